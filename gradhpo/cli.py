"""The ``gradhpo`` command.

User mistakes (bad config, unknown model, missing data files, damaged run directories...)
are printed as one line on stderr and exit with code 2; nothing is written to disk before
the config has been checked. A study that learned nothing (every trial failed the same way,
or none completed) prints its trial counts and one error line and exits with code 1, as a
diverged `gradhpo train` does.

Start-up is kept light: torch, optuna, matplotlib and the jobs are imported inside the
subcommand that needs them, after its cheap checks (arguments, reading the YAML file), so
``--version``, ``--help`` and those mistakes answer without loading them
(tests/test_cli_startup.py).
"""

from __future__ import annotations

import argparse
import os
import shlex
import socket
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from gradhpo import __version__
from gradhpo.config import STORAGE_ENV, ConfigError, load_yaml

__all__ = ["main"]

EXIT_USAGE = 2
EXIT_FAILED = 1


class UserError(Exception):
    """An error caused by the user's input: reported in one line, exit code 2."""


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gradhpo", description="Gradient-based hyperparameter optimization for PyTorch."
    )
    parser.add_argument("--version", action="version", version=f"gradhpo {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    train = sub.add_parser(
        "train",
        help="train one model from a YAML config",
        description="Train one model from a YAML config (data, model, optimizer, training, output).",
    )
    train.add_argument("config", type=Path, help="path to a YAML config")
    _add_overrides(train, *_OVERRIDES)
    train.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    train.set_defaults(func=_cmd_train)

    tune = sub.add_parser(
        "tune",
        help="run a study: a sampler picks discrete choices, hypergradients tune the rest",
        description=(
            "Run a hyperparameter study from a YAML config (train sections plus 'search'). "
            "The study lives in <output.dir>/<name>/ (Optuna journal storage, checkpoints, config); "
            "TensorBoard logs go to <output.tensorboard_dir>/<name>/<trial>."
        ),
    )
    tune.add_argument("config", type=Path, help="path to a YAML study config")
    tune.add_argument("--trials", type=int, default=None, help="override search.trials")
    tune.add_argument("--timeout", type=float, default=None, help="override search.timeout (s)")
    _add_overrides(
        tune,
        *_OVERRIDES,
        name="override the study name (run folder)",
        seed="override training.seed (and the sampler's seed)",
    )
    tune.add_argument(
        "--storage",
        default=None,
        help="Optuna storage URL for the trials (e.g. postgresql://user:pw@host/db; default "
        f"search.storage, else ${STORAGE_ENV}, else the journal file of the study folder); "
        "a password is never written to disk",
    )
    tune.add_argument(
        "--baseline",
        action="store_true",
        help="also train the untuned default for the study's wall-clock time and compare",
    )
    tune.add_argument("--no-progress", action="store_true", help="hide progress bars")
    tune.set_defaults(func=_cmd_tune)

    pbt = sub.add_parser(
        "pbt",
        help="Population Based Training from a YAML config",
        description=(
            "Train a population with Population Based Training (train sections plus 'pbt'). "
            "The run lives in <output.dir>/<name>/ (pbt.db with scores and lineage, checkpoints)."
        ),
    )
    pbt.add_argument("config", type=Path, help="path to a YAML PBT config")
    _add_overrides(pbt, "device", "out", "name")
    pbt.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    pbt.set_defaults(func=_cmd_pbt)

    resume = sub.add_parser(
        "resume",
        help="continue an interrupted study",
        description=(
            "Continue the study or PBT run in DIR: finished trials are kept, trials of a dead "
            "process are continued from their last checkpoint, the sampler continues its "
            "sequence; a PBT run continues from its last finished interval."
        ),
    )
    resume.add_argument("dir", type=Path, help="study directory (holds study.db, config.yaml)")
    resume.add_argument("--trials", type=int, default=None, help="new total number of trials")
    resume.add_argument("--timeout", type=float, default=None, help="seconds for this run")
    resume.add_argument(
        "--seed",
        type=int,
        default=None,
        help=(
            "start this driver's sampler from SEED instead of the saved state (several "
            "drivers at once never evaluate a proposal twice in any case)"
        ),
    )
    resume.add_argument(
        "--storage",
        default=None,
        help=(
            "the study's storage URL when study.json cannot name it (a password); default "
            f"${STORAGE_ENV}"
        ),
    )
    resume.add_argument("--no-progress", action="store_true", help="hide progress bars")
    resume.set_defaults(func=_cmd_resume)

    worker = sub.add_parser(
        "worker",
        help="attach this process to a running study and run its trials",
        description=(
            "Run trials of the study in DIR until it holds its number of finished trials, "
            "beside the other drivers (gradhpo tune, resume, other workers; on any machine "
            "that reaches DIR and the study's storage). A config-driven study runs its "
            "config's trials; a study made from Python needs --objective and --trials. The "
            "best trial is not evaluated here: gradhpo tune or resume does that."
        ),
    )
    worker.add_argument("dir", type=Path, help="study directory (shared by every worker)")
    worker.add_argument(
        "--storage",
        default=None,
        help="the study's storage URL when study.json cannot name it (a password); "
        f"default: ${STORAGE_ENV}",
    )
    worker.add_argument(
        "--objective", default=None, help="module:function, for a study made from Python"
    )
    worker.add_argument("--trials", type=int, default=None, help="total trials of the study")
    worker.add_argument("--timeout", type=float, default=None, help="seconds for this worker")
    worker.add_argument(
        "--seed", type=int, default=None, help="sampler seed of this worker (default: random)"
    )
    worker.add_argument("--threads", type=int, default=None, help="torch threads")
    worker.add_argument("--no-progress", action="store_true", help="hide progress bars")
    worker.set_defaults(func=_cmd_worker)

    proxy = sub.add_parser(
        "storage-proxy",
        help="serve a study database to drivers on other machines (Optuna's gRPC proxy)",
        description=(
            "Serve the study storage at --storage (postgresql://, mysql://, sqlite:///) "
            "through Optuna's gRPC storage proxy, until Ctrl-C. Drivers on other machines "
            "then use storage grpc://HOST:PORT (config `search.storage`, --storage of "
            "resume/worker, or create_study(storage=...)) and need no database driver or "
            "password. Listens on 127.0.0.1 unless --host names another address; the proxy "
            "has no authentication of its own."
        ),
    )
    proxy.add_argument("--storage", default=None, help=f"database URL; default: ${STORAGE_ENV}")
    proxy.add_argument("--host", default="127.0.0.1", help="address to listen on")
    proxy.add_argument("--port", type=int, default=13000, help="port to listen on (13000)")
    proxy.set_defaults(func=_cmd_storage_proxy)

    report = sub.add_parser(
        "report",
        help="tables and plots of a study",
        description="Write results.csv/.md and PNG plots of the study in DIR to DIR/report/.",
    )
    report.add_argument("dir", type=Path, help="study directory")
    report.add_argument("--out", type=Path, default=None, help="output folder (default DIR/report)")
    report.set_defaults(func=_cmd_report)

    export = sub.add_parser(
        "export",
        help="write a run's best model as a plain state_dict plus a YAML card",
        description=(
            "Export the model of a run folder: the best trial of a study (its best epoch), "
            "the weights of a `gradhpo train` run, or the best member of a PBT run. Writes "
            "FILE (torch.load(FILE, weights_only=True) gives the state_dict) and FILE with "
            "the suffix .yaml (model config, input shape, outputs, loss, data, metric, "
            "hyperparameters); rebuild the module with "
            "gradhpo.jobs.export.load_exported(FILE)."
        ),
    )
    export.add_argument("dir", type=Path, help="study, train or PBT run folder")
    export.add_argument(
        "--out",
        type=Path,
        default=None,
        help="the weights file (default DIR/export/best.pt, or DIR/export/trial_<n>.pt)",
    )
    export.add_argument(
        "--trial",
        type=int,
        default=None,
        help="export this complete trial of a study instead of the best one (needed for a "
        "multi-objective study: a trial of its Pareto front)",
    )
    export.add_argument(
        "--fold", type=int, default=0, help="the fold of a cross-validated study (default 0)"
    )
    export.add_argument("--force", action="store_true", help="replace an existing --out")
    export.add_argument(
        "--storage",
        default=None,
        help=f"the study's storage URL when study.json cannot name it; default ${STORAGE_ENV}",
    )
    export.set_defaults(func=_cmd_export)
    return parser


#: The config overrides of train, tune and pbt: option -> (section, key, argparse keywords);
#: section None: a top-level key.
_OVERRIDES: dict[str, tuple[str | None, str, dict[str, Any]]] = {
    "epochs": ("training", "epochs", {"type": int}),
    "device": ("training", "device", {"help": "override training.device (auto, cpu, cuda)"}),
    "out": ("output", "dir", {"type": Path}),
    "name": (None, "name", {"help": "override the run name (run folder)"}),
    "seed": ("training", "seed", {"type": int}),
}


def _add_overrides(parser: argparse.ArgumentParser, *names: str, **helps: str) -> None:
    """The ``--NAME`` options of :data:`_OVERRIDES` (``helps``: other help texts, by NAME)."""
    for name in names:
        section, key, options = _OVERRIDES[name]
        options = {"default": None, "help": f"override {section}.{key}", **options}
        options["help"] = helps.get(name, options["help"])
        parser.add_argument(f"--{name}", **options)


def _apply_overrides(raw: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """Write the command-line overrides that a subcommand has into the raw config."""
    for name, (section, key, _) in _OVERRIDES.items():
        value = getattr(args, name, None)
        if value is not None:
            target = raw if section is None else raw.setdefault(section, {})
            target[key] = str(value) if isinstance(value, Path) else value
    return raw


def _cmd_train(args: argparse.Namespace) -> int:
    raw = _apply_overrides(load_yaml(args.config), args)
    from gradhpo.jobs.train import prepare_train, run_train

    config, run = prepare_train(raw)
    summary = run_train(config, run, progress=not args.no_progress)
    name = config["name"]
    if summary["diverged"]:
        print(
            f"{name}: training diverged (non-finite loss) in epoch "
            f"{summary['history'][-1]['epoch']}; stopping",
            file=sys.stderr,
        )
    if run.tuner is not None:
        tuned = ", ".join(f"{k}={v:.3g}" for k, v in summary["hyperparameters"].items())
        print(
            f"{name}: tuned hyperparameters {tuned} ({run.tuner.rejected_steps} rejected hyper steps)"
        )
    print(
        f"{name}: {_test_figures(summary)} after {summary['steps']} steps in {summary['seconds']:.1f} s "
        f"on {summary['device']}; checkpoint {summary['checkpoint']}"
    )
    return 1 if summary["diverged"] else 0


def _test_figures(summary: Mapping[str, Any]) -> str:
    """``test accuracy A, test loss L``; the loss alone without class labels."""
    loss = f"test loss {summary['test_loss']:.4f}"
    accuracy = summary.get("test_accuracy")
    return loss if accuracy is None else f"test accuracy {accuracy:.4f}, {loss}"


def _versus(base: Mapping[str, Any], tuned: Mapping[str, Any]) -> str:
    """The untuned default against the tuned result, by accuracy or else by loss."""
    key = "test_accuracy" if tuned.get("test_accuracy") is not None else "test_loss"
    label = key.replace("_", " ")
    return f"{label} {base[key]:.4f}; tuned: {tuned[key]:.4f} ({tuned[key] - base[key]:+.4f})"


def _check_count(field: str, value: Any, minimum: int = 1) -> None:
    if value is not None and value < minimum:
        raise UserError(f"{field}: expected an integer >= {minimum}, got {value!r}")


def _check_seconds(field: str, value: float | None) -> None:
    if value is not None and not value > 0:
        raise UserError(f"{field}: expected seconds > 0, got {value!r}")


def _print_best(name: str, summary: dict[str, Any] | None) -> None:
    if summary is None:
        print(f"{name}: no trial finished with a finite value")
        return
    if "pareto" in summary:
        _print_pareto(name, summary["objectives"], summary["directions"], summary["pareto"])
        return
    params = ", ".join(f"{k}={v}" for k, v in summary["params"].items())
    tuned = ", ".join(f"{k}={v:.3g}" for k, v in summary["hyperparameters"].items())
    print(f"{name}: best trial {summary['trial']}: {params}")
    if tuned:
        print(f"{name}: tuned hyperparameters at the end of the best trial: {tuned}")
    print(
        f"{name}: best {summary.get('metric', 'validation value')} {summary['value']:.4f}, "
        f"{_test_figures(summary)}"
    )
    base = summary.get("baseline")
    if base is not None:
        print(
            f"{name}: untuned default (the config's model and optimizer, no search, no tuner) "
            f"trained for the same {base['seconds']:.0f} s ({base['epochs']} epochs): "
            + _versus(base, summary)
        )


def _print_pareto(
    name: str, objectives: Sequence[str], directions: Sequence[str], pareto: Sequence[Any]
) -> None:
    """A multi-objective study's Pareto front: one line per trial (values, parameters, test
    figures)."""
    goals = ", ".join(f"{o} ({d})" for o, d in zip(objectives, directions, strict=True))
    print(f"{name}: Pareto front of {len(pareto)} trial(s) over {goals}:")
    for entry in pareto:
        values = ", ".join(f"{k} {_number(v)}" for k, v in entry["values"].items())
        params = ", ".join(f"{k}={v}" for k, v in entry["params"].items())
        print(f"{name}:   trial {entry['trial']}: {values}; {params}; {_test_figures(entry)}")


def _print_stored_pareto(directory: Path) -> None:
    """The Pareto front a multi-objective study stored at its end (``pareto_test``)."""
    from gradhpo.search.study import load_optuna_study

    study = load_optuna_study(directory)
    pareto = study.user_attrs.get("pareto_test")
    if len(study.directions) < 2 or not pareto:
        return
    names = list(pareto[0]["values"])
    directions = [d.name.lower() for d in study.directions]
    _print_pareto(directory.name, names, directions, pareto)


def _job_errors() -> tuple[type[BaseException], ...]:
    """User mistakes found while a job is prepared (unknown model knob, missing data files),
    besides ConfigError: imported here, as their modules load torch."""
    from gradhpo.data import DatasetNotFoundError
    from gradhpo.models import ModelConfigError

    return (ModelConfigError, DatasetNotFoundError)


def _quiet_optuna() -> None:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # our own lines say what happened


def _cmd_tune(args: argparse.Namespace) -> int:
    _check_count("--trials", args.trials)
    _check_count("--epochs", args.epochs)
    _check_seconds("--timeout", args.timeout)
    raw = _apply_overrides(load_yaml(args.config), args)
    if args.trials is not None and isinstance(raw.get("search"), dict):
        raw["search"]["trials"] = args.trials
    if args.baseline and isinstance(raw.get("search"), dict):
        raw["search"]["baseline"] = True
    _quiet_optuna()
    from gradhpo.jobs.tune import prepare_study

    study, config, space, folds = prepare_study(raw=raw, storage=_storage_arg(args))
    print(f"{study.name}: study in {study.directory} ({study.dashboard_hint})")
    return _run_and_print(study, config, space, folds, args, trials=None)


def _storage_arg(args: argparse.Namespace) -> str | None:
    """The storage URL of ``tune``/``resume``/``worker``/``storage-proxy``: --storage, else
    $GRADHPO_STORAGE (None: the config's search.storage or what study.json records)."""
    return getattr(args, "storage", None) or os.environ.get(STORAGE_ENV) or None


def _run_and_print(
    study: Any, config: dict[str, Any], space: Any, folds: Any, args: Any, trials: int | None
) -> int:
    """Run the study, print how its trials ended and the best one; StudyFailed (nothing
    learned) is printed after the counts as one error line, exit code 1."""
    from gradhpo.jobs.tune import StudyFailed, counts_line, run_study

    asked = trials if trials is not None else config["search"]["trials"]
    try:
        summary = run_study(
            study,
            config,
            space,
            folds,
            trials=trials,
            timeout=args.timeout,
            progress=not args.no_progress,
            storage=_storage_arg(args),
        )
    except StudyFailed as exc:
        print(f"{study.name}: {counts_line(study.trial_counts(), asked)}")
        print(f"gradhpo: error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print(f"{study.name}: {counts_line(study.trial_counts(), asked)}")
    _print_best(study.name, summary)
    _print_export_hint(study.name, study.directory, summary)
    return 0


def _print_export_hint(name: str, directory: Path, summary: Mapping[str, Any] | None) -> None:
    """Where the best trial's weights are and how to export them as a plain model."""
    if summary is None:
        return
    if "pareto" in summary:
        trials = [entry["trial"] for entry in summary["pareto"]]
        print(
            f"{name}: the Pareto trials' weights are in {directory / 'trials'}/<trial>/; export "
            f"one with `gradhpo export {shlex.quote(str(directory))} --trial N` (N in {trials})"
        )
        return
    if not summary.get("checkpoints"):
        return
    files = summary["checkpoints"]
    where = files[0] if len(files) == 1 else f"{files[0]} (and {len(files) - 1} more fold(s))"
    print(
        f"{name}: best checkpoint {where}; export the model with "
        f"`gradhpo export {shlex.quote(str(directory))}` (a state_dict .pt and its YAML card)"
    )


def _print_pbt(name: str, best: dict[str, Any]) -> None:
    values = ", ".join(
        f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in best["values"].items()
    )
    tuned = ", ".join(f"{k}={v:.3g}" for k, v in best["hyperparameters"].items())
    print(f"{name}: best member {best['member']} at step {best['step']}: {values}")
    print(f"{name}: its hyperparameters: {tuned}")
    print(f"{name}: {best['metric']} {best['score']:.4f}, {_test_figures(best)}")


def _cmd_pbt(args: argparse.Namespace) -> int:
    raw = _apply_overrides(load_yaml(args.config), args)
    _quiet_optuna()
    return _run_pbt(args, "PBT run in {}", raw=raw)


def _run_pbt(args: argparse.Namespace, intro: str, **where: Any) -> int:
    """Prepare (``where``: prepare_pbt's arguments) and run a PBT run, print its best member;
    ``intro`` says what starts, ``{}`` standing for the run folder."""
    from gradhpo.jobs.pbt import prepare_pbt, run_pbt

    manager, config, population = prepare_pbt(**where)
    print(f"{config['name']}: {intro.format(manager.db.directory)}")
    try:
        best = run_pbt(manager, config, population, progress=not args.no_progress)
    finally:
        manager.close()  # the database whole on disk (no -wal left) when the command ends
    _print_pbt(config["name"], best)
    return 0


def _cmd_resume(args: argparse.Namespace) -> int:
    _quiet_optuna()
    from gradhpo.jobs.rundir import check_pbt_checkpoints, open_run_dir

    kind, _ = open_run_dir(args.dir)
    if kind == "train":
        raise UserError(
            f"{str(args.dir)!r} holds a finished `gradhpo train` run; nothing to resume"
        )
    if kind == "pbt":
        if args.trials is not None:
            raise UserError("--trials: not used by a PBT run")
        if args.seed is not None:
            raise UserError("--seed: not used by a PBT run (its seeds are in its config)")
        check_pbt_checkpoints(args.dir)
        return _run_pbt(args, "resuming the PBT run in {}", resume_dir=args.dir)
    _check_count("--trials", args.trials)
    _check_count("--seed", args.seed, minimum=0)
    _check_seconds("--timeout", args.timeout)
    if not args.dir.is_dir():
        raise UserError(f"study directory not found: {str(args.dir)!r}")
    from gradhpo.jobs.tune import prepare_study

    study, config, space, folds = prepare_study(resume_dir=args.dir, storage=_storage_arg(args))
    if args.seed is not None:
        study.reseed(args.seed)
    finished = len(study.finished_trials())
    recovered = study.recover_stale_trials()
    note = f"; continuing interrupted trial(s) {recovered}" if recovered else ""
    print(f"{study.name}: resuming with {finished} finished trial(s){note}")
    return _run_and_print(study, config, space, folds, args, trials=args.trials)


def _cmd_worker(args: argparse.Namespace) -> int:
    _check_count("--trials", args.trials)
    _check_count("--threads", args.threads)
    _check_seconds("--timeout", args.timeout)
    _check_count("--seed", args.seed, minimum=0)
    _quiet_optuna()
    from gradhpo.jobs.worker import prepare_worker, run_worker

    storage = _storage_arg(args)
    job = prepare_worker(args.dir, storage=storage, objective=args.objective)
    if job.config is None and args.trials is None:
        raise UserError("--trials: required for a study made from Python (with --objective)")
    study = job.study
    print(
        f"{study.name}: worker on {socket.gethostname()} (pid {os.getpid()}) attached to "
        f"{study.directory} ({study.dashboard_hint}) with "
        f"{len(study.finished_trials())} finished trial(s)"
    )
    result = run_worker(
        job,
        trials=args.trials,
        timeout=args.timeout,
        seed=args.seed,
        threads=args.threads,
        progress=not args.no_progress,
    )
    print(
        f"{study.name}: this worker ran {len(result['ran'])} trial(s) in "
        f"{result['seconds']:.1f} s (sampler seed {result['seed']}); the study holds "
        f"{result['finished']} of {result['target']}"
    )
    return 0


def _cmd_storage_proxy(args: argparse.Namespace) -> int:
    if not 1 <= args.port <= 65535:
        raise UserError(f"--port: expected an integer in [1, 65535], got {args.port!r}")
    os.environ.setdefault("GRPC_VERBOSITY", "NONE")  # errors are reported here, in one line
    _quiet_optuna()
    from gradhpo.jobs.proxy import serve_storage_proxy

    url = _storage_arg(args)
    if url is None:
        raise UserError(f"--storage: give the database URL (or set ${STORAGE_ENV})")
    serve_storage_proxy(url, host=args.host, port=args.port)
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    if not args.dir.is_dir():
        raise UserError(f"study directory not found: {str(args.dir)!r}")
    from gradhpo.jobs.rundir import check_writable_dir, open_run_dir
    from gradhpo.report import write_pbt_report, write_report

    kind, _ = open_run_dir(args.dir)
    if kind == "train":
        raise UserError(
            f"{str(args.dir)!r} holds a `gradhpo train` run; its metrics are in metrics.json"
        )
    check_writable_dir("--out", args.out if args.out is not None else args.dir / "report")
    if kind == "pbt":
        result = write_pbt_report(args.dir, args.out)
        print(f"{args.dir.name}: PBT report; wrote " + ", ".join(str(f) for f in result["files"]))
        return 0
    result = write_report(args.dir, args.out)
    best = result["best"]
    if best is not None:
        _print_best(args.dir.name, best)
    else:
        _print_stored_pareto(args.dir)
    states = [row["state"] for row in result["rows"]]
    tally = ", ".join(
        f"{states.count(state)} {word}"
        for state, word in (("complete", "complete"), ("pruned", "pruned"), ("fail", "failed"))
    )
    running = states.count("running") + states.count("waiting")
    print(
        f"{args.dir.name}: {len(states)} trial(s): {tally}"
        + (f", {running} unfinished" if running else "")
        + "; wrote "
        + ", ".join(str(f) for f in result["files"])
    )
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    if args.trial is not None and args.trial < 0:
        raise UserError(f"--trial: expected a trial number >= 0, got {args.trial!r}")
    if args.fold < 0:
        raise UserError(f"--fold: expected an integer >= 0, got {args.fold!r}")
    _quiet_optuna()
    from gradhpo.jobs.export import export_model

    result = export_model(
        args.dir,
        args.out,
        trial=args.trial,
        fold=args.fold,
        force=args.force,
        storage=_storage_arg(args),
    )
    metric, value = result["metric"], result["value"]
    if isinstance(metric, list):
        figure = ", ".join(f"{m} {_number(v)}" for m, v in zip(metric, value, strict=True))
    else:
        figure = f"{metric} {_number(value)}"
    print(
        f"{args.dir.name}: exported {result['what']} ({figure}) to {result['weights_path']} "
        f"and {result['card_path']}; rebuild it with "
        f"gradhpo.jobs.export.load_exported({str(result['weights_path'])!r})"
    )
    return 0


def _number(value: Any) -> str:
    """A figure in a line: counts (a parameter count) whole, other floats to 4 digits."""
    if isinstance(value, float) and value.is_integer() and abs(value) >= 10:
        return str(int(value))
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def main(argv: Sequence[str] | None = None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except (ConfigError, UserError) as exc:
        return _usage_error(exc)
    except KeyboardInterrupt:
        print("gradhpo: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        # the job's own user errors can only come from a command that has loaded the job,
        # so importing their classes here costs nothing new
        if isinstance(exc, _job_errors()):
            return _usage_error(exc)
        raise


def _usage_error(exc: BaseException) -> int:
    print(f"gradhpo: error: {exc}", file=sys.stderr)
    return EXIT_USAGE


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
