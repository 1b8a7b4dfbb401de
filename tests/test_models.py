"""Tests for the ``models`` package: config knobs, torch.func compatibility, config errors."""

from __future__ import annotations

import ast
import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from gradhpo.models import (
    ACTIVATIONS,
    CNN,
    CNN_DEFAULTS,
    CNN_HEADS,
    MLP_DEFAULTS,
    MODEL_NAMES,
    POOLINGS,
    RESNET_DEFAULTS,
    BasicBlock,
    L2Pool,
    ModelConfigError,
    build_model,
    count_parameters,
)
from torch import nn

NUM_CLASSES = 5
BATCH = 3

# Small base configs keep every test fast; each test overrides one knob at a time.
BASE: dict[str, dict[str, Any]] = {
    "cnn": {"name": "cnn", "width": 8, "groups": 4},
    "cnn1d": {"name": "cnn1d", "width": 8, "groups": 4},
    "resnet": {"name": "resnet", "width": 4, "groups": 2},
    "mlp": {"name": "mlp", "width": 16},
}
SHAPES: dict[str, list[tuple[int, ...]]] = {
    "cnn": [(1, 8, 8), (3, 32, 32)],
    "cnn1d": [(1, 40)],
    "resnet": [(3, 32, 32)],
    "mlp": [(1, 8, 8)],
}
CNN_KNOBS: dict[str, list[Any]] = {
    "depth": [1, 3],
    "width": [4, [4, 8]],
    "kernel_size": [1, 3, 5],
    "pooling": list(POOLINGS),
    "norm": ["batch", "group", "none"],
    "groups": [2, 4],
    "activation": list(ACTIVATIONS),
    "dropout": [0.0, 0.5],
    "head": list(CNN_HEADS),
    "head_width": [0, 16],
}
KNOB_VALUES: dict[str, dict[str, list[Any]]] = {
    "cnn": CNN_KNOBS,
    "cnn1d": CNN_KNOBS,
    "resnet": {
        "num_blocks": [[1, 1, 1], [2, 1, 2], 1],
        "width": [4, 8],
        "norm": ["batch", "group", "none"],
        "groups": [1, 2, 4],
        "activation": list(ACTIVATIONS),
        "dropout": [0.0, 0.5],
    },
    "mlp": {
        "depth": [0, 1, 3],
        "width": [16, [8, 4]],
        "activation": list(ACTIVATIONS),
        "dropout": [0.0, 0.5],
        "norm": ["none", "layer", "batch"],
    },
}
DEFAULTS = {
    "cnn": CNN_DEFAULTS,
    "cnn1d": CNN_DEFAULTS,
    "resnet": RESNET_DEFAULTS,
    "mlp": MLP_DEFAULTS,
}
ACTIVATION_TYPES = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "tanh": nn.Tanh,
    "silu": nn.SiLU,
    "elu": nn.ELU,
    "leaky_relu": nn.LeakyReLU,
    "softplus": nn.Softplus,
}
POOL_TYPES = (nn.MaxPool2d, nn.AvgPool2d, nn.MaxPool1d, nn.AvgPool1d, nn.LPPool2d, L2Pool)
NORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm)


@pytest.fixture(autouse=True)
def _seed() -> None:
    """Make every test deterministic."""
    torch.manual_seed(0)


def _modules(model: nn.Module, kind: type | tuple[type, ...]) -> list[nn.Module]:
    """All submodules of ``model`` that are instances of ``kind``."""
    return [m for m in model.modules() if isinstance(m, kind)]


def _cnn(shape: tuple[int, ...] = (3, 32, 32), **knobs: Any) -> nn.Module:
    """Build a small "cnn" with some knobs overridden."""
    return build_model({**BASE["cnn"], **knobs}, shape, NUM_CLASSES)


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and buffers of ``model`` as one dict, as functional_call expects."""
    return {**dict(model.named_parameters()), **dict(model.named_buffers())}


# --------------------------------------------------------------------------- knobs build


def _knob_cases() -> list[Any]:
    """One case per (family, input shape, knob, value)."""
    cases = []
    for name, knobs in KNOB_VALUES.items():
        for shape in SHAPES[name]:
            for knob, values in knobs.items():
                for value in values:
                    cases.append(
                        pytest.param(name, shape, knob, value, id=f"{name}-{shape}-{knob}={value}")
                    )
    return cases


@pytest.mark.parametrize(("name", "shape", "knob", "value"), _knob_cases())
def test_each_knob_value_builds_and_forwards(
    name: str, shape: tuple[int, ...], knob: str, value: Any
) -> None:
    """Every knob value builds and gives finite (B, num_classes) logits, in train and eval mode."""
    model = build_model({**BASE[name], knob: value}, shape, NUM_CLASSES)
    x = torch.randn(BATCH, *shape)
    for train in (True, False):
        model.train(train)
        out = model(x)
        assert out.shape == (BATCH, NUM_CLASSES)
        assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_knob_table_covers_every_knob(name: str) -> None:
    """The knob table above tests every knob a family accepts."""
    assert set(KNOB_VALUES[name]) == set(DEFAULTS[name])


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_defaults_build(name: str) -> None:
    """A config with only a name builds with the family defaults."""
    shape = SHAPES[name][-1]
    model = build_model({"name": name}, shape, NUM_CLASSES).eval()
    assert model(torch.randn(2, *shape)).shape == (2, NUM_CLASSES)


def test_model_names() -> None:
    """The accepted names are exactly the four families."""
    assert MODEL_NAMES == ("cnn", "cnn1d", "resnet", "mlp")
    assert issubclass(ModelConfigError, ValueError)


def test_cnn_defaults_are_as_documented() -> None:
    """Default cnn: 2 blocks of 32-channel 3x3 conv, BatchNorm, ReLU, max pool; no dropout."""
    model = build_model({"name": "cnn"}, (3, 32, 32), NUM_CLASSES)
    convs = _modules(model, nn.Conv2d)
    assert [c.out_channels for c in convs] == [32, 32]
    assert all(c.kernel_size == (3, 3) and c.stride == (1, 1) for c in convs)
    assert len(_modules(model, nn.BatchNorm2d)) == 2
    assert len(_modules(model, nn.ReLU)) == 2
    assert len(_modules(model, nn.MaxPool2d)) == 2
    assert not _modules(model, nn.Dropout)
    assert model.head == "gap" and _modules(model, nn.Linear) == [model.classifier]
    assert model.classifier.in_features == 32
    # the default head adds no parameter or buffer: checkpoints of earlier versions still load
    assert not any(key.startswith("hidden") for key in model.state_dict())


# --------------------------------------------------------------------------- knobs change the model


@pytest.mark.parametrize(("name", "conv_type"), [("cnn", nn.Conv2d), ("cnn1d", nn.Conv1d)])
@pytest.mark.parametrize("depth", [1, 2, 4])
def test_cnn_depth_sets_conv_count(name: str, conv_type: type, depth: int) -> None:
    """depth is the number of conv layers."""
    model = build_model({**BASE[name], "depth": depth}, SHAPES[name][-1], NUM_CLASSES)
    assert len(_modules(model, conv_type)) == depth


def test_cnn_width_list_sets_channels() -> None:
    """A width list gives those conv channel counts and the classifier input size."""
    model = _cnn(depth=3, width=[4, 6, 12], norm="none")
    assert [c.out_channels for c in _modules(model, nn.Conv2d)] == [4, 6, 12]
    assert model.classifier.in_features == 12


@pytest.mark.parametrize("kernel_size", [1, 5])
def test_cnn_kernel_size_same_padding(kernel_size: int) -> None:
    """kernel_size sets the conv kernel, with 'same' padding keeping the spatial size."""
    model = _cnn(kernel_size=kernel_size, pooling="none")
    convs = _modules(model, nn.Conv2d)
    assert all(c.kernel_size == (kernel_size, kernel_size) for c in convs)
    assert model.features(torch.randn(1, 3, 32, 32)).shape[-2:] == (32, 32)


@pytest.mark.parametrize(
    ("pooling", "pool_type", "stride", "final_size"),
    [
        ("max", nn.MaxPool2d, 1, 8),
        ("avg", nn.AvgPool2d, 1, 8),
        ("l2", L2Pool, 1, 8),
        ("stride", None, 2, 8),
        ("none", None, 1, 32),
    ],
)
def test_cnn_pooling_modules(
    pooling: str, pool_type: type | None, stride: int, final_size: int
) -> None:
    """pooling picks the downsampling: a pool module per block, conv stride 2, or nothing."""
    model = _cnn(depth=2, pooling=pooling)
    pools = _modules(model, POOL_TYPES)
    if pool_type is None:
        assert pools == []
    else:
        assert len(pools) == 2 and all(type(p) is pool_type for p in pools)
    assert all(c.stride == (stride, stride) for c in _modules(model, nn.Conv2d))
    assert model.features(torch.randn(1, 3, 32, 32)).shape[-2:] == (final_size, final_size)


def test_cnn1d_stride_pooling() -> None:
    """cnn1d with pooling "stride" uses stride-2 Conv1d layers and no pool modules."""
    model = build_model({**BASE["cnn1d"], "pooling": "stride", "depth": 3}, (1, 40), NUM_CLASSES)
    assert [c.stride for c in _modules(model, nn.Conv1d)] == [(2,), (2,), (2,)]
    assert _modules(model, POOL_TYPES) == []
    assert model.features(torch.randn(1, 1, 40)).shape[-1] == 5


@pytest.mark.parametrize(
    ("norm", "norm_type", "bias"),
    [("batch", nn.BatchNorm2d, False), ("group", nn.GroupNorm, True), ("none", None, True)],
)
def test_cnn_norm_modules(norm: str, norm_type: type | None, bias: bool) -> None:
    """norm picks BatchNorm / GroupNorm(groups) / nothing; conv bias only without BatchNorm."""
    model = _cnn(depth=3, width=[4, 8, 12], norm=norm, groups=2)
    norms = _modules(model, NORM_TYPES)
    if norm_type is None:
        assert norms == []
    else:
        assert len(norms) == 3 and all(type(n) is norm_type for n in norms)
    if norm == "group":
        assert [(n.num_groups, n.num_channels) for n in norms] == [(2, 4), (2, 8), (2, 12)]
    assert all((c.bias is not None) == bias for c in _modules(model, nn.Conv2d))


@pytest.mark.parametrize("activation", list(ACTIVATIONS))
def test_activation_modules(activation: str) -> None:
    """activation puts that (non-in-place) activation after every layer of every family."""
    expected = ACTIVATION_TYPES[activation]
    counts = {"cnn": 2, "cnn1d": 2, "resnet": 1 + 2 * 3, "mlp": 2}
    for name in MODEL_NAMES:
        model = build_model({**BASE[name], "activation": activation}, SHAPES[name][-1], NUM_CLASSES)
        acts = _modules(model, tuple(ACTIVATION_TYPES.values()))
        assert len(acts) == counts[name], name
        assert all(type(a) is expected for a in acts), name
        assert not any(getattr(a, "inplace", False) for a in acts), name


@pytest.mark.parametrize("name", ["cnn", "cnn1d", "resnet"])
def test_conv_dropout_before_classifier(name: str) -> None:
    """dropout adds one Dropout(p) before the classifier; 0.0 adds none."""
    shape = SHAPES[name][-1]
    model = build_model({**BASE[name], "dropout": 0.3}, shape, NUM_CLASSES)
    drops = _modules(model, nn.Dropout)
    assert len(drops) == 1 and drops[0].p == 0.3 and model.dropout is drops[0]
    assert not _modules(build_model({**BASE[name], "dropout": 0.0}, shape, NUM_CLASSES), nn.Dropout)


def test_resnet_structure() -> None:
    """num_blocks/width set blocks per stage and widths; stages 2, 3 downsample with 1x1 projections."""
    model = build_model(
        {"name": "resnet", "num_blocks": [2, 1, 3], "width": 4, "norm": "group", "groups": 2},
        (3, 32, 32),
        NUM_CLASSES,
    )
    stages = list(model.stages)
    assert [len(_modules(s, BasicBlock)) for s in stages] == [2, 1, 3]
    assert [s[-1].conv2.out_channels for s in stages] == [4, 8, 16]
    firsts = [s[0] for s in stages]
    assert [b.conv1.stride for b in firsts] == [(1, 1), (2, 2), (2, 2)]
    assert isinstance(firsts[0].shortcut, nn.Identity)
    for block in firsts[1:]:
        projection = block.shortcut[0]
        assert isinstance(projection, nn.Conv2d)
        assert projection.kernel_size == (1, 1) and projection.stride == (2, 2)
    assert model.stem[0].kernel_size == (3, 3)
    assert all(n.num_groups == 2 for n in _modules(model, nn.GroupNorm))
    assert model.stages(model.stem(torch.randn(1, 3, 32, 32))).shape == (1, 16, 8, 8)
    assert model.classifier.in_features == 16


@pytest.mark.parametrize(("num_blocks", "expected"), [(1, [1, 1, 1]), (2, [2, 2, 2])])
def test_resnet_int_num_blocks(num_blocks: int, expected: list[int]) -> None:
    """An int num_blocks means that many blocks in each stage."""
    model = build_model({**BASE["resnet"], "num_blocks": num_blocks}, (3, 32, 32), NUM_CLASSES)
    assert [len(s) for s in model.stages] == expected


@pytest.mark.parametrize(("norm", "norm_type"), [("batch", nn.BatchNorm2d), ("none", None)])
def test_resnet_norm(norm: str, norm_type: type | None) -> None:
    """resnet norm "batch" puts BatchNorm after every conv (incl. projections); "none" has no norms."""
    model = build_model({**BASE["resnet"], "norm": norm}, (3, 32, 32), NUM_CLASSES)
    norms = _modules(model, NORM_TYPES)
    if norm_type is None:
        assert norms == []
    else:
        assert len(norms) == len(_modules(model, nn.Conv2d)) == 1 + 2 * 3 + 2


def test_resnet_small_input() -> None:
    """The resnet works for an 8x8 input."""
    model = build_model(BASE["resnet"], (3, 8, 8), NUM_CLASSES)
    assert model(torch.randn(2, 3, 8, 8)).shape == (2, NUM_CLASSES)


@pytest.mark.parametrize("depth", [0, 1, 3])
def test_mlp_depth_and_flatten(depth: int) -> None:
    """mlp depth is the number of hidden layers; the input is flattened."""
    model = build_model({"name": "mlp", "depth": depth, "width": 7}, (1, 8, 8), NUM_CLASSES)
    linears = _modules(model, nn.Linear)
    assert len(linears) == depth + 1
    assert linears[0].in_features == 64


def test_mlp_width_list() -> None:
    """A width list gives those hidden sizes."""
    model = build_model({"name": "mlp", "depth": 3, "width": [9, 5, 3]}, (2, 3), NUM_CLASSES)
    assert [lin.out_features for lin in _modules(model, nn.Linear)] == [9, 5, 3, NUM_CLASSES]


@pytest.mark.parametrize(
    ("norm", "norm_type"), [("layer", nn.LayerNorm), ("batch", nn.BatchNorm1d), ("none", None)]
)
def test_mlp_norm(norm: str, norm_type: type | None) -> None:
    """mlp norm puts LayerNorm / BatchNorm1d after each hidden linear, or nothing."""
    model = build_model(
        {"name": "mlp", "depth": 2, "width": 6, "norm": norm}, (1, 8, 8), NUM_CLASSES
    )
    norms = _modules(model, NORM_TYPES)
    if norm_type is None:
        assert norms == []
    else:
        assert len(norms) == 2 and all(type(n) is norm_type for n in norms)


def test_mlp_dropout() -> None:
    """mlp dropout puts Dropout(p) after each hidden layer; 0.0 adds none."""
    model = build_model(
        {"name": "mlp", "depth": 2, "width": 6, "dropout": 0.25}, (1, 8, 8), NUM_CLASSES
    )
    assert [d.p for d in _modules(model, nn.Dropout)] == [0.25, 0.25]
    assert not _modules(
        build_model({"name": "mlp", "dropout": 0.0}, (1, 8, 8), NUM_CLASSES), nn.Dropout
    )


def test_count_parameters() -> None:
    """count_parameters sums parameter sizes, optionally only trainable ones."""
    model = build_model({"name": "mlp", "depth": 1, "width": 5}, (1, 2, 2), 3)
    assert count_parameters(model) == (4 * 5 + 5) + (5 * 3 + 3)
    model.classifier.weight.requires_grad_(False)
    assert count_parameters(model, trainable_only=True) == (4 * 5 + 5) + 3


def test_models_do_not_import_gradhpo() -> None:
    """models is independent of gradhpo."""
    for path in Path(__file__).resolve().parents[1].joinpath("models").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                assert all(not a.name.startswith("gradhpo") for a in node.names), path
            if isinstance(node, ast.ImportFrom):
                assert not (node.module or "").startswith("gradhpo"), path


# --------------------------------------------------------------------------- L2 pooling


def test_l2_pool_matches_lppool() -> None:
    """L2Pool equals nn.LPPool2d(2, 2) / nn.LPPool1d(2, 2) up to eps on generic input."""
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    torch.testing.assert_close(L2Pool(2, 2)(x), nn.LPPool2d(2, 2)(x), atol=1e-6, rtol=1e-6)
    x1 = torch.randn(2, 3, 10, dtype=torch.float64)
    torch.testing.assert_close(L2Pool(1, 2)(x1), nn.LPPool1d(2, 2)(x1), atol=1e-6, rtol=1e-6)


def test_l2_pool_gradient_finite_on_zeros() -> None:
    """First and second derivatives of L2 pooling are finite on an all-zero input."""
    x = torch.zeros(1, 2, 4, 4, requires_grad=True)
    (grad,) = torch.autograd.grad(L2Pool(2, 2)(x).sum(), x, create_graph=True)
    assert torch.isfinite(grad).all()
    (second,) = torch.autograd.grad(grad.sum(), x)
    assert torch.isfinite(second).all()


def test_cnn_l2_gradient_finite_on_zeros() -> None:
    """A cnn with l2 pooling has finite parameter gradients on an all-zero batch."""
    model = _cnn(pooling="l2", norm="none")
    loss = model(torch.zeros(2, 3, 32, 32)).square().sum()
    loss.backward()
    for name, param in model.named_parameters():
        assert torch.isfinite(param.grad).all(), name


# --------------------------------------------------------------------------- head


def _fmnist_cnn(**knobs: Any) -> nn.Module:
    """The 2-conv, width-32 Fashion-MNIST CNN with some knobs overridden."""
    config = {"name": "cnn", "depth": 2, "width": 32, "pooling": "max", "norm": "batch"}
    return build_model({**config, **knobs}, (1, 28, 28), 10)


@pytest.mark.parametrize(
    ("knobs", "expected"),
    [
        # convs 1*32*9 + 32*32*9 (no bias under BatchNorm) + 2 BatchNorms of 2*32 = 9632
        ({"head": "gap"}, 9632 + 32 * 10 + 10),  # 9,962
        ({"head": "gap", "head_width": 128}, 9632 + 32 * 128 + 128 + 128 * 10 + 10),  # 15,434
        # 28 -> 14 -> 7: 32 * 7 * 7 = 1568 flattened features
        ({"head": "flatten"}, 9632 + 1568 * 10 + 10),  # 25,322
        ({"head": "flatten", "head_width": 128}, 9632 + 1568 * 128 + 128 + 128 * 10 + 10),
        # a third block pools 7 -> 3: 32 * 3 * 3 = 288 features, under 100k parameters in all
        ({"head": "flatten", "head_width": 128, "depth": 3}, 9632 + 9280 + 288 * 128 + 128 + 1290),
    ],
)
def test_head_parameter_counts_on_fashion_mnist(knobs: dict[str, Any], expected: int) -> None:
    """Parameter counts of the Fashion-MNIST CNNs, by hand; the 2-conv flatten head with 128
    hidden units has 211,754 parameters, 200,832 of them in its hidden layer; with depth 3
    it stays under 100k (57,194)."""
    assert count_parameters(_fmnist_cnn(**knobs)) == expected
    if knobs.get("depth") == 3:
        assert expected == 57194 < 100_000
    if knobs == {"head": "flatten", "head_width": 128}:
        assert expected == 211754


@pytest.mark.parametrize(
    ("name", "shape", "knobs"),
    [
        ("cnn", (1, 28, 28), {"pooling": "max"}),
        ("cnn", (3, 15, 9), {"pooling": "avg", "depth": 3}),  # odd sides: floor per block
        ("cnn", (3, 15, 9), {"pooling": "stride", "depth": 3}),  # stride-2 convs: ceil
        ("cnn", (2, 7, 5), {"pooling": "none", "kernel_size": 5}),
        ("cnn", (1, 17, 17), {"pooling": "l2", "kernel_size": 1}),
        ("cnn1d", (1, 40), {"pooling": "max"}),
        ("cnn1d", (2, 41), {"pooling": "stride", "depth": 3}),
    ],
)
@pytest.mark.parametrize("head_width", [0, 12])
def test_flatten_head_sizes_its_dense_layer(
    name: str, shape: tuple[int, ...], knobs: dict[str, Any], head_width: int
) -> None:
    """The first dense layer takes exactly the flattened last feature map, in 1-D and 2-D."""
    config = {**BASE[name], **knobs, "head": "flatten", "head_width": head_width}
    model = build_model(config, shape, NUM_CLASSES).eval()
    x = torch.randn(BATCH, *shape)
    flat = model.features(x).flatten(1).shape[1]
    first = model.hidden.linear if head_width else model.classifier
    assert first.in_features == flat
    assert model.classifier.in_features == (head_width or flat)
    assert model(x).shape == (BATCH, NUM_CLASSES)


def test_flatten_head_keeps_positions_gap_does_not() -> None:
    """A flatten head sees where features are (a shifted input changes its output); a
    global-average head over 'none' pooling with 1x1 convs cannot tell the positions apart."""
    x = torch.randn(1, 1, 6, 6)
    rolled = torch.roll(x, shifts=(2, 3), dims=(2, 3))
    knobs = {"depth": 1, "kernel_size": 1, "pooling": "none", "norm": "none"}
    gap = _cnn((1, 6, 6), **knobs, head="gap").eval()
    flat = _cnn((1, 6, 6), **knobs, head="flatten").eval()
    torch.testing.assert_close(gap(x), gap(rolled))
    assert not torch.allclose(flat(x), flat(rolled))


@pytest.mark.parametrize("head", CNN_HEADS)
def test_head_width_adds_hidden_layer_with_activation_then_dropout(head: str) -> None:
    """head_width adds Linear -> the family's activation, then dropout, then the classifier."""
    model = _cnn((1, 16, 16), head=head, head_width=24, activation="gelu", dropout=0.3)
    assert [name for name, _ in model.named_children()] == [
        "features",
        "hidden",
        "dropout",
        "classifier",
    ]
    assert isinstance(model.hidden.linear, nn.Linear) and model.hidden.linear.out_features == 24
    assert type(model.hidden.act) is nn.GELU and model.classifier.in_features == 24
    assert len(_modules(model, nn.Dropout)) == 1 and model.dropout.p == 0.3
    # the hidden activation runs: zero its input weights, and the classifier sees gelu(bias)
    model.eval()
    with torch.no_grad():
        model.hidden.linear.weight.zero_()
        model.hidden.linear.bias.fill_(-1.0)
        expected = model.classifier(nn.functional.gelu(torch.full((2, 24), -1.0)))
    torch.testing.assert_close(model(torch.randn(2, 1, 16, 16)), expected)
    # in train mode dropout acts on the hidden layer's output: the classifier gets 0 or
    # gelu(-1) / (1 - p), both (dropout before the hidden layer would leave it constant)
    seen: list[torch.Tensor] = []
    model.classifier.register_forward_hook(lambda module, args, out: seen.append(args[0]))
    model.train()(torch.randn(4, 1, 16, 16))
    kept = nn.functional.gelu(torch.tensor(-1.0)) / 0.7
    values = seen[0].flatten()
    assert bool(((values == 0) | torch.isclose(values, kept)).all())
    assert bool((values == 0).any()) and bool((values != 0).any())


def test_cnn_class_flatten_needs_input_size() -> None:
    with pytest.raises(ModelConfigError, match=r"head='flatten' needs input_size.*None"):
        CNN(1, NUM_CLASSES, head="flatten")
    model = CNN(1, NUM_CLASSES, head="flatten", input_size=(8, 8), width=4, norm="none")
    assert model.classifier.in_features == 4 * 2 * 2
    assert CNN(1, NUM_CLASSES).classifier.in_features == 32  # gap needs no input_size


# --------------------------------------------------------------------------- torch.func


FUNC_CASES = [
    pytest.param("cnn", {"norm": "batch"}, (3, 16, 16), id="cnn-batch"),
    pytest.param("cnn", {"norm": "group", "pooling": "l2"}, (3, 16, 16), id="cnn-group-l2"),
    pytest.param("cnn1d", {"norm": "batch", "pooling": "stride"}, (2, 40), id="cnn1d-batch-stride"),
    pytest.param(
        "cnn",
        {"norm": "batch", "head": "flatten", "head_width": 16},
        (1, 12, 12),
        id="cnn-batch-flatten-hidden",
    ),
    pytest.param(
        "cnn1d",
        {"norm": "group", "head": "flatten", "activation": "tanh"},
        (2, 40),
        id="cnn1d-group-flatten",
    ),
    pytest.param("resnet", {"norm": "batch"}, (3, 16, 16), id="resnet-batch"),
    pytest.param("resnet", {"norm": "group", "activation": "gelu"}, (3, 16, 16), id="resnet-group"),
    pytest.param("mlp", {"norm": "batch", "activation": "tanh"}, (1, 8, 8), id="mlp-batch"),
    pytest.param("mlp", {"norm": "layer"}, (1, 8, 8), id="mlp-layer"),
]


def _func_model(
    name: str, knobs: dict[str, Any], shape: tuple[int, ...]
) -> tuple[nn.Module, torch.Tensor]:
    """A model for the torch.func tests and an input batch for it."""
    model = build_model({**BASE[name], **knobs}, shape, NUM_CLASSES)
    return model, torch.randn(4, *shape)


@pytest.mark.parametrize(("name", "knobs", "shape"), FUNC_CASES)
def test_functional_call_eval_equals_module(
    name: str, knobs: dict[str, Any], shape: tuple[int, ...]
) -> None:
    """In eval mode functional_call with the module's own state equals model(x) exactly."""
    model, x = _func_model(name, knobs, shape)
    model.eval()
    out = torch.func.functional_call(model, _state(model), (x,))
    assert torch.equal(out, model(x))


@pytest.mark.parametrize(("name", "knobs", "shape"), FUNC_CASES)
def test_functional_call_train_updates_passed_buffers(
    name: str, knobs: dict[str, Any], shape: tuple[int, ...]
) -> None:
    """In train mode the passed buffers get the same updates as a module copy's own buffers."""
    model, x = _func_model(name, knobs, shape)
    model.train()
    reference = copy.deepcopy(model)
    originals = {k: v.clone() for k, v in model.named_buffers()}
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    params = dict(model.named_parameters())
    for _ in range(2):
        out = torch.func.functional_call(model, {**params, **buffers}, (x,))
        assert torch.equal(out, reference(x))
    for key, value in reference.named_buffers():
        assert torch.equal(buffers[key], value), key
    for key, value in model.named_buffers():
        assert torch.equal(value, originals[key]), key  # the module's own buffers are untouched
    if knobs["norm"] == "batch":
        assert any(not torch.equal(buffers[k], originals[k]) for k in buffers)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("name", "knobs", "shape"), FUNC_CASES)
def test_func_grad_equals_backward(
    name: str, knobs: dict[str, Any], shape: tuple[int, ...], dtype: torch.dtype
) -> None:
    """torch.func.grad through functional_call (train mode) equals the module's .backward() grads."""
    model, x = _func_model(name, knobs, shape)
    model = model.to(dtype).train()
    x = x.to(dtype)
    target = torch.arange(x.shape[0]) % NUM_CLASSES
    reference = copy.deepcopy(model)
    buffers = {k: v.clone() for k, v in model.named_buffers()}

    # BatchNorm updates its running stats in place: under torch.func.grad the
    # buffers must be inputs of the transformed function, not captured tensors.
    def loss_fn(params: dict[str, torch.Tensor], bufs: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = torch.func.functional_call(model, {**params, **bufs}, (x,))
        assert logits.dtype == dtype
        return nn.functional.cross_entropy(logits, target)

    params = {k: v.detach() for k, v in model.named_parameters()}
    grads = torch.func.grad(loss_fn)(params, buffers)
    nn.functional.cross_entropy(reference(x), target).backward()
    for key, value in reference.named_buffers():
        assert torch.equal(buffers[key], value), key
    tol = {"atol": 1e-12, "rtol": 1e-10} if dtype == torch.float64 else {"atol": 1e-6, "rtol": 1e-5}
    for key, param in reference.named_parameters():
        assert grads[key].dtype == dtype
        torch.testing.assert_close(grads[key], param.grad, **tol)


@pytest.mark.parametrize(("name", "knobs", "shape"), FUNC_CASES)
def test_float64_forward(name: str, knobs: dict[str, Any], shape: tuple[int, ...]) -> None:
    """model.double() runs in float64 and agrees with the float32 model."""
    model, x = _func_model(name, knobs, shape)
    model.eval()
    out32 = model(x)
    model64 = copy.deepcopy(model).double()
    out64 = model64(x.double())
    assert out64.dtype == torch.float64
    assert torch.equal(torch.func.functional_call(model64, _state(model64), (x.double(),)), out64)
    torch.testing.assert_close(out64.float(), out32, atol=1e-4, rtol=1e-4)


VMAP_CASES = [
    pytest.param("cnn", {"norm": "group"}, (3, 16, 16), id="cnn-group"),
    pytest.param("cnn", {"norm": "none", "pooling": "l2"}, (3, 16, 16), id="cnn-none-l2"),
    pytest.param("cnn", {"norm": "batch", "pooling": "stride"}, (3, 16, 16), id="cnn-batch-eval"),
    pytest.param("cnn1d", {"norm": "group", "pooling": "avg"}, (2, 40), id="cnn1d-group"),
    pytest.param(
        "cnn",
        {"norm": "batch", "head": "flatten", "head_width": 16},
        (3, 16, 16),
        id="cnn-flatten-hidden",
    ),
    pytest.param("resnet", {"norm": "group"}, (3, 16, 16), id="resnet-group"),
    pytest.param("mlp", {"norm": "layer"}, (1, 8, 8), id="mlp-layer"),
]


@pytest.mark.parametrize(("name", "knobs", "shape"), VMAP_CASES)
def test_vmap_over_stacked_models_equals_loop(
    name: str, knobs: dict[str, Any], shape: tuple[int, ...]
) -> None:
    """vmap of functional_call over 3 stacked copies (eval) equals running them one by one."""
    models = [_func_model(name, knobs, shape)[0].eval() for _ in range(3)]
    x = torch.randn(4, *shape)
    params, buffers = torch.func.stack_module_state(models)
    base = copy.deepcopy(models[0]).to("meta")

    def run(
        p: dict[str, torch.Tensor], b: dict[str, torch.Tensor], inp: torch.Tensor
    ) -> torch.Tensor:
        return torch.func.functional_call(base, (p, b), (inp,))

    out = torch.vmap(run, in_dims=(0, 0, None))(params, buffers, x)
    expected = torch.stack([m(x) for m in models])
    assert not torch.allclose(expected[0], expected[1])  # the copies really differ
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_vmap_of_grad_over_stacked_cnns() -> None:
    """Per-model gradients via vmap(grad) over stacked cnn parameters equal separate backward passes."""
    models = [_cnn(shape=(3, 16, 16), norm="group", pooling="l2").eval() for _ in range(3)]
    x = torch.randn(4, 3, 16, 16)
    target = torch.tensor([0, 1, 2, 3])
    params, buffers = torch.func.stack_module_state(models)
    base = copy.deepcopy(models[0]).to("meta")

    def loss_fn(p: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> torch.Tensor:
        return nn.functional.cross_entropy(torch.func.functional_call(base, (p, b), (x,)), target)

    grads = torch.vmap(torch.func.grad(loss_fn))(params, buffers)
    for index, model in enumerate(models):
        nn.functional.cross_entropy(model(x), target).backward()
        for key, param in model.named_parameters():
            torch.testing.assert_close(grads[key][index], param.grad, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- bad configs


BAD_CONFIGS = [
    pytest.param({"name": "vgg"}, (3, 32, 32), ["'vgg'", "resnet"], id="unknown-name"),
    pytest.param({"depth": 2}, (3, 32, 32), ["'name'"], id="missing-name"),
    pytest.param({"name": 3}, (3, 32, 32), ["name=3"], id="non-str-name"),
    pytest.param(
        {"name": "cnn", "depthh": 2},
        (3, 32, 32),
        ["'depthh'", "allowed keys", "'pooling'"],
        id="cnn-unknown-key",
    ),
    pytest.param(
        {"name": "mlp", "pooling": "max"},
        (1, 8, 8),
        ["'pooling'", "allowed keys"],
        id="mlp-unknown-key",
    ),
    pytest.param(
        {"name": "resnet", "depth": 3},
        (3, 32, 32),
        ["'depth'", "'num_blocks'"],
        id="resnet-unknown-key",
    ),
    pytest.param({"name": "cnn", "depth": 0}, (3, 32, 32), ["depth=0"], id="cnn-depth-0"),
    pytest.param({"name": "cnn1d", "depth": 2.0}, (1, 40), ["depth=2.0"], id="cnn1d-float-depth"),
    pytest.param({"name": "cnn", "depth": True}, (3, 32, 32), ["depth=True"], id="cnn-bool-depth"),
    pytest.param({"name": "mlp", "depth": -1}, (1, 8, 8), ["depth=-1"], id="mlp-negative-depth"),
    pytest.param({"name": "cnn", "width": -4}, (3, 32, 32), ["width=-4"], id="cnn-negative-width"),
    pytest.param(
        {"name": "resnet", "width": -4}, (3, 32, 32), ["width=-4"], id="resnet-negative-width"
    ),
    pytest.param({"name": "mlp", "width": 0}, (1, 8, 8), ["width=0"], id="mlp-zero-width"),
    pytest.param(
        {"name": "cnn", "width": [8, 8, 8]},
        (3, 32, 32),
        ["[8, 8, 8]", "length 2"],
        id="cnn-width-list-len",
    ),
    pytest.param(
        {"name": "mlp", "depth": 1, "width": [4, 4]}, (1, 8, 8), ["[4, 4]"], id="mlp-width-list-len"
    ),
    pytest.param(
        {"name": "cnn", "width": [8, -2]}, (3, 32, 32), ["[8, -2]", "-2"], id="cnn-width-list-item"
    ),
    pytest.param(
        {"name": "cnn", "kernel_size": 4}, (3, 32, 32), ["kernel_size=4"], id="cnn-even-kernel"
    ),
    pytest.param(
        {"name": "cnn1d", "kernel_size": 0}, (1, 40), ["kernel_size=0"], id="cnn1d-zero-kernel"
    ),
    pytest.param(
        {"name": "cnn", "pooling": "median"}, (3, 32, 32), ["'median'"], id="cnn-unknown-pooling"
    ),
    pytest.param(
        {"name": "cnn", "norm": "instance"}, (3, 32, 32), ["'instance'"], id="cnn-unknown-norm"
    ),
    pytest.param(
        {"name": "resnet", "norm": "layer"}, (3, 32, 32), ["'layer'"], id="resnet-unknown-norm"
    ),
    pytest.param({"name": "mlp", "norm": "group"}, (1, 8, 8), ["'group'"], id="mlp-unknown-norm"),
    pytest.param(
        {"name": "cnn", "activation": "swish"}, (3, 32, 32), ["'swish'"], id="cnn-unknown-act"
    ),
    pytest.param(
        {"name": "resnet", "activation": "ReLU"}, (3, 32, 32), ["'ReLU'"], id="resnet-unknown-act"
    ),
    pytest.param({"name": "mlp", "activation": None}, (1, 8, 8), ["None"], id="mlp-none-act"),
    pytest.param({"name": "cnn", "dropout": 1.0}, (3, 32, 32), ["dropout=1.0"], id="cnn-dropout-1"),
    pytest.param(
        {"name": "mlp", "dropout": -0.1}, (1, 8, 8), ["dropout=-0.1"], id="mlp-negative-dropout"
    ),
    pytest.param(
        {"name": "resnet", "dropout": "0.1"}, (3, 32, 32), ["'0.1'"], id="resnet-str-dropout"
    ),
    pytest.param(
        {"name": "cnn", "norm": "group", "groups": 3, "width": 8},
        (3, 32, 32),
        ["groups=3", "width=8"],
        id="cnn-groups",
    ),
    pytest.param(
        {"name": "cnn1d", "norm": "group", "groups": 4, "width": [8, 6]},
        (1, 40),
        ["groups=4", "width=6"],
        id="cnn1d-groups-list",
    ),
    pytest.param(
        {"name": "resnet", "norm": "group", "groups": 8, "width": 4},
        (3, 32, 32),
        ["groups=8", "width=4"],
        id="resnet-groups",
    ),
    pytest.param({"name": "cnn", "groups": 0}, (3, 32, 32), ["groups=0"], id="cnn-zero-groups"),
    pytest.param(
        {"name": "cnn", "head": "mean"}, (3, 32, 32), ["head=", "'mean'", "'gap'"], id="cnn-head"
    ),
    pytest.param({"name": "cnn1d", "head": None}, (1, 40), ["head=None"], id="cnn1d-head-none"),
    pytest.param(
        {"name": "cnn", "head": "Flatten"}, (3, 32, 32), ["head='Flatten'"], id="cnn-head-case"
    ),
    pytest.param(
        {"name": "cnn", "head_width": -1}, (3, 32, 32), ["head_width=-1"], id="cnn-head-width-neg"
    ),
    pytest.param(
        {"name": "cnn1d", "head": "flatten", "head_width": 1.5},
        (1, 40),
        ["head_width=1.5"],
        id="cnn1d-head-width-float",
    ),
    pytest.param(
        {"name": "cnn", "head_width": True},
        (3, 32, 32),
        ["head_width=True"],
        id="cnn-head-width-bool",
    ),
    pytest.param(
        {"name": "cnn", "head": "flatten", "depth": 4},
        (1, 8, 8),
        ["depth=4", "'max'", "(1, 8, 8)"],
        id="cnn-flatten-too-deep",
    ),
    pytest.param(
        {"name": "cnn", "depth": 5, "pooling": "max"},
        (1, 8, 8),
        ["depth=5", "'max'", "(1, 8, 8)"],
        id="cnn-too-deep",
    ),
    pytest.param(
        {"name": "cnn", "depth": 3, "pooling": "l2"},
        (3, 32, 4),
        ["depth=3", "'l2'", "(3, 32, 4)"],
        id="cnn-too-deep-narrow",
    ),
    pytest.param(
        {"name": "cnn1d", "depth": 6, "pooling": "avg"},
        (1, 40),
        ["depth=6", "'avg'", "(1, 40)"],
        id="cnn1d-too-deep",
    ),
    pytest.param(
        {"name": "resnet", "num_blocks": [1, 1]},
        (3, 32, 32),
        ["[1, 1]"],
        id="resnet-num-blocks-len",
    ),
    pytest.param(
        {"name": "resnet", "num_blocks": [1, 0, 1]},
        (3, 32, 32),
        ["[1, 0, 1]"],
        id="resnet-num-blocks-0",
    ),
    pytest.param({"name": "cnn"}, (3, 32), ["(3, 32)"], id="cnn-rank"),
    pytest.param({"name": "cnn1d"}, (1, 8, 8), ["(1, 8, 8)"], id="cnn1d-rank"),
    pytest.param({"name": "resnet"}, (32, 32), ["(32, 32)"], id="resnet-rank"),
    pytest.param({"name": "mlp"}, (), ["()"], id="mlp-empty-shape"),
    pytest.param({"name": "cnn"}, (3, 0, 32), ["(3, 0, 32)"], id="cnn-zero-size"),
]


@pytest.mark.parametrize(("config", "shape", "fragments"), BAD_CONFIGS)
def test_bad_config_raises(
    config: dict[str, Any], shape: tuple[int, ...], fragments: list[str]
) -> None:
    """Each bad config raises ModelConfigError whose message shows the bad value."""
    with pytest.raises(ModelConfigError) as info:
        build_model(config, shape, NUM_CLASSES)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, (fragment, message)


@pytest.mark.parametrize("num_classes", [0, 2.5])
def test_bad_num_classes(num_classes: Any) -> None:
    """num_classes must be a positive int."""
    with pytest.raises(ModelConfigError, match="num_classes"):
        build_model({"name": "mlp"}, (4,), num_classes)


def test_config_must_be_mapping() -> None:
    """A non-mapping config is rejected."""
    with pytest.raises(ModelConfigError, match="mapping"):
        build_model(["cnn"], (3, 32, 32), NUM_CLASSES)  # type: ignore[arg-type]
