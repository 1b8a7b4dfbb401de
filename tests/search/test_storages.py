"""Where a study's trials live: the journal file (default of a new study directory), SQLite
(older directories, storage="sqlite"), a storage URL or an Optuna storage object; a URL is
never a folder and a password never reaches a file, a file name or a message. Sampler state,
heartbeats and stale-trial recovery on each storage."""

from __future__ import annotations

import gc
import json
import os
import threading
import time
from pathlib import Path

import optuna
import pytest

from gradhpo.config import ConfigError
from gradhpo.search import create_study, load_optuna_study, load_study
from gradhpo.search import study as study_module
from gradhpo.search.study import mask_password

optuna.logging.set_verbosity(optuna.logging.WARNING)

SECRET = "s3cr3t-pw"
PG_URL = f"postgresql://alice:{SECRET}@127.0.0.1:1/hpo"


def point(trial: optuna.trial.Trial) -> float:
    return trial.suggest_float("x", -1.0, 1.0) ** 2


def _all_names(root: Path) -> list[str]:
    return [str(p) for p in root.rglob("*")] + [str(root)]


def _all_text(root: Path) -> str:
    return "\n".join(
        p.read_text(encoding="utf-8", errors="replace") for p in root.rglob("*") if p.is_file()
    )


# ---------------------------------------------------------------------- URLs and passwords
@pytest.mark.parametrize(
    "directory",
    [
        "sqlite:///study.db",
        Path("sqlite:///study.db"),  # a Path collapses the slashes: still a URL
        PG_URL,
        "mysql+pymysql://bob:pw@localhost/db",
    ],
)
@pytest.mark.parametrize("opener", [create_study, load_study])
def test_a_url_as_directory_is_a_clear_error_not_a_folder(
    tmp_path: Path, monkeypatch, directory, opener
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="looks like a storage URL; pass it as storage=") as exc:
        opener(directory)
    assert SECRET not in str(exc.value) and ":pw@" not in str(exc.value)
    assert list(tmp_path.iterdir()) == []  # no 'sqlite:' or 'postgresql:' folder


def test_sqlite_url_storage_keeps_the_directory_for_metadata_and_checkpoints(
    tmp_path: Path,
) -> None:
    url = f"sqlite:///{tmp_path / 'elsewhere.db'}"
    study = create_study(tmp_path / "s", storage=url, sampler="random", pruner=None, seed=1)
    study.optimize(point, n_trials=3)
    assert (tmp_path / "elsewhere.db").is_file()
    names = {p.name for p in (tmp_path / "s").iterdir()}
    assert "study.json" in names and "sampler_state.bin" in names
    assert not {"study.journal", "study.db"} & names
    meta = json.loads((tmp_path / "s" / "study.json").read_text())
    assert meta["storage"] == {"kind": "url", "url": url, "password": False}
    # No password in the URL: load_study finds it in study.json.
    again = load_study(tmp_path / "s")
    again.optimize(point, n_trials=5)
    assert len(again.finished_trials()) == 5
    assert again.trial_dir(4).parent == tmp_path / "s" / "trials"
    assert len(load_optuna_study(tmp_path / "s").trials) == 5


def test_a_url_password_is_masked_in_study_json_and_needed_again_to_load(
    tmp_path: Path, monkeypatch
) -> None:
    # No database server here: the URL opens an in-memory storage (the URL handling is ours).
    backing = optuna.storages.InMemoryStorage()
    opened = []
    monkeypatch.setattr(
        study_module, "_url_storage", lambda url, **_: opened.append(url) or backing
    )
    study = create_study(tmp_path / "s", storage=PG_URL, sampler="random", pruner=None)
    study.optimize(point, n_trials=2)
    assert opened == [PG_URL]
    meta = json.loads((tmp_path / "s" / "study.json").read_text())
    assert meta["storage"] == {
        "kind": "url",
        "url": "postgresql://alice:***@127.0.0.1:1/hpo",
        "password": True,
    }
    assert SECRET not in _all_text(tmp_path) and SECRET not in "".join(_all_names(tmp_path))
    assert SECRET not in repr(study) and SECRET not in study.dashboard_hint
    with pytest.raises(ValueError, match="password is not stored: pass storage=") as exc:
        load_study(tmp_path / "s")
    assert SECRET not in str(exc.value) and "alice:***@" in str(exc.value)
    again = load_study(tmp_path / "s", storage=PG_URL)
    assert len(again.finished_trials()) == 2


def test_an_unreachable_database_is_a_value_error_without_the_password(tmp_path: Path) -> None:
    # Port 1 on the loopback: refused at once (or the driver is not installed): either way one
    # ValueError that names the masked URL, and no folder made.
    with pytest.raises(ValueError, match="cannot open it") as exc:
        create_study(tmp_path / "s", storage=PG_URL)
    assert SECRET not in str(exc.value) and "alice:***@127.0.0.1" in str(exc.value)
    assert exc.value.__cause__ is None and exc.value.__context__ is None  # no driver traceback
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize(
    ("url", "masked"),
    [
        (PG_URL, "postgresql://alice:***@127.0.0.1:1/hpo"),
        ("mysql+pymysql://u:p@ss:w@host/db", "mysql+pymysql://u:***@host/db"),
        ("postgresql://u@host/db", "postgresql://u@host/db"),
        ("postgresql://host/db?user=u&password=pw", "postgresql://host/db?user=u&password=***"),
        ("sqlite:///x.db", "sqlite:///x.db"),
    ],
)
def test_mask_password(url: str, masked: str) -> None:
    assert mask_password(url) == masked


@pytest.mark.parametrize("storage", [123, "bogus", "journal.db", ["sqlite"]])
def test_a_bad_storage_argument_names_the_field_and_value(tmp_path: Path, storage) -> None:
    with pytest.raises(
        ValueError, match=r"storage must be .*got " + repr(storage).replace("[", r"\[")
    ):
        create_study(tmp_path / "s", storage=storage)
    assert not (tmp_path / "s").exists()


# ---------------------------------------------------------------------- embedded files
def test_a_new_directory_gets_a_journal_and_old_sqlite_directories_still_open(
    tmp_path: Path,
) -> None:
    new = create_study(tmp_path / "new", sampler="random", pruner=None)
    new.optimize(point, n_trials=2)
    assert (tmp_path / "new" / "study.journal").is_file()
    assert not (tmp_path / "new" / "study.db").exists()
    assert "study.journal" in new.dashboard_hint

    old = create_study(tmp_path / "old", storage="sqlite", sampler="random", pruner=None)
    old.optimize(point, n_trials=2)
    assert (tmp_path / "old" / "study.db").is_file()
    assert not (tmp_path / "old" / "study.journal").exists()
    # A directory from before the storage record: study.json without "storage".
    meta_path = tmp_path / "old" / "study.json"
    meta = json.loads(meta_path.read_text())
    del meta["storage"]
    meta_path.write_text(json.dumps(meta))
    del old
    gc.collect()
    reopened = load_study(tmp_path / "old")
    assert reopened.storage_record["kind"] == "sqlite"
    reopened.optimize(point, n_trials=4)
    assert len(reopened.finished_trials()) == 4
    assert len(load_optuna_study(tmp_path / "new").trials) == 2


def test_a_directory_without_its_storage_file_is_a_config_error(tmp_path: Path) -> None:
    create_study(tmp_path / "s", sampler="random", pruner=None)
    (tmp_path / "s" / "study.journal").unlink()
    with pytest.raises(ConfigError, match="no study.journal"):
        load_study(tmp_path / "s")
    with pytest.raises(ConfigError, match="not a study directory"):
        load_study(tmp_path / "nothing")


# ---------------------------------------------------------------------- every storage
def _storage(kind: str, tmp_path: Path):
    if kind == "memory":
        return optuna.storages.InMemoryStorage()
    if kind == "sqlite-url":
        return f"sqlite:///{tmp_path / 'url.db'}"
    return kind  # "journal" / "sqlite": files in the directory


KINDS = ["journal", "sqlite", "memory", "sqlite-url"]


@pytest.mark.parametrize("kind", KINDS)
def test_sampler_state_survives_a_restart_on_every_storage(tmp_path: Path, kind: str) -> None:
    (tmp_path / "w").mkdir()
    (tmp_path / "p").mkdir()
    whole = create_study(
        tmp_path / "whole", storage=_storage(kind, tmp_path / "w"), sampler="random", seed=5
    )
    whole.optimize(point, n_trials=6)
    storage = _storage(kind, tmp_path / "p")
    part = create_study(tmp_path / "part", storage=storage, sampler="random", seed=5)
    part.optimize(point, n_trials=3)
    del part
    gc.collect()
    again = load_study(tmp_path / "part", storage=storage if kind == "memory" else None)
    again.optimize(point, n_trials=6)
    assert [t.params for t in again.finished_trials()] == [
        t.params for t in whole.finished_trials()
    ]


@pytest.mark.parametrize("kind", KINDS)
def test_heartbeats_and_stale_trial_recovery_on_every_storage(tmp_path: Path, kind: str) -> None:
    storage = _storage(kind, tmp_path)
    study = create_study(tmp_path / "s", storage=storage, sampler="random", pruner=None)
    trial = study.ask()
    trial.suggest_float("x", -1.0, 1.0)
    driver = study.optuna._storage.get_trial(trial._trial_id).system_attrs["gradhpo:driver"]
    assert driver["pid"] == os.getpid() and driver["token"] == study.token
    study.heartbeat(trial)
    beat = study.optuna._storage.get_trial(trial._trial_id).system_attrs["gradhpo:driver"]
    assert beat["beat"] >= driver["beat"]
    reopen = storage if kind == "memory" else None
    # A live driver's trial is not stale, even for another Study object of this process.
    other = load_study(tmp_path / "s", storage=reopen)
    assert other.recover_stale_trials() == []
    # Its driver object gone: stale at once (same host, same pid, unknown token).
    del study
    gc.collect()
    assert other.recover_stale_trials() == [0]
    dead = other.optuna.trials[0]
    assert dead.state.name == "FAIL" and dead.system_attrs["gradhpo:retried"] is True
    other.optimize(point, n_trials=1)
    (retry,) = other.finished_trials()
    assert retry.params == dead.params and retry.user_attrs["gradhpo:resume_from"] == 0
    # A heartbeat older than stale_after makes a trial stale, even of a live driver.
    live = load_study(tmp_path / "s", storage=reopen)
    trial = live.ask()
    storage_obj = live.optuna._storage
    old = {**live._driver, "beat": time.time() - 60.0}
    storage_obj.set_trial_system_attr(trial._trial_id, "gradhpo:driver", old)
    assert load_study(tmp_path / "s", storage=reopen).recover_stale_trials() == []
    late = load_study(tmp_path / "s", storage=reopen, stale_after=30.0)
    assert late.recover_stale_trials() == [trial.number]


def test_two_drivers_on_one_journal_give_exactly_n_trials(tmp_path: Path) -> None:
    create_study(tmp_path / "s", sampler="random", pruner=None, seed=0)
    a = load_study(tmp_path / "s")  # two storage objects on one file, as two processes have
    b = load_study(tmp_path / "s")
    threads = [threading.Thread(target=s.optimize, args=(point, 9)) for s in (a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    done = load_study(tmp_path / "s").finished_trials()
    assert len(done) == 9 and len({t.number for t in done}) == 9


def test_a_study_name_taken_in_a_shared_database(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    first = create_study(tmp_path / "a", storage=url, name="hpo", sampler="random", pruner=None)
    first.optimize(point, n_trials=2)
    with pytest.raises(ValueError, match="already holds a study named 'hpo'; pass load_if_exists"):
        create_study(tmp_path / "b", storage=url, name="hpo", sampler="random", pruner=None)
    assert not (tmp_path / "b").exists()
    second = create_study(
        tmp_path / "b", storage=url, name="hpo", sampler="random", pruner=None, load_if_exists=True
    )
    assert len(second.finished_trials()) == 2 and (tmp_path / "b" / "study.json").is_file()
    with pytest.raises(ValueError, match=r"has directions \['maximize'\], not \['minimize'\]"):
        create_study(
            tmp_path / "c", storage=url, name="hpo", direction="minimize", load_if_exists=True
        )


def test_sampler_state_is_replaced_whole_and_an_unreadable_one_is_reported(
    tmp_path: Path,
) -> None:
    from gradhpo.search.samplers import (
        load_sampler_state,
        make_sampler,
        sampler_rng_states,
        save_sampler_state,
    )

    study = create_study(tmp_path / "s", sampler="random", pruner=None, seed=3)
    study.optimize(point, n_trials=5)
    assert (tmp_path / "s" / "sampler_state.bin").is_file()
    state = tmp_path / "s" / "sampler_state.json"  # the helpers' format: one JSON file
    save_sampler_state(study.sampler, state)
    # No leftovers of the state's writes (the journal lock keeps its own record while open).
    assert not [
        p
        for p in state.parent.iterdir()
        if p.name.endswith(".tmp") and not p.name.startswith(".study.journal.lock.")
    ]
    fresh = make_sampler("random", seed=3)
    assert load_sampler_state(fresh, state)
    assert sampler_rng_states(fresh) != sampler_rng_states(make_sampler("random", seed=3))
    state.write_text("{")
    with pytest.warns(UserWarning, match="unreadable sampler state"):
        assert not load_sampler_state(make_sampler("random", seed=3), state)
    # A state file of the older format (a plain list of keys) still loads.
    legacy = make_sampler("random", seed=99)
    state.write_text(json.dumps({"sampler": "RandomSampler", "rng": sampler_rng_states(legacy)}))
    restored = make_sampler("random", seed=0)
    assert load_sampler_state(restored, state)
    assert sampler_rng_states(restored) == sampler_rng_states(legacy)


@pytest.mark.parametrize("kind", ["journal", "sqlite"])
@pytest.mark.parametrize("damage", ["garbage", "truncated", "zero-bytes", "text-line"])
def test_a_damaged_storage_file_is_one_config_error_and_left_as_it_is(
    tmp_path: Path, kind: str, damage: str
) -> None:
    """Optuna would make a new database of an empty SQLite file, and read a journal up to
    its damage and then append after it (unreadable from then on)."""
    from gradhpo.search.study import JOURNAL_FILE, SQLITE_FILE

    study = create_study(tmp_path / "s", storage=kind, sampler="random", pruner=None, seed=0)
    study.optimize(point, n_trials=3)
    del study
    gc.collect()
    path = tmp_path / "s" / (JOURNAL_FILE if kind == "journal" else SQLITE_FILE)
    data = path.read_bytes()
    damaged = {
        "garbage": b"\x00\x01 not a storage file \xff",
        "truncated": data[: len(data) // 2],
        "zero-bytes": b"",
        "text-line": data + b"this line is no record\n",
    }[damage]
    if kind == "sqlite" and damage == "text-line":
        pytest.skip("SQLite ignores bytes past its last page: still a readable database")
    path.write_bytes(damaged)
    listing = sorted(p.name for p in path.parent.iterdir())
    with pytest.raises(ConfigError, match=path.name) as info:
        load_study(tmp_path / "s")
    assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match=path.name):
        load_optuna_study(tmp_path / "s")
    assert path.read_bytes() == damaged
    assert sorted(p.name for p in path.parent.iterdir()) == listing
