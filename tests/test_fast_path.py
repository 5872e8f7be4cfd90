"""Fidelity guard: the fast path (bf16 autocast) keeps each method's math.

On fixed inputs, every method's loss under bf16 autocast matches the fp32 reference within
a stated tolerance, and the attack lands on (nearly) the same adversarial points. The
evaluation attacks always run in fp32 (train.py wraps only the method call in autocast).
"""

import pytest
import torch

from afm_ray.methods import METHODS, AttackSpec, build_method
from afm_ray.models import build_model

LOSS_RTOL = 0.05  # bf16 keeps 8 bits of mantissa: ~0.4% per op, a few % through a network
LOSS_RTOL_HOT = 0.1  # ARD's tau = 30 flattens both softmaxes: KL is tiny and rounding-sensitive
ATTACK_STRENGTH = 0.9  # the bf16 attack reaches >= 90% of the fp32 attack's objective (scored in fp32)


def _models():
    torch.manual_seed(0)
    kwargs = dict(num_classes=10, in_channels=1, mean=(0.5,), std=(0.25,))
    teacher = build_model("small_cnn", width=16, **kwargs).eval().requires_grad_(False)
    student = build_model("small_cnn", width=8, **kwargs)
    return student, teacher


@pytest.mark.parametrize("name", sorted(METHODS))
def test_bf16_loss_and_attack_match_fp32(name):
    student, teacher = _models()
    method = build_method(name)
    x = torch.rand(16, 1, 14, 14, generator=torch.Generator().manual_seed(1))
    y = torch.nn.functional.one_hot(torch.arange(16) % 10, 10).float()
    spec = AttackSpec(eps=0.1, step_size=0.025, steps=3, random_start="none")
    results = {}
    for precision in ("fp32", "bf16"):
        torch.manual_seed(2)
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else torch.autocast("cpu", enabled=False)
        with ctx:
            parts = method(student, teacher if method.needs_teacher else None, x, y if method.uses_labels else None, spec)
        results[precision] = parts
    ref, fast = results["fp32"]["loss"].float(), results["bf16"]["loss"].float()
    assert fast.dtype == torch.float32 or fast.dtype == torch.bfloat16
    assert torch.isfinite(fast)
    rtol = LOSS_RTOL_HOT if getattr(method, "tau", 1.0) > 10 else LOSS_RTOL
    assert fast.item() == pytest.approx(ref.item(), rel=rtol, abs=1e-3)

    if method.uses_attack:
        from afm_ray.attacks import pgd

        def objective():
            return method.inner_objective(student, teacher if method.needs_teacher else None, x,
                                          y if method.uses_labels else None)

        adversarial = {}
        for precision in ("fp32", "bf16"):
            torch.manual_seed(3)  # the same small normal start for both
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                adversarial[precision] = pgd(objective(), x, eps=0.1, step_size=0.025, steps=3,
                                             random_start="normal", models=(student,))
        from afm_ray.attacks import model_modes_for_attack

        score = objective()  # fp32 scoring of both adversarial batches, in the attack's eval mode
        with torch.no_grad(), model_modes_for_attack((student,)):
            strength = {p: score(x_adv).item() for p, x_adv in adversarial.items()}
            start = score(x).item()
        assert strength["fp32"] > start
        assert strength["bf16"] >= ATTACK_STRENGTH * strength["fp32"], f"{name}: {strength}"
        x16 = adversarial["bf16"]
        assert (x16 - x).abs().max() <= 0.1 + 1e-6 and x16.min() >= 0 and x16.max() <= 1


@pytest.mark.parametrize("name", sorted(METHODS))
def test_channels_last_matches_contiguous(name):
    """channels_last changes only the memory layout (and so the convolution kernels): the loss
    agrees with the contiguous fp32 run to float rounding."""
    import copy

    student, teacher = _models()
    method = build_method(name)
    x = torch.rand(16, 1, 14, 14, generator=torch.Generator().manual_seed(1))
    y = torch.nn.functional.one_hot(torch.arange(16) % 10, 10).float()
    spec = AttackSpec(eps=0.1, step_size=0.025, steps=3)
    losses = {}
    for layout in ("contiguous", "channels_last"):
        s, t, xb = copy.deepcopy(student), copy.deepcopy(teacher), x
        if layout == "channels_last":
            s, t = s.to(memory_format=torch.channels_last), t.to(memory_format=torch.channels_last)
            xb = x.contiguous(memory_format=torch.channels_last)
        torch.manual_seed(2)  # the same random start
        losses[layout] = method(s, t if method.needs_teacher else None, xb, y if method.uses_labels else None, spec)["loss"]
    assert losses["channels_last"].item() == pytest.approx(losses["contiguous"].item(), rel=1e-4, abs=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("policy", ["crop_flip", "autoaugment+cutmix"])
def test_training_step_never_waits_for_the_gpu(policy):
    """No host-device synchronisation inside a step: CUDA's sync debug mode raises on any."""
    from afm_ray.augment import BatchAugment
    from afm_ray.train import TrainStep

    student, teacher = (m.cuda() for m in _models())
    step = TrainStep(method=build_method("advfunmatch"), model=student, teacher=teacher,
                     augment=BatchAugment(policy, image_shape=(1, 14, 14), num_classes=10),
                     attack=AttackSpec(eps=0.1, step_size=0.025, steps=3),
                     optimizer=torch.optim.SGD(student.parameters(), lr=0.1), num_classes=10,
                     amp_dtype=torch.bfloat16)
    x, y = torch.rand(32, 1, 14, 14, device="cuda"), torch.arange(32, device="cuda") % 10
    step(x, y)  # warm-up: lazy initialisation may synchronise once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step(x, y)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_amp_auto_is_bf16_exactly_where_measured_fast():
    from afm_ray.train import amp_dtype_for, cpu_has_native_bf16

    assert amp_dtype_for("off", torch.device("cpu")) is None
    assert amp_dtype_for("bf16", torch.device("cpu")) is torch.bfloat16
    assert amp_dtype_for("auto", torch.device("cuda")) is torch.bfloat16
    assert amp_dtype_for("auto", torch.device("cpu")) is (torch.bfloat16 if cpu_has_native_bf16() else None)
    with open("/proc/cpuinfo") as f:
        native = any(flag in f.read().split() for flag in ("avx512_bf16", "amx_bf16"))
    assert cpu_has_native_bf16() is native
