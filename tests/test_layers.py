"""The package's layers point down: a module imports nothing from a layer above its own,
and nothing imports a private name of another module. Read from the source with ``ast``
(imports inside functions included), so a new upward import fails here, not in a review."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: Bottom to top; a module may import from its own layer and the layers before it.
LAYERS: list[tuple[str, ...]] = [
    ("gradhpo.files", "gradhpo.config", "gradhpo.tensorboard_logger", "gradhpo.execution"),
    ("gradhpo.hyper",),
    ("gradhpo.optim",),
    ("gradhpo.models",),
    ("gradhpo.data",),
    ("gradhpo.run",),
    ("gradhpo.search",),
    ("gradhpo.pbt",),
    ("gradhpo.testing",),
    ("gradhpo.jobs",),
    ("gradhpo.integrations",),
    ("gradhpo.report",),
    ("gradhpo.cli", "gradhpo.__main__"),
]


def layer_of(module: str) -> int | None:
    for i, prefixes in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return i
    return None


def modules() -> dict[str, Path]:
    found = {}
    # models/ at the top of the repository is installed as gradhpo.models
    for root, package in (("gradhpo", ("gradhpo",)), ("models", ("gradhpo", "models"))):
        for path in (ROOT / root).rglob("*.py"):
            parts = (*package, *path.relative_to(ROOT / root).with_suffix("").parts)
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


def imports_of(path: Path, module: str) -> list[tuple[str, str | None]]:
    """(imported module, imported name) for every import in the file."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out: list[tuple[str, str | None]] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out += [(a.name, None) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, *([node.module] if node.module else [])])
            out += [(base, a.name) for a in node.names]
    return out


def test_every_module_has_a_layer() -> None:
    missing = [m for m in modules() if m not in ("gradhpo",) and layer_of(m) is None]
    assert not missing, f"modules without a layer in tests/test_layers.py: {missing}"


def test_imports_point_down_and_use_public_names() -> None:
    found = modules()
    upward, private = [], []
    for module, path in found.items():
        mine = layer_of(module)
        if mine is None:
            continue
        for target, name in imports_of(path, module):
            theirs = layer_of(target)
            if theirs is not None and theirs > mine:
                upward.append(f"{module} imports {target}")
            same_module = target == module or module.startswith(target + ".")
            if (
                name
                and name.startswith("_")
                and not name.startswith("__")
                and layer_of(target) is not None
                and not same_module
            ):
                private.append(f"{module} imports {target}.{name}")
    assert not upward, "imports from a higher layer:\n" + "\n".join(upward)
    assert not private, "private cross-module imports:\n" + "\n".join(private)


def test_every_package_is_installed_and_models_only_under_gradhpo() -> None:
    """pyproject.toml lists every package (a folder of the package with an __init__.py) and
    maps models/ to gradhpo.models: no top-level ``models`` to shadow a user's own."""
    tomllib = pytest.importorskip("tomllib")
    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]
    listed = set(config["setuptools"]["packages"])
    on_disk = {
        ".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "gradhpo").rglob("__init__.py")
    }
    assert on_disk | {"gradhpo.models"} == listed
    assert config["setuptools"]["package-dir"] == {"gradhpo.models": "models"}


def test_a_users_own_models_package_does_not_break_gradhpo(tmp_path: Path) -> None:
    """A project with its own ``models/`` package imports gradhpo and its own models side by
    side (gradhpo's model families are ``gradhpo.models``)."""
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "__init__.py").write_text("MARK = 'user'\n")
    code = (
        "import gradhpo.run, gradhpo.models, models; "
        "assert models.MARK == 'user'; "
        "assert gradhpo.models.build_model({'name': 'mlp'}, (4,), 3) is not None"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
