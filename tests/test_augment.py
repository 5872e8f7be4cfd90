"""Behaviour of the batch augmentation policies (CPU, seconds)."""

from __future__ import annotations

import warnings

import kornia
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from afm_ray.augment import BatchAugment, _PerSampleChoice
from afm_ray.names import AUGMENT_POLICIES as POLICIES
from afm_ray.names import MIXING_POLICIES as MIXING
from afm_ray.names import parse_policy

NUM_CLASSES = 10
SHAPES = [(1, 28, 28), (3, 32, 32)]
COMBOS = ["crop_flip+autoaugment+cutmix", "randaugment+mixup", "mixup+cutmix", "crop_flip+trivialaugment"]
ALL = [*POLICIES, *COMBOS]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def images(shape, batch=32, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand((batch, *shape), generator=g)
    y = torch.randint(0, NUM_CLASSES, (batch,), generator=g)
    return x.to(device), y.to(device)


def mixes(policy: str) -> bool:
    return any(p in MIXING for p in parse_policy(policy))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("policy", ALL)
def test_policy_contract(policy, shape, device):
    aug = BatchAugment(policy, image_shape=shape, num_classes=NUM_CLASSES)
    x, y = images(shape, device=device)
    x_in = x.clone()
    x_aug, y_soft = aug(x, y)
    assert torch.equal(x, x_in)  # the caller's batch is not modified in place
    assert x_aug.shape == x.shape and x_aug.dtype == x.dtype and x_aug.device == x.device
    assert x_aug.min() >= 0.0 and x_aug.max() <= 1.0
    assert not x_aug.requires_grad
    assert y_soft.shape == (len(x), NUM_CLASSES) and y_soft.dtype == x.dtype and y_soft.device == x.device
    assert torch.allclose(y_soft.sum(1), torch.ones(len(x), device=device), atol=1e-6)
    assert (y_soft >= 0).all()
    if mixes(policy):
        assert not torch.equal(y_soft, F.one_hot(y, NUM_CLASSES).float())
        if len([p for p in parse_policy(policy) if p in MIXING]) == 1:  # one mix: two sources per row
            assert ((y_soft > 0).sum(1) <= 2).all()
    else:
        assert torch.equal(y_soft, F.one_hot(y, NUM_CLASSES).float())
    if policy != "none":
        assert not torch.equal(x_aug, x)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("policy", ALL)
def test_policy_without_labels(policy, shape):
    aug = BatchAugment(policy, image_shape=shape, num_classes=NUM_CLASSES)
    x, _ = images(shape)
    x_aug, y_soft = aug(x, None)
    assert y_soft is None and x_aug.shape == x.shape
    assert x_aug.min() >= 0.0 and x_aug.max() <= 1.0


@pytest.mark.parametrize("policy", ALL)
def test_deterministic_under_manual_seed(policy):
    aug = BatchAugment(policy, image_shape=(3, 32, 32), num_classes=NUM_CLASSES)
    x, y = images((3, 32, 32))
    torch.manual_seed(5)
    a = aug(x, y)
    torch.manual_seed(5)
    b = aug(x, y)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    if policy != "none":
        torch.manual_seed(6)
        c = aug(x, y)
        assert not torch.equal(a[0], c[0])


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("policy", [p for p in POLICIES if p not in ("none", *MIXING)])
def test_image_policies_transform_each_sample_differently(policy, shape):
    aug = BatchAugment(policy, image_shape=shape, num_classes=NUM_CLASSES)
    x = images(shape, batch=1)[0].expand(64, *shape).contiguous()  # 64 copies of one image
    torch.manual_seed(0)
    x_aug, _ = aug(x, None)
    distinct = torch.unique(x_aug.flatten(1), dim=0).shape[0]
    assert distinct >= 16, f"{policy}: only {distinct} distinct outputs from 64 copies"


@pytest.mark.parametrize("policy", MIXING)
def test_mixing_is_per_sample(policy):
    aug = BatchAugment(policy, image_shape=(3, 32, 32), num_classes=NUM_CLASSES)
    x, y = images((3, 32, 32), batch=64)
    torch.manual_seed(0)
    _, y_soft = aug(x, y)
    own = y_soft.gather(1, y[:, None]).squeeze(1)
    assert torch.unique(own).numel() > 16  # a lambda per sample, not one per batch


def test_trivialaugment_draws_the_op_per_sample():
    # kornia's TrivialAugment picks ONE op per call; ours picks per sample. Two of its ops are
    # deterministic (auto_contrast, equalize): with per-sample draws, a batch of copies of one
    # image holds both results (and others), not one op everywhere.
    x = images((3, 32, 32), batch=1)[0] * 0.5 + 0.2  # not already full-range
    batch = x.expand(128, 3, 32, 32).contiguous()
    torch.manual_seed(0)
    out, _ = BatchAugment("trivialaugment", image_shape=(3, 32, 32), num_classes=NUM_CLASSES)(batch, None)
    auto_contrast = kornia.enhance.normalize_min_max(x)
    equalized = kornia.enhance.equalize(x)
    is_ac = torch.isclose(out, auto_contrast, atol=1e-5).flatten(1).all(1)
    is_eq = torch.isclose(out, equalized, atol=1e-5).flatten(1).all(1)
    assert 0 < is_ac.sum() < 40 and 0 < is_eq.sum() < 40
    assert (~is_ac & ~is_eq).sum() > 64


@pytest.mark.parametrize("rounds", [1, 2])
def test_per_sample_choice_applies_rounds_distinct_ops_to_each_sample(rounds):
    class AddPower(nn.Module):
        def __init__(self, k):
            super().__init__()
            self.k = k

        def forward(self, x):
            return x + 10.0**self.k

    choice = _PerSampleChoice([AddPower(k) for k in range(4)], [False] * 4, rounds=rounds)
    torch.manual_seed(0)
    out = choice(torch.zeros(200, 1, 2, 2))
    assert (out == out[:, :1, :1, :1]).all()  # one op per whole sample, never per pixel
    digits = torch.stack([(out[:, 0, 0, 0] // 10**k) % 10 for k in range(4)], 1)
    assert ((digits == 0) | (digits == 1)).all()  # no op twice on a sample
    assert (digits.sum(1) == rounds).all()
    assert torch.unique(digits, dim=0).shape[0] == (4 if rounds == 1 else 6)  # all choices occur


def test_grey_runs_rgb_only_ops_on_repeated_channels():
    aug = BatchAugment("autoaugment", image_shape=(1, 28, 28), num_classes=NUM_CLASSES)
    sub = aug.image_ops[0]
    rgb_only = [k for k, need in enumerate(sub.needs_rgb) if need]
    assert rgb_only  # the CIFAR-10 policy has 'color' sub-policies
    x, _ = images((1, 28, 28), batch=8)
    for k in rgb_only:
        out = sub._apply_one(k, x)
        assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1


def _is_translation(out: torch.Tensor, x: torch.Tensor, pad: int) -> bool:
    padded = F.pad(x, (pad,) * 4)
    h, w = x.shape[-2:]
    return any(
        torch.equal(out, padded[..., i : i + h, j : j + w]) for i in range(2 * pad + 1) for j in range(2 * pad + 1)
    )


def test_crop_flip_grey_never_flips_and_rgb_flips_some():
    torch.manual_seed(0)
    grey = images((1, 28, 28), batch=1)[0].expand(32, 1, 28, 28).contiguous()
    out, _ = BatchAugment("crop_flip", image_shape=(1, 28, 28), num_classes=NUM_CLASSES)(grey, None)
    assert all(_is_translation(o, grey[0], 2) for o in out)

    rgb = images((3, 32, 32), batch=1)[0].expand(32, 3, 32, 32).contiguous()
    out, _ = BatchAugment("crop_flip", image_shape=(3, 32, 32), num_classes=NUM_CLASSES)(rgb, None)
    shifted = [_is_translation(o, rgb[0], 4) for o in out]
    flipped = [_is_translation(o, rgb[0].flip(-1), 4) for o in out]
    assert all(s or f for s, f in zip(shifted, flipped, strict=True))
    assert 4 < sum(flipped) < 28 and 4 < sum(shifted) < 28


@pytest.mark.parametrize("policy", ["mixup", "cutmix", "mixup+cutmix"])
def test_mixed_labels_match_mixed_pixels(policy):
    # Sample i is the constant image v_i: a mixed pixel mean is sum_j y_soft[i, j] v_j exactly
    # when the label weights are the pixel weights.
    b = 16
    values = torch.arange(b, dtype=torch.float32) / b
    x = values.view(b, 1, 1, 1).expand(b, 1, 8, 8).contiguous()
    torch.manual_seed(0)
    x_aug, y_soft = BatchAugment(policy, image_shape=(1, 8, 8), num_classes=b)(x, torch.arange(b))
    assert torch.allclose(x_aug.mean((1, 2, 3)), y_soft @ values, atol=1e-5)
    if policy == "cutmix":  # pasted boxes: the own-label weight is the share of own pixels
        own = (x_aug.flatten(1) == values[:, None]).float().mean(1)
        assert torch.allclose(y_soft.diagonal(), own, atol=1e-6)


def test_soft_labels_in_are_mixed():
    x, y = images((3, 32, 32), batch=16)
    soft = F.softmax(torch.randn(16, NUM_CLASSES), 1)
    torch.manual_seed(0)
    _, out = BatchAugment("mixup", image_shape=(3, 32, 32), num_classes=NUM_CLASSES)(x, soft)
    assert torch.allclose(out.sum(1), torch.ones(16), atol=1e-6) and not torch.allclose(out, soft)
    _, same = BatchAugment("crop_flip", image_shape=(3, 32, 32), num_classes=NUM_CLASSES)(x, soft)
    assert torch.equal(same, soft)


def test_no_trainable_state_and_no_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        aug = BatchAugment("autoaugment+randaugment+cutmix", image_shape=(3, 32, 32), num_classes=NUM_CLASSES)
        aug(*images((3, 32, 32)))
    assert not any(p.requires_grad for p in aug.parameters())


def test_parse_policy():
    assert parse_policy("autoaugment+cutmix") == ("autoaugment", "cutmix")
    assert parse_policy("cutmix + crop_flip") == ("crop_flip", "cutmix")  # mixing goes last
    assert parse_policy("none") == ("none",)
    for p in POLICIES:
        assert parse_policy(p) == (p,)


@pytest.mark.parametrize(
    "policy, match",
    [
        ("autoaug", "valid: none, crop_flip, autoaugment"),
        ("mixup+mixup", "repeats"),
        ("none+cutmix", "alone"),
        ("", "unknown"),
    ],
)
def test_parse_policy_rejects(policy, match):
    with pytest.raises(ValueError, match=match):
        parse_policy(policy)
    with pytest.raises(ValueError, match=match):
        BatchAugment(policy, image_shape=(3, 32, 32), num_classes=NUM_CLASSES)


def test_bad_inputs_raise():
    aug = BatchAugment("crop_flip", image_shape=(3, 32, 32), num_classes=NUM_CLASSES)
    x, y = images((3, 32, 32))
    with pytest.raises(ValueError, match=r"expected float \(B, 3, 32, 32\)"):
        aug(x[:, :1], y)
    with pytest.raises(ValueError, match="expected float"):
        aug((x * 255).to(torch.uint8), y)
    with pytest.raises(ValueError, match="soft labels"):
        aug(x, y.float())
    with pytest.raises(ValueError, match="image_shape"):
        BatchAugment("none", image_shape=(2, 8, 8), num_classes=NUM_CLASSES)
