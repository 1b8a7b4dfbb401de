"""Tests of gradhpo.data: offline data sets, file parsers, splits, BatchIterator, Augment.

Nothing here touches the network: torchvision-format data sets are written by the tests
themselves, in their real on-disk formats, into temporary directories.
"""

from __future__ import annotations

import gzip
import io
import os
import pickle
import random
import re
import shlex
import struct
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import scipy.io
import torch

import gradhpo.data as gd
from gradhpo.data import (
    DATASETS,
    Augment,
    BatchIterator,
    DatasetNotFoundError,
    DataSplits,
    Split,
    default_data_dir,
    kfold_indices,
    load_dataset,
)

OFFLINE = ("digits", "synthetic", "mnist1d")
#: The real system folders, saved before any test points them elsewhere.
REAL_SYSTEM_DATA_DIRS = dict(gd.SYSTEM_DATA_DIRS)
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


# ------------------------------------------------------------------------------------ helpers
def rows(x: torch.Tensor) -> Counter[bytes]:
    """Multiset of the rows (samples) of ``x``, as raw bytes."""
    flat = x.reshape(len(x), -1).contiguous().numpy()
    return Counter(r.tobytes() for r in flat)


def samples(split: Split) -> Counter[bytes]:
    """Multiset of (features, label) pairs of a split."""
    flat = split.x.reshape(len(split), -1).contiguous().numpy()
    return Counter(
        r.tobytes() + struct.pack("<q", int(lab)) for r, lab in zip(flat, split.y, strict=False)
    )


def assert_splits_equal(a: DataSplits, b: DataSplits) -> None:
    for name in ("train", "val", "test"):
        sa, sb = getattr(a, name), getattr(b, name)
        assert torch.equal(sa.x, sb.x) and torch.equal(sa.y, sb.y), name


def channel_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    dims = [0, *range(2, x.ndim)]
    return x.double().mean(dims), x.double().std(dims, correction=0)


@pytest.fixture(autouse=True)
def _no_system_data(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory):
    """Every test sees an empty system folder, whatever this machine has installed, so that
    files missing from ``data_dir`` are missing everywhere; tests of the system folder point
    :data:`gradhpo.data.SYSTEM_DATA_DIRS` at their own (or back at the real one)."""
    absent = tmp_path_factory.getbasetemp() / "no-system-data"
    monkeypatch.setattr(gd, "SYSTEM_DATA_DIRS", {"fashion_mnist": (absent,)})


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One data dir per module, so mnist1d is generated once."""
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="module")
def mnist1d_first(data_dir: Path) -> dict[str, Any]:
    """Generates mnist1d into ``data_dir`` and records the global RNG states around it."""
    np_before, py_before = np.random.get_state()[1].copy(), random.getstate()
    torch_before = torch.get_rng_state()
    splits = load_dataset("mnist1d", data_dir=data_dir)
    return {
        "splits": splits,
        "np_same": np.array_equal(np.random.get_state()[1], np_before),
        "py_same": random.getstate() == py_before,
        "torch_same": torch.equal(torch.get_rng_state(), torch_before),
    }


def load(name: str, data_dir: Path, **kwargs: Any) -> DataSplits:
    return load_dataset(name, data_dir=data_dir, **kwargs)


# ---------------------------------------------------------------------- offline data sets
EXPECTED = {
    # name: (input_shape, num_classes, (train, val, test) with default fractions)
    "digits": ((1, 8, 8), 10, (1258, 180, 359)),
    "synthetic": ((1, 8, 8), 3, (168, 24, 48)),
    "mnist1d": ((1, 40), 10, (3600, 400, 1000)),
}


@pytest.mark.parametrize("name", OFFLINE)
def test_offline_shapes_dtypes_sizes(name: str, data_dir: Path, mnist1d_first: dict) -> None:
    shape, classes, sizes = EXPECTED[name]
    d = load(name, data_dir)
    assert d.name == name and d.input_shape == shape and d.num_classes == classes
    assert (len(d.train), len(d.val), len(d.test)) == sizes
    for split in (d.train, d.val, d.test):
        assert split.x.dtype == torch.float32 and split.y.dtype == torch.int64
        assert split.x.shape == (len(split), *shape) and split.y.shape == (len(split),)
        assert split.x.is_contiguous() and split.x.device.type == "cpu"
        assert 0 <= int(split.y.min()) and int(split.y.max()) < classes
    assert set(d.train.y.tolist()) == set(range(classes))


@pytest.mark.parametrize("name", ["digits", "synthetic"])
def test_whole_dataset_splits_partition_the_data(name: str, data_dir: Path) -> None:
    """train + val + test is exactly the data set (as a multiset); so the splits are disjoint."""
    d = load(name, data_dir, normalize=False)
    other = load(name, data_dir, normalize=False, val_fraction=0.3, test_fraction=0.3, seed=5)
    together = samples(d.train) + samples(d.val) + samples(d.test)
    assert together == samples(other.train) + samples(other.val) + samples(other.test)
    assert sum(together.values()) == {"digits": 1797, "synthetic": 240}[name]
    if name == "digits":
        from sklearn.datasets import load_digits

        ref = load_digits()
        x = torch.from_numpy(ref.data.reshape(-1, 1, 8, 8) / 16.0).float()
        expected = samples(Split(x, torch.from_numpy(ref.target).long()))
        assert together == expected
        assert float(d.train.x.min()) == 0.0 and float(d.train.x.max()) == 1.0


def test_mnist1d_splits_match_the_generator(data_dir: Path, mnist1d_first: dict) -> None:
    d = load("mnist1d", data_dir, normalize=False)
    cache = next((data_dir / "mnist1d").glob("*.npz"))
    with np.load(cache, allow_pickle=False) as z:
        train = Split(torch.from_numpy(z["x"][:, None, :]).float(), torch.from_numpy(z["y"]))
        test = Split(
            torch.from_numpy(z["x_test"][:, None, :]).float(), torch.from_numpy(z["y_test"])
        )
    assert samples(d.train) + samples(d.val) == samples(train)
    assert torch.equal(d.test.x, test.x) and torch.equal(d.test.y, test.y)
    assert not set(rows(d.train.x)) & set(rows(d.val.x))


@pytest.mark.parametrize("name", OFFLINE)
def test_same_seed_identical_other_seed_differs(name: str, data_dir: Path, mnist1d_first) -> None:
    a, b = load(name, data_dir, seed=3), load(name, data_dir, seed=3)
    assert_splits_equal(a, b)
    c = load(name, data_dir, seed=4)
    assert not torch.equal(a.train.y, c.train.y)
    assert rows(a.val.x) != rows(c.val.x)


@pytest.mark.parametrize("name", OFFLINE)
def test_normalization_uses_train_stats(name: str, data_dir: Path, mnist1d_first) -> None:
    d, raw = load(name, data_dir), load(name, data_dir, normalize=False)
    mean, std = channel_stats(d.train.x)
    assert torch.allclose(mean, torch.zeros_like(mean), atol=1e-4)
    assert torch.allclose(std, torch.ones_like(std), atol=1e-3)
    # val/test are standardized with the *train* statistics
    raw_mean, raw_std = channel_stats(raw.train.x)
    shape = (1, -1) + (1,) * (raw.test.x.ndim - 2)
    for split in ("val", "test"):
        expected = (getattr(raw, split).x.double() - raw_mean.view(shape)) / raw_std.view(shape)
        assert torch.allclose(getattr(d, split).x.double(), expected, atol=1e-4)
    assert torch.equal(d.train.y, raw.train.y)


def test_synthetic_is_learnable() -> None:
    """Nearest class mean on train classifies the test split almost perfectly."""
    d = load_dataset("synthetic", seed=0)
    xtr, xte = d.train.x.flatten(1), d.test.x.flatten(1)
    means = torch.stack([xtr[d.train.y == k].mean(0) for k in range(d.num_classes)])
    pred = torch.cdist(xte, means).argmin(1)
    assert (pred == d.test.y).float().mean() > 0.95


def test_mnist1d_generation_leaves_global_rng_alone(mnist1d_first: dict) -> None:
    assert mnist1d_first["np_same"] and mnist1d_first["py_same"] and mnist1d_first["torch_same"]


def test_mnist1d_second_load_reads_the_cache(
    data_dir: Path, mnist1d_first: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mnist1d.data

    def boom(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("make_dataset called although a cache exists")

    monkeypatch.setattr(mnist1d.data, "make_dataset", boom)
    assert_splits_equal(load("mnist1d", data_dir), mnist1d_first["splits"])
    assert [p.name for p in (data_dir / "mnist1d").iterdir()] == ["mnist1d_default.npz"]


@pytest.mark.parametrize("damage", ["garbage", "truncated", "wrong_keys"])
def test_mnist1d_bad_cache_is_regenerated(
    tmp_path: Path,
    data_dir: Path,
    mnist1d_first: dict,
    monkeypatch: pytest.MonkeyPatch,
    damage: str,
) -> None:
    import mnist1d.data

    good = next((data_dir / "mnist1d").glob("*.npz"))
    with np.load(good, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    calls = []
    monkeypatch.setattr(mnist1d.data, "make_dataset", lambda args: calls.append(1) or arrays)
    bad = tmp_path / "mnist1d" / good.name
    bad.parent.mkdir()
    if damage == "garbage":
        bad.write_bytes(b"not an npz file")
    elif damage == "truncated":
        bad.write_bytes(good.read_bytes()[:5000])
    else:
        np.savez(bad, a=np.zeros(3))
    with pytest.warns(UserWarning, match="mnist1d cache"):
        d = load("mnist1d", tmp_path)
    assert calls == [1]
    assert_splits_equal(d, mnist1d_first["splits"])
    with np.load(bad, allow_pickle=False) as z:  # rewritten with the good arrays
        assert np.array_equal(z["x"], arrays["x"])


def test_digits_and_synthetic_write_nothing(tmp_path: Path) -> None:
    load_dataset("digits", data_dir=tmp_path / "d")
    load_dataset("synthetic", data_dir=tmp_path / "d")
    assert not (tmp_path / "d").exists()


def test_default_data_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("GRADHPO_DATA_DIR", str(tmp_path / "x"))
    assert default_data_dir() == tmp_path / "x"
    monkeypatch.delenv("GRADHPO_DATA_DIR")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_data_dir() == tmp_path / ".cache" / "gradhpo" / "data"


def test_splits_to_device_and_validation() -> None:
    d = load_dataset("synthetic")
    moved = d.to("cpu")
    assert moved.name == d.name and moved.input_shape == d.input_shape
    assert_splits_equal(moved, d)
    assert len(d.train.to(torch.device("cpu"))) == len(d.train)
    with pytest.raises(ValueError, match="length"):
        Split(torch.zeros(3, 2), torch.zeros(4, dtype=torch.long))


# ---------------------------------------------------------------------------------- k-fold
@pytest.mark.parametrize("n,k", [(10, 3), (12, 4), (7, 7), (100, 2)])
def test_kfold_indices_partition(n: int, k: int) -> None:
    folds = kfold_indices(n, k, seed=0)
    assert len(folds) == k
    vals = [v for _, v in folds]
    assert sorted(torch.cat(vals).tolist()) == list(range(n))
    sizes = [len(v) for v in vals]
    assert max(sizes) - min(sizes) <= 1 and sum(sizes) == n
    for train, val in folds:
        assert train.dtype == val.dtype == torch.int64
        assert not set(train.tolist()) & set(val.tolist())
        assert sorted(train.tolist() + val.tolist()) == list(range(n))
    again = kfold_indices(n, k, seed=0)
    assert all(
        torch.equal(a, c) and torch.equal(b, e)
        for (a, b), (c, e) in zip(folds, again, strict=False)
    )


def test_kfold_indices_seed_matters_and_errors() -> None:
    a, b = kfold_indices(50, 5, seed=0), kfold_indices(50, 5, seed=1)
    assert any(not torch.equal(x[1], y[1]) for x, y in zip(a, b, strict=False))
    for n, k in [(5, 1), (3, 4), (5, 2.0)]:
        with pytest.raises(ValueError, match="n_folds"):
            kfold_indices(n, k, seed=0)


def test_load_dataset_folds() -> None:
    k = 4
    folds = [load_dataset("digits", n_folds=k, fold=i, seed=2, normalize=False) for i in range(k)]
    pool = samples(folds[0].train) + samples(folds[0].val)
    val_union: Counter[bytes] = Counter()
    for d in folds:
        assert torch.equal(d.test.x, folds[0].test.x) and torch.equal(d.test.y, folds[0].test.y)
        assert samples(d.train) + samples(d.val) == pool
        val_union += samples(d.val)
    assert val_union == pool  # every pool sample is in val exactly once over the folds
    plain = load_dataset("digits", seed=2, normalize=False)
    assert torch.equal(plain.test.x, folds[0].test.x)  # same held-out test as without folds
    assert [len(d.val) for d in folds] == [360, 360, 359, 359]  # 1797 - 359 test = 1438 in the pool
    synthetic = load_dataset("synthetic", n_folds=3, fold=1, val_fraction=0.5)
    assert len(synthetic.val) == 64  # val_fraction is ignored in k-fold mode: (240 - 48) / 3


# ------------------------------------------------------------------ argument validation
@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"name": "imagenet"}, r"'imagenet'.*digits.*svhn"),
        ({"val_fraction": -0.1}, r"val_fraction.*-0\.1"),
        ({"val_fraction": 1.0}, r"val_fraction.*1\.0"),
        ({"val_fraction": float("nan")}, r"val_fraction.*nan"),
        ({"val_fraction": "0.1"}, r"val_fraction.*'0\.1'"),
        ({"test_fraction": 1.5}, r"test_fraction.*1\.5"),
        ({"test_fraction": True}, r"test_fraction.*True"),
        ({"val_fraction": 0.5, "test_fraction": 0.5}, r"val_fraction \+ test_fraction"),
        ({"val_fraction": 0.0, "test_fraction": 0.9999}, r"no training samples"),
        ({"n_folds": 1, "fold": 0}, r"n_folds.*1"),
        ({"n_folds": 2.5, "fold": 0}, r"n_folds.*2\.5"),
        ({"n_folds": 3, "fold": 3}, r"fold.*\[0, 3\).*3"),
        ({"n_folds": 3, "fold": -1}, r"fold.*-1"),
        ({"n_folds": 3}, r"fold.*None"),
        ({"fold": 0}, r"fold=0 needs n_folds"),
        ({"name": "synthetic", "n_folds": 500, "fold": 0}, r"n_folds=500"),
        ({"seed": 1.5}, r"seed.*1\.5"),
    ],
)
def test_load_dataset_rejects_bad_arguments(kwargs: dict[str, Any], match: str) -> None:
    kwargs = {"name": "digits", **kwargs}
    with pytest.raises(ValueError, match=match):
        load_dataset(kwargs.pop("name"), **kwargs)


# ------------------------------------------------------------------------------ train_size
@pytest.mark.parametrize(
    "class_counts,size,expected",
    [
        ([50, 30, 20], 10, [5, 3, 2]),  # exact shares
        ([5, 3, 2], 5, [3, 1, 1]),  # shares 2.5, 1.5, 1: the tie goes to the lower class
        ([10, 10, 10], 4, [2, 1, 1]),
        ([10, 10, 10], 30, [10, 10, 10]),  # everything
        ([70, 20, 10], 7, [5, 1, 1]),  # shares 4.9, 1.4, 0.7: largest remainders 0.9, 0.7
        ([91, 1, 1, 1, 1, 1, 1, 1, 1, 1], 10, [1] * 10),  # nine shares of 0.1 raised to 1
        ([1, 1, 98], 50, [1, 1, 48]),  # shares 0.5, 0.5, 49: the big class gives one
    ],
)
def test_stratified_counts_largest_remainder(
    class_counts: list[int], size: int, expected: list[int]
) -> None:
    assert gd._stratified_counts(class_counts, size) == expected


def test_stratified_counts_properties() -> None:
    """Sum is exact, every class has 1..n_c samples, each count is within 1 of its share
    (unless raised to the minimum of 1), over many random class layouts."""
    rng = random.Random(0)
    for _ in range(300):
        class_counts = [rng.randint(1, 60) for _ in range(rng.randint(1, 12))]
        n = sum(class_counts)
        size = rng.randint(len(class_counts), n)
        counts = gd._stratified_counts(class_counts, size)
        assert sum(counts) == size
        assert all(1 <= k <= n_c for k, n_c in zip(counts, class_counts, strict=True))
        raised = sum(1 for n_c in class_counts if size * n_c < n)
        if raised == 0:
            assert all(
                abs(k - size * n_c / n) < 1 for k, n_c in zip(counts, class_counts, strict=True)
            )


def test_train_size_keeps_class_proportions_of_the_train_split() -> None:
    full = load_dataset("digits", seed=3)
    sub = load_dataset("digits", seed=3, train_size=100)
    assert len(sub.train) == 100
    full_counts = torch.bincount(full.train.y, minlength=10)
    sub_counts = torch.bincount(sub.train.y, minlength=10)
    assert sub_counts.tolist() == gd._stratified_counts(full_counts.tolist(), 100)
    shares = 100 * full_counts.double() / len(full.train)
    assert bool(((sub_counts - shares).abs() < 1).all())
    # a subset of the train split, in its order, with the same (whole-train) standardization
    assert not samples(sub.train) - samples(full.train)
    positions = [
        full.train.x.reshape(len(full.train), -1).tolist().index(r)
        for r in sub.train.x.reshape(100, -1).tolist()[:5]
    ]
    assert positions == sorted(positions)
    # val and test are bit-identical to a load without train_size
    for name in ("val", "test"):
        a, b = getattr(full, name), getattr(sub, name)
        assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y), name
    assert sub.input_shape == full.input_shape and sub.num_classes == full.num_classes


def test_train_size_is_deterministic_and_seeded() -> None:
    a = load_dataset("digits", seed=1, train_size=200)
    assert_splits_equal(a, load_dataset("digits", seed=1, train_size=200))
    # another seed: another split, and another subset of it
    assert not torch.equal(a.train.y, load_dataset("digits", seed=2, train_size=200).train.y)
    whole = load_dataset("digits", seed=1)
    assert_splits_equal(whole, load_dataset("digits", seed=1, train_size=len(whole.train)))


def test_train_size_gives_every_class_one_sample(monkeypatch: pytest.MonkeyPatch) -> None:
    """A class with a share below one sample still gets one; the big class gives it up."""
    y = torch.tensor([0] * 180 + [1] * 10 + [2] * 10)
    x = torch.arange(len(y), dtype=torch.float32).reshape(-1, 1, 1, 1)
    raw = gd._Raw(x, y, x[:3].clone(), y[:3].clone(), 1.0, 3)
    monkeypatch.setitem(gd._LOADERS, "synthetic", lambda root, download: raw)
    d = load_dataset("synthetic", val_fraction=0.0, train_size=10, normalize=False)
    assert torch.bincount(d.train.y, minlength=3).tolist() == [8, 1, 1]
    assert len(d.val) == 0 and torch.equal(d.test.y, y[:3])


def test_train_size_applies_to_each_fold() -> None:
    folds = [load_dataset("digits", n_folds=3, fold=i, train_size=60) for i in range(3)]
    assert [len(d.train) for d in folds] == [60, 60, 60]
    assert all(set(d.train.y.tolist()) == set(range(10)) for d in folds)
    plain = load_dataset("digits", n_folds=3, fold=1)
    assert torch.equal(folds[1].val.x, plain.val.x)


@pytest.mark.parametrize("value", [0, -3, True, False, 2.5, 100.0, "100", 9, 1259, 10**6])
def test_train_size_bad_values(value: Any) -> None:
    """digits' train split has 1258 samples of 10 classes: 10..1258 is the valid range."""
    with pytest.raises(ValueError, match=rf"train_size.*got {re.escape(repr(value))}$"):
        load_dataset("digits", train_size=value)


def test_train_size_bounds_are_inclusive() -> None:
    assert len(load_dataset("digits", train_size=10).train) == 10
    assert len(load_dataset("digits", train_size=1258).train) == 1258


def test_datasets_tuple() -> None:
    assert DATASETS == (
        "digits",
        "mnist1d",
        "synthetic",
        "mnist",
        "fashion_mnist",
        "cifar10",
        "svhn",
    )


# ------------------------------------------------------------ torchvision formats: writers
def write_idx(path: Path, arr: np.ndarray, *, gz: bool = False) -> None:
    """Writes a uint8 array in IDX format (optionally gzip-compressed, with a .gz suffix)."""
    header = struct.pack(">HBB", 0, 0x08, arr.ndim) + struct.pack(f">{arr.ndim}i", *arr.shape)
    data = header + arr.astype(np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    if gz:
        path.with_name(path.name + ".gz").write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)


def write_mnist(root: Path, folder: str, *, gz: bool = False, n_train: int = 20, n_test: int = 6):
    rng = np.random.default_rng(0)
    parts = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        x = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        y = rng.integers(0, 10, size=n, dtype=np.uint8)
        write_idx(root / folder / "raw" / f"{prefix}-images-idx3-ubyte", x, gz=gz)
        write_idx(root / folder / "raw" / f"{prefix}-labels-idx1-ubyte", y, gz=gz)
        parts[prefix] = (x, y)
    return parts


def cifar_arrays(n: int, seed: int) -> tuple[np.ndarray, list[int]]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(n, 3072), dtype=np.uint8), rng.integers(0, 10, n).tolist()


def write_cifar_py(root: Path, *, protocol: int = 2, bytes_keys: bool = True, n: int = 4):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for i, name in enumerate(names):
        data, labels = cifar_arrays(n, seed=i)
        key = (lambda s: s.encode()) if bytes_keys else (lambda s: s)
        batch = {
            key("batch_label"): key(f"batch {i}"),
            key("labels"): labels,
            key("data"): data,
            key("filenames"): [key(f"img{j}.png") for j in range(n)],
        }
        (folder / name).write_bytes(pickle.dumps(batch, protocol=protocol))
        written[name] = (data, labels)
    return written


def write_cifar_bin(root: Path, n: int = 4):
    folder = root / "cifar-10-batches-bin"
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    names = [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]
    for i, name in enumerate(names):
        data, labels = cifar_arrays(n, seed=10 + i)
        records = np.concatenate([np.array(labels, dtype=np.uint8)[:, None], data], axis=1)
        (folder / name).write_bytes(records.tobytes())
        written[name] = (data, labels)
    return written


def write_svhn(root: Path, n_train: int = 12, n_test: int = 5):
    rng = np.random.default_rng(1)
    written = {}
    for split, n in (("train", n_train), ("test", n_test)):
        x = rng.integers(0, 256, size=(32, 32, 3, n), dtype=np.uint8)
        y = rng.integers(1, 11, size=(n, 1)).astype(np.uint8)
        y[0, 0] = 10  # digit 0
        root.mkdir(parents=True, exist_ok=True)
        scipy.io.savemat(root / f"{split}_32x32.mat", {"X": x, "y": y})
        written[split] = (x, y)
    return written


# -------------------------------------------------------------- torchvision formats: tests
@pytest.mark.parametrize(
    "name,folder,gz", [("mnist", "MNIST", False), ("fashion_mnist", "FashionMNIST", True)]
)
def test_idx_round_trip(tmp_path: Path, name: str, folder: str, gz: bool) -> None:
    parts = write_mnist(tmp_path, folder, gz=gz)
    d = load_dataset(name, data_dir=tmp_path, normalize=False, val_fraction=0.25)
    assert d.input_shape == (1, 28, 28) and d.num_classes == 10
    assert (len(d.train), len(d.val), len(d.test)) == (15, 5, 6)
    x_test, y_test = parts["t10k"]
    assert float(d.test.x[2, 0, 5, 7]) == pytest.approx(x_test[2, 5, 7] / 255.0)
    assert d.test.y.tolist() == y_test.tolist()
    x_train, y_train = parts["train"]
    original = Split(
        torch.from_numpy(x_train[:, None] / 255.0).float(), torch.from_numpy(y_train).long()
    )
    assert samples(d.train) + samples(d.val) == samples(original)
    normed = load_dataset(name, data_dir=tmp_path)
    mean, std = channel_stats(normed.train.x)
    assert abs(float(mean)) < 1e-4 and abs(float(std) - 1) < 1e-3


def test_idx_truncated_or_bad_magic(tmp_path: Path) -> None:
    write_mnist(tmp_path, "MNIST")
    path = tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(ValueError, match="train-images-idx3-ubyte.*truncated"):
        load_dataset("mnist", data_dir=tmp_path)
    labels = tmp_path / "MNIST" / "raw" / "t10k-labels-idx1-ubyte"
    write_mnist(tmp_path, "MNIST")
    labels.write_bytes(b"\x00\x00\x08\x03" + labels.read_bytes()[4:])
    with pytest.raises(ValueError, match="t10k-labels-idx1-ubyte.*magic"):
        load_dataset("mnist", data_dir=tmp_path)


def test_idx_corrupt_gzip(tmp_path: Path) -> None:
    write_mnist(tmp_path, "FashionMNIST", gz=True)
    gz = tmp_path / "FashionMNIST" / "raw" / "t10k-images-idx3-ubyte.gz"
    gz.write_bytes(gz.read_bytes()[:30])
    with pytest.raises(ValueError, match=r"t10k-images-idx3-ubyte\.gz"):
        load_dataset("fashion_mnist", data_dir=tmp_path)


@pytest.mark.parametrize(
    "name,expected",
    [
        ("mnist", "MNIST/raw/train-images-idx3-ubyte"),
        ("fashion_mnist", "FashionMNIST/raw/t10k-labels-idx1-ubyte"),
        ("cifar10", "cifar-10-batches-py/data_batch_1"),
        ("svhn", "train_32x32.mat"),
    ],
)
def test_missing_files_raise_dataset_not_found(tmp_path: Path, name: str, expected: str) -> None:
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset(name, data_dir=tmp_path)
    message = str(info.value)
    assert str(tmp_path / expected) in message and "download=True" in message
    assert name in message and isinstance(info.value, FileNotFoundError)
    assert "\n" not in message  # the CLI prints it as one line
    again = pickle.loads(pickle.dumps(info.value))
    assert str(again) == message
    assert not any(tmp_path.iterdir())  # nothing was written, no download attempted


def test_missing_files_use_default_data_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GRADHPO_DATA_DIR", str(tmp_path / "env"))
    with pytest.raises(DatasetNotFoundError, match="env/test_32x32.mat"):
        load_dataset("svhn")


def test_download_calls_torchvision(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """download=True asks torchvision (stubbed here) to fetch into data_dir, then reads the files."""
    import torchvision.datasets

    calls: list[dict[str, Any]] = []

    class FakeMNIST:
        def __init__(self, root: str, download: bool, train: bool) -> None:
            calls.append({"root": root, "download": download, "train": train})
            write_mnist(Path(root), "MNIST")

    monkeypatch.setattr(torchvision.datasets, "MNIST", FakeMNIST)
    d = load_dataset("mnist", data_dir=tmp_path, download=True)
    assert calls and all(c["root"] == str(tmp_path) and c["download"] for c in calls)
    assert len(d.test) == 6
    calls.clear()
    load_dataset("mnist", data_dir=tmp_path, download=True)  # files present: no call
    assert calls == []


# --------------------------------------------------- Fashion-MNIST from the system folder
def write_flat_fashion(folder: Path, *, seed: int = 5, n_train: int = 12, n_test: int = 4):
    """Writes the four gzipped IDX files flat into ``folder``, as Debian's package has them."""
    rng = np.random.default_rng(seed)
    parts = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        x = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        y = np.arange(n, dtype=np.uint8) % 10
        write_idx(folder / f"{prefix}-images-idx3-ubyte", x, gz=True)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte", y, gz=True)
        parts[prefix] = (x, y)
    return parts


def use_system_folder(monkeypatch: pytest.MonkeyPatch, folder: Path) -> None:
    monkeypatch.setattr(gd, "SYSTEM_DATA_DIRS", {"fashion_mnist": (folder,)})


def test_fashion_mnist_from_system_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    system, data = tmp_path / "system", tmp_path / "data"
    parts = write_flat_fashion(system)
    use_system_folder(monkeypatch, system)
    d = load_dataset("fashion_mnist", data_dir=data, normalize=False, val_fraction=0.25)
    assert (len(d.train), len(d.val), len(d.test)) == (9, 3, 4)
    x_test, y_test = parts["t10k"]
    assert d.test.y.tolist() == y_test.tolist()
    assert torch.equal(d.test.x, torch.from_numpy(x_test[:, None] / 255.0).float())
    assert not data.exists()  # nothing written into data_dir, nothing downloaded


def test_fashion_mnist_data_dir_wins_over_system_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    parts = write_mnist(tmp_path / "data", "FashionMNIST", gz=True)
    write_flat_fashion(tmp_path / "system", n_test=7)
    use_system_folder(monkeypatch, tmp_path / "system")
    d = load_dataset("fashion_mnist", data_dir=tmp_path / "data")
    assert d.test.y.tolist() == parts["t10k"][1].tolist()
    # an incomplete data_dir is passed over for a complete system folder
    (tmp_path / "data" / "FashionMNIST" / "raw" / "train-labels-idx1-ubyte.gz").unlink()
    assert len(load_dataset("fashion_mnist", data_dir=tmp_path / "data").test) == 7


def test_fashion_mnist_system_folder_needs_no_download(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torchvision.datasets

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("torchvision was asked to download")

    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", refuse)
    write_flat_fashion(tmp_path / "system")
    use_system_folder(monkeypatch, tmp_path / "system")
    d = load_dataset("fashion_mnist", data_dir=tmp_path / "data", download=True)
    assert len(d.test) == 4


def test_fashion_mnist_missing_everywhere_names_both_places(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    system = tmp_path / "system"
    write_flat_fashion(system)
    (system / "t10k-labels-idx1-ubyte.gz").unlink()  # incomplete: not used
    use_system_folder(monkeypatch, system)
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset("fashion_mnist", data_dir=tmp_path / "data")
    message = str(info.value)
    assert str(tmp_path / "data" / "FashionMNIST" / "raw" / "train-images-idx3-ubyte") in message
    assert str(system / "t10k-labels-idx1-ubyte") in message
    assert str(system / "train-images-idx3-ubyte") not in message  # that one is there
    assert f"looked in {tmp_path / 'data' / 'FashionMNIST' / 'raw'} and {system}" in message
    assert "apt-get install -y dataset-fashion-mnist" in message
    assert "download=True" in message and "\n" not in message
    assert str(pickle.loads(pickle.dumps(info.value))) == message
    assert not (tmp_path / "data").exists()


def test_system_folder_constant_is_the_debian_one() -> None:
    assert REAL_SYSTEM_DATA_DIRS == {"fashion_mnist": (DEBIAN_FASHION_MNIST,)}


@pytest.mark.skipif(
    not DEBIAN_FASHION_MNIST.is_dir(),
    reason=f"{DEBIAN_FASHION_MNIST} is absent (apt-get install -y dataset-fashion-mnist)",
)
def test_fashion_mnist_real_debian_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gd, "SYSTEM_DATA_DIRS", REAL_SYSTEM_DATA_DIRS)
    d = load_dataset("fashion_mnist", data_dir=tmp_path, normalize=False)
    assert d.input_shape == (1, 28, 28) and d.num_classes == 10
    assert len(d.train) + len(d.val) + len(d.test) == 70000 and len(d.test) == 10000
    for split in (d.train, d.val, d.test):
        assert split.x.shape[1:] == (1, 28, 28)
        assert torch.bincount(split.y, minlength=10).tolist().count(0) == 0
        assert 0.0 <= float(split.x.min()) and float(split.x.max()) <= 1.0
    assert torch.bincount(d.test.y).tolist() == [1000] * 10  # the official test set
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("protocol,bytes_keys", [(2, True), (4, False), (5, True)])
def test_cifar_python_round_trip(tmp_path: Path, protocol: int, bytes_keys: bool) -> None:
    written = write_cifar_py(tmp_path, protocol=protocol, bytes_keys=bytes_keys)
    d = load_dataset("cifar10", data_dir=tmp_path, normalize=False, val_fraction=0.2)
    assert d.input_shape == (3, 32, 32) and (len(d.train), len(d.val), len(d.test)) == (16, 4, 4)
    data, labels = written["test_batch"]
    # channel 1, row 3, column 5 of test image 2
    assert float(d.test.x[2, 1, 3, 5]) == pytest.approx(data[2, 1024 + 3 * 32 + 5] / 255.0)
    assert d.test.y.tolist() == labels
    train = [written[f"data_batch_{i}"] for i in range(1, 6)]
    x = torch.from_numpy(np.concatenate([a for a, _ in train]).reshape(-1, 3, 32, 32) / 255.0)
    y = torch.tensor([lab for _, labs in train for lab in labs])
    assert samples(d.train) + samples(d.val) == samples(Split(x.float(), y))
    mean, std = channel_stats(load_dataset("cifar10", data_dir=tmp_path).train.x)
    assert mean.shape == (3,) and torch.allclose(mean, torch.zeros(3, dtype=mean.dtype), atol=1e-4)
    assert torch.allclose(std, torch.ones(3, dtype=std.dtype), atol=1e-3)


def test_cifar_binary_round_trip(tmp_path: Path) -> None:
    written = write_cifar_bin(tmp_path)
    d = load_dataset("cifar10", data_dir=tmp_path, normalize=False)
    data, labels = written["test_batch.bin"]
    assert float(d.test.x[3, 2, 31, 0]) == pytest.approx(data[3, 2048 + 31 * 32] / 255.0)
    assert d.test.y.tolist() == labels and len(d.train) + len(d.val) == 20
    bad = tmp_path / "cifar-10-batches-bin" / "data_batch_3.bin"
    bad.write_bytes(bad.read_bytes()[:-1])
    with pytest.raises(ValueError, match="data_batch_3.bin"):
        load_dataset("cifar10", data_dir=tmp_path)


class _Evil:
    """Pickles to a call of os.system; unpickling it must never run the command."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (self.command,))


def test_cifar_restricted_unpickler_rejects_code(tmp_path: Path) -> None:
    write_cifar_py(tmp_path)
    marker = tmp_path / "pwned"
    evil = {b"data": _Evil(f"touch {shlex.quote(str(marker))}"), b"labels": [0]}
    target = tmp_path / "cifar-10-batches-py" / "data_batch_2"
    target.write_bytes(pickle.dumps(evil, protocol=2))
    with pytest.raises(ValueError, match="data_batch_2") as info:
        load_dataset("cifar10", data_dir=tmp_path)
    assert isinstance(info.value.__cause__, pickle.UnpicklingError)
    assert "system" in str(info.value)
    assert not marker.exists()
    # the unpickler itself, on a bare payload
    with pytest.raises(pickle.UnpicklingError):
        gd._RestrictedUnpickler(io.BytesIO(pickle.dumps(_Evil("echo hi")))).load()
    assert not marker.exists()


def test_cifar_corrupt_pickle(tmp_path: Path) -> None:
    write_cifar_py(tmp_path)
    target = tmp_path / "cifar-10-batches-py" / "test_batch"
    target.write_bytes(target.read_bytes()[:100])
    with pytest.raises(ValueError, match="test_batch"):
        load_dataset("cifar10", data_dir=tmp_path)
    target.write_bytes(pickle.dumps({b"data": np.zeros((2, 10), np.uint8), b"labels": [0, 1]}))
    with pytest.raises(ValueError, match="test_batch.*3072"):
        load_dataset("cifar10", data_dir=tmp_path)


def test_svhn_round_trip(tmp_path: Path) -> None:
    written = write_svhn(tmp_path)
    d = load_dataset("svhn", data_dir=tmp_path, normalize=False, val_fraction=0.25)
    assert d.input_shape == (3, 32, 32) and (len(d.train), len(d.val), len(d.test)) == (9, 3, 5)
    x, y = written["test"]
    assert float(d.test.x[1, 2, 4, 9]) == pytest.approx(x[4, 9, 2, 1] / 255.0)
    expected = y[:, 0].astype(np.int64) % 10
    assert d.test.y.tolist() == expected.tolist() and d.test.y[0] == 0
    all_labels = torch.cat([d.train.y, d.val.y, d.test.y])
    assert int(all_labels.max()) <= 9
    (tmp_path / "train_32x32.mat").write_bytes(b"MATLAB garbage" * 10)
    with pytest.raises(ValueError, match="train_32x32.mat"):
        load_dataset("svhn", data_dir=tmp_path)


# ------------------------------------------------------------------------- BatchIterator
def make_data(n: int = 30) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.arange(n, dtype=torch.float32)[:, None], torch.arange(n)


@pytest.mark.parametrize("shuffle", [True, False])
def test_batch_iterator_covers_each_sample_once_per_epoch(shuffle: bool) -> None:
    x, y = make_data(30)
    it = BatchIterator(x, y, 7, shuffle=shuffle, seed=1)
    assert len(it) == 5 and it.epoch == 0 and it.position == 0
    epochs = []
    for _ in range(3):
        batches = [next(it) for _ in range(len(it))]
        assert [len(b[1]) for b in batches] == [7, 7, 7, 7, 2]
        ys = torch.cat([b[1] for b in batches])
        assert torch.equal(torch.cat([b[0] for b in batches])[:, 0].long(), ys)
        assert sorted(ys.tolist()) == list(range(30))
        epochs.append(ys)
    assert it.epoch == 2 and it.position == 5
    it.next()
    assert it.epoch == 3 and it.position == 1
    if shuffle:
        assert not torch.equal(epochs[0], epochs[1])
        assert not torch.equal(epochs[0], torch.arange(30))
    else:
        assert all(torch.equal(e, torch.arange(30)) for e in epochs)


def test_batch_iterator_drop_last_and_seed() -> None:
    x, y = make_data(30)
    it = BatchIterator(x, y, 7, drop_last=True, seed=0)
    assert len(it) == 4
    sizes = [len(next(it)[1]) for _ in range(12)]
    assert sizes == [7] * 12 and it.epoch == 2
    a = torch.cat([next(BatchIterator(x, y, 30, seed=s))[1] for s in (0, 0)]).view(2, 30)
    b = next(BatchIterator(x, y, 30, seed=1))[1]
    assert torch.equal(a[0], a[1]) and not torch.equal(a[0], b)


@pytest.mark.parametrize("batch_size", [0, -1, 31, 2.0])
def test_batch_iterator_bad_batch_size(batch_size: Any) -> None:
    x, y = make_data(30)
    with pytest.raises(ValueError, match=f"batch_size.*{batch_size}"):
        BatchIterator(x, y, batch_size)


def test_batch_iterator_length_mismatch() -> None:
    with pytest.raises(ValueError, match="same length"):
        BatchIterator(torch.zeros(5, 2), torch.zeros(4), 2)


def roundtrip(state: dict[str, Any]) -> dict[str, Any]:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("augment", [None, Augment(crop_padding=2)])
def test_batch_iterator_state_dict_continuation(augment: Augment | None) -> None:
    torch.manual_seed(0)
    x, y = torch.rand(23, 3, 6, 6), torch.arange(23)
    it = BatchIterator(x, y, 5, seed=7, augment=augment)
    for _ in range(7):  # into the second epoch
        next(it)
    state = it.state_dict()
    assert all(isinstance(v, (torch.Tensor, int)) for v in state.values())
    restored = BatchIterator(x, y, 5, seed=999, augment=augment)
    restored.load_state_dict(roundtrip(state))
    assert (restored.epoch, restored.position) == (it.epoch, it.position) == (1, 2)
    for _ in range(12):  # crosses epoch boundaries
        (xa, ya), (xb, yb) = next(it), next(restored)
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    fresh = BatchIterator(x, y, 5, seed=999, augment=augment)
    assert not torch.equal(next(fresh)[1], next(BatchIterator(x, y, 5, seed=7))[1])


def test_batch_iterator_load_state_dict_checks() -> None:
    x, y = make_data(30)
    state = BatchIterator(x, y, 5).state_dict()
    with pytest.raises(ValueError, match="batch_size"):
        BatchIterator(x, y, 6).load_state_dict(state)
    with pytest.raises(ValueError, match="samples"):
        BatchIterator(*make_data(31), 5).load_state_dict(state)
    with pytest.raises(ValueError, match="missing"):
        BatchIterator(x, y, 5).load_state_dict({"position": 0})


def test_batch_iterator_applies_augment_with_own_generator() -> None:
    x, y = torch.rand(8, 1, 4, 4), torch.arange(8)
    seen: list[torch.Generator] = []

    def aug(xb: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        seen.append(gen)
        return xb + 1

    it = BatchIterator(x, y, 8, shuffle=False, augment=aug)
    xb, _ = next(it)
    assert torch.equal(xb, x + 1) and seen == [it._generator]


# ----------------------------------------------------------------------------------- Augment
def test_augment_identity_and_shape() -> None:
    x = torch.rand(5, 3, 8, 8)
    assert torch.equal(Augment(crop_padding=0, hflip=False)(x, torch.Generator()), x)
    out = Augment()(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == x.dtype


def test_augment_hflip_only() -> None:
    x = torch.rand(64, 2, 5, 6)
    out = Augment(crop_padding=0, hflip=True)(x, torch.Generator().manual_seed(0))
    same = [torch.equal(o, s) for o, s in zip(out, x, strict=False)]
    flipped = [torch.equal(o, s.flip(-1)) for o, s in zip(out, x, strict=False)]
    assert all(a or b for a, b in zip(same, flipped, strict=False))
    assert any(same) and any(flipped)


@pytest.mark.parametrize("hflip", [False, True])
def test_augment_crops_come_from_padded_input(hflip: bool) -> None:
    p, h, w = 2, 6, 7
    x = torch.rand(40, 3, h, w) + 1  # strictly positive, so padding zeros are recognizable
    out = Augment(crop_padding=p, hflip=hflip)(x, torch.Generator().manual_seed(3))
    padded = torch.nn.functional.pad(x, (p, p, p, p))

    def is_window(sample: torch.Tensor, i: int, dy: int, dx: int) -> bool:
        view = padded[i, :, dy : dy + h, dx : dx + w]
        return torch.equal(sample, view) or (hflip and torch.equal(sample, view.flip(-1)))

    offsets = set()
    for i in range(len(x)):
        grid = [(dy, dx) for dy in range(2 * p + 1) for dx in range(2 * p + 1)]
        matches = [(dy, dx) for dy, dx in grid if is_window(out[i], i, dy, dx)]
        assert matches, f"sample {i} is not a crop of the padded input"
        offsets.update(matches)
    assert len(offsets) > 5  # offsets vary per sample


def test_augment_deterministic_and_device_of_input() -> None:
    x = torch.rand(16, 3, 8, 8)
    aug = Augment()
    a = aug(x, torch.Generator().manual_seed(5))
    b = aug(x, torch.Generator().manual_seed(5))
    c = aug(x, torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.device == x.device


@pytest.mark.parametrize("padding", [-1, 1.5])
def test_augment_bad_padding(padding: Any) -> None:
    with pytest.raises(ValueError, match="crop_padding"):
        Augment(crop_padding=padding)


def test_augment_needs_4d() -> None:
    with pytest.raises(ValueError, match="B, C, H, W"):
        Augment()(torch.zeros(3, 8, 8), torch.Generator())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_iterator_and_augment_match_cpu() -> None:
    x, y = torch.rand(20, 3, 8, 8), torch.arange(20)
    cpu = BatchIterator(x, y, 6, seed=1, augment=Augment())
    gpu = BatchIterator(x.cuda(), y.cuda(), 6, seed=1, augment=Augment())
    for _ in range(5):
        (xa, ya), (xb, yb) = next(cpu), next(gpu)
        assert xb.is_cuda and torch.equal(xa, xb.cpu()) and torch.equal(ya, yb.cpu())


def test_a_data_config_takes_normalize_and_download() -> None:
    """The ``data`` section of a config takes ``normalize`` and ``download`` (the message for
    missing files tells a config user to set ``download: true``): normalize false keeps the
    features as loaded; download is passed on (digits ship with scikit-learn: no effect)."""
    from gradhpo.data import DatasetNotFoundError, load_data

    spec, plain = load_data({"name": "digits", "normalize": False, "download": True})
    assert spec == {"name": "digits", "normalize": False, "download": True}
    _, standard = load_data({"name": "digits"})
    assert plain.train.x.min() >= 0 and plain.train.x.max() <= 1
    assert abs(float(standard.train.x.mean())) < 1e-3 and float(plain.train.x.mean()) > 0.1
    assert plain.preprocessing["mean"] is None and standard.preprocessing["mean"] is not None
    message = str(DatasetNotFoundError("cifar10", ["/nowhere/cifar-10"], "/nowhere"))
    assert "`download: true` in a config's data section" in message
