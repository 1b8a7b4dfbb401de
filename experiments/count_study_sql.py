"""SQL statements and commits per trivial trial: plain Optuna against a gradhpo Study, on one
database (a throwaway PostgreSQL server started here, fsync on, or ``--url``).

Wall time on a database server moves by several milliseconds per trial between runs (the
server's fsyncs); the number of statements and commits per trial does not, so this is the
figure that shows what a change to the study's storage traffic did. Each side runs 20 trials
to warm up, then ``--trials`` counted ones (a RandomSampler, two float parameters).

    python experiments/count_study_sql.py --trials 100
"""

from __future__ import annotations

import argparse
import collections
import re
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import optuna
from sqlalchemy import event

from gradhpo.search import create_study

optuna.logging.set_verbosity(optuna.logging.WARNING)


def objective(trial: optuna.trial.Trial) -> float:
    return trial.suggest_float("x", 0, 1) + trial.suggest_float("y", 0, 1)


def _engine(storage: Any) -> Any:
    """The SQLAlchemy engine under a storage (RetryingStorage, Optuna's cache, RDBStorage)."""
    for attr in ("backend", "_backend"):
        storage = vars(storage).get(attr, storage)
    return storage.engine


def count(engine: Any, run: Any, trials: int) -> dict[str, Any]:
    statements: collections.Counter[str] = collections.Counter()
    commits = [0]

    def on_statement(conn: Any, cursor: Any, statement: str, *rest: Any) -> None:
        statements[" ".join(statement.split())[:60]] += 1

    def on_commit(conn: Any) -> None:
        commits[0] += 1

    event.listen(engine, "before_cursor_execute", on_statement)
    event.listen(engine, "commit", on_commit)
    start = time.perf_counter()
    try:
        run(trials)
    finally:
        event.remove(engine, "before_cursor_execute", on_statement)
        event.remove(engine, "commit", on_commit)
    return {
        "ms_per_trial": (time.perf_counter() - start) * 1000 / trials,
        "statements_per_trial": sum(statements.values()) / trials,
        "commits_per_trial": commits[0] / trials,
        "by_statement": {k: v / trials for k, v in statements.most_common()},
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=100)
    parser.add_argument("--url", default=None, help="a database URL (default: start PostgreSQL)")
    args = parser.parse_args(argv)
    server = None
    url = args.url
    if url is None:
        from gradhpo.testing.postgres import PostgresServer

        server = PostgresServer(durable=True)
        url = server.create_database("count")
    try:
        plain_storage = optuna.storages.RDBStorage(url)
        plain = optuna.create_study(
            storage=plain_storage,
            sampler=optuna.samplers.RandomSampler(seed=0),
            study_name=f"plain-{uuid.uuid4().hex[:8]}",
        )
        ours = create_study(
            Path(tempfile.mkdtemp()) / "study",
            storage=url,
            name=f"ours-{uuid.uuid4().hex[:8]}",
            sampler="random",
            pruner=None,
            seed=0,
        )
        sides = {
            "plain Optuna": (plain_storage.engine, lambda n: plain.optimize(objective, n_trials=n)),
            "gradhpo Study": (
                _engine(ours.optuna._storage),
                lambda n: ours.optimize(objective, n_trials=n, n_trials_mode="more"),
            ),
        }
        results = {}
        for name, (engine, run) in sides.items():
            run(20)
            results[name] = count(engine, run, args.trials)
        for name, r in results.items():
            print(
                f"{name}: {r['statements_per_trial']:.1f} statements, "
                f"{r['commits_per_trial']:.2f} commits, {r['ms_per_trial']:.1f} ms per trial"
            )
        a, b = (results[k]["by_statement"] for k in sides)
        for key in sorted(set(a) | set(b)):
            if a.get(key, 0) != b.get(key, 0):
                print(
                    f"  {a.get(key, 0):5.2f} -> {b.get(key, 0):5.2f}  {re.sub(' AS .*', '', key)}"
                )
    finally:
        if server is not None:
            server.close()


if __name__ == "__main__":
    main()
