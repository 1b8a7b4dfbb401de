"""gradhpo.files: the one atomic write."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from gradhpo.files import atomic_write, write_json, write_text, write_torch


def test_target_appears_only_on_clean_exit(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "state.bin"
    with atomic_write(target) as fh:
        fh.write(b"abc")
        assert not target.exists()  # not visible while being written
    assert target.read_bytes() == b"abc"
    assert [p.name for p in target.parent.iterdir()] == ["state.bin"]


def test_error_keeps_old_file_and_removes_temp(tmp_path: Path) -> None:
    target = write_text(tmp_path / "config.yaml", "old\n")
    with pytest.raises(RuntimeError, match="boom"), atomic_write(target, "w") as fh:
        fh.write("new, half written")
        raise RuntimeError("boom")
    assert target.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["config.yaml"]


def test_json_and_torch_round_trip(tmp_path: Path) -> None:
    write_json(tmp_path / "a.json", {"x": [1, 2]})
    assert json.loads((tmp_path / "a.json").read_text()) == {"x": [1, 2]}
    write_torch(tmp_path / "w.pt", {"w": torch.arange(3)})
    loaded = torch.load(tmp_path / "w.pt", weights_only=True)
    assert torch.equal(loaded["w"], torch.arange(3))


def test_bad_mode_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="'a'"), atomic_write(tmp_path / "x", "a"):
        pass
