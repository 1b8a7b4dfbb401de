"""Offline data sets, seeded splits, a device-resident batch iterator and batched augmentation.

* :func:`load_dataset` returns :class:`DataSplits` (train / val / test tensors on the CPU) for
  one of :data:`DATASETS`. Splits are seeded permutations drawn from a local
  :class:`torch.Generator`, so the same arguments always give bit-identical tensors and the
  global random state is never touched.
* ``digits``, ``mnist1d`` and ``synthetic`` need no files and no network. ``mnist``,
  ``fashion_mnist``, ``cifar10`` and ``svhn`` are read by small parsers of their own from
  torchvision's on-disk layout under ``data_dir``; ``download=True`` asks torchvision to fetch
  the files there first. ``fashion_mnist`` missing from ``data_dir`` is also looked for in the
  folder of the Debian package ``dataset-fashion-mnist`` (:data:`SYSTEM_DATA_DIRS`), so it
  works offline once that package is installed. CIFAR pickles are read with a restricted
  unpickler that only rebuilds numpy arrays.
* ``train_size`` keeps a seeded, class-stratified subset of the train split (val and test are
  untouched), for tuning on less data.
* :class:`BatchIterator` slices tensors that already live on the target device, one
  ``randperm`` per epoch, and can be checkpointed with ``state_dict()`` for a bit-identical
  continuation. :class:`Augment` is a vectorized random-crop + horizontal-flip.
"""

from __future__ import annotations

import gzip
import importlib
import math
import numbers
import os
import pickle
import random
import struct
import warnings
import zipfile
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeGuard

import numpy as np
import torch
import torch.nn.functional as F

from gradhpo.config import import_object
from gradhpo.files import atomic_write

__all__ = [
    "DATASETS",
    "DATA_KEYS",
    "Augment",
    "BatchIterator",
    "DataSplits",
    "DatasetNotFoundError",
    "SYSTEM_DATA_DIRS",
    "Split",
    "default_data_dir",
    "carve_split",
    "kfold_indices",
    "load_data",
    "load_dataset",
]

#: Names accepted by :func:`load_dataset`.
DATASETS: tuple[str, ...] = (
    "digits",
    "mnist1d",
    "synthetic",
    "mnist",
    "fashion_mnist",
    "cifar10",
    "svhn",
)

Device = torch.device | str | int

#: Folders of system packages searched, in order, for a data set's files when they are not in
#: ``data_dir``; they hold the files flat (no torchvision sub-folders). Looked up at every load,
#: so tests can point it elsewhere. Debian's ``dataset-fashion-mnist`` installs the four gzipped
#: IDX files of Fashion-MNIST in ``/usr/share/datasets/fashion-mnist``.
SYSTEM_DATA_DIRS: dict[str, tuple[Path, ...]] = {
    "fashion_mnist": (Path("/usr/share/datasets/fashion-mnist"),),
}

#: How to install the files of :data:`SYSTEM_DATA_DIRS`, named in the not-found message.
_SYSTEM_INSTALL: dict[str, str] = {
    "fashion_mnist": "apt-get install -y dataset-fashion-mnist",
}


# ---------------------------------------------------------------------------------- containers
@dataclass(frozen=True, eq=False)
class Split:
    """One split: float32 features ``x`` of shape ``(N, *input_shape)`` and targets ``y``:
    int64 class labels ``(N,)`` for classification, or float values ``(N,)`` / ``(N, *k)``
    for regression and other losses (``training.loss``)."""

    x: torch.Tensor
    y: torch.Tensor

    def __post_init__(self) -> None:
        if self.y.ndim < 1 or (self.y.ndim != 1 and not self.y.is_floating_point()):
            raise ValueError(
                f"Split.y must be 1-D class labels or float targets (N, ...), got "
                f"{self.y.dtype} of shape {tuple(self.y.shape)}"
            )
        if self.x.ndim < 1 or self.x.shape[0] != self.y.shape[0]:
            raise ValueError(
                f"Split.x and Split.y differ in length: x {tuple(self.x.shape)}, "
                f"y {tuple(self.y.shape)}"
            )

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def to(self, device: Device) -> Split:
        """Returns this split with both tensors moved to ``device``."""
        return Split(self.x.to(device), self.y.to(device))


@dataclass(frozen=True, eq=False)
class DataSplits:
    """A data set split into train / val / test, with its class count and per-sample shape.

    For float targets ``num_classes`` is the number of outputs a model needs (the number of
    target values per example) and :attr:`classification` is False (no accuracy)."""

    name: str
    train: Split
    val: Split
    test: Split
    num_classes: int
    input_shape: tuple[int, ...]
    #: How raw examples became ``x`` (built-in data sets): ``{"divisor": d, "mean": [...],
    #: "std": [...]}`` per channel, ``x = (raw / divisor - mean) / std``; ``None`` when
    #: unknown (a user's DataSplits). An exported model records it (``gradhpo export``).
    preprocessing: dict[str, Any] | None = None

    @property
    def classification(self) -> bool:
        """Integer class targets (accuracy is defined), not float targets."""
        return not self.train.y.is_floating_point()

    def evaluation_split(self, split: str) -> Split:
        """The split ``"train"``, ``"val"`` or ``"test"`` that ``evaluate(split)`` reads; a
        ValueError for another name or an empty split."""
        if split not in ("train", "val", "test"):
            raise ValueError(f"evaluate: split must be 'train', 'val' or 'test', got {split!r}")
        data: Split = getattr(self, split)
        if len(data) == 0:
            raise ValueError(f"evaluate: split {split!r} is empty")
        return data

    def to(self, device: Device) -> DataSplits:
        """Returns these splits with every tensor moved to ``device``."""
        return replace(
            self,
            train=self.train.to(device),
            val=self.val.to(device),
            test=self.test.to(device),
        )


class DatasetNotFoundError(FileNotFoundError):
    """The files of a data set are not on disk (and ``download`` was False).

    The message is one line: the data set, the missing paths and how to get them; ``install``
    (when given) is a system command that puts the files in a folder searched by default.
    """

    def __init__(
        self,
        dataset: str,
        expected: Sequence[str | os.PathLike[str]],
        data_dir: str | os.PathLike[str],
        note: str = "",
        install: str = "",
    ) -> None:
        self.dataset = dataset
        self.expected = tuple(str(p) for p in expected)
        self.data_dir = str(data_dir)
        self.note = note
        self.install = install
        message = f"data set {dataset!r} not found: expected {', '.join(self.expected)}"
        if note:
            message += f" ({note})"
        message += (
            f"; download=True (load_dataset({dataset!r}, data_dir={self.data_dir!r}, "
            "download=True), or `download: true` in a config's data section) fetches them "
            "with torchvision, needs internet; or place the files there in torchvision's "
            "on-disk layout"
        )
        if install:
            message += f"; or install them system-wide with `{install}`"
        super().__init__(message)

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.dataset, self.expected, self.data_dir, self.note, self.install))


def default_data_dir() -> Path:
    """``$GRADHPO_DATA_DIR`` if set (and not empty), else ``~/.cache/gradhpo/data``."""
    env = os.environ.get("GRADHPO_DATA_DIR")
    if env:
        return Path(env).expanduser()
    return Path("~/.cache/gradhpo/data").expanduser()


# ------------------------------------------------------------------------------------ raw data
@dataclass(frozen=True, eq=False)
class _Raw:
    """Data as loaded from its source, before splitting.

    ``x`` tensors may be uint8 (or any dtype); dividing by ``divisor`` after conversion to
    float32 gives the unnormalized features. ``x_test`` is None for data sets without an
    official test set (the test split is then drawn by the seeded permutation).
    """

    x: torch.Tensor
    y: torch.Tensor
    x_test: torch.Tensor | None
    y_test: torch.Tensor | None
    divisor: float
    num_classes: int


def _labels(arr: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(arr).reshape(-1).astype(np.int64))


def _check_labels(y: torch.Tensor, num_classes: int, source: Path | str) -> None:
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ValueError(
            f"{source}: labels must lie in [0, {num_classes}), got range "
            f"[{int(y.min())}, {int(y.max())}]"
        )


def _load_digits(root: Path, download: bool) -> _Raw:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.asarray(bunch.data, dtype=np.uint8).reshape(-1, 1, 8, 8)  # values 0..16
    return _Raw(torch.from_numpy(images.copy()), _labels(bunch.target), None, None, 16.0, 10)


def _load_synthetic(root: Path, download: bool) -> _Raw:
    """Three well separated Gaussian classes, 80 samples each, shaped like digits."""
    gen = torch.Generator().manual_seed(1234)
    num_classes, per_class, dim = 3, 80, 64
    means = 1.5 * torch.randn(num_classes, dim, generator=gen)
    y = torch.arange(num_classes).repeat_interleave(per_class)
    x = means[y] + torch.randn(len(y), dim, generator=gen)
    return _Raw(x.reshape(-1, 1, 8, 8), y, None, None, 1.0, num_classes)


_MNIST1D_KEYS = ("x", "y", "x_test", "y_test")
_MNIST1D_CACHE = "mnist1d_default.npz"


def _generate_mnist1d() -> dict[str, np.ndarray]:
    """Runs mnist1d's generator offline, restoring the global RNGs it reseeds."""
    from mnist1d.data import get_dataset_args, make_dataset

    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        data = make_dataset(get_dataset_args())
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    return {
        "x": np.asarray(data["x"], dtype=np.float32),
        "y": np.asarray(data["y"], dtype=np.int64),
        "x_test": np.asarray(data["x_test"], dtype=np.float32),
        "y_test": np.asarray(data["y_test"], dtype=np.int64),
    }


def _valid_mnist1d(arrays: Mapping[str, np.ndarray]) -> bool:
    if not all(k in arrays for k in _MNIST1D_KEYS):
        return False
    x, y, xt, yt = (arrays[k] for k in _MNIST1D_KEYS)
    return (
        x.ndim == 2
        and xt.ndim == 2
        and x.shape[1] == xt.shape[1]
        and y.shape == (x.shape[0],)
        and yt.shape == (xt.shape[0],)
        and x.dtype.kind == "f"
        and y.dtype.kind in "iu"
    )


def _atomic_savez(path: Path, arrays: Mapping[str, np.ndarray]) -> None:
    """Writes an .npz next to ``path`` under a temporary name, then renames it into place."""
    # numpy's stub types every keyword alike (allow_pickle among them): the arrays as Any
    named: dict[str, Any] = dict(arrays)
    with atomic_write(path) as fh:
        np.savez(fh, **named)


def _load_mnist1d(root: Path, download: bool) -> _Raw:
    path = root / "mnist1d" / _MNIST1D_CACHE
    arrays: dict[str, np.ndarray] | None = None
    if path.exists():
        try:
            with np.load(path, allow_pickle=False) as npz:
                arrays = {k: npz[k] for k in npz.files}
        except (OSError, ValueError, EOFError, KeyError, zlib.error, zipfile.BadZipFile) as exc:
            warnings.warn(f"unreadable mnist1d cache {path} ({exc}); regenerating", stacklevel=3)
        if arrays is not None and not _valid_mnist1d(arrays):
            warnings.warn(f"malformed mnist1d cache {path}; regenerating", stacklevel=3)
            arrays = None
    if arrays is None:
        arrays = _generate_mnist1d()
        try:
            _atomic_savez(path, arrays)
        except OSError as exc:
            warnings.warn(f"could not write the mnist1d cache {path}: {exc}", stacklevel=3)

    def features(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.array(a, dtype=np.float32)[:, None, :])

    return _Raw(
        features(arrays["x"]),
        _labels(arrays["y"]),
        features(arrays["x_test"]),
        _labels(arrays["y_test"]),
        1.0,
        10,
    )


# ------------------------------------------------------------------- torchvision-format files
def _read_bytes(path: Path) -> bytes:
    """Reads ``path``, or ``path`` + ``.gz`` (decompressed) when only that exists."""
    if path.exists():
        return path.read_bytes()
    gz = path.with_name(path.name + ".gz")
    try:
        return gzip.decompress(gz.read_bytes())
    except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise ValueError(f"{gz}: corrupt gzip file ({exc})") from exc


def _exists_maybe_gz(path: Path) -> bool:
    return path.exists() or path.with_name(path.name + ".gz").exists()


def _read_idx(path: Path, ndim: int) -> np.ndarray:
    """Parses an IDX file of unsigned bytes (magic ``0x0000 08 <ndim>``) into an array."""
    raw = _read_bytes(path)
    if len(raw) < 4:
        raise ValueError(f"{path}: truncated IDX file ({len(raw)} bytes)")
    magic = struct.unpack(">I", raw[:4])[0]
    expected_magic = 0x00000800 | ndim
    if magic != expected_magic:
        raise ValueError(
            f"{path}: bad IDX magic number 0x{magic:08x}, expected 0x{expected_magic:08x}"
        )
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated IDX header")
    dims = struct.unpack(f">{ndim}i", raw[4:header])
    if any(d < 0 for d in dims):
        raise ValueError(f"{path}: negative IDX dimension in {dims}")
    size = math.prod(dims)
    if len(raw) != header + size:
        raise ValueError(
            f"{path}: IDX dimensions {dims} need {header + size} bytes, file has {len(raw)} "
            "(truncated or corrupt)"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


_IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _idx_folder(name: str, root: Path, folder: str, download: bool) -> Path:
    """The folder to read the IDX files of ``name`` from.

    ``root/<folder>/raw`` when it holds all four files, else the first folder of
    :data:`SYSTEM_DATA_DIRS` that does; else torchvision downloads into ``root`` (only with
    ``download``), else :class:`DatasetNotFoundError` lists what is missing in every place.
    """
    raw_dir = root / folder / "raw"
    places = [raw_dir, *SYSTEM_DATA_DIRS.get(name, ())]
    for place in places:
        if all(_exists_maybe_gz(place / f) for pair in _IDX_FILES.values() for f in pair):
            return place
    note = "the .gz versions of these files are accepted too"
    if len(places) > 1:
        note += "; looked in " + " and ".join(str(p) for p in places)
    missing = [
        place / f
        for place in places
        for pair in _IDX_FILES.values()
        for f in pair
        if not _exists_maybe_gz(place / f)
    ]
    if download:
        paths = [raw_dir / f for pair in _IDX_FILES.values() for f in pair]
        _ensure_files(name, root, download, paths, _exists_maybe_gz, note=note)
        return raw_dir
    raise DatasetNotFoundError(name, missing, root, note, _SYSTEM_INSTALL.get(name, ""))


def _mnist_like(name: str, folder: str) -> Callable[[Path, bool], _Raw]:
    """Loader of MNIST or Fashion-MNIST (``name``) from ``root/<folder>/raw`` or, when the
    files are not there, from the data set's folders in :data:`SYSTEM_DATA_DIRS`."""

    def load(root: Path, download: bool) -> _Raw:
        raw_dir = _idx_folder(name, root, folder, download)
        out: list[torch.Tensor] = []
        for images_name, labels_name in _IDX_FILES.values():
            images = _read_idx(raw_dir / images_name, 3)
            labels = _read_idx(raw_dir / labels_name, 1)
            if images.shape[1:] != (28, 28):
                raise ValueError(
                    f"{raw_dir / images_name}: expected 28x28 images, got {images.shape[1:]}"
                )
            if len(images) != len(labels):
                raise ValueError(
                    f"{raw_dir / labels_name}: {len(labels)} labels for "
                    f"{len(images)} images in {raw_dir / images_name}"
                )
            y = _labels(labels)
            _check_labels(y, 10, raw_dir / labels_name)
            out += [torch.from_numpy(images[:, None].copy()), y]
        return _Raw(out[0], out[1], out[2], out[3], 255.0, 10)

    return load


def _numpy_global(module: str, name: str) -> Any:
    return getattr(importlib.import_module(module), name)


def _allowed_pickle_globals() -> dict[tuple[str, str], Callable[[], Any]]:
    """(module, name) pairs a CIFAR pickle may reference, mapped to how to resolve them."""
    core = "numpy._core" if hasattr(np, "_core") else "numpy.core"
    reconstruct = lambda: _numpy_global(f"{core}.multiarray", "_reconstruct")  # noqa: E731
    frombuffer = lambda: _numpy_global(f"{core}.numeric", "_frombuffer")  # noqa: E731
    return {
        ("numpy.core.multiarray", "_reconstruct"): reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): reconstruct,
        ("numpy.core.numeric", "_frombuffer"): frombuffer,
        ("numpy._core.numeric", "_frombuffer"): frombuffer,
        ("numpy", "ndarray"): lambda: np.ndarray,
        ("numpy", "dtype"): lambda: np.dtype,
        # Protocol <= 2 pickles written by Python 3 store bytes as _codecs.encode(str, "latin1").
        ("_codecs", "encode"): lambda: _numpy_global("codecs", "encode"),
    }


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that can only rebuild numpy arrays, dtypes and plain containers."""

    _allowed = _allowed_pickle_globals()

    def find_class(self, module: str, name: str) -> Any:
        resolve = self._allowed.get((module, name))
        if resolve is None:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed here")
        return resolve()

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("persistent ids are not allowed here")


def _load_cifar_pickle(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Reads one ``cifar-10-batches-py`` batch: (N, 3, 32, 32) uint8 images and labels."""
    try:
        with path.open("rb") as fh:
            obj = _RestrictedUnpickler(fh, encoding="latin1").load()
    except (
        pickle.UnpicklingError,
        EOFError,
        ValueError,
        TypeError,
        AttributeError,
        IndexError,
        KeyError,
        struct.error,
    ) as exc:
        raise ValueError(f"{path}: not a valid CIFAR-10 batch pickle ({exc})") from exc
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a pickled dict, got {type(obj).__name__}")
    batch = {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in obj.items()}
    if "data" not in batch or "labels" not in batch:
        raise ValueError(f"{path}: CIFAR-10 batch needs 'data' and 'labels', got {sorted(batch)}")
    data = np.asarray(batch["data"])
    labels = np.asarray(batch["labels"])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise ValueError(
            f"{path}: expected uint8 data of shape (N, 3072), got {data.dtype} {data.shape}"
        )
    if labels.shape != (data.shape[0],) or labels.dtype.kind not in "iu":
        raise ValueError(
            f"{path}: expected {data.shape[0]} integer labels, got {labels.dtype} {labels.shape}"
        )
    return data.reshape(-1, 3, 32, 32), labels


def _load_cifar_binary(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Reads one ``cifar-10-batches-bin`` file: records of 1 label byte + 3072 pixel bytes."""
    raw = path.read_bytes()
    if len(raw) == 0 or len(raw) % 3073:
        raise ValueError(
            f"{path}: size {len(raw)} is not a positive multiple of 3073 bytes "
            "(truncated or corrupt)"
        )
    records = np.frombuffer(raw, dtype=np.uint8).reshape(-1, 3073)
    return records[:, 1:].reshape(-1, 3, 32, 32), records[:, 0]


_CIFAR_PY = ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], "test_batch")
_CIFAR_BIN = (
    "cifar-10-batches-bin",
    [f"data_batch_{i}.bin" for i in range(1, 6)],
    "test_batch.bin",
)


def _load_cifar10(root: Path, download: bool) -> _Raw:
    def paths(fmt: tuple[str, list[str], str]) -> list[Path]:
        folder, train, test = fmt
        return [root / folder / f for f in [*train, test]]

    # The python version (what torchvision downloads) wins; the binary version is a fallback.
    files = paths(_CIFAR_PY)
    reader: Callable[[Path], tuple[np.ndarray, np.ndarray]] = _load_cifar_pickle
    if not all(p.exists() for p in files):
        if all(p.exists() for p in paths(_CIFAR_BIN)):
            files, reader = paths(_CIFAR_BIN), _load_cifar_binary
        else:
            note = f"the binary version under {root / _CIFAR_BIN[0]} is accepted too"
            _ensure_files("cifar10", root, download, files, Path.exists, note=note)
    parts = [reader(p) for p in files]
    out: list[torch.Tensor] = []
    for chunk, path in ((parts[:-1], files[-2]), (parts[-1:], files[-1])):
        x = np.concatenate([c[0] for c in chunk])  # a fresh, writable array
        y = _labels(np.concatenate([c[1] for c in chunk]))
        _check_labels(y, 10, path.parent)
        out += [torch.from_numpy(x), y]
    return _Raw(out[0], out[1], out[2], out[3], 255.0, 10)


def _load_svhn_mat(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    from scipy.io import loadmat

    try:
        mat = loadmat(path)
    except Exception as exc:  # scipy raises many kinds of errors on a corrupt file
        raise ValueError(f"{path}: not a readable SVHN .mat file ({exc})") from exc
    if "X" not in mat or "y" not in mat:
        raise ValueError(f"{path}: SVHN .mat needs variables 'X' and 'y'")
    x, y = np.asarray(mat["X"]), np.asarray(mat["y"]).reshape(-1)
    if x.ndim != 4 or x.shape[:3] != (32, 32, 3) or x.dtype != np.uint8:
        raise ValueError(f"{path}: expected X as uint8 (32, 32, 3, N), got {x.dtype} {x.shape}")
    if y.shape != (x.shape[3],):
        raise ValueError(f"{path}: {y.shape[0]} labels for {x.shape[3]} images")
    labels = _labels(y)
    labels[labels == 10] = 0  # SVHN stores digit 0 as label 10
    _check_labels(labels, 10, path)
    images = np.ascontiguousarray(np.transpose(x, (3, 2, 0, 1)))  # (N, C, H, W)
    return torch.from_numpy(images), labels


def _load_svhn(root: Path, download: bool) -> _Raw:
    train, test = root / "train_32x32.mat", root / "test_32x32.mat"
    _ensure_files("svhn", root, download, [train, test], Path.exists)
    x, y = _load_svhn_mat(train)
    xt, yt = _load_svhn_mat(test)
    return _Raw(x, y, xt, yt, 255.0, 10)


# torchvision class names and how to call them to download into root.
_TORCHVISION: dict[str, tuple[str, list[dict[str, Any]]]] = {
    "mnist": ("MNIST", [{"train": True}, {"train": False}]),
    "fashion_mnist": ("FashionMNIST", [{"train": True}, {"train": False}]),
    "cifar10": ("CIFAR10", [{"train": True}, {"train": False}]),
    "svhn": ("SVHN", [{"split": "train"}, {"split": "test"}]),
}


def _ensure_files(
    name: str,
    root: Path,
    download: bool,
    paths: Sequence[Path],
    exists: Callable[[Path], bool],
    note: str = "",
) -> None:
    """Downloads through torchvision when asked and needed; raises if files are still missing."""
    missing = [p for p in paths if not exists(p)]
    if missing and download:
        import torchvision.datasets

        cls_name, calls = _TORCHVISION[name]
        cls = getattr(torchvision.datasets, cls_name)
        root.mkdir(parents=True, exist_ok=True)
        for kwargs in calls:
            try:
                cls(root=str(root), download=True, **kwargs)
            except Exception as exc:
                raise RuntimeError(
                    f"downloading {name!r} into {root} with torchvision.datasets.{cls_name} "
                    f"failed: {exc}"
                ) from exc
        missing = [p for p in paths if not exists(p)]
    if missing:
        raise DatasetNotFoundError(name, missing, root, note)


_LOADERS: dict[str, Callable[[Path, bool], _Raw]] = {
    "digits": _load_digits,
    "mnist1d": _load_mnist1d,
    "synthetic": _load_synthetic,
    "mnist": _mnist_like("mnist", "MNIST"),
    "fashion_mnist": _mnist_like("fashion_mnist", "FashionMNIST"),
    "cifar10": _load_cifar10,
    "svhn": _load_svhn,
}


# --------------------------------------------------------------------------------- splitting
def _generator(seed: int) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(seed)


def _is_int(value: Any) -> TypeGuard[int]:
    # numbers.Integral (numpy's integers among them) behaves as int wherever it is used here
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def kfold_indices(n: int, n_folds: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Seeded k-fold split of ``range(n)``: one ``(train_idx, val_idx)`` int64 pair per fold.

    The val parts of the folds are disjoint, cover ``range(n)`` and differ in size by at most
    one (the first ``n % n_folds`` folds get the extra sample); each ``train_idx`` is the rest.
    """
    if not _is_int(n) or n < 0:
        raise ValueError(f"n must be an integer >= 0, got {n!r}")
    if not _is_int(n_folds) or n_folds < 2:
        raise ValueError(f"n_folds must be an integer >= 2, got {n_folds!r}")
    if n_folds > n:
        raise ValueError(f"n_folds={n_folds} is larger than the number of samples n={n}")
    if not _is_int(seed):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    perm = torch.randperm(int(n), generator=_generator(int(seed)))
    base, extra = divmod(int(n), int(n_folds))
    sizes = [base + (1 if i < extra else 0) for i in range(n_folds)]
    chunks = list(torch.split(perm, sizes))
    return [(torch.cat(chunks[:i] + chunks[i + 1 :]), chunks[i].clone()) for i in range(n_folds)]


def _check_fraction(field: str, value: Any) -> float:
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if not ok or not 0.0 <= float(value) < 1.0:
        raise ValueError(f"{field} must be a number in [0, 1), got {value!r}")
    return float(value)


def _count(n: int, fraction: float) -> int:
    return int(math.floor(n * fraction + 0.5))


def _stratified_counts(class_counts: Sequence[int], size: int) -> list[int]:
    """How many samples of each class a stratified subset of ``size`` keeps.

    Each class's exact share ``size * n_c / n`` is rounded by largest remainders (ties go to
    the lower class index), so the counts add up to ``size``; then every class left at 0 (one
    with a share below 1) takes one sample from the class furthest above its share (ties: the
    larger count, then the lower index). Needs ``len(class_counts) <= size <= sum``, all
    counts >= 1. Exact integer arithmetic, so the result never depends on float rounding.
    """
    n = sum(class_counts)
    counts = [size * n_c // n for n_c in class_counts]
    by_remainder = sorted(
        range(len(class_counts)), key=lambda c: (-(size * class_counts[c] % n), c)
    )
    for c in by_remainder[: size - sum(counts)]:
        counts[c] += 1  # the remainder is > 0 here, so counts[c] <= class_counts[c]
    for c in range(len(counts)):
        if counts[c] == 0:
            # surplus over the exact share, times n: counts[d] * n - size * n_d
            donor = max(
                (d for d in range(len(counts)) if counts[d] >= 2),
                key=lambda d: (counts[d] * n - size * class_counts[d], counts[d], -d),
            )
            counts[donor] -= 1
            counts[c] = 1
    return counts


def _stratified_subset(y: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """Sorted indices into ``y`` of a seeded subset of ``size`` with the class proportions of
    ``y`` (see :func:`_stratified_counts`): the first samples of each class in one random
    permutation drawn from ``generator``."""
    classes, class_counts = torch.unique(y, return_counts=True)
    counts = _stratified_counts([int(c) for c in class_counts], size)
    perm = torch.randperm(len(y), generator=generator)
    labels = y[perm]
    chosen = [perm[labels == c][:k] for c, k in zip(classes.tolist(), counts, strict=True)]
    return torch.sort(torch.cat(chosen)).values


def carve_split(split: Split, fraction: float, seed: int) -> tuple[Split, Split]:
    """``(rest, carved)``: a seeded, class-stratified ``fraction`` of ``split`` carved out
    (at least one sample, at most all but one), e.g. a hyper-validation split taken from the
    train split so that hyperparameters fitted by hypergradient never see the validation
    split that selects trials. Both keep ``split``'s order."""
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction < 1:
        raise ValueError(f"fraction must be a number in (0, 1), got {fraction!r}")
    if not _is_int(seed) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
    n = len(split)
    size = min(max(1, round(n * fraction)), n - 1)
    if split.y.is_floating_point():  # float targets have no classes: a plain seeded subset
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        carved = perm[:size].sort().values
        keep = torch.ones(n, dtype=torch.bool)
        keep[carved] = False
        rest = keep.nonzero().squeeze(1).to(split.y.device)
        carved = carved.to(split.y.device)
        return Split(split.x[rest], split.y[rest]), Split(split.x[carved], split.y[carved])
    classes = len(torch.unique(split.y))
    if size < classes:
        raise ValueError(
            f"fraction: {fraction} of {n} samples is {size}, fewer than the {classes} classes "
            "(a stratified split needs one sample per class)"
        )
    carved = _stratified_subset(split.y, size, torch.Generator().manual_seed(seed))
    keep = torch.ones(n, dtype=torch.bool)
    keep[carved] = False
    rest = keep.nonzero().squeeze(1)
    carved = carved.to(split.y.device)
    rest = rest.to(split.y.device)
    return Split(split.x[rest], split.y[rest]), Split(split.x[carved], split.y[carved])


def _check_train_size(value: Any, y_train: torch.Tensor) -> int:
    """``train_size`` as an int in [classes in the train split, train split size]."""
    n, n_classes = len(y_train), len(torch.unique(y_train))
    if not _is_int(value) or not n_classes <= value <= n:
        raise ValueError(
            f"train_size must be an integer in [{n_classes}, {n}] (at least one sample per "
            f"class of the train split, at most all {n} of its samples) or None, got {value!r}"
        )
    return int(value)


def _channel_standardize(splits: Sequence[torch.Tensor]) -> tuple[list[float], list[float]]:
    """Standardizes every tensor in place with per-channel (dim 1) stats of the first one;
    returns the per-channel mean and std used."""
    train = splits[0]
    dims = [0, *range(2, train.ndim)]
    std, mean = torch.std_mean(train, dim=dims, correction=0, keepdim=True)
    std = torch.where(std > 1e-8, std, torch.ones_like(std))
    for t in splits:
        t.sub_(mean).div_(std)
    return mean.flatten().tolist(), std.flatten().tolist()


def load_dataset(
    name: str,
    *,
    seed: int = 0,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    data_dir: str | os.PathLike[str] | None = None,
    download: bool = False,
    n_folds: int | None = None,
    fold: int | None = None,
    normalize: bool = True,
    train_size: int | None = None,
) -> DataSplits:
    """Loads data set ``name`` and splits it by a permutation seeded with ``seed``.

    Args:
        name: one of :data:`DATASETS`.
        seed: seed of the split permutation (and of the k-fold assignment).
        val_fraction: share of the samples that go to val: of the whole data set for
            ``digits``/``synthetic``, of the official train set for the others. Ignored when
            ``n_folds`` is given.
        test_fraction: share of the whole data set held out as test for ``digits`` and
            ``synthetic``; ignored by data sets that come with an official test set.
        data_dir: root of the data files (and of the mnist1d cache); default
            :func:`default_data_dir`.
        download: fetch missing torchvision-format files into ``data_dir`` with torchvision.
        n_folds, fold: k-fold mode: the test split is held out as usual and the rest is split
            by :func:`kfold_indices` into train / val of fold ``fold``.
        normalize: scale to [0, 1] (image data) then standardize each channel with the mean
            and std of the train split. With False, images stay in [0, 1] and mnist1d /
            synthetic features stay as generated.
        train_size: keep only this many samples of the train split (None keeps all), chosen
            after the train / val / test split (also per fold) by a permutation that continues
            the ``seed``'s generator, stratified by class: each class keeps its share, rounded
            by largest remainders, and at least one sample; they stay in train-split order.
            Val and test are unchanged, bit for bit: the standardization statistics are those
            of the whole train split, computed before the subset is taken, so the subset's
            own mean and std are only close to 0 and 1. Must be an integer between the number
            of classes in the train split and its size.

    Raises:
        ValueError: bad arguments, or a corrupt data file (the message names it).
        DatasetNotFoundError: files missing and ``download`` is False.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; valid names: {', '.join(DATASETS)}")
    if not _is_int(seed) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
    val_fraction = _check_fraction("val_fraction", val_fraction)
    test_fraction = _check_fraction("test_fraction", test_fraction)
    if val_fraction + test_fraction >= 1.0:
        raise ValueError(
            f"val_fraction + test_fraction must be < 1, got {val_fraction} + {test_fraction}"
        )
    if n_folds is None:
        if fold is not None:
            raise ValueError(f"fold={fold!r} needs n_folds (an integer >= 2)")
    else:
        if not _is_int(n_folds) or n_folds < 2:
            raise ValueError(f"n_folds must be an integer >= 2, got {n_folds!r}")
        if not _is_int(fold) or not 0 <= fold < n_folds:
            raise ValueError(f"fold must be an integer in [0, {n_folds}), got {fold!r}")
    if train_size is not None and (not _is_int(train_size) or train_size < 1):
        raise ValueError(f"train_size must be an integer >= 1 or None, got {train_size!r}")
    root = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()

    raw = _LOADERS[name](root, download)
    gen = _generator(int(seed))
    if raw.x_test is None or raw.y_test is None:
        n = len(raw.y)
        n_test, n_val = _count(n, test_fraction), _count(n, val_fraction)
        perm = torch.randperm(n, generator=gen)
        x_test, y_test = raw.x[perm[:n_test]], raw.y[perm[:n_test]]
        pool = perm[n_test:]
    else:
        n_val = _count(len(raw.y), val_fraction)
        x_test, y_test = raw.x_test, raw.y_test
        pool = torch.randperm(len(raw.y), generator=gen)
    if n_folds is None:
        train_idx, val_idx = pool[n_val:], pool[:n_val]
    else:
        assert fold is not None  # checked with n_folds above
        fold_train, fold_val = kfold_indices(len(pool), int(n_folds), int(seed))[int(fold)]
        train_idx, val_idx = pool[fold_train], pool[fold_val]
    if len(train_idx) == 0:
        raise ValueError(
            f"no training samples left in {name!r} with val_fraction={val_fraction} and "
            f"test_fraction={test_fraction}"
        )

    xs = [raw.x[train_idx], raw.x[val_idx], x_test]
    xs = [x.to(torch.float32) if x.dtype != torch.float32 else x.clone() for x in xs]
    if raw.divisor != 1.0:
        for x in xs:
            x.div_(raw.divisor)
    preprocessing: dict[str, Any] = {"divisor": float(raw.divisor), "mean": None, "std": None}
    if normalize:
        preprocessing["mean"], preprocessing["std"] = _channel_standardize(xs)
    ys = [raw.y[train_idx], raw.y[val_idx], y_test.clone()]
    if train_size is not None:
        keep = _stratified_subset(ys[0], _check_train_size(train_size, ys[0]), gen)
        xs[0], ys[0] = xs[0][keep], ys[0][keep]
    train, val, test = (Split(x.contiguous(), y.contiguous()) for x, y in zip(xs, ys, strict=True))
    return DataSplits(
        name=name,
        train=train,
        val=val,
        test=test,
        num_classes=raw.num_classes,
        input_shape=tuple(int(d) for d in raw.x.shape[1:]),
        preprocessing=preprocessing,
    )


# ---------------------------------------------------------------------------- augmentation
class Augment:
    """CIFAR-style augmentation of a batch: random crop after zero padding, random h-flip.

    Every sample gets its own crop offset in ``[0, 2 * crop_padding]`` on both axes and is
    mirrored left-right with probability 0.5. All of it is one gather, without per-sample
    Python. Random numbers come from the given CPU generator, drawn as: offsets (if
    ``crop_padding > 0``), then flips (if ``hflip``).
    """

    def __init__(self, crop_padding: int = 4, hflip: bool = True) -> None:
        if not _is_int(crop_padding) or crop_padding < 0:
            raise ValueError(f"crop_padding must be an integer >= 0, got {crop_padding!r}")
        self.crop_padding = int(crop_padding)
        self.hflip = bool(hflip)

    def __repr__(self) -> str:
        return f"Augment(crop_padding={self.crop_padding}, hflip={self.hflip})"

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Augments ``x`` of shape (B, C, H, W); returns a new tensor of the same shape."""
        if x.ndim != 4:
            raise ValueError(f"Augment expects a batch of shape (B, C, H, W), got {tuple(x.shape)}")
        p = self.crop_padding
        if p == 0 and not self.hflip:
            return x
        b, c, h, w = x.shape
        if p:
            offsets = torch.randint(0, 2 * p + 1, (2, b), generator=generator)
            dy, dx = offsets[0], offsets[1]
        else:
            dy = dx = torch.zeros(b, dtype=torch.int64)
        cols = torch.arange(w).expand(b, w)
        if self.hflip:
            flip = torch.randint(0, 2, (b,), generator=generator).bool()
            cols = torch.where(flip[:, None], cols.flip(1), cols)
        rows = dy[:, None] + torch.arange(h)  # (B, H) into the padded image
        cols = dx[:, None] + cols  # (B, W)
        padded = F.pad(x, (p, p, p, p)) if p else x
        dev = x.device
        rows, cols = rows.to(dev), cols.to(dev)
        batch = torch.arange(b, device=dev)[:, None, None, None]
        chan = torch.arange(c, device=dev)[None, :, None, None]
        return padded[batch, chan, rows[:, None, :, None], cols[:, None, None, :]]


# ---------------------------------------------------------------------------- batch iterator
class BatchIterator:
    """Infinite iterator of ``(xb, yb)`` batches over tensors already on their device.

    One ``randperm`` per epoch from the iterator's own CPU generator (moved to the data's
    device), then one ``index_select`` per batch. When an epoch is used up, the next call
    starts a new one. ``epoch`` counts finished epochs; ``position`` is the number of batches
    already returned in the current epoch; ``len()`` is the number of batches per epoch.
    """

    def __init__(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        batch_size: int,
        *,
        shuffle: bool = True,
        drop_last: bool = False,
        seed: int = 0,
        augment: Augment | Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None,
    ) -> None:
        if x.ndim < 1 or y.ndim < 1 or x.shape[0] != y.shape[0]:
            raise ValueError(
                f"x and y must have the same length, got {tuple(x.shape)} and {tuple(y.shape)}"
            )
        if x.device != y.device:
            raise ValueError(f"x and y must be on the same device, got {x.device} and {y.device}")
        n = int(x.shape[0])
        if not _is_int(batch_size) or not 1 <= batch_size <= n:
            raise ValueError(f"batch_size must be an integer in [1, {n}], got {batch_size!r}")
        if not _is_int(seed):
            raise ValueError(f"seed must be an integer, got {seed!r}")
        self.x, self.y = x, y
        self.batch_size = int(batch_size)
        self.shuffle = bool(shuffle)
        self.drop_last = bool(drop_last)
        self.augment = augment
        self.num_samples = n
        self._generator = _generator(int(seed))
        self._epoch = 0
        self._position = 0
        self._perm = self._new_permutation()

    def _new_permutation(self) -> torch.Tensor:
        if self.shuffle:
            perm = torch.randperm(self.num_samples, generator=self._generator)
        else:
            perm = torch.arange(self.num_samples)
        return perm.to(self.x.device)

    def __len__(self) -> int:
        if self.drop_last:
            return self.num_samples // self.batch_size
        return -(-self.num_samples // self.batch_size)

    @property
    def epoch(self) -> int:
        """Number of completed epochs (the index of the current one)."""
        return self._epoch

    @property
    def position(self) -> int:
        """Batches already returned in the current epoch."""
        return self._position

    def __iter__(self) -> BatchIterator:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._position >= len(self):
            self._epoch += 1
            self._position = 0
            self._perm = self._new_permutation()
        start = self._position * self.batch_size
        stop = min(start + self.batch_size, self.num_samples)
        self._position += 1
        if self.shuffle:
            idx = self._perm[start:stop]
            xb, yb = self.x.index_select(0, idx), self.y.index_select(0, idx)
        else:
            xb, yb = self.x[start:stop], self.y[start:stop]
        if self.augment is not None:
            xb = self.augment(xb, self._generator)
        return xb, yb

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns the next batch (same as ``next(iterator)``)."""
        return self.__next__()

    def state_dict(self) -> dict[str, Any]:
        """Position in the stream, as tensors and ints (loads with ``weights_only=True``)."""
        return {
            "generator_state": self._generator.get_state().clone(),
            "permutation": self._perm.cpu().clone(),
            "position": self._position,
            "epoch": self._epoch,
            "num_samples": self.num_samples,
            "batch_size": self.batch_size,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restores a :meth:`state_dict`; later batches are then bit-identical to the original's."""
        keys = ("generator_state", "permutation", "position", "epoch", "num_samples", "batch_size")
        missing = [k for k in keys if k not in state]
        if missing:
            raise ValueError(f"BatchIterator state is missing {missing}")
        if int(state["num_samples"]) != self.num_samples:
            raise ValueError(
                f"state is for {int(state['num_samples'])} samples, this iterator "
                f"has {self.num_samples}"
            )
        if int(state["batch_size"]) != self.batch_size:
            raise ValueError(
                f"state is for batch_size {int(state['batch_size'])}, this "
                f"iterator has {self.batch_size}"
            )
        perm = torch.as_tensor(state["permutation"], dtype=torch.int64)
        if perm.shape != (self.num_samples,):
            raise ValueError(
                f"state permutation has shape {tuple(perm.shape)}, expected ({self.num_samples},)"
            )
        position, epoch = int(state["position"]), int(state["epoch"])
        if not 0 <= position <= len(self) or epoch < 0:
            raise ValueError(f"invalid state position={position}, epoch={epoch}")
        self._generator.set_state(torch.as_tensor(state["generator_state"]).cpu())
        self._perm = perm.to(self.x.device)
        self._position, self._epoch = position, epoch


#: Keys of a ``data`` config section (the arguments of :func:`load_dataset` a config may set).
DATA_KEYS = (
    "name",
    "seed",
    "val_fraction",
    "test_fraction",
    "data_dir",
    "n_folds",
    "fold",
    "train_size",
    "normalize",
    "download",
)
#: The ``data`` keys that take true or false.
_DATA_FLAGS = ("normalize", "download")


def load_data(
    data: str | Mapping[str, Any] | DataSplits,
) -> tuple[dict[str, Any] | None, DataSplits]:
    """The one way from a ``data`` config to splits. The config is a built-in data set's name,
    a mapping of :data:`DATA_KEYS`, ``{"factory": "package.module:function", **kwargs}`` (your
    own data set: ``function(**kwargs)`` returns :class:`DataSplits`, imported in every process
    that needs it), or already loaded :class:`DataSplits`. Returns the reloadable spec
    (``None`` for user-supplied splits, which cannot be described) and the splits."""
    if isinstance(data, DataSplits):
        return None, data
    if isinstance(data, str):
        data = {"name": data}
    if not isinstance(data, Mapping):
        raise TypeError(f"data must be a name, a mapping or DataSplits, got {data!r}")
    if "factory" in data:
        return dict(data), _from_factory(data)
    unknown = sorted(set(data) - set(DATA_KEYS))
    if unknown:
        raise ValueError(f"data: unknown key(s) {unknown}; allowed: {list(DATA_KEYS)}")
    if "name" not in data:
        raise ValueError(
            "data.name is required (e.g. 'digits'), or data.factory for your own data set "
            "('package.module:function' returning DataSplits)"
        )
    for key in _DATA_FLAGS:
        if key in data and not isinstance(data[key], bool):
            raise ValueError(f"data.{key}: expected true or false, got {data[key]!r}")
    spec: dict[str, Any] = {
        k: (str(v) if k == "data_dir" and v is not None else v) for k, v in data.items()
    }
    kwargs = {k: v for k, v in spec.items() if k != "name"}
    return spec, load_dataset(spec["name"], **kwargs)


def _from_factory(data: Mapping[str, Any]) -> DataSplits:
    """``data.factory(**kwargs)``, checked to be :class:`DataSplits`."""
    if "name" in data:
        raise ValueError(
            f"data: give 'name' or 'factory', not both; got name={data['name']!r}, "
            f"factory={data['factory']!r}"
        )
    factory = import_object(data["factory"], "data.factory")
    if not callable(factory):
        raise ValueError(f"data.factory: {data['factory']!r} is not callable")
    kwargs = {k: v for k, v in data.items() if k != "factory"}
    try:
        splits = factory(**kwargs)
    except TypeError as exc:
        raise ValueError(
            f"data.factory {data['factory']!r} failed with arguments {kwargs!r}: {exc}"
        ) from exc
    if not isinstance(splits, DataSplits):
        raise ValueError(
            f"data.factory {data['factory']!r} must return gradhpo.data.DataSplits, got "
            f"{type(splits).__name__}"
        )
    return splits
