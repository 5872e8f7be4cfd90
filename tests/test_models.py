"""afm_ray.models: every registered model on tiny inputs, normalisation inside, helpers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from afm_ray.models import (
    MODELS,
    Normalize,
    build_model,
    count_parameters,
    measure_latency_ms,
    model_spec,
    unwrap,
)

MEAN3, STD3 = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)
# the generic "wrn" is exercised small here; its default size is wrn34_10's, tested by name
SMALL_KWARGS = {"wrn": {"depth": 10, "width": 2}}


def _build(arch: str, in_channels: int = 3, num_classes: int = 10, **kwargs) -> nn.Module:
    mean, std = (MEAN3, STD3) if in_channels == 3 else ((0.13,) * in_channels, (0.31,) * in_channels)
    return build_model(arch, num_classes=num_classes, in_channels=in_channels, mean=mean, std=std, **kwargs)


def test_registry_names() -> None:
    assert set(MODELS) == {"small_cnn", "resnet18", "preact_resnet18", "wrn", "wrn34_10", "wrn28_10", "mobilenet_v2"}


@pytest.mark.parametrize("arch", sorted(MODELS))
def test_forward_backward_and_normalisation_inside(arch: str) -> None:
    """One forward+backward per model (WRN-34-10 included): shape, input gradient, Normalize first."""
    torch.manual_seed(0)
    model = _build(arch, num_classes=7, **SMALL_KWARGS.get(arch, {})).eval()
    assert isinstance(model[0], Normalize) and model[0] is model.normalize
    assert {name for name, _ in model.named_buffers()} >= {"normalize.mean", "normalize.std"}
    assert "normalize.mean" not in dict(model.named_parameters())
    assert count_parameters(model) > 0
    assert model.arch_name == arch

    x = torch.rand(2, 3, 32, 32, requires_grad=True)
    out = model(x)
    assert out.shape == (2, 7) and out.dtype == torch.float32
    (grad,) = torch.autograd.grad(out.sum(), x)
    assert grad.shape == x.shape and grad.abs().sum() > 0
    with torch.no_grad():
        inner = model.net((x - torch.tensor(MEAN3).view(1, 3, 1, 1)) / torch.tensor(STD3).view(1, 3, 1, 1))
    torch.testing.assert_close(out.detach(), inner, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("size", [8, 28, 32])
def test_small_cnn_grey_any_size(size: int) -> None:
    model = _build("small_cnn", in_channels=1)
    x = torch.rand(2, 1, size, size, requires_grad=True)
    out = model(x)
    assert out.shape == (2, 10)
    (grad,) = torch.autograd.grad(out.sum(), x)
    assert grad.abs().sum() > 0


@pytest.mark.parametrize(
    "arch,kwargs",
    [("small_cnn", {"width": 8}), ("resnet18", {"width": 8}), ("preact_resnet18", {"width": 8}),
     ("wrn", {"depth": 10, "width": 1}), ("mobilenet_v2", {"width": 0.25})],
)  # fmt: skip
def test_grey_28x28_and_width(arch: str, kwargs: dict) -> None:
    """in_channels=1 on MNIST-size input, and width shrinks the model."""
    model = _build(arch, in_channels=1, **kwargs)
    assert model(torch.rand(2, 1, 28, 28)).shape == (2, 10)
    assert count_parameters(model) < count_parameters(_build(arch, in_channels=1))
    assert model.arch_kwargs == kwargs


@pytest.mark.parametrize(
    "arch,expected",
    [("resnet18", 11_173_962), ("wrn34_10", 46_160_474), ("wrn28_10", 36_479_194),
     ("preact_resnet18", 11_172_170), ("mobilenet_v2", 2_296_922)],
)  # fmt: skip
def test_known_parameter_counts(arch: str, expected: int) -> None:
    # resnet18 / mobilenet_v2: kuangliu/pytorch-cifar; wrn: TRADES; preact: robust_overfitting
    assert count_parameters(_build(arch)) == expected


def test_wrn_named_equals_generic() -> None:
    assert count_parameters(_build("wrn", depth=28, width=10)) == count_parameters(_build("wrn28_10"))
    with pytest.raises(ValueError, match="depth=30"):
        _build("wrn", depth=30)


def test_unknown_arch_and_kwargs() -> None:
    with pytest.raises(ValueError, match=r"'resnet50'.*mobilenet_v2.*preact_resnet18.*resnet18.*small_cnn.*wrn"):
        _build("resnet50")
    with pytest.raises(ValueError, match=r"\['depth'\] for arch 'resnet18'.*\['width'\]"):
        _build("resnet18", depth=34)
    with pytest.raises(ValueError, match="in_channels=1"):
        build_model("small_cnn", num_classes=10, in_channels=1, mean=MEAN3, std=STD3)
    # None means "the architecture's default", so callers can pass config values straight through
    assert model_spec(_build("small_cnn", in_channels=1, width=None))["arch"] == "small_cnn"


def test_model_spec_rebuilds() -> None:
    model = _build("resnet18", in_channels=1, num_classes=5, width=4)
    spec = model_spec(model)
    assert spec == {"arch": "resnet18", "num_classes": 5, "in_channels": 1,
                    "mean": pytest.approx([0.13]), "std": pytest.approx([0.31]), "width": 4}  # fmt: skip
    rebuilt = build_model(**spec)
    rebuilt.load_state_dict(model.state_dict())  # strict: same architecture
    x = torch.rand(2, 1, 28, 28)
    torch.testing.assert_close(rebuilt.eval()(x), model.eval()(x))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.compile's own imports
def test_unwrap() -> None:
    model = _build("small_cnn", in_channels=1)
    assert unwrap(model) is model
    assert unwrap(nn.DataParallel(model)) is model
    compiled = torch.compile(model)  # wraps lazily; nothing is compiled until called
    assert unwrap(compiled) is model
    assert model_spec(compiled)["arch"] == "small_cnn"
    assert count_parameters(compiled) == count_parameters(model)


def test_measure_latency_restores_modes() -> None:
    model = _build("small_cnn", in_channels=1, width=8).train()
    model.net.features[1].eval()  # a mixed state (e.g. frozen BN) must come back exactly
    before = [m.training for m in model.modules()]
    ms = measure_latency_ms(model, (1, 28, 28), repeats=3, warmup=1)
    assert isinstance(ms, float) and ms > 0
    assert [m.training for m in model.modules()] == before
    assert measure_latency_ms(model.eval(), (1, 8, 8), batch_size=4, device="cpu", repeats=2) > 0
    assert not model.training
    assert measure_latency_ms(nn.DataParallel(model), (1, 8, 8), repeats=2) > 0  # timed unwrapped
    with pytest.raises(ValueError, match="repeats=0"):
        measure_latency_ms(model, (1, 8, 8), repeats=0)


def test_normalize_buffers_follow_state_dict() -> None:
    norm = Normalize((0.5,), (0.25,))
    assert set(norm.state_dict()) == {"mean", "std"}
    torch.testing.assert_close(norm(torch.ones(1, 1, 2, 2)), torch.full((1, 1, 2, 2), 2.0))
    with pytest.raises(ValueError, match="std"):
        Normalize((0.5,), (0.0,))
