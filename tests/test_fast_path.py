"""Fidelity guard: the fast path (bf16 autocast, channels_last) keeps each method's math.

Tolerances come from the precision involved, not from one machine's run: the CPUs this is
tested on (AMD EPYC with AVX512-BF16, Intel Xeon with AMX) pick different oneDNN kernels,
which round differently. So each check compares a quantity that is well-conditioned at its
precision:

- bf16 (8-bit mantissa, unit roundoff u = 2^-9): the outer loss at a fixed input x' = x, where
  it is a smooth function of the logits; the attack's *strength*, averaged over random starts
  and compared with a margin set by how much the fp32 attack itself varies between starts.
  Not the adversarial points themselves: a sign step flips wherever a gradient component is
  near zero, so two roundings land on different (equally strong) points.
- channels_last: the whole method, attack included, in float64, where the layout may change
  nothing but the order of float64 additions (u = 2^-53); and in float32 the logits of
  both models, which a conv stack computes to a few hundred ulps.
"""

import copy
import os
import statistics
import subprocess
import sys

import pytest
import torch

from afm_ray.attacks import pgd
from afm_ray.methods import METHODS, AttackSpec, build_method
from afm_ray.models import build_model, eval_mode

BF16_U = 2.0**-9  # unit roundoff of bf16
FP32_U = 2.0**-24
FP64_U = 2.0**-53
# A forward pass rounds at every layer and every reduction: we allow 2^4 = 16 roundoffs of
# relative error per value (small_cnn has 3 layers, with reductions of at most a few hundred
# terms, whose error grows like sqrt(length) for round-to-nearest).
LAYERS_OF_ROUNDING = 16
# ARD's tau = 30 flattens both softmaxes: its KL is then about half the squared difference of
# teacher and student logits over tau^2, so its relative error is that of the logit
# *difference*, which is a few times the logits' own (teacher and student logits are alike).
HOT_SOFTMAX_AMPLIFICATION = 2**2
# How far below the fp32 attack the bf16 attack may land, in units of the fp32 attack's own
# spread across random starts: changing the start moves the objective by one such unit, so a
# shortfall of a few is indistinguishable from a different start.
ATTACK_NOISE_UNITS = 3.0
ATTACK_SEEDS = 8


def _models(logit_scale: float = 1.0):
    """A student and a frozen teacher. logit_scale > 1 makes their outputs confident, like a
    trained model's: at initialisation the softmax is near uniform and KL objectives are
    ~1e-4, below what bf16 can resolve, so an attack comparison would measure rounding."""
    torch.manual_seed(0)
    kwargs = dict(num_classes=10, in_channels=1, mean=(0.5,), std=(0.25,))
    teacher = build_model("small_cnn", width=16, **kwargs)
    student = build_model("small_cnn", width=8, **kwargs)
    for model in (teacher, student):
        head = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
        with torch.no_grad():
            head.weight.mul_(logit_scale)
            head.bias.mul_(logit_scale)
    return student, teacher.eval().requires_grad_(False)


def _batch(n: int = 16, dtype: torch.dtype = torch.float32):
    x = torch.rand(n, 1, 14, 14, generator=torch.Generator().manual_seed(1)).to(dtype)
    y = torch.nn.functional.one_hot(torch.arange(n) % 10, 10).to(dtype)
    return x, y


def _args(method, teacher, y):
    return (teacher if method.needs_teacher else None), (y if method.uses_labels else None)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_bf16_outer_loss_matches_fp32(name):
    """The outer loss at x' = x (no attack, so both precisions see the same input)."""
    student, teacher = _models()
    method = build_method(name)
    x, y = _batch()
    t, labels = _args(method, teacher, y)
    spec = AttackSpec(eps=0.1, step_size=0.025, steps=0, random_start="none")
    losses = {}
    for precision in ("fp32", "bf16"):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            losses[precision] = method(student, t, x, labels, spec)["loss"].float()
    assert torch.isfinite(losses["bf16"])
    amplification = HOT_SOFTMAX_AMPLIFICATION if getattr(method, "tau", 1.0) > 10 else 1
    # bf16 logits carry LAYERS_OF_ROUNDING * u relative error; the loss (fp32 softmax/KL on
    # those logits) inherits it, amplified where the loss cancels.
    rtol = LAYERS_OF_ROUNDING * BF16_U * amplification
    assert losses["bf16"].item() == pytest.approx(losses["fp32"].item(), rel=rtol)


@pytest.mark.parametrize("name", sorted(n for n, cls in METHODS.items() if cls.uses_attack))
def test_bf16_attack_is_as_strong_as_fp32(name):
    """Averaged over random starts, the bf16 attack raises the method's inner objective (scored
    in fp32) as far as the fp32 attack does, within the fp32 attack's start-to-start spread."""
    student, teacher = _models(logit_scale=8.0)
    method = build_method(name)
    x, y = _batch(32)
    t, labels = _args(method, teacher, y)
    objective = method.inner_objective(student, t, x, labels)
    reached = {"fp32": [], "bf16": []}
    for seed in range(ATTACK_SEEDS):
        for precision in reached:
            torch.manual_seed(100 + seed)  # the same random start for both precisions
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                x_adv = pgd(
                    method.inner_objective(student, t, x, labels),
                    x,
                    eps=0.1,
                    step_size=0.025,
                    steps=5,
                    random_start="uniform",
                    models=(student,),
                )
            assert (x_adv - x).abs().max() <= 0.1 + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
            with torch.no_grad(), eval_mode((student,)):
                reached[precision].append(objective(x_adv).item())
    with torch.no_grad(), eval_mode((student,)):
        start = objective(x).item()
    fp32, bf16 = statistics.mean(reached["fp32"]), statistics.mean(reached["bf16"])
    spread = statistics.stdev(reached["fp32"])
    assert fp32 > start  # the attack does something to compare
    assert bf16 >= fp32 - ATTACK_NOISE_UNITS * spread, f"{name}: start {start}, {reached}"


def _two_layouts(name, dtype, **spec):
    student, teacher = (m.to(dtype) for m in _models())
    method = build_method(name)
    x, y = _batch(dtype=dtype)
    out = {}
    for layout in ("contiguous", "channels_last"):
        s, t, xb = copy.deepcopy(student), copy.deepcopy(teacher), x
        if layout == "channels_last":
            s, t = s.to(memory_format=torch.channels_last), t.to(memory_format=torch.channels_last)
            xb = x.contiguous(memory_format=torch.channels_last)
        torch.manual_seed(2)  # the same random start
        t_arg, labels = _args(method, t, y)
        loss = method(s, t_arg, xb, labels, AttackSpec(**spec))["loss"]
        with torch.no_grad():
            out[layout] = (loss, s.eval()(xb), t(xb))
    return out


@pytest.mark.parametrize("name", sorted(METHODS))
def test_channels_last_changes_nothing_but_rounding(name):
    """The whole method, attack included, in float64: channels_last may only reorder additions,
    so the loss agrees to float64 precision, amplified at most 2^20 by the loss's conditioning
    (the attack's sign steps do not flip at this precision)."""
    out = _two_layouts(name, torch.float64, eps=0.1, step_size=0.025, steps=3)
    loss_c, loss_cl = out["contiguous"][0].item(), out["channels_last"][0].item()
    assert loss_cl == pytest.approx(loss_c, rel=FP64_U * 2**20)


@pytest.mark.parametrize("name", ["advfunmatch", "pgd_at"])
def test_channels_last_float32_logits_agree(name):
    """In float32, the channels_last kernels compute both models' logits to within the rounding
    of a few layers of reductions."""
    out = _two_layouts(name, torch.float32, eps=0.1, step_size=0.025, steps=0, random_start="none")
    for which in (1, 2):  # student, teacher logits on the same input
        a, b = out["contiguous"][which], out["channels_last"][which]
        scale = a.abs().max()
        assert (a - b).abs().max() <= LAYERS_OF_ROUNDING * 2**4 * FP32_U * scale


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("policy", ["crop_flip", "autoaugment+cutmix"])
def test_training_step_never_waits_for_the_gpu(policy):
    """No host-device synchronisation inside a step: CUDA's sync debug mode raises on any."""
    from afm_ray.augment import BatchAugment
    from afm_ray.train.loop import TrainStep

    student, teacher = (m.cuda() for m in _models())
    step = TrainStep(
        method=build_method("advfunmatch"),
        model=student,
        teacher=teacher,
        augment=BatchAugment(policy, image_shape=(1, 14, 14), num_classes=10),
        attack=AttackSpec(eps=0.1, step_size=0.025, steps=3),
        optimizer=torch.optim.SGD(student.parameters(), lr=0.1),
        num_classes=10,
        amp_dtype=torch.bfloat16,
    )
    x, y = torch.rand(32, 1, 14, 14, device="cuda"), torch.arange(32, device="cuda") % 10
    step(x, y)  # warm-up: lazy initialisation may synchronise once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step(x, y)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_amp_auto_is_bf16_exactly_where_measured_fast():
    from afm_ray.devices import amp_dtype_for, cpu_has_native_bf16

    assert amp_dtype_for("off", torch.device("cpu")) is None
    assert amp_dtype_for("bf16", torch.device("cpu")) is torch.bfloat16
    assert amp_dtype_for("auto", torch.device("cuda")) is torch.bfloat16
    assert amp_dtype_for("auto", torch.device("cpu")) is (torch.bfloat16 if cpu_has_native_bf16() else None)
    with open("/proc/cpuinfo") as f:
        native = any(flag in f.read().split() for flag in ("avx512_bf16", "amx_bf16"))
    capped = "AVX512" not in torch.backends.cpu.get_cpu_capability() or os.environ.get(
        "ONEDNN_MAX_CPU_ISA", ""
    ).upper() in ("AVX2", "AVX512_CORE")
    assert cpu_has_native_bf16() is (native and not capped)


def test_kernels_capped_below_bf16_mean_no_native_bf16():
    """ATEN_CPU_CAPABILITY=avx2 / ONEDNN_MAX_CPU_ISA=AVX2 make torch emulate bf16, whatever the CPU."""
    code = "from afm_ray.devices import cpu_has_native_bf16; print(cpu_has_native_bf16())"
    for env in ({"ATEN_CPU_CAPABILITY": "avx2"}, {"ONEDNN_MAX_CPU_ISA": "AVX2"}):
        out = subprocess.run([sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True)
        assert out.stdout.strip() == "False", (env, out.stderr[-500:])
