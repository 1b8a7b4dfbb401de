"""README.md's code blocks, run verbatim.

* every fenced ``python`` block runs on its own (a fresh namespace, so each block must hold
  its own imports, as it would when pasted alone) in a temporary working directory;
* every ``bash`` block runs with ``bash -e`` there, the installed ``gradhpo`` on ``PATH``;
* every ``yaml`` block is a config fragment: its sections replace those of the shipped
  ``experiments/configs/digits_search.yaml`` and the result must pass the checks of
  ``gradhpo tune`` (validation and the dry run of its sampler and pruner).

A block that must not run here (the main job, the whole suite) is marked in README.md by the
line before it: ``<!-- readme-test: skip (reason) -->``. Every other block runs, and a block
in a language this file cannot run fails :func:`test_every_block_runs_or_is_marked`."""

from __future__ import annotations

import contextlib
import io
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from gradhpo.config import load_yaml
from gradhpo.jobs.tune import dry_run_search, validate_tune_config

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
FENCE = re.compile(r"^```(\S*)\s*$")
SKIP = re.compile(r"^<!-- readme-test: skip \((?P<reason>.+)\) -->$")
LANGUAGES = ("python", "bash", "yaml")


@dataclass(frozen=True)
class Block:
    line: int  # of the opening fence, 1-based
    language: str
    source: str
    skip: str | None  # the reason of a skip marker


def read_blocks(text: str) -> tuple[list[Block], list[int]]:
    """The fenced blocks of ``text`` and the lines of skip markers that precede no block."""
    lines = text.splitlines()
    blocks: list[Block] = []
    markers: dict[int, str] = {}
    i = 0
    while i < len(lines):
        marker = SKIP.match(lines[i].strip())
        if marker:
            markers[i] = marker["reason"]
        fence = FENCE.match(lines[i])
        if fence:
            end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
            before = i - 1
            while before >= 0 and not lines[before].strip():
                before -= 1
            reason = markers.pop(before, None)
            blocks.append(Block(i + 1, fence[1], "\n".join(lines[i + 1 : end]) + "\n", reason))
            i = end
        i += 1
    return blocks, [n + 1 for n in markers]


BLOCKS, DANGLING = read_blocks(README.read_text(encoding="utf-8"))
TO_RUN = [b for b in BLOCKS if b.skip is None]


def test_every_block_runs_or_is_marked() -> None:
    assert not DANGLING, f"README.md: skip markers before no code block, lines {DANGLING}"
    unknown = [(b.line, b.language) for b in TO_RUN if b.language not in LANGUAGES]
    assert not unknown, (
        f"README.md blocks in a language this test cannot run (line, language): {unknown}; "
        "run them here or mark them <!-- readme-test: skip (reason) -->"
    )
    # The examples a reader copies first run here, and the skipped ones say why.
    assert sum(b.language == "python" for b in TO_RUN) >= 3
    assert all(b.skip.strip() for b in BLOCKS if b.skip is not None)


def test_the_reader_finds_blocks_and_markers() -> None:
    """The parser itself: a marked block, an unmarked one, a dangling marker."""
    text = (
        "<!-- readme-test: skip (slow) -->\n```bash\nmake run\n```\n\n"
        "```python\nprint(1)\n```\n<!-- readme-test: skip (nothing) -->\n\ntext\n"
    )
    blocks, dangling = read_blocks(text)
    assert blocks == [
        Block(2, "bash", "make run\n", "slow"),
        Block(6, "python", "print(1)\n", None),
    ]
    assert dangling == [9]


@pytest.mark.parametrize("block", TO_RUN, ids=[f"{b.language}-line{b.line}" for b in TO_RUN])
def test_readme_block(block: Block, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    if block.language == "python":
        out = io.StringIO()
        code = compile(block.source, f"README.md:{block.line}", "exec")
        with contextlib.redirect_stdout(out):
            exec(code, {"__name__": "__readme__"})  # noqa: S102 - the README's own code
        if "print(" in block.source:
            assert out.getvalue().strip(), "the block prints nothing"
    elif block.language == "bash":
        env = dict(
            os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
        )
        done = subprocess.run(
            ["bash", "-e", "-u", "-o", "pipefail", "-c", block.source],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, f"README.md:{block.line}\n{done.stdout}\n{done.stderr}"
        assert done.stdout.strip()
    elif block.language == "yaml":
        fragment = yaml.safe_load(block.source)
        assert isinstance(fragment, dict) and fragment
        config = load_yaml(ROOT / "experiments" / "configs" / "digits_search.yaml")
        config.update(fragment)
        resolved, space = validate_tune_config(config)
        dry_run_search(resolved, space)
    else:  # pragma: no cover - test_every_block_runs_or_is_marked names it
        pytest.fail(f"README.md:{block.line}: no runner for {block.language!r}")
