"""Optuna's gRPC storage proxy: ``gradhpo storage-proxy`` serves one study database, drivers use
``storage="grpc://host:port"`` and together run exactly N trials; the study directory records
the URL so ``load_study`` reopens it; every bad value is one clear error."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import optuna
import pytest

from gradhpo.search import create_study, load_study
from gradhpo.search.study import is_retried, open_storage_url

optuna.logging.set_verbosity(optuna.logging.WARNING)


def point(trial: optuna.trial.Trial) -> float:
    return trial.suggest_float("x", -1.0, 1.0) ** 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _default_sigint() -> None:
    """In the child before exec: SIGINT back to its default. A suite started as a background
    job of a non-interactive shell inherits SIGINT ignored, and Python then installs no
    KeyboardInterrupt handler: the proxy would never see the test's Ctrl-C."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _cli(*args: str, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "gradhpo.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        preexec_fn=_default_sigint,
        **kwargs,
    )


@pytest.fixture
def proxy(tmp_path: Path):
    """``gradhpo storage-proxy`` over an SQLite database in tmp_path, on a free port: yields
    (grpc URL, database URL); stopped with Ctrl-C (SIGINT) after the test."""
    db_url = f"sqlite:///{tmp_path / 'hpo.db'}"
    port = _free_port()
    process = _cli("storage-proxy", "--storage", db_url, "--port", str(port))
    url = f"grpc://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:  # ready once a client's first call gets through
        try:
            open_storage_url(url)
            break
        except ValueError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                pytest.fail(f"the proxy did not start: {process.communicate()}")
            time.sleep(0.2)
    yield url, db_url
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=30)
    assert process.returncode == 130, err
    assert f"serving {db_url} as grpc://127.0.0.1:{port}" in out


def test_drivers_through_the_proxy_give_exactly_n_trials_in_the_database(
    tmp_path: Path, proxy
) -> None:
    url, db_url = proxy
    create_study(tmp_path / "s", storage=url, sampler="random", pruner=None, seed=0)
    # Two drivers, each with its own proxy client, as two machines have; the directory
    # records the URL, so load_study needs no storage argument.
    drivers = [load_study(tmp_path / "s") for _ in range(2)]
    threads = [threading.Thread(target=d.optimize, args=(point, 9)) for d in drivers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    done = load_study(tmp_path / "s").finished_trials()
    assert len(done) == 9 and len({t.number for t in done}) == 9
    # The trials are in the database behind the proxy, not in the directory (a driver that
    # lost the race for the last trial leaves a surplus one, marked and not counted).
    direct = optuna.load_study(study_name=drivers[0].name, storage=db_url)
    counted = [t.number for t in direct.trials if t.state.is_finished() and not is_retried(t)]
    assert sorted(counted) == sorted(t.number for t in done)
    assert not (tmp_path / "s" / "study.journal").exists()
    assert not (tmp_path / "s" / "study.db").exists()


def test_sampler_state_and_stale_trial_recovery_work_through_the_proxy(
    tmp_path: Path, proxy
) -> None:
    url, _ = proxy
    whole = create_study(tmp_path / "whole", sampler="random", seed=5)
    whole.optimize(point, n_trials=6)
    part = create_study(tmp_path / "part", storage=url, sampler="random", seed=5)
    part.optimize(point, n_trials=3)
    trial = part.ask()  # a driver dies with a trial running
    trial.suggest_float("x", -1.0, 1.0)
    del part, trial
    import gc

    gc.collect()
    again = load_study(tmp_path / "part")
    assert again.recover_stale_trials() == [3]
    again.optimize(point, n_trials=6)
    finished = [t for t in again.finished_trials() if t.state.name == "COMPLETE"]
    assert [t.params for t in finished] == [t.params for t in whole.finished_trials()]


@pytest.mark.parametrize(
    "url, message",
    [
        ("grpc://", "a gRPC storage URL is grpc://HOST"),
        ("grpc://127.0.0.1:99999", "a gRPC storage URL is grpc://HOST"),
        ("grpc://127.0.0.1:x", "a gRPC storage URL is grpc://HOST"),
        ("grpc://127.0.0.1:5/db", "nothing after it"),
    ],
)
def test_a_malformed_grpc_url_is_a_clear_error(tmp_path: Path, url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        create_study(tmp_path / "s", storage=url)
    assert not (tmp_path / "s").exists()


def test_an_unreachable_proxy_is_a_clear_error_and_nothing_is_made(tmp_path: Path) -> None:
    url = f"grpc://127.0.0.1:{_free_port()}"
    with pytest.raises(ValueError, match=r"cannot reach the gRPC storage proxy"):
        create_study(tmp_path / "s", storage=url)
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize(
    "args, field",
    [
        (["--port", "0"], "--port"),
        (["--port", "70000"], "--port"),
        (["--storage", "grpc://127.0.0.1:5"], "--storage"),
        (["--storage", "not-a-url"], "--storage"),
        (["--storage", "postgresql://u:secret@127.0.0.1:1/db"], "storage"),
        ([], "--storage"),
    ],
)
def test_storage_proxy_bad_input_is_one_line_and_exit_2(args: list[str], field: str) -> None:
    env = {k: v for k, v in os.environ.items() if k != "GRADHPO_STORAGE"}
    done = subprocess.run(
        [sys.executable, "-m", "gradhpo.cli", "storage-proxy", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gradhpo: error: ") and field in lines[0]
    assert "secret" not in done.stderr and "Traceback" not in done.stderr


def test_a_port_in_use_is_one_line_and_exit_2(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "gradhpo.cli",
                "storage-proxy",
                "--storage",
                f"sqlite:///{tmp_path / 'x.db'}",
                "--port",
                str(port),
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "--port: cannot listen on" in lines[0], done.stderr
