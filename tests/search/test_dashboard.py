"""optuna-dashboard reads a gradhpo study (issue 15: "optuna-dashboard on the study", the
``dashboard`` extra): the study's journal and SQLite storages are plain Optuna storages, and
the dashboard's own API lists the study with its trials and values."""

from __future__ import annotations

import io
import json
from pathlib import Path

import optuna
import pytest
from optuna.storages.journal import JournalFileBackend

from gradhpo.search import create_study

dashboard = pytest.importorskip("optuna_dashboard")


def _get(app, path: str) -> dict:
    status: list[str] = []
    environ = {
        "REQUEST_METHOD": "GET",
        "PATH_INFO": path,
        "QUERY_STRING": "",
        "SERVER_NAME": "127.0.0.1",
        "SERVER_PORT": "0",
        "wsgi.input": io.BytesIO(),
        "wsgi.url_scheme": "http",
        "wsgi.errors": io.StringIO(),
    }
    body = b"".join(app(environ, lambda s, headers, exc_info=None: status.append(s)))
    assert status and status[0].startswith("200"), status
    return json.loads(body)


@pytest.mark.parametrize("storage", ["journal", "sqlite"])
def test_dashboard_lists_the_study_and_its_trials(tmp_path: Path, storage: str) -> None:
    study = create_study(
        tmp_path / "s",
        name="dash",
        storage=storage,
        sampler="random",
        pruner=None,
        metric="val_loss",
    )
    study.optimize(lambda trial: (trial.suggest_float("x", -1, 1) - 0.2) ** 2, n_trials=4)
    if storage == "journal":
        backend = JournalFileBackend(str(tmp_path / "s" / "study.journal"))
        opened = optuna.storages.JournalStorage(backend)
    else:
        opened = f"sqlite:///{tmp_path / 's' / 'study.db'}"
    app = dashboard.wsgi(opened)
    studies = _get(app, "/api/studies")["study_summaries"]
    (summary,) = [s for s in studies if s["study_name"] == "dash"]
    assert summary["directions"] == ["minimize"]
    detail = _get(app, f"/api/studies/{summary['study_id']}")
    values = sorted(t["values"][0] for t in detail["trials"] if t["state"] == "Complete")
    assert len(values) == 4 and values[0] == pytest.approx(study.best_value)
