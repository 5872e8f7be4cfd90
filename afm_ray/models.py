"""Small image classifiers by name: inputs in [0, 1], normalisation inside, logits out.

As in RobustBench, every model returned by :func:`build_model` is
``nn.Sequential(normalize=Normalize(mean, std), net=<architecture>)``: epsilon lives in pixel
space ([0, 1]) and any attack works on the model unchanged.

Architectures (the standard CIFAR variants: 3x3 stride-1 stem, no max-pool; global average
pooling is adaptive, so the same models also run on 28x28 or 8x8 inputs):

- ``small_cnn``: 5 conv-BN-ReLU layers, two 2x2 max-pools, global average pool, linear head
  (a student for 8x8 digits and 28x28 MNIST; any input of at least 4x4).
- ``resnet18``: ResNet-18 (He et al. 2016), kuangliu/pytorch-cifar layout, 11,173,962
  parameters for 3 channels and 10 classes.
- ``preact_resnet18``: PreAct ResNet-18 (He et al. 2016, identity mappings), the
  locuslab/robust_overfitting layout (with the final BN-ReLU before pooling), 11,172,170 params.
- ``wrn`` / ``wrn34_10`` / ``wrn28_10``: WideResNet-depth-k (Zagoruyko & Komodakis 2016),
  the TRADES/MART layout; WRN-34-10 has 46,160,474 parameters, WRN-28-10 36,479,194.
- ``mobilenet_v2``: MobileNetV2 (Sandler et al. 2018), kuangliu/pytorch-cifar CIFAR variant
  (stride-1 stem, stride 1 in the second stage), 2,296,922 parameters.

Every builder takes ``in_channels`` and ``num_classes`` plus its own ``width`` (and ``depth``,
``dropout`` for ``wrn``); :func:`build_model` adds the normalisation and records
``arch_name``/``arch_kwargs`` on the model so :func:`model_spec` can rebuild it.
"""

from __future__ import annotations

import contextlib
import inspect
import statistics
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "MODELS",
    "Normalize",
    "build_model",
    "count_parameters",
    "measure_latency_ms",
    "model_spec",
    "unwrap",
    "small_cnn",
    "resnet18",
    "preact_resnet18",
    "wrn",
    "wrn34_10",
    "wrn28_10",
    "mobilenet_v2",
    "ResNet",
    "PreActResNet",
    "WideResNet",
    "MobileNetV2",
]


class Normalize(nn.Module):
    """``(x - mean) / std`` per channel; mean and std are buffers so they travel with the weights."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        if len(mean) != len(std):
            raise ValueError(f"mean has {len(mean)} channels but std has {len(std)}: give one value per channel")
        if any(s <= 0 for s in std):
            raise ValueError(f"std={tuple(std)} must be positive in every channel")
        self.register_buffer("mean", torch.tensor([float(m) for m in mean]).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor([float(s) for s in std]).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        return f"mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}"


# ---------------------------------------------------------------------------------------------
# small_cnn


class SmallCNN(nn.Module):
    """conv(w)-conv(w)-pool-conv(2w)-conv(2w)-pool-conv(4w), each conv 3x3 + BN + ReLU."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 32) -> None:
        super().__init__()

        def block(c_in: int, c_out: int) -> list[nn.Module]:
            return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]

        w = width
        self.features = nn.Sequential(
            *block(in_channels, w), *block(w, w), nn.MaxPool2d(2),
            *block(w, 2 * w), *block(2 * w, 2 * w), nn.MaxPool2d(2),
            *block(2 * w, 4 * w),
            nn.AdaptiveAvgPool2d(1),
        )  # fmt: skip
        self.classifier = nn.Linear(4 * w, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


def small_cnn(*, in_channels: int, num_classes: int, width: int = 32) -> nn.Module:
    """A small student: ~0.14M parameters at ``width=32`` (scales as width^2)."""
    return SmallCNN(in_channels, num_classes, width)


# ---------------------------------------------------------------------------------------------
# ResNet-18 and PreAct ResNet-18 (CIFAR variants)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR ResNet (kuangliu/pytorch-cifar): 3x3 stem, stages of width w, 2w, 4w, 8w."""

    def __init__(self, num_blocks: Sequence[int], in_channels: int = 3, num_classes: int = 10, width: int = 64):
        super().__init__()
        self.in_planes = width
        self.conv1 = nn.Conv2d(in_channels, width, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.layer1 = self._make_layer(width, num_blocks[0], 1)
        self.layer2 = self._make_layer(2 * width, num_blocks[1], 2)
        self.layer3 = self._make_layer(4 * width, num_blocks[2], 2)
        self.layer4 = self._make_layer(8 * width, num_blocks[3], 2)
        self.linear = nn.Linear(8 * width * BasicBlock.expansion, num_classes)

    def _make_layer(self, planes: int, num_blocks: int, stride: int) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (num_blocks - 1):
            layers.append(BasicBlock(self.in_planes, planes, s))
            self.in_planes = planes * BasicBlock.expansion
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        # adaptive pooling == avg_pool2d(out, 4) at 32x32, and also works at 28x28 or 8x8
        out = F.adaptive_avg_pool2d(out, 1)
        return self.linear(torch.flatten(out, 1))


def resnet18(*, in_channels: int, num_classes: int, width: int = 64) -> nn.Module:
    """ResNet-18, CIFAR variant; ``width`` is the first stage's channel count (64 standard)."""
    return ResNet([2, 2, 2, 2], in_channels, num_classes, width)


class PreActBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        # the projection shortcut takes the pre-activated input, as in He et al. (2016b)
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class PreActResNet(nn.Module):
    """CIFAR PreAct ResNet (locuslab/robust_overfitting): final BN-ReLU before pooling."""

    def __init__(self, num_blocks: Sequence[int], in_channels: int = 3, num_classes: int = 10, width: int = 64):
        super().__init__()
        self.in_planes = width
        self.conv1 = nn.Conv2d(in_channels, width, 3, stride=1, padding=1, bias=False)
        self.layer1 = self._make_layer(width, num_blocks[0], 1)
        self.layer2 = self._make_layer(2 * width, num_blocks[1], 2)
        self.layer3 = self._make_layer(4 * width, num_blocks[2], 2)
        self.layer4 = self._make_layer(8 * width, num_blocks[3], 2)
        self.bn = nn.BatchNorm2d(8 * width)
        self.linear = nn.Linear(8 * width, num_classes)

    def _make_layer(self, planes: int, num_blocks: int, stride: int) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (num_blocks - 1):
            layers.append(PreActBlock(self.in_planes, planes, s))
            self.in_planes = planes
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(x)
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = F.relu(self.bn(out))
        out = F.adaptive_avg_pool2d(out, 1)
        return self.linear(torch.flatten(out, 1))


def preact_resnet18(*, in_channels: int, num_classes: int, width: int = 64) -> nn.Module:
    """PreAct ResNet-18, CIFAR variant; ``width`` is the first stage's channel count."""
    return PreActResNet([2, 2, 2, 2], in_channels, num_classes, width)


# ---------------------------------------------------------------------------------------------
# WideResNet


class WideBasicBlock(nn.Module):
    def __init__(self, in_planes: int, out_planes: int, stride: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, stride=1, padding=1, bias=False)
        self.dropout = dropout
        self.equal_in_out = in_planes == out_planes
        self.conv_shortcut: nn.Module | None = None
        if not self.equal_in_out:
            self.conv_shortcut = nn.Conv2d(in_planes, out_planes, 1, stride=stride, padding=0, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.equal_in_out:
            out = self.relu1(self.bn1(x))
            shortcut = x
        else:
            # the reference code pre-activates x itself and projects the activated tensor
            x = self.relu1(self.bn1(x))
            out = x
            assert self.conv_shortcut is not None
            shortcut = self.conv_shortcut(x)
        out = self.relu2(self.bn2(self.conv1(out)))
        if self.dropout > 0:
            out = F.dropout(out, p=self.dropout, training=self.training)
        return shortcut + self.conv2(out)


class WideResNet(nn.Module):
    """WRN-depth-k (Zagoruyko & Komodakis 2016) as in TRADES/MART: groups of 16k, 32k, 64k.

    ``depth`` must be 6n + 4; ``widen_factor`` is k; ``dropout`` 0 as in adversarial training.
    """

    def __init__(
        self,
        depth: int = 34,
        widen_factor: int = 10,
        *,
        in_channels: int = 3,
        num_classes: int = 10,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if depth < 10 or (depth - 4) % 6 != 0:
            raise ValueError(f"WideResNet depth={depth} is invalid: must be 6n+4, n >= 1 (10, 16, 28, 34, ...)")
        n = (depth - 4) // 6
        channels = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(in_channels, channels[0], 3, stride=1, padding=1, bias=False)
        self.block1 = self._make_group(n, channels[0], channels[1], 1, dropout)
        self.block2 = self._make_group(n, channels[1], channels[2], 2, dropout)
        self.block3 = self._make_group(n, channels[2], channels[3], 2, dropout)
        self.bn1 = nn.BatchNorm2d(channels[3])
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(channels[3], num_classes)
        # initialisation of the reference implementation
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    @staticmethod
    def _make_group(n: int, in_planes: int, out_planes: int, stride: int, dropout: float) -> nn.Sequential:
        return nn.Sequential(
            *[WideBasicBlock(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1, dropout)
              for i in range(n)]
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        out = self.relu(self.bn1(out))
        out = F.adaptive_avg_pool2d(out, 1)
        return self.fc(torch.flatten(out, 1))


def wrn(*, in_channels: int, num_classes: int, depth: int = 34, width: int = 10, dropout: float = 0.0) -> nn.Module:
    """WideResNet-``depth``-``width`` (``width`` is the widen factor k)."""
    return WideResNet(depth, width, in_channels=in_channels, num_classes=num_classes, dropout=dropout)


def wrn34_10(*, in_channels: int, num_classes: int, dropout: float = 0.0) -> nn.Module:
    """WRN-34-10, the usual robust CIFAR teacher."""
    return WideResNet(34, 10, in_channels=in_channels, num_classes=num_classes, dropout=dropout)


def wrn28_10(*, in_channels: int, num_classes: int, dropout: float = 0.0) -> nn.Module:
    """WRN-28-10."""
    return WideResNet(28, 10, in_channels=in_channels, num_classes=num_classes, dropout=dropout)


# ---------------------------------------------------------------------------------------------
# MobileNetV2 (CIFAR variant)


def _make_divisible(v: float, divisor: int = 8) -> int:
    """Round channels to a multiple of 8 without going >10% below ``v`` (reference MobileNetV2 code)."""
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


class InvertedResidual(nn.Module):
    """expand 1x1 -> depthwise 3x3 -> project 1x1 (linear bottleneck)."""

    def __init__(self, in_planes: int, out_planes: int, expansion: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        planes = expansion * in_planes
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, groups=planes, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_planes, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        # kuangliu's variant keeps a residual at every stride-1 block, projecting when widths differ
        self.shortcut = nn.Sequential()
        if stride == 1 and in_planes != out_planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, out_planes, 1, bias=False), nn.BatchNorm2d(out_planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return out + self.shortcut(x) if self.stride == 1 else out


class MobileNetV2(nn.Module):
    """MobileNetV2 for 32x32 inputs (kuangliu/pytorch-cifar): stride-1 stem, 2nd stage stride 1."""

    # (expansion, out_planes, num_blocks, stride)
    cfg = [(1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]

    def __init__(self, in_channels: int = 3, num_classes: int = 10, width: float = 1.0) -> None:
        super().__init__()
        if width <= 0:
            raise ValueError(f"MobileNetV2 width={width} must be a positive multiplier (1.0 standard)")
        stem = _make_divisible(32 * width)
        # the paper keeps the last layer at 1280 for multipliers < 1
        last = _make_divisible(1280 * max(1.0, width))
        self.conv1 = nn.Conv2d(in_channels, stem, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        layers: list[nn.Module] = []
        in_planes = stem
        for expansion, out_planes, num_blocks, stride in self.cfg:
            out_planes = _make_divisible(out_planes * width)
            for s in [stride] + [1] * (num_blocks - 1):
                layers.append(InvertedResidual(in_planes, out_planes, expansion, s))
                in_planes = out_planes
        self.layers = nn.Sequential(*layers)
        self.conv2 = nn.Conv2d(in_planes, last, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(last)
        self.linear = nn.Linear(last, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layers(out)
        out = F.relu(self.bn2(self.conv2(out)))
        out = F.adaptive_avg_pool2d(out, 1)
        return self.linear(torch.flatten(out, 1))


def mobilenet_v2(*, in_channels: int, num_classes: int, width: float = 1.0) -> nn.Module:
    """MobileNetV2, CIFAR variant; ``width`` is the channel multiplier (1.0 standard)."""
    return MobileNetV2(in_channels, num_classes, width)


# ---------------------------------------------------------------------------------------------
# registry and helpers

MODELS: dict[str, Callable[..., nn.Module]] = {
    "small_cnn": small_cnn,
    "resnet18": resnet18,
    "preact_resnet18": preact_resnet18,
    "wrn": wrn,
    "wrn34_10": wrn34_10,
    "wrn28_10": wrn28_10,
    "mobilenet_v2": mobilenet_v2,
}


def _arch_kwarg_names(builder: Callable[..., nn.Module]) -> list[str]:
    return [p for p in inspect.signature(builder).parameters if p not in ("in_channels", "num_classes")]


def build_model(
    arch: str,
    *,
    num_classes: int,
    in_channels: int,
    mean: Sequence[float],
    std: Sequence[float],
    **arch_kwargs: Any,
) -> nn.Module:
    """Build ``arch`` as ``nn.Sequential(normalize=Normalize(mean, std), net=...)``.

    The model takes images in [0, 1] and returns logits. Arch kwargs whose value is ``None``
    mean "the architecture's default", so a caller can pass ``width=cfg.width`` uniformly.
    The model gets ``arch_name`` and ``arch_kwargs`` attributes; ``build_model(**model_spec(m))``
    rebuilds the same architecture.
    """
    if arch not in MODELS:
        raise ValueError(f"unknown arch {arch!r}: expected one of {sorted(MODELS)}")
    if len(mean) != in_channels or len(std) != in_channels:
        raise ValueError(f"mean={tuple(mean)} and std={tuple(std)} must have in_channels={in_channels} values each")
    builder = MODELS[arch]
    kwargs = {k: v for k, v in arch_kwargs.items() if v is not None}
    valid = _arch_kwarg_names(builder)
    unknown = sorted(set(kwargs) - set(valid))
    if unknown:
        raise ValueError(f"unknown argument(s) {unknown} for arch {arch!r}: valid ones are {valid}")
    net = builder(in_channels=in_channels, num_classes=num_classes, **kwargs)
    model = nn.Sequential(OrderedDict(normalize=Normalize(mean, std), net=net))
    model.arch_name = arch  # type: ignore[assignment]
    model.arch_kwargs = dict(kwargs)  # type: ignore[assignment]
    model.num_classes = int(num_classes)  # type: ignore[assignment]
    model.in_channels = int(in_channels)  # type: ignore[assignment]
    return model


def model_spec(model: nn.Module) -> dict[str, Any]:
    """Plain (YAML/JSON-able) description of a :func:`build_model` model: ``build_model(**spec)`` rebuilds it."""
    m = unwrap(model)
    if not hasattr(m, "arch_name"):
        raise ValueError(f"{type(m).__name__} was not made by afm_ray.models.build_model: it has no arch_name")
    norm = m.normalize
    return {
        "arch": m.arch_name,
        "num_classes": m.num_classes,
        "in_channels": m.in_channels,
        "mean": norm.mean.flatten().tolist(),
        "std": norm.std.flatten().tolist(),
        **m.arch_kwargs,
    }


@contextlib.contextmanager
def eval_mode(models: Sequence[nn.Module]) -> Iterator[None]:
    """Put `models` in eval mode for the block; restore every submodule's exact flag after.

    `Module.train(flag)` recurses, so a model in train mode with a frozen-BN submodule in eval
    would come back with that submodule in train mode; setting `.training` per submodule
    restores exactly what was there, also when the block raises.
    """
    saved = [(m, m.training) for model in models for m in model.modules()]
    try:
        for model in models:
            model.eval()
        yield
    finally:
        for m, flag in saved:
            m.training = flag


def unwrap(model: nn.Module, *, keep_compiled: bool = False) -> nn.Module:
    """The module inside DDP/DataParallel (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers.

    keep_compiled: stop at a compiled module (an attack wants the compiled forward), unless the
    compiled thing is itself a DDP wrapper, which must always be bypassed.
    """
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
            continue
        inner = getattr(model, "_orig_mod", None)
        if isinstance(inner, nn.Module) and (
            not keep_compiled or isinstance(inner, (nn.parallel.DistributedDataParallel, nn.DataParallel))
        ):
            model = inner
            continue
        return model


def model_kwargs(section: Any, data: Any) -> dict[str, Any]:
    """build_model's keyword arguments for a config section with arch/width/depth (``cfg.student``,
    ``cfg.teacher``) on a dataset (an ImageDataset or anything with num_classes, image_shape,
    mean and std): classes, channels and normalisation come from the data."""
    kwargs: dict[str, Any] = dict(
        num_classes=data.num_classes, in_channels=data.image_shape[0], mean=data.mean, std=data.std
    )
    if section.width:
        kwargs["width"] = section.width
    if section.depth:
        kwargs["depth"] = section.depth
    return kwargs


def count_parameters(model: nn.Module) -> int:
    """Number of parameters (trainable or not) of the unwrapped model."""
    return sum(p.numel() for p in unwrap(model).parameters())


def _synchronize(device: torch.device) -> None:
    if device.type == "cpu":
        return
    backend = getattr(torch, device.type, None)
    sync = getattr(backend, "synchronize", None)
    if sync is None:
        return
    try:
        sync(device)
    except TypeError:  # torch.mps.synchronize() takes no device
        sync()


def _model_device(model: nn.Module) -> torch.device:
    for t in list(model.parameters()) + list(model.buffers()):
        return t.device
    return torch.device("cpu")


def measure_latency_ms(
    model: nn.Module,
    input_shape: Sequence[int],
    *,
    batch_size: int = 1,
    device: torch.device | str | None = None,
    repeats: int = 20,
    warmup: int = 3,
) -> float:
    """Median wall time in ms of one forward pass on a ``(batch_size, *input_shape)`` batch.

    Eval mode and ``torch.no_grad``; every submodule's train/eval flag is restored afterwards.
    ``device`` defaults to the model's; the model is not moved (a mismatch is an error).
    DDP/DataParallel wrappers are timed without the wrapper (a ``torch.compile`` one is kept).
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats={repeats} must be >= 1 and warmup={warmup} >= 0")
    # DDP's forward broadcasts buffers (a collective that would hang if only one rank times it)
    model = unwrap(model, keep_compiled=True)
    model_device = _model_device(model)
    dev = model_device if device is None else torch.device(device)
    if dev.type != model_device.type or (dev.index is not None and dev.index != model_device.index):
        raise ValueError(f"device={dev} but the model is on {model_device}: move the model first")
    x = torch.rand((batch_size, *input_shape), device=model_device)
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    times = []
    try:
        with torch.no_grad():
            for _ in range(warmup):
                model(x)
            _synchronize(model_device)
            for _ in range(repeats):
                start = time.perf_counter()
                model(x)
                _synchronize(model_device)  # asynchronous backends: time the work, not the launch
                times.append((time.perf_counter() - start) * 1000.0)
    finally:
        for m, training in modes:
            m.training = training
    return float(statistics.median(times))
