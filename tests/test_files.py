"""gradhpo.files: the one atomic write, and the two-slot record file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from gradhpo.files import (
    SlotFile,
    atomic_write,
    read_slot_file,
    write_json,
    write_text,
    write_torch,
)


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


def _slot_of(path: Path, payload: bytes) -> int:
    """Which slot (0 or 1) holds ``payload``."""
    data = path.read_bytes()
    half = len(data) // 2
    return 0 if payload in data[:half] else 1


def test_slot_file_alternates_slots_in_place_and_reads_back_the_newest(tmp_path: Path) -> None:
    path = tmp_path / "state.bin"
    slots = SlotFile(path)
    slots.write(b"first")
    inode = path.stat().st_ino
    assert read_slot_file(path) == b"first"
    used = []
    for k in range(5):
        payload = f"record {k}".encode()
        slots.write(payload)
        assert read_slot_file(path) == payload
        used.append(_slot_of(path, payload))
    assert used in ([1, 0, 1, 0, 1], [0, 1, 0, 1, 0])  # never the slot of the record before
    assert path.stat().st_ino == inode  # written in place: no new file per record
    assert [p.name for p in tmp_path.iterdir()] == ["state.bin"]
    slots.close()


def test_a_torn_record_leaves_the_one_before(tmp_path: Path) -> None:
    """What a kill in the middle of a write leaves: the newest slot's bytes half new, half
    old. Its checksum fails and the record before it is read back; the next writer (a new
    process) continues the sequence and writes over the torn slot, not the good one."""
    path = tmp_path / "state.bin"
    first = SlotFile(path)
    first.write(b"A" * 300)
    first.write(b"B" * 300)
    torn_slot = _slot_of(path, b"B" * 300)
    data = bytearray(path.read_bytes())
    start = torn_slot * (len(data) // 2)
    data[start + 100 : start + 200] = b"C" * 100  # as if the write stopped half way
    path.write_bytes(bytes(data))
    first.close()
    assert read_slot_file(path) == b"A" * 300
    second = SlotFile(path)
    second.write(b"D" * 300)
    assert _slot_of(path, b"D" * 300) == torn_slot
    assert read_slot_file(path) == b"D" * 300
    second.close()


def test_slot_file_grows_and_follows_a_replaced_file(tmp_path: Path) -> None:
    path = tmp_path / "state.bin"
    slots = SlotFile(path)
    slots.write(b"small")
    size = path.stat().st_size
    big = bytes(range(256)) * 40  # 10 KiB: more than a slot holds
    slots.write(big)
    assert path.stat().st_size > size and read_slot_file(path) == big
    slots.write(b"after")
    assert read_slot_file(path) == b"after"
    # Someone else replaced the file (another writer's growth): the next write goes to the
    # new file, not to the descriptor of the old one.
    other = SlotFile(path)
    other.write(big + big)
    slots.write(b"mine")
    assert read_slot_file(path) == b"mine"
    path.unlink()
    slots.write(b"again")  # removed: created afresh
    assert read_slot_file(path) == b"again"
    slots.close()
    other.close()


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda d: b"", "empty file"),
        (lambda d: b"{not: a slot file}", "not a gradhpo two-slot record file"),
        (lambda d: d[: len(d) // 2], "cut off or damaged"),
        (lambda d: d.replace(b"x" * 50, b"y" * 50), "no complete record"),
    ],
)
def test_a_damaged_slot_file_says_what_is_wrong(tmp_path: Path, damage, message: str) -> None:
    path = tmp_path / "state.bin"
    slots = SlotFile(path)
    slots.write(b"x" * 50)
    slots.close()
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(ValueError, match=message):
        read_slot_file(path)
