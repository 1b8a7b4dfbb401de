"""YAML configuration files: loading (``yaml.safe_load`` only) and validation.

Every problem is reported as a :class:`ConfigError` whose message names the field by its dotted
path and the bad value, e.g. ``training.epochs: expected an integer >= 1, got -3``. The CLI
prints that one line and exits with code 2.

The schema here is the one of ``gradhpo train``; model, data, optimizer and tuner sections are
validated by the code that owns them (:func:`models.build_model`,
:func:`gradhpo.data.load_dataset`, :class:`gradhpo.run.TrainingRun`) so the rules live in
one place.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "ConfigError",
    "SIZE_LIMITS",
    "STORAGE_ENV",
    "check_sizes",
    "import_object",
    "load_yaml",
    "parse_yaml",
    "validate_train_config",
    "with_section",
    "TRAIN_DEFAULTS",
]


class ConfigError(ValueError):
    """A user mistake in a configuration file or mapping."""


#: Environment variable read for a study's storage URL when the command line gives none
#: (``--storage``): it keeps a password out of the command line, which other users of the
#: machine can see, and out of config files. Read by ``gradhpo tune | resume | worker |
#: storage-proxy``; here, at the bottom, so the CLI names it without loading a job.
STORAGE_ENV = "GRADHPO_STORAGE"


#: Defaults of the ``training`` and ``output`` sections of a ``gradhpo train`` config.
TRAIN_DEFAULTS: dict[str, dict[str, Any]] = {
    "training": {
        "epochs": 10,
        "batch_size": 64,
        "seed": 0,
        "device": "auto",
        "augment": False,
        "eval_batch_size": 1024,
        "loss": "cross_entropy",
        "precision": "float32",
    },
    "output": {"dir": "runs", "tensorboard_dir": "tensorboard_logs"},
}
_TRAIN_SECTIONS = ("name", "data", "model", "optimizer", "tuner", "training", "output")

#: The largest sizes a config may ask for. Above them a run cannot even allocate its model
#: on the machines gradhpo is meant for, or trains for hours on what was a typo (``width:
#: 100000`` tried to allocate 360 GB; ``width: 1000000000`` crashed in the allocator), so
#: they are refused by validation, naming the field and the value. Every entry of a
#: per-layer list is checked.
SIZE_LIMITS: dict[str, int] = {
    "model.width": 16384,
    "model.head_width": 16384,
    "model.depth": 1000,
    "training.batch_size": 1 << 20,
    "training.eval_batch_size": 1 << 20,
    "training.epochs": 100_000,
}


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping (plain PyYAML keeps
    the later one silently: a second ``model:`` section would train another model)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                duplicate = key in seen
            except TypeError:  # an unhashable key: the base class reports it
                break
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def parse_yaml(text: str) -> Any:
    """``yaml.safe_load`` of ``text`` that also refuses duplicate keys."""
    return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass


def load_yaml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a YAML mapping (safe loading, duplicate keys refused); every problem, an
    unreadable or non-UTF-8 file included, is one :class:`ConfigError` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {str(path)!r}")
    try:
        loaded = parse_yaml(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}: invalid YAML{where}: {getattr(exc, 'problem', exc)}") from exc
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(loaded).__name__}")
    return loaded


def _section(config: Mapping[str, Any], name: str, required: bool) -> dict[str, Any]:
    value = config.get(name)
    if value is None:
        if required:
            raise ConfigError(f"{name}: section is required")
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"{name}: expected a mapping, got {value!r}")
    return dict(value)


def _check_unknown(path: str, mapping: Mapping[str, Any], allowed: tuple[str, ...]) -> None:
    unknown = sorted(set(mapping) - set(allowed))
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {unknown}; allowed: {list(allowed)}")


def check_int(path: str, value: Any, minimum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{path}: expected an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise ConfigError(f"{path}: expected an integer >= {minimum}, got {value!r}")
    return value


def check_bool(path: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{path}: expected true or false, got {value!r}")
    return value


def check_choice(path: str, value: Any, choices: tuple[Any, ...]) -> Any:
    if value not in choices:
        raise ConfigError(f"{path}: expected one of {list(choices)}, got {value!r}")
    return value


def check_str(path: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{path}: expected a non-empty string, got {value!r}")
    return value


def import_object(spec: str, field: str) -> Any:
    """The object named ``"package.module:attribute"`` (the attribute may be dotted), for
    configs that name the user's own code (``model.factory``, ``data.factory``,
    ``training.loss``). Every failure is a ConfigError naming ``field`` and ``spec``.

    A config that names code runs that code, like ``python -m`` would: load configs you wrote
    or trust, as you would a script."""
    if not isinstance(spec, str) or spec.count(":") != 1:
        raise ConfigError(f"{field}: expected 'package.module:name', got {spec!r}")
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise ConfigError(f"{field}: expected 'package.module:name', got {spec!r}")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(
            f"{field}: cannot import module {module_name!r} of {spec!r} ({exc}); is it "
            "installed or on PYTHONPATH?"
        ) from None
    for part in attribute.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"{field}: {module_name!r} has no {attribute!r} (from {spec!r})")
        obj = getattr(obj, part)
    return obj


def check_sizes(config: Mapping[str, Any], where: str | None = None) -> None:
    """ConfigError when a size of the run config ``config`` (the YAML shape) is over its
    :data:`SIZE_LIMITS` entry (``where``, e.g. a corner of a search space, prefixes the
    message). Values of other types are left to the owner of the field."""
    for path, limit in SIZE_LIMITS.items():
        section, key = path.split(".")
        block = config.get(section)
        value = block.get(key) if isinstance(block, Mapping) else None
        values = value if isinstance(value, list) else [value]
        for v in values:
            if isinstance(v, int) and not isinstance(v, bool) and v > limit:
                shown = f"{value!r}" if isinstance(value, list) else f"{v!r}"
                prefix = f"{where}: " if where else ""
                raise ConfigError(
                    f"{prefix}{path}: {shown} is over the limit of {limit} (sizes this large "
                    "cannot be allocated or trained here; see gradhpo.config.SIZE_LIMITS)"
                )


def validate_train_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """Check the structure of a ``gradhpo train`` config and fill in defaults.

    Returns a new, fully resolved dict. Section contents of ``data``, ``model`` and
    ``optimizer`` are checked later by their owners (see module docstring).
    """
    if not isinstance(config, Mapping):
        raise ConfigError(f"config: expected a mapping, got {config!r}")
    _check_unknown("config", config, _TRAIN_SECTIONS)
    resolved: dict[str, Any] = {"name": check_str("name", config.get("name", "train"))}
    for section in ("data", "model"):
        resolved[section] = _section(config, section, required=True)
        if "name" not in resolved[section] and "factory" not in resolved[section]:
            raise ConfigError(
                f"{section}.name is required, or {section}.factory for your own "
                f"{'network' if section == 'model' else 'data set'} ('package.module:function')"
            )
        if "factory" in resolved[section]:
            check_str(f"{section}.factory", resolved[section]["factory"])
    resolved["optimizer"] = _section(config, "optimizer", required=False) or {"name": "sgd"}
    # Optional hypergradient tuning; its keys are checked by TrainingRun (gradhpo.run.TUNER_KEYS).
    resolved["tuner"] = _section(config, "tuner", required=False) or None

    for section, defaults in TRAIN_DEFAULTS.items():
        given = _section(config, section, required=False)
        _check_unknown(section, given, tuple(defaults))
        resolved[section] = {**defaults, **given}

    training = resolved["training"]
    check_int("training.epochs", training["epochs"], 1)
    check_int("training.batch_size", training["batch_size"], 1)
    check_int("training.seed", training["seed"], 0)
    check_str("training.device", training["device"])
    check_bool("training.augment", training["augment"])
    check_int("training.eval_batch_size", training["eval_batch_size"], 1)
    check_str("training.loss", training["loss"])  # the name is resolved by TrainingRun
    check_choice("training.precision", training["precision"], ("float32", "bfloat16", "float16"))
    check_str("output.dir", resolved["output"]["dir"])
    check_str("output.tensorboard_dir", resolved["output"]["tensorboard_dir"])
    if "seed" in resolved["data"]:  # named here: the data loader only knows "seed"
        check_int("data.seed", resolved["data"]["seed"], 0)
    check_sizes(resolved)
    return resolved


def with_section(
    raw: Mapping[str, Any], section: str, defaults: Mapping[str, Any], command: str
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Validate a train config that carries one extra section (``search`` for ``gradhpo
    tune``, ``pbt`` for ``gradhpo pbt``): returns the resolved train config and the section
    merged over ``defaults``, after checking its presence, type and key names."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"config: expected a mapping, got {raw!r}")
    given = raw.get(section)
    if given is None:
        raise ConfigError(f"{section}: section is required for `{command}`")
    if not isinstance(given, Mapping):
        raise ConfigError(f"{section}: expected a mapping, got {given!r}")
    config = validate_train_config({k: v for k, v in raw.items() if k != section})
    _check_unknown(section, given, tuple(defaults))
    return config, {**defaults, **given}


_EXECUTOR_KEYS = {
    "serial": ("workers",),
    "processes": ("workers", "threads_per_worker", "max_failures"),
    "ray": (
        "workers",
        "address",
        "num_cpus",
        "num_cpus_per_worker",
        "num_gpus_per_worker",
        "max_failures",
    ),
}


def check_executor(field: str, spec: Any) -> dict[str, Any] | None:
    """An ``executor`` entry (``search.executor``, ``pbt.executor``): a name or ``{name,
    workers, ...}``, checked so that a typo is a config error before anything runs."""
    if spec is None:
        return None
    if isinstance(spec, str):
        spec = {"name": spec}
    if not isinstance(spec, Mapping):
        raise ConfigError(f"{field}: expected a name or a mapping, got {spec!r}")
    name = spec.get("name")
    if name not in _EXECUTOR_KEYS:
        raise ConfigError(
            f"{field}.name: unknown executor {name!r}; choose one of {list(_EXECUTOR_KEYS)}"
        )
    unknown = sorted(set(spec) - {"name", *_EXECUTOR_KEYS[name]})
    if unknown:
        raise ConfigError(
            f"{field}: unknown key(s) {unknown} for {name!r}; allowed: {list(_EXECUTOR_KEYS[name])}"
        )
    spec = dict(spec)
    spec.setdefault("workers", 1 if name == "serial" else 2)
    check_int(f"{field}.workers", spec["workers"], 1)
    if name == "serial" and spec["workers"] != 1:
        raise ConfigError(
            f"{field}.workers: the serial executor has one worker, got {spec['workers']!r}"
        )
    if "max_failures" in spec:
        check_int(f"{field}.max_failures", spec["max_failures"], 0)
    # find_spec, not import: importing Ray here would fix its network mode before the executor
    # can ask for a loopback-only local instance.
    if name == "ray" and importlib.util.find_spec("ray") is None:
        raise ConfigError(f"{field}: 'ray' needs Ray installed (pip install 'gradhpo[ray]')")
    return spec
