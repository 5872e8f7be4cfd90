"""Augmentation policies on whole batches, per sample, on the batch's device (kornia).

Consistent teaching (Beyer et al. 2022, "a good teacher is patient and consistent", sec. 3)
needs teacher and student to see the SAME strongly augmented view: the caller augments once
and passes that one batch to both. Policies combine with "+" ("autoaugment+cutmix"); the
mixing ops (MixUp, Zhang et al. 2018; CutMix, Yun et al. 2019) always run last.

kornia's AutoAugment / RandAugment / TrivialAugment draw ONE sub-policy (or op set) per call
and apply it to the whole batch; only magnitudes vary per row. `BatchAugment` instead draws the
sub-policy per sample, as the papers do, by grouping the batch by its draw (one kornia call per
sub-policy present in the batch).
"""

from __future__ import annotations

import kornia.augmentation as K
import torch
import torch.nn.functional as F
from kornia.augmentation.auto import AutoAugment, RandAugment, TrivialAugment
from kornia.augmentation.auto.autoaugment.autoaugment import cifar10_policy
from kornia.augmentation.auto.rand_augment.rand_augment import default_policy as randaugment_ops
from kornia.augmentation.auto.trivial_augment.trivial_augment import default_policy as trivialaugment_ops
from torch import Tensor, nn

from afm_ray.names import MIXING_POLICIES, parse_policy

# RandAugment N ops per sample at magnitude M on kornia's (0, 30) scale: torchvision's defaults
# (num_ops=2, magnitude=9 of 31 bins). A guess for this project, not tuned.
RANDAUGMENT_N = 2
RANDAUGMENT_M = 9
# kornia ops that raise on 1-channel input (checked on kornia 0.9: only saturation, "color").
# On a grey image repeated to RGB they are the identity, but they still run so every
# sub-policy keeps its other ops.
_RGB_ONLY_OPS = frozenset({"color"})


class _PerSampleChoice(nn.Module):
    """Applies `rounds` distinct modules out of `choices` to each sample, drawn uniformly per sample.

    The batch is grouped by draw so each module runs once on its group; the draw lives on the
    CPU so grouping needs no device sync.
    """

    def __init__(self, choices: list[nn.Module], needs_rgb: list[bool], rounds: int = 1) -> None:
        super().__init__()
        if not 1 <= rounds <= len(choices):
            raise ValueError(f"rounds={rounds} must be in [1, {len(choices)}]")
        self.choices = nn.ModuleList(choices)
        self.needs_rgb = needs_rgb
        self.rounds = rounds

    def forward(self, x: Tensor) -> Tensor:
        # Distinct ops per sample (RandAugment samples without replacement): a random permutation per row.
        picks = torch.rand(x.shape[0], len(self.choices)).argsort(dim=1)[:, : self.rounds]
        for r in range(self.rounds):
            x = self._apply_grouped(x, picks[:, r])
        return x

    def _apply_grouped(self, x: Tensor, choice: Tensor) -> Tensor:
        order = torch.argsort(choice, stable=True)
        counts = torch.bincount(choice, minlength=len(self.choices)).tolist()
        order_dev = order.to(x.device, non_blocking=True)
        groups = x.index_select(0, order_dev).split(counts)
        out = torch.cat([self._apply_one(k, g) if g.shape[0] else g for k, g in enumerate(groups)])
        result = torch.empty_like(x)
        result[order_dev] = out
        return result

    def _apply_one(self, k: int, x: Tensor) -> Tensor:
        if x.shape[1] == 1 and self.needs_rgb[k]:
            return self.choices[k](x.expand(-1, 3, -1, -1)).mean(dim=1, keepdim=True)
        return self.choices[k](x)


def _autoaugment() -> _PerSampleChoice:
    # AutoAugment's CIFAR-10 policy (Cubuk et al. 2019, appendix): one of 25 sub-policies per sample.
    subs = [AutoAugment(policy=[sub]) for sub in cifar10_policy]
    return _PerSampleChoice(subs, [any(op in _RGB_ONLY_OPS for op, _, _ in sub) for sub in cifar10_policy])


def _randaugment() -> _PerSampleChoice:
    ops = [RandAugment(n=1, m=RANDAUGMENT_M, policy=[op]) for op in randaugment_ops]
    return _PerSampleChoice(ops, [op[0][0] in _RGB_ONLY_OPS for op in randaugment_ops], rounds=RANDAUGMENT_N)


def _trivialaugment() -> _PerSampleChoice:
    ops = [TrivialAugment(policy=[op]) for op in trivialaugment_ops]
    return _PerSampleChoice(ops, [op[0][0] in _RGB_ONLY_OPS for op in trivialaugment_ops])


def _crop_flip(image_shape: tuple[int, int, int]) -> nn.Module:
    c, h, w = image_shape
    if c == 1:
        # Digits: no flip (a flipped 2, 3, 7 is not a digit of its class). 2 px at 28x28, scaled
        # with the image side so 8x8 digits get 1 px, not a quarter of the image.
        return K.RandomCrop((h, w), padding=max(1, round(2 * h / 28)), p=1.0)
    # The standard CIFAR recipe: 4 px padding at 32x32 (scaled with the side), random crop, hflip.
    return nn.Sequential(K.RandomCrop((h, w), padding=max(1, round(4 * h / 32)), p=1.0), K.RandomHorizontalFlip(p=0.5))


_IMAGE_POLICIES = {"autoaugment": _autoaugment, "randaugment": _randaugment, "trivialaugment": _trivialaugment}


class BatchAugment(nn.Module):
    """A policy from afm_ray.names.AUGMENT_POLICIES, or a '+' combination, applied per sample to whole batches.

    forward(x, y): x float (B, C, H, W) in [0,1] on any device; y int64 class indices (B,), soft
    labels (B, num_classes), or None. Returns x_aug in [0,1] (same shape, dtype, device) and soft
    labels (B, num_classes) in x's float dtype: one-hot unless mixup/cutmix mixed them (rows
    sum to 1), or None when y is None. Randomness comes from torch's global RNG, so
    torch.manual_seed makes it reproducible. No gradient flows through the augmentation.
    """

    def __init__(self, policy: str, *, image_shape: tuple[int, int, int], num_classes: int) -> None:
        super().__init__()
        if len(image_shape) != 3 or image_shape[0] not in (1, 3):
            raise ValueError(f"image_shape={tuple(image_shape)}; expected (C, H, W) with C 1 (grey) or 3 (RGB)")
        if num_classes < 1:
            raise ValueError(f"num_classes={num_classes} must be >= 1")
        self.policy = policy
        self.parts = parse_policy(policy)
        self.image_shape = tuple(image_shape)
        self.num_classes = num_classes
        image_ops = []
        for part in self.parts:
            if part == "crop_flip":
                image_ops.append(_crop_flip(self.image_shape))
            elif part in _IMAGE_POLICIES:
                image_ops.append(_IMAGE_POLICIES[part]())
        self.image_ops = nn.ModuleList(image_ops)
        self.mixing = nn.ModuleList(
            # use_correct_lambda: lambda = 1 - pasted area, the CutMix paper's weight of the original.
            K.RandomMixUpV2(p=1.0, data_keys=["input", "class"])
            if part == "mixup"
            else K.RandomCutMixV2(p=1.0, data_keys=["input", "class"], use_correct_lambda=True)
            for part in self.parts
            if part in MIXING_POLICIES
        )
        self._mix_kinds = [part for part in self.parts if part in MIXING_POLICIES]
        # kornia's auto-augment wrappers hold nn.Parameters (for learnable policies); this is a
        # fixed policy, and a graph back into them would only cost memory.
        self.requires_grad_(False)

    def extra_repr(self) -> str:
        return f"policy={self.policy!r}, image_shape={self.image_shape}, num_classes={self.num_classes}"

    @torch.no_grad()
    def forward(self, x: Tensor, y: Tensor | None) -> tuple[Tensor, Tensor | None]:
        if x.dim() != 4 or tuple(x.shape[1:]) != self.image_shape or not x.is_floating_point():
            raise ValueError(
                f"x has shape {tuple(x.shape)} and dtype {x.dtype}; "
                f"expected float (B, {', '.join(map(str, self.image_shape))})"
            )
        y_soft = None if y is None else self._soft_labels(y, x)
        for op in self.image_ops:
            x = op(x)
        for kind, mix in zip(self._mix_kinds, self.mixing, strict=True):
            x, y_soft = self._mix(kind, mix, x, y_soft)
        # Interpolating geometric ops and sharpness can overshoot by rounding; keep the contract.
        return x.clamp(0.0, 1.0), y_soft  # out of place: with no ops x is still the caller's tensor

    def _soft_labels(self, y: Tensor, x: Tensor) -> Tensor:
        if y.dim() == 1 and not y.is_floating_point():
            return F.one_hot(y.to(x.device), self.num_classes).to(x.dtype)
        if y.dim() == 2 and y.shape[1] == self.num_classes and y.is_floating_point():
            return y.to(device=x.device, dtype=x.dtype)
        raise ValueError(
            f"y has shape {tuple(y.shape)} and dtype {y.dtype}; expected int64 (B,) class indices "
            f"or float (B, {self.num_classes}) soft labels"
        )

    @staticmethod
    def _mix(kind: str, mix: nn.Module, x: Tensor, y_soft: Tensor | None) -> tuple[Tensor, Tensor | None]:
        # kornia returns (own label, partner label, lambda) per row. Passing the row index as
        # the "label" gives the partner's row, so any label (also already mixed soft labels
        # from an earlier mixing op) is mixed exactly like the pixels were.
        rows = torch.arange(x.shape[0], device=x.device)
        x, info = mix(x, rows)
        info = info[0] if kind == "cutmix" else info  # cutmix: (num_mix=1, B, 3)
        if y_soft is None:
            return x, None
        partner = info[:, 1].round().long()
        lam = info[:, 2:3].to(y_soft.dtype)
        if kind == "mixup":  # image = (1 - lam) x + lam x[partner]
            return x, (1 - lam) * y_soft + lam * y_soft[partner]
        # cutmix with use_correct_lambda: lam = 1 - pasted area = the share of the original.
        return x, lam * y_soft + (1 - lam) * y_soft[partner]
