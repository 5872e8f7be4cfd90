"""The performance record: `python -m afm_ray.bench`.

For each method it times one training step as `train_fn_per_worker` runs it (device-resident
batches, `BatchAugment` on the device, the method's shared `pgd`, SGD) next to a plain
reference step written the way research code usually is (fp32; a `DataLoader` whose
dataset crops and flips each sample in `__getitem__`; the PGD loop written out inline with
`loss.backward()` and a `.item()` per attack step; teacher logits recomputed where the
official code recomputes them). Both run in the same process on the same machine,
interleaved iteration by iteration so background load hits both alike; the table reports
images/s of each, their ratio, peak memory, FLOPs per step (FlopCounterMode, counted once)
and the achieved fraction of the device's peak. `--eval` adds the evaluation attacks
(PGD-20, AutoAttack on a small subset).

The reference computes the same math as the method (same attack objective, steps, start,
student mode during the attack, outer loss) and differs only where research code differs:
host-side per-sample augmentation, parameter gradients in every attack step (`backward`;
`--ref-attack-grad input` gives the official TRADES/RSLAD/ARD/AdaAD `autograd.grad` style),
a host sync per attack step, and the extra forwards of the official code (see REFERENCE_NOTES).
Its teacher is frozen (requires_grad False), which is kinder to the reference than ARD's
official code, where the KL target is not detached and teacher gradients are computed.

The measured record for the CPU machine is docs/bench_cpu.md (`python -m afm_ray.bench --eval`,
2 cores, small_cnn shapes, training's defaults bf16 + channels_last, one run at low load): ours /
reference 1.81 (PGD-AT) to 3.62 (AdaAD), AdvFunMatch 2.96; the A/A control put the run's noise
at +-6%. docs/defaults_cpu.md holds the switch-by-switch runs behind those defaults. The header
of each record names its machine and shapes.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import datetime
import gc
import math
import os
import platform
import re
import resource
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.flop_counter import FlopCounterMode

from afm_ray.attacks import robust_predictions
from afm_ray.augment import BatchAugment
from afm_ray.config import RunConfig
from afm_ray.data import DeviceBatchLoader
from afm_ray.eval_batch import choose_eval_batch_size
from afm_ray.methods import METHODS, AttackSpec, build_method
from afm_ray.models import build_model
from afm_ray.train import TrainStep, amp_dtype_for

__all__ = [
    "AugmentRow",
    "BenchConfig",
    "BenchReport",
    "EvalRow",
    "MachineInfo",
    "StepRow",
    "bench_augment",
    "bench_eval",
    "bench_methods",
    "count_flops",
    "device_peak_flops",
    "machine_info",
    "main",
    "peak_memory",
    "Timings",
    "time_steps",
    "to_markdown",
]

# What each reference step runs beyond our step, from the official code (DESIGN.md's methods).
REFERENCE_NOTES: dict[str, str] = {
    "advfunmatch": "no official code reachable: written like AdaAD (T at x' in every attack step, "
                   "T(x') once more after)",
    "rslad": "official: T(x) once per batch before the attack; S(x') and S(x) after",
    "adaad": "official: S(x), S(x'), T(x), T(x') after the attack even at alpha = 1 (ours skips S(x), T(x))",
    "akd": "no official code: T(x) once, attack and loss on CE(S(x'), y~)",
    "ard": "official: S(x') (AttackPGD's return), T(x), S(x) even at alpha = 1 (ours skips S(x))",
    "funmatch": "no attack: S(x), T(x) under no_grad",
    "pgd_at": "Madry et al.: attack, then S(x')",
    "trades": "official: S(x) recomputed in every attack step and twice in the loss (ours: once in the "
              "attack, once in the loss)",
}

# Dense (no sparsity) peak TFLOP/s from NVIDIA's datasheets, matched by a pattern on
# torch.cuda.get_device_name(); the first match wins, so the specific variants come first.
GPU_PEAK_TFLOPS: tuple[tuple[str, dict[str, float]], ...] = (
    (r"H100.*PCIe", {"bf16": 756.5, "tf32": 378.0, "fp32": 51.2}),
    (r"H100.*NVL", {"bf16": 835.5, "tf32": 417.5, "fp32": 60.0}),
    (r"H100", {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9}),  # SXM
    (r"H200.*NVL", {"bf16": 835.5, "tf32": 417.5, "fp32": 60.0}),
    (r"H200", {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9}),  # SXM
    (r"A100", {"bf16": 312.0, "tf32": 156.0, "fp32": 19.5}),
    (r"\bL4\b", {"bf16": 121.0, "tf32": 60.0, "fp32": 30.3}),
    # A10 datasheet; NVIDIA publishes none for AWS's A10G, whose tensor clocks are lower:
    # read the fraction as a lower bound.
    (r"A10G", {"bf16": 125.0, "tf32": 62.5, "fp32": 31.2}),
)


# --------------------------------------------------------------------------------------------
# Configuration and result rows.

@dataclass(frozen=True)
class BenchConfig:
    """One benchmark shape and how to run it (`cpu_defaults` / `cuda_defaults` fill it in)."""

    student: str = "small_cnn"  # student architecture, a name in afm_ray.models.MODELS
    student_width: int | None = 16  # None = the architecture's default width
    teacher: str = "small_cnn"  # teacher architecture (frozen, eval mode)
    teacher_width: int | None = 64
    batch_size: int = 128  # images per training step
    steps: int = 3  # PGD steps of the training attack
    image_size: int = 28  # square images of this side
    channels: int = 1  # 1 (grey) or 3 (RGB)
    num_classes: int = 10
    eps: float = 0.3  # linf budget in [0,1] pixel units; the step is eps / 4 (DESIGN.md)
    policy: str = "crop_flip"  # our step's BatchAugment policy; crop_flip is what the reference does
    device: str = "cpu"
    amp: str = "off"  # off | bf16 autocast around our method call (the reference is always fp32)
    channels_last: bool = False  # our student, teacher and batches in channels_last (as train.py)
    compile: bool = False  # torch.compile our student (as train.py)
    iters: int = 12  # timed iterations; the median is reported
    warmup: int = 1  # untimed iterations first (with --compile at least 3: compilation)
    ref_workers: int = 0  # DataLoader workers of the reference step
    ref_attack_grad: str = "backward"  # backward: loss.backward() per attack step | input: autograd.grad
    seed: int = 0

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (self.channels, self.image_size, self.image_size)

    @property
    def step_size(self) -> float:
        return self.eps / 4


def cpu_defaults() -> dict[str, object]:
    """Shapes that finish in a few minutes on 2 CPU cores: the embedded default (28x28 grey digits,
    small_cnn width-16 student, width-64 teacher), PGD-3, batch 128."""
    return dict(student="small_cnn", student_width=16, teacher="small_cnn", teacher_width=64,
                batch_size=128, steps=3, image_size=28, channels=1, eps=0.3, iters=12, warmup=1,
                ref_workers=0)


def cuda_defaults() -> dict[str, object]:
    """The realistic CIFAR shapes: ResNet-18 student, WRN-34-10 teacher, batch 256, PGD-10 at 8/255.
    Research code typically loads with 4 DataLoader workers."""
    return dict(student="resnet18", student_width=None, teacher="wrn34_10", teacher_width=None,
                batch_size=256, steps=10, image_size=32, channels=3, eps=8 / 255, iters=20, warmup=5,
                ref_workers=4)


@dataclass
class StepRow:
    """One method at one batch size: our step next to the reference step."""

    method: str
    student: str
    teacher: str  # "-" for methods without a teacher
    batch: int
    ours_ips: float  # images per second, batch / median step time
    ref_ips: float
    ours_peak_mib: float
    ref_peak_mib: float
    ours_flops: int  # FLOPs of one step (FlopCounterMode: matmuls and convolutions, fwd + bwd)
    ref_flops: int
    ours_flops_per_s: float  # ours_flops / median step time
    peak_fraction: float  # ours_flops_per_s / the device's peak
    ratio: float  # ours / reference speed: median over iterations of reference time / our time (paired)
    ratio_q1: float  # quartiles of those per-iteration ratios
    ratio_q3: float
    cpu_time_ratio: float  # reference / our median process CPU time per step (CPU device: robust to other load)
    load: float = float("nan")  # 1-min load average when the row finished
    control: bool = False  # an A/A row: "ref" is a second copy of our step (measures the noise)


@dataclass
class AugmentRow:
    """Augmentation alone: images/s, and its time as a share of one of our steps."""

    name: str
    batch: int
    ips: float
    share: float | None  # augmentation time / the step named in BenchReport.share_of


@dataclass
class EvalRow:
    """An evaluation attack on the student: images/s at one batch size."""

    attack: str
    model: str
    batch: int
    samples: int
    ips: float
    flops_per_s: float | None  # None where not counted (AutoAttack)
    peak_fraction: float | None


@dataclass
class MachineInfo:
    name: str  # CPU model or GPU name
    device: str  # cpu | cuda
    cores: int
    threads: int  # torch.get_num_threads()
    torch_version: str
    python_version: str
    date: str
    load_start: float  # 1-minute load average when the run started
    load_end: float = float("nan")
    peak_flops: float = float("nan")  # the device peak the fractions are of
    peak_source: str = ""
    measured_flops: dict[str, float] = field(default_factory=dict)  # dense ops timed in this run
    memory_method: str = ""


@dataclass
class BenchReport:
    config: BenchConfig
    machine: MachineInfo
    rows: list[StepRow] = field(default_factory=list)
    augment: list[AugmentRow] = field(default_factory=list)
    share_of: str = ""  # the step the augmentation shares are relative to
    evals: list[EvalRow] = field(default_factory=list)
    eval_note: str = ""
    command: str = ""  # the command line that produced the report


# --------------------------------------------------------------------------------------------
# Measurements: pure functions of a step callable.

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Timings:
    """Per-call seconds of one step: wall clock, and this process's CPU time over the same calls."""

    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)  # time.process_time: all threads of this process

    @property
    def median(self) -> float:
        return statistics.median(self.wall)

    @property
    def median_cpu(self) -> float:
        return statistics.median(self.cpu)


def time_steps(steps: Mapping[str, Callable[[], object]], *, iters: int, warmup: int,
               device: torch.device) -> dict[str, Timings]:
    """Seconds of each of `iters` calls of each step, after `warmup` untimed calls, the steps
    interleaved call by call.

    Interleaving makes a change in background load hit every step alike, so the paired ratios
    hold even on a shared machine; the order flips every iteration (A B, B A, ...) so that
    neither step always runs second, on caches the other warmed. The device is synchronised
    around each timed call, never inside. The CPU time beside the wall time counts only this
    process's work: on a CPU shared with other processes it does not grow with the time spent
    waiting for a core.
    """
    if iters < 1 or warmup < 0:
        raise ValueError(f"iters={iters} must be >= 1 and warmup={warmup} >= 0")
    for _ in range(warmup):
        for step in steps.values():
            step()
    times = {name: Timings() for name in steps}
    order = list(steps.items())
    for i in range(iters):
        for name, step in order if i % 2 == 0 else order[::-1]:
            _sync(device)
            wall, cpu = time.perf_counter(), time.process_time()
            step()
            _sync(device)
            times[name].wall.append(time.perf_counter() - wall)
            times[name].cpu.append(time.process_time() - cpu)
    return times


def paired_ratio_quartiles(slow: Sequence[float], fast: Sequence[float]) -> tuple[float, float, float]:
    """Lower quartile, median and upper quartile of slow[i] / fast[i] over interleaved iterations.

    Each pair ran back to back, so a change in background load cancels within a pair; the
    median of the pairs is steadier than the ratio of the two medians on a shared machine.
    """
    ratios = [s / f for s, f in zip(slow, fast)]
    if len(ratios) < 2:
        return ratios[0], ratios[0], ratios[0]
    q = statistics.quantiles(ratios, n=4, method="inclusive")
    return q[0], q[1], q[2]


class _GlobalOnly:
    """Stands in for FlopCounterMode's per-module tracker, whose hooks make autograd.grad on a
    leaf input fail ("A leaf node was passed to _will_engine_execute_node", pytorch#131753):
    every PGD step is such a call. Only the global total is needed here."""

    parents = ("Global",)

    def __enter__(self) -> _GlobalOnly:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


def count_flops(step: Callable[[], object]) -> int:
    """FLOPs of one call (matmuls, convolutions, attention; forward and backward)."""
    counter = FlopCounterMode(display=False)
    counter.mod_tracker = _GlobalOnly()  # type: ignore[assignment]
    with counter:
        step()
    return int(counter.get_total_flops())


_LIBC = None


def _malloc_trim() -> None:
    """Hand freed heap memory back to the OS so the RSS baseline is the live memory."""
    global _LIBC
    try:
        _LIBC = _LIBC or ctypes.CDLL("libc.so.6")
        _LIBC.malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def _proc_status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def _reset_rss_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


CPU_MEMORY_METHOD = ("peak RSS above the RSS before the step: VmHWM after resetting it through "
                     "/proc/self/clear_refs, freed heap returned with malloc_trim first")
CPU_MEMORY_FALLBACK = "growth of getrusage ru_maxrss over the step (0 if an earlier step peaked higher)"
CUDA_MEMORY_METHOD = ("torch.cuda.max_memory_allocated over the step minus memory_allocated before it: what the "
                      "step adds (activations, autograd graph, gradients, batch) on top of weights, optimizer "
                      "state and data")


def peak_memory(step: Callable[[], object], device: torch.device) -> tuple[int, str]:
    """Peak bytes of one call and how they were measured (see the *_MEMORY_METHOD strings)."""
    gc.collect()
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        step()
        _sync(device)
        return int(torch.cuda.max_memory_allocated(device)) - before, CUDA_MEMORY_METHOD
    _malloc_trim()
    try:
        before = _proc_status_kib("VmRSS")
        if _reset_rss_peak():
            step()
            return max(0, _proc_status_kib("VmHWM") - before) * 1024, CPU_MEMORY_METHOD
    except (OSError, KeyError):
        pass
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    step()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024, CPU_MEMORY_FALLBACK


def matmul_flops_per_s(device: torch.device, dtype: torch.dtype = torch.float32, n: int = 2048,
                       iters: int = 10) -> float:
    """FLOP/s of the fastest of `iters` n x n matmuls (a peak is what the device can do, not
    what it did on average)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    seconds = min(time_steps({"mm": lambda: a @ b}, iters=iters, warmup=2, device=device)["mm"].wall)
    return 2 * n**3 / seconds


def conv_flops_per_s(device: torch.device, dtype: torch.dtype = torch.float32, iters: int = 10) -> float:
    """FLOP/s of the fastest of `iters` 3x3 256->256-channel convolutions at 14x14, batch 128:
    on CPUs oneDNN's convolutions can outrun torch's fp32 matmul, so the matmul alone
    understates what the convolutional steps here can reach."""
    x = torch.randn(128, 256, 14, 14, device=device, dtype=dtype)
    w = torch.randn(256, 256, 3, 3, device=device, dtype=dtype)
    seconds = min(time_steps({"conv": lambda: F.conv2d(x, w, padding=1)}, iters=iters, warmup=2,
                             device=device)["conv"].wall)
    return 2 * 128 * 256 * 256 * 9 * 14 * 14 / seconds


def gpu_peak_flops(name: str, precision: str) -> float | None:
    """Datasheet dense peak FLOP/s of the GPU `name` at `precision` (bf16 | tf32 | fp32), or None."""
    for pattern, peaks in GPU_PEAK_TFLOPS:
        if re.search(pattern, name):
            return peaks[precision] * 1e12
    return None


def device_peak_flops(device: torch.device, amp: str, *, matmul_n: int = 2048) -> tuple[float, str, dict[str, float]]:
    """(peak FLOP/s, where it comes from, the dense ops measured here) for the achieved fractions.

    CPU: no datasheet applies to a shared VM, so the peak is measured in this run: the faster of a
    large matmul and a large convolution. CUDA: NVIDIA's dense datasheet peak for bf16 under
    --amp bf16; otherwise TF32, because cuDNN runs fp32 convolutions on TF32 tensor cores by
    default (torch.backends.cudnn.allow_tf32); a measured matmul where the GPU is not in the table.
    """
    dtype = torch.bfloat16 if amp == "bf16" else torch.float32
    label = "bf16" if amp == "bf16" else "fp32"
    if device.type != "cuda":
        measured = {f"{matmul_n}x{matmul_n} matmul": matmul_flops_per_s(device, dtype, n=matmul_n),
                    "3x3 conv 256->256 at 14x14": conv_flops_per_s(device, dtype)}
        source = (f"measured in this run: the faster of a {matmul_n}x{matmul_n} {label} matmul and a {label} "
                  "3x3 256->256-channel convolution at 14x14, batch 128; best of 10 calls each, at the start and "
                  "the end of the run; not a datasheet peak")
        return max(measured.values()), source, measured
    measured = {"8192x8192 matmul": matmul_flops_per_s(device, dtype, n=8192)}
    name = torch.cuda.get_device_name(device)
    precision = "bf16" if amp == "bf16" else ("tf32" if torch.backends.cudnn.allow_tf32 else "fp32")
    peak = gpu_peak_flops(name, precision)
    if peak is None:
        return max(measured.values()), f"measured 8192x8192 {label} matmul ({name} is not in GPU_PEAK_TFLOPS)", measured
    return peak, f"NVIDIA datasheet, dense {precision} ({name})", measured


def machine_info(device: torch.device) -> MachineInfo:
    cpu = platform.processor() or "unknown CPU"
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    name = cpu if device.type != "cuda" else f"{torch.cuda.get_device_name(device)} (host: {cpu})"
    return MachineInfo(
        name=name, device=device.type, cores=os.cpu_count() or 1, threads=torch.get_num_threads(),
        torch_version=torch.__version__, python_version=platform.python_version(),
        date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        load_start=os.getloadavg()[0],
    )


# --------------------------------------------------------------------------------------------
# Data, models and the two steps.

def synthetic_images(n: int, cfg: BenchConfig, seed: int = 0) -> tuple[Tensor, Tensor]:
    """n random uint8 images of cfg's shape and int64 labels, on the CPU (content does not
    change the cost of any op here)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, *cfg.image_shape), generator=g, dtype=torch.uint8)
    return x, torch.randint(0, cfg.num_classes, (n,), generator=g)


def build_models(cfg: BenchConfig, device: torch.device) -> tuple[nn.Module, nn.Module]:
    """A student (train mode) and a frozen eval-mode teacher of cfg's architectures."""
    common = dict(num_classes=cfg.num_classes, in_channels=cfg.channels,
                  mean=(0.5,) * cfg.channels, std=(0.25,) * cfg.channels)
    torch.manual_seed(cfg.seed)
    student = build_model(cfg.student, width=cfg.student_width, **common).to(device)
    teacher = build_model(cfg.teacher, width=cfg.teacher_width, **common).to(device)
    return student.train(), teacher.eval().requires_grad_(False)


def _cycle(loader: object) -> Iterator[tuple[Tensor, Tensor]]:
    """Batches forever, re-iterating (a new epoch) when the loader runs out."""
    while True:
        yield from loader  # type: ignore[misc]


def _sgd(model: nn.Module) -> torch.optim.Optimizer:
    # optim.* defaults of afm_ray.config
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)


def _n_images(cfg: BenchConfig) -> int:
    # enough batches that the timed iterations rarely cross an epoch boundary
    return cfg.batch_size * (cfg.warmup + cfg.iters + 4)


def make_our_step(name: str, cfg: BenchConfig, student: nn.Module, teacher: nn.Module,
                  device: torch.device) -> Callable[[], None]:
    """One iteration of train_fn_per_worker's inner loop for method `name`: the same TrainStep
    object training calls, fed by the same loader (the per-epoch bookkeeping is left out)."""
    method = build_method(name)
    x_all, y_all = synthetic_images(_n_images(cfg), cfg, cfg.seed)
    batches = _cycle(DeviceBatchLoader(x_all, y_all, cfg.batch_size, device=device, shuffle=True,
                                       drop_last=True, seed=cfg.seed))
    if cfg.channels_last:
        student = student.to(memory_format=torch.channels_last)
        # A copy: the teacher is shared with the reference step, which stays contiguous (NCHW).
        teacher = copy.deepcopy(teacher).to(memory_format=torch.channels_last)
    model = torch.compile(student) if cfg.compile else student
    model.train()
    train_step = TrainStep(
        method=method, model=model, teacher=teacher if method.needs_teacher else None,
        augment=BatchAugment(cfg.policy, image_shape=cfg.image_shape, num_classes=cfg.num_classes),
        attack=AttackSpec(eps=cfg.eps, step_size=cfg.step_size, steps=cfg.steps),
        optimizer=_sgd(student), num_classes=cfg.num_classes, channels_last=cfg.channels_last,
        amp_dtype=torch.bfloat16 if cfg.amp == "bf16" else None,
    )
    sums: dict[str, Tensor] = {}

    def step() -> None:
        for key, value in train_step(*next(batches)).items():  # as the training loop accumulates
            sums[key] = sums.get(key, 0) + value.float()

    return step


class CropFlipDataset(TensorDataset):
    """The research-code input pipeline: ToTensor, RandomCrop(padding), RandomHorizontalFlip,
    per sample in __getitem__, in plain torch (the same ops as BatchAugment's crop_flip)."""

    def __init__(self, x: Tensor, y: Tensor) -> None:
        super().__init__(x, y)
        c, h, _ = x.shape[1:]
        # afm_ray.augment._crop_flip: grey digits 2 px at 28x28 and no flip; RGB 4 px at 32x32 + flip
        self.pad = max(1, round(2 * h / 28)) if c == 1 else max(1, round(4 * h / 32))
        self.flip = c == 3

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        img, label = self.tensors[0][i], self.tensors[1][i]
        img = img.float().div(255.0)
        h, w = img.shape[1:]
        img = F.pad(img, (self.pad,) * 4)
        top, left = torch.randint(0, 2 * self.pad + 1, (2,)).tolist()
        img = img[:, top:top + h, left:left + w]
        if self.flip and torch.rand(1).item() < 0.5:
            img = img.flip(-1)
        return img, label


def make_reference_step(name: str, cfg: BenchConfig, student: nn.Module, teacher: nn.Module,
                        device: torch.device) -> Callable[[], None]:
    """The plain research-code step for method `name` (see the module docstring)."""
    hp = build_method(name)  # the same hyperparameters and random start as our step
    x_all, y_all = synthetic_images(_n_images(cfg), cfg, cfg.seed)
    loader = DataLoader(CropFlipDataset(x_all, y_all), batch_size=cfg.batch_size, shuffle=True,
                        drop_last=True, num_workers=cfg.ref_workers, pin_memory=device.type == "cuda",
                        persistent_workers=cfg.ref_workers > 0)
    batches = _cycle(loader)
    optimizer = _sgd(student)
    student.train()
    running = {"loss": 0.0, "attack_loss": 0.0}

    def step() -> None:
        inputs, targets = next(batches)
        inputs, targets = inputs.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        loss = reference_loss(name, hp, student, teacher, inputs, targets, cfg, running)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        running["loss"] += loss.item()

    return step


def reference_loss(name: str, hp: object, student: nn.Module, teacher: nn.Module, x: Tensor, y: Tensor,
                   cfg: BenchConfig, running: dict[str, float]) -> Tensor:
    """Research-style attack + outer loss of `name`: the PGD loop inline, one `.item()` per step."""
    tau, alpha = getattr(hp, "tau", 1.0), getattr(hp, "alpha", 1.0)
    beta, lam = getattr(hp, "beta", 6.0), getattr(hp, "lam", 0.5)
    eps, step_size = cfg.eps, cfg.step_size
    kl = nn.KLDivLoss(reduction="sum")

    teacher_logits = None
    if name in ("rslad", "akd"):
        with torch.no_grad():
            teacher_logits = teacher(x)
    if name == "akd":
        soft_y = lam * F.one_hot(y, cfg.num_classes).float() + (1 - lam) * F.softmax(teacher_logits / tau, dim=1)

    def attack_loss(x_adv: Tensor) -> Tensor:
        if name in ("pgd_at", "ard"):
            return F.cross_entropy(student(x_adv), y, reduction="sum")
        if name == "akd":
            return -(soft_y * F.log_softmax(student(x_adv), dim=1)).sum()
        if name == "rslad":
            return kl(F.log_softmax(student(x_adv) / tau, dim=1), F.softmax(teacher_logits / tau, dim=1))
        if name in ("adaad", "advfunmatch"):
            return kl(F.log_softmax(student(x_adv) / tau, dim=1), F.softmax(teacher(x_adv) / tau, dim=1))
        if name == "trades":
            return kl(F.log_softmax(student(x_adv), dim=1), F.softmax(student(x), dim=1))
        raise ValueError(name)

    x_adv = x
    if name != "funmatch":
        student.eval()
        if type(hp).default_random_start == "normal":
            x_adv = x.detach() + 0.001 * torch.randn(x.shape, device=x.device)
        else:
            x_adv = x.detach() + torch.zeros_like(x).uniform_(-eps, eps)
        x_adv = torch.clamp(torch.min(torch.max(x_adv, x - eps), x + eps), 0.0, 1.0)
        for _ in range(cfg.steps):
            x_adv.requires_grad_()
            loss = attack_loss(x_adv)
            if cfg.ref_attack_grad == "backward":
                loss.backward()
                grad = x_adv.grad
            else:
                grad = torch.autograd.grad(loss, [x_adv])[0]
            x_adv = x_adv.detach() + step_size * torch.sign(grad.detach())
            x_adv = torch.min(torch.max(x_adv, x - eps), x + eps)
            x_adv = torch.clamp(x_adv, 0.0, 1.0)
            running["attack_loss"] += loss.item()
        student.train()

    def kl_bm(student_logits: Tensor, teacher_logits: Tensor, t: float = 1.0) -> Tensor:
        return F.kl_div(F.log_softmax(student_logits / t, dim=1), F.softmax(teacher_logits / t, dim=1),
                        reduction="batchmean")

    if name == "pgd_at":
        return F.cross_entropy(student(x_adv), y)
    if name == "akd":
        return -(soft_y * F.log_softmax(student(x_adv), dim=1)).sum(dim=1).mean()
    if name == "rslad":
        adv_logits, nat_logits = student(x_adv), student(x)
        return alpha * kl_bm(adv_logits, teacher_logits, tau) + (1 - alpha) * kl_bm(nat_logits, teacher_logits, tau)
    if name == "adaad":
        ori_outputs, adv_outputs = student(x), student(x_adv)
        with torch.no_grad():
            t_ori_outputs, t_adv_outputs = teacher(x), teacher(x_adv)
        return alpha * kl_bm(adv_outputs, t_adv_outputs, tau) + (1 - alpha) * kl_bm(ori_outputs, t_ori_outputs, tau)
    if name == "ard":
        outputs = student(x_adv)
        teacher_outputs = teacher(x)
        basic_outputs = student(x)
        return (alpha * tau * tau * kl_bm(outputs, teacher_outputs, tau)
                + (1.0 - alpha) * F.cross_entropy(basic_outputs, y))
    if name == "advfunmatch":
        outputs = student(x_adv)
        with torch.no_grad():
            teacher_outputs = teacher(x_adv)
        return tau * tau * kl_bm(outputs, teacher_outputs, tau)
    if name == "funmatch":
        outputs = student(x)
        with torch.no_grad():
            teacher_outputs = teacher(x)
        return tau * tau * kl_bm(outputs, teacher_outputs, tau)
    if name == "trades":
        logits = student(x)
        loss_natural = F.cross_entropy(logits, y)
        loss_robust = (1.0 / x.shape[0]) * kl(F.log_softmax(student(x_adv), dim=1), F.softmax(student(x), dim=1))
        return loss_natural + beta * loss_robust
    raise ValueError(f"no reference step for method {name!r}")


# --------------------------------------------------------------------------------------------
# The benchmarks.

def bench_method(name: str, cfg: BenchConfig, student: nn.Module, teacher: nn.Module,
                 device: torch.device, peak_flops: float, *, control: bool = False) -> StepRow:
    """Our step and the reference step of `name`, each on its own copy of `student`.

    control: time our step against an identical second copy of itself instead (an A/A test):
    its ratio's distance from 1 is the measurement noise of this run.
    """
    ours_student, ref_student = copy.deepcopy(student), copy.deepcopy(student)
    ours = make_our_step(name, cfg, ours_student, teacher, device)
    make_other = make_our_step if control else make_reference_step
    ref = make_other(name, cfg, ref_student, teacher, device)
    # FLOPs on an eager copy: FlopCounterMode does not see inside compiled graphs.
    eager = ours if not cfg.compile else make_our_step(name, replace(cfg, compile=False),
                                                       copy.deepcopy(student), teacher, device)
    ours_flops, ref_flops = count_flops(eager), count_flops(ref)
    times = time_steps({"ours": ours, "ref": ref}, iters=cfg.iters, warmup=cfg.warmup, device=device)
    seconds = {k: v.median for k, v in times.items()}
    q1, ratio, q3 = paired_ratio_quartiles(times["ref"].wall, times["ours"].wall)
    ours_mem, _ = peak_memory(ours, device)
    ref_mem, _ = peak_memory(ref, device)
    has_teacher = METHODS[name].needs_teacher
    achieved = ours_flops / seconds["ours"]
    return StepRow(
        method=f"A/A control: {name} ours vs ours" if control else name,
        student=_arch_label(cfg.student, cfg.student_width),
        teacher=_arch_label(cfg.teacher, cfg.teacher_width) if has_teacher else "-",
        batch=cfg.batch_size, ours_ips=cfg.batch_size / seconds["ours"], ref_ips=cfg.batch_size / seconds["ref"],
        ours_peak_mib=ours_mem / 2**20, ref_peak_mib=ref_mem / 2**20, ours_flops=ours_flops, ref_flops=ref_flops,
        ours_flops_per_s=achieved, peak_fraction=achieved / peak_flops, ratio=ratio, ratio_q1=q1, ratio_q3=q3,
        cpu_time_ratio=times["ref"].median_cpu / times["ours"].median_cpu, load=os.getloadavg()[0],
        control=control,
    )


def bench_methods(cfg: BenchConfig, methods: Sequence[str], *, batch_sizes: Sequence[int] | None = None,
                  peak_flops: float | None = None, control: str | None = None,
                  progress: Callable[[str], None] | None = None) -> list[StepRow]:
    """A StepRow per method and batch size (cfg.batch_size when batch_sizes is None), and with
    `control` a last A/A row per batch size: that method's step against a copy of itself."""
    device = torch.device(cfg.device)
    if peak_flops is None:
        peak_flops = device_peak_flops(device, cfg.amp)[0]
    rows = []
    for batch in batch_sizes or (cfg.batch_size,):
        bcfg = replace(cfg, batch_size=batch)
        student, teacher = build_models(bcfg, device)
        runs = [(name, False) for name in methods] + ([(control, True)] if control else [])
        for name, is_control in runs:
            row = bench_method(name, bcfg, student, teacher, device, peak_flops, control=is_control)
            rows.append(row)
            if progress is not None:
                progress(f"{row.method:<12} batch {batch}: ours {row.ours_ips:9.1f} img/s, "
                         f"{'copy' if is_control else 'reference'} {row.ref_ips:9.1f} img/s, ratio {row.ratio:.2f}")
    return rows


def bench_augment(cfg: BenchConfig, policies: Sequence[str] = ("crop_flip", "autoaugment+cutmix"),
                  *, step_seconds: float | None = None) -> list[AugmentRow]:
    """BatchAugment alone per policy, and the reference's DataLoader (host crop+flip) alone."""
    device = torch.device(cfg.device)
    x_all, y_all = synthetic_images(_n_images(cfg), cfg, cfg.seed)
    batches = _cycle(DeviceBatchLoader(x_all, y_all, cfg.batch_size, device=device, seed=cfg.seed))
    steps: dict[str, Callable[[], object]] = {}
    for policy in policies:
        augment = BatchAugment(policy, image_shape=cfg.image_shape, num_classes=cfg.num_classes)
        steps[f"BatchAugment {policy} ({cfg.device})"] = (
            lambda augment=augment: augment(*_labels_one_hot(next(batches), cfg.num_classes)))
    loader = DataLoader(CropFlipDataset(x_all, y_all), batch_size=cfg.batch_size, shuffle=True, drop_last=True,
                        num_workers=cfg.ref_workers, persistent_workers=cfg.ref_workers > 0)
    host = _cycle(loader)
    steps[f"reference DataLoader crop_flip (host, {cfg.ref_workers} workers)"] = lambda: next(host)
    seconds = {k: v.median for k, v in time_steps(steps, iters=cfg.iters, warmup=cfg.warmup, device=device).items()}
    return [AugmentRow(name, cfg.batch_size, cfg.batch_size / s, None if step_seconds is None else s / step_seconds)
            for name, s in seconds.items()]


def _labels_one_hot(batch: tuple[Tensor, Tensor], num_classes: int) -> tuple[Tensor, Tensor]:
    x, y = batch
    return x, F.one_hot(y, num_classes).float()


def bench_eval(cfg: BenchConfig, *, batch_size: int = 0, aa_samples: int = 64,
               peak_flops: float | None = None) -> tuple[list[EvalRow], str]:
    """PGD-20 (median over cfg.iters batches) and AutoAttack standard (one run on `aa_samples`
    images) on an untrained student; labels are the model's own predictions, so every image is
    attacked. batch_size 0 = chosen as training runs choose it (afm_ray.eval_batch), for up to
    4096 images on CUDA and 1024 on CPU."""
    device = torch.device(cfg.device)
    model, _ = build_models(cfg, device)
    model.eval()
    if batch_size:
        batch, choice_note = batch_size, f"batch {batch_size}: set with --eval-batch-size"
    else:
        choice = choose_eval_batch_size(model, cfg.image_shape, device,
                                        n_images=4096 if device.type == "cuda" else 1024)
        batch, choice_note = choice.batch_size, choice.reason
    x = torch.rand(batch, *cfg.image_shape, device=device)
    with torch.no_grad():
        y = model(x).argmax(dim=1)
    label = _arch_label(cfg.student, cfg.student_width)

    def pgd20() -> Tensor:
        return robust_predictions(model, x, y, attack="pgd20", eps=cfg.eps, batch_size=batch)

    flops = count_flops(pgd20)
    seconds = time_steps({"pgd20": pgd20}, iters=cfg.iters, warmup=cfg.warmup, device=device)["pgd20"].median
    rows = [EvalRow("PGD-20", label, batch, batch, batch / seconds, flops / seconds,
                    None if peak_flops is None else flops / seconds / peak_flops)]

    n = min(aa_samples, batch)
    _sync(device)
    start = time.perf_counter()
    robust = robust_predictions(model, x[:n], y[:n], attack="aa", eps=cfg.eps, batch_size=batch, seed=cfg.seed)
    _sync(device)
    aa_seconds = time.perf_counter() - start
    rows.append(EvalRow("AutoAttack standard", label, batch, n, n / aa_seconds, None, None))
    note = (f"Batch size (eval.batch_size 0, afm_ray.eval_batch): {choice_note}. "
            f"Untrained student, labels = its own predictions, so APGD-CE starts on every image; each later "
            f"attack (APGD-T, FAB-T, Square) runs only on the images still robust, and "
            f"{int(robust.sum())}/{n} were left at the end. A robust model keeps more images for the "
            "later attacks: read the AutoAttack row as an upper bound on throughput. AutoAttack is one "
            "timed run (no warm-up of its own); PGD-20 is the median of the iterations.")
    return rows, note


def _arch_label(arch: str, width: int | None) -> str:
    return arch if width is None else f"{arch}-w{width}"


# --------------------------------------------------------------------------------------------
# The Markdown record.

def machine_busy(m: MachineInfo) -> bool:
    """Whether other processes competed for the cores the torch threads needed: the load before
    the run, or the load at its end less our own threads, plus our threads exceeds the cores."""
    if m.device != "cpu":
        return False
    others_at_end = m.load_end - m.threads if math.isfinite(m.load_end) else 0.0
    return max(m.load_start, others_at_end) + m.threads > m.cores + 0.5


def _flops_unit(device: str) -> tuple[float, str]:
    return (1e12, "TFLOP/s") if device == "cuda" else (1e9, "GFLOP/s")


def to_markdown(report: BenchReport) -> str:
    """The record: the machine, the shapes, the step table, augmentation, evaluation, notes."""
    cfg, m = report.config, report.machine
    scale, unit = _flops_unit(m.device)
    # Every student the rows cover (--student a,b), in order; the config names the first.
    students = ", ".join(dict.fromkeys(r.student for r in report.rows if not r.control)) or _arch_label(
        cfg.student, cfg.student_width)
    out = [
        "# afm-ray performance record",
        "",
        *([f"Command: `{report.command}`", ""] if report.command else []),
        f"Machine: {m.name}, {m.cores} cores, {m.threads} torch threads, torch {m.torch_version}, "
        f"Python {m.python_version}, {m.date}; 1-min load average {m.load_start:.2f} at start, "
        f"{m.load_end:.2f} at end.",
        "",
        f"Shapes: student {students}, teacher "
        f"{_arch_label(cfg.teacher, cfg.teacher_width)}, input {cfg.channels}x{cfg.image_size}x{cfg.image_size}, "
        f"{cfg.num_classes} classes, PGD-{cfg.steps} linf eps {cfg.eps:.4g} step {cfg.step_size:.4g}; our "
        f"augmentation {cfg.policy} on {cfg.device}, amp {cfg.amp}, "
        f"channels_last {'on' if cfg.channels_last else 'off'}, "
        f"compile {'on' if cfg.compile else 'off'}. Median of {cfg.iters} iterations after {cfg.warmup} warm-up, "
        f"ours and reference interleaved. Reference: fp32, DataLoader with {cfg.ref_workers} workers, attack "
        f"gradients by {'loss.backward()' if cfg.ref_attack_grad == 'backward' else 'torch.autograd.grad'}.",
        "",
        f"Device peak: {m.peak_flops / scale:.4g} {unit} ({m.peak_source}). Measured: "
        + ", ".join(f"{op} {v / scale:.4g} {unit}" for op, v in m.measured_flops.items()) + ".",
        f"Peak memory: {m.memory_method}.",
        "",
    ]
    if machine_busy(m):
        out += [f"**Busy machine**: the load average ({m.load_start:.2f} at start, {m.load_end:.2f} at end) "
                f"plus {m.threads} torch threads exceeds the {m.cores} cores, so other processes shared them: "
                "absolute numbers are low and noisy. The ratios come from interleaved pairs and hold better; "
                "the CPU-time ratio does not count waiting for a core at all.", ""]
    cpu = m.device == "cpu"
    if report.rows:
        out += [
            "## Training step",
            "",
            "| method | student / teacher | batch | ours img/s | reference img/s | ours / ref |"
            + (" ours / ref by CPU time |" if cpu else "")
            + f" ours peak MiB | ref peak MiB | ours GFLOP/step | ref GFLOP/step | ours {unit} | % of peak |"
            + (" load |" if cpu else ""),
            "|---|---|---:|---:|---:|---:|" + ("---:|" if cpu else "") + "---:|---:|---:|---:|---:|---:|"
            + ("---:|" if cpu else ""),
        ]
        for r in report.rows:
            out.append(
                f"| {r.method} | {r.student} / {r.teacher} | {r.batch} | {r.ours_ips:.1f} | {r.ref_ips:.1f} | "
                f"{r.ratio:.2f} ({r.ratio_q1:.2f}-{r.ratio_q3:.2f}) |"
                + (f" {r.cpu_time_ratio:.2f} |" if cpu else "")
                + f" {r.ours_peak_mib:.0f} | {r.ref_peak_mib:.0f} | "
                f"{r.ours_flops / 1e9:.2f} | {r.ref_flops / 1e9:.2f} | {r.ours_flops_per_s / scale:.3g} | "
                f"{100 * r.peak_fraction:.1f} |" + (f" {r.load:.2f} |" if cpu else "")
            )
        method_rows = [r for r in report.rows if not r.control]
        slower = [f"{r.method} (batch {r.batch})" for r in method_rows if r.ratio_q3 < 1]
        unclear = [f"{r.method} (batch {r.batch})" for r in method_rows if r.ratio_q1 <= 1 <= r.ratio_q3]
        noise = {r.batch: max(abs(r.ratio_q1 - 1), abs(r.ratio - 1), abs(r.ratio_q3 - 1))
                 for r in report.rows if r.control}
        within = [f"{r.method} (batch {r.batch})" for r in method_rows
                  if r.batch in noise and abs(r.ratio - 1) <= noise[r.batch]]
        out += [
            "",
            "ours / ref: each iteration times our step and the reference step back to back (the order "
            "alternating); the ratio is the median over iterations of reference time / our time, in "
            "brackets its quartiles. images/s columns are batch / median time of each. The A/A control "
            "times our step against an identical copy of itself: how far its ratio lands from 1 is "
            "the noise of this run."
            + (" By CPU time: reference / our median process CPU seconds per step (all threads, spinning "
               "included; DataLoader workers not counted). load: 1-min load average when the row "
               "finished (our own threads included)." if cpu else ""),
            "",
            "Slower than the reference (upper quartile of the ratio < 1): "
            + (", ".join(slower) if slower else "none") + ".",
            "Not distinguishable from the reference (quartiles straddle 1): "
            + (", ".join(unclear) if unclear else "none") + ".",
            *([f"Within the noise of the A/A control (|ratio - 1| <= "
               f"{', '.join(f'{v:.2f} at batch {b}' for b, v in noise.items())}, the control's largest "
               "distance from 1 among its median and quartiles): " + (", ".join(within) if within else "none") + "."]
              if noise else []),
            "",
        ]
    if report.augment:
        out += [
            "## Augmentation alone",
            "",
            f"| augmentation | batch | img/s | share of {report.share_of or 'a step'} |",
            "|---|---:|---:|---:|",
        ]
        for a in report.augment:
            share = "-" if a.share is None else f"{100 * a.share:.1f}%"
            out.append(f"| {a.name} | {a.batch} | {a.ips:.0f} | {share} |")
        out.append("")
    if report.evals:
        out += [
            "## Evaluation attacks",
            "",
            f"| attack | model | batch | images | img/s | {unit} | % of peak |",
            "|---|---|---:|---:|---:|---:|---:|",
        ]
        for e in report.evals:
            fl = "-" if e.flops_per_s is None else f"{e.flops_per_s / scale:.3g}"
            frac = "-" if e.peak_fraction is None else f"{100 * e.peak_fraction:.1f}"
            out.append(f"| {e.attack} | {e.model} | {e.batch} | {e.samples} | {e.ips:.1f} | {fl} | {frac} |")
        out += ["", report.eval_note, ""]
    out += [
        "## Notes",
        "",
        "- images/s = batch / median step time. A step is everything from drawing the batch to the "
        "optimizer step: ours draws from the device-resident DeviceBatchLoader and augments with "
        "BatchAugment on the device; the reference draws from a DataLoader that augments per sample "
        "on the host, then copies to the device.",
        "- GFLOP/step: torch.utils.flop_counter.FlopCounterMode over one step (matmuls and convolutions, "
        "forward and backward); achieved FLOP/s = that count / the median step time. The reference's "
        "extra FLOPs are its parameter gradients in every attack step and the forwards listed below.",
        "- The reference computes the same math as our method (objective, steps, start, eval-mode "
        "student during the attack, outer loss); what it computes beyond ours, per method:",
    ]
    methods = dict.fromkeys(r.method for r in report.rows if not r.control)
    out += [f"  - {name}: {REFERENCE_NOTES[name]}" for name in methods]
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------------------------
# CLI

def _parse_methods(text: str) -> list[str]:
    if text == "all":
        return list(METHODS)
    if text == "none":
        return []
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown method(s) {unknown}; known: {', '.join(METHODS)}, all, none")
    return names


def _parse_ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated integers, e.g. 128,256") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: expected positive integers")
    return values


def _resolve_device(setting: str) -> torch.device:
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if setting == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but no CUDA device is available")
    return torch.device(setting)


def _default_out(device: torch.device) -> str:
    if device.type != "cuda":
        return "docs/bench_cpu.md"
    short = re.sub(r"[^a-z0-9]+", "_", torch.cuda.get_device_name(device).lower().replace("nvidia", "")).strip("_")
    return f"docs/bench_{short}.md"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m afm_ray.bench",
        description="Images/s of one training step of each method next to a plain reference step, "
                    "with peak memory and FLOP/s; writes a Markdown record. Unset options take the "
                    "device's defaults (CPU: small_cnn on 1x28x28, batch 128, PGD-3; CUDA: ResNet-18 "
                    "student, WRN-34-10 teacher, 3x32x32, batch 256, PGD-10).",
    )
    p.add_argument("--student", help="resnet18 | mobilenet_v2 | small_cnn (any afm_ray.models name); "
                   "comma-separated for several, e.g. resnet18,mobilenet_v2")
    p.add_argument("--student-width", type=int, help="width of the student (default: 16 for the CPU small_cnn, "
                   "else the architecture's)")
    p.add_argument("--teacher", help="wrn34_10 | resnet18 | small_cnn (any afm_ray.models name)")
    p.add_argument("--teacher-width", type=int, help="width of the teacher (default: 64 for the CPU small_cnn)")
    p.add_argument("--batch-sizes", type=_parse_ints, help="comma-separated, e.g. 128,256,512")
    p.add_argument("--steps", type=int, help="PGD steps of the training attack")
    p.add_argument("--image-size", type=int)
    p.add_argument("--channels", type=int, choices=(1, 3))
    p.add_argument("--eps", type=float, help="linf budget (default 0.3 grey, 8/255 RGB); step eps/4")
    p.add_argument("--methods", type=_parse_methods, default=list(METHODS), help="all | none | advfunmatch,rslad,...")
    p.add_argument("--policy", default="crop_flip", help="our step's BatchAugment policy (default crop_flip, "
                   "what the reference does)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--amp", choices=("auto", "off", "bf16"), default="auto",
                   help="bf16 autocast around our method call; auto = run.amp auto of training (bf16 on CUDA "
                        "and on CPUs with native bf16). The reference is always fp32")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=RunConfig.channels_last,
                   help=f"our step in channels_last (default: run.channels_last's default, {RunConfig.channels_last})")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=RunConfig.compile,
                   help=f"torch.compile our student (default: run.compile's default, {RunConfig.compile})")
    p.add_argument("--iters", type=int)
    p.add_argument("--warmup", type=int)
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (default: all cores)")
    p.add_argument("--ref-workers", type=int, help="DataLoader workers of the reference (default: CPU 0, CUDA 4)")
    p.add_argument("--ref-attack-grad", choices=("backward", "input"), default="backward",
                   help="reference attack gradient: loss.backward() (default) or autograd.grad w.r.t. x only")
    p.add_argument("--eval", action="store_true", help="also time PGD-20 and AutoAttack on the student")
    p.add_argument("--eval-batch-size", type=int, default=0, help="0 = chosen as training runs choose it (afm_ray.eval_batch)")
    p.add_argument("--aa-samples", type=int, help="images for the AutoAttack timing (default: CPU 64, CUDA 512)")
    p.add_argument("--no-augment", action="store_true", help="skip the augmentation-alone rows")
    p.add_argument("--control", default="funmatch",
                   help="method of the A/A control row (our step against a copy of itself), or none")
    p.add_argument("--out", help="Markdown file (default docs/bench_cpu.md or docs/bench_<gpu>.md)")
    return p


def config_from_args(args: argparse.Namespace, device: torch.device) -> tuple[BenchConfig, list[int]]:
    values = cpu_defaults() if device.type != "cuda" else cuda_defaults()
    given = {
        "student": args.student, "teacher": args.teacher, "steps": args.steps, "image_size": args.image_size,
        "channels": args.channels, "iters": args.iters, "warmup": args.warmup, "ref_workers": args.ref_workers,
    }
    values.update({k: v for k, v in given.items() if v is not None})
    # A width only carries over to the architecture it was chosen for.
    defaults = cpu_defaults() if device.type != "cuda" else cuda_defaults()
    for role in ("student", "teacher"):
        width = getattr(args, f"{role}_width")
        if width is not None:
            values[f"{role}_width"] = width
        elif values[role] != defaults[role]:
            values[f"{role}_width"] = None
    if args.eps is not None:
        values["eps"] = args.eps
    elif args.channels is not None:
        values["eps"] = 0.3 if values["channels"] == 1 else 8 / 255
    if args.compile and args.warmup is None:
        values["warmup"] = max(3, int(values["warmup"]))  # type: ignore[call-overload]
    batch_sizes = args.batch_sizes or [int(values["batch_size"])]  # type: ignore[arg-type]
    values["batch_size"] = batch_sizes[0]
    amp = "bf16" if amp_dtype_for(args.amp, device) is not None else "off"  # as training resolves run.amp
    cfg = BenchConfig(**values, policy=args.policy, device=str(device), amp=amp,  # type: ignore[arg-type]
                      channels_last=args.channels_last, compile=args.compile, ref_attack_grad=args.ref_attack_grad)
    return cfg, batch_sizes


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    device = _resolve_device(args.device)
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    # One config per student; all share the teacher, shapes and switches.
    configs = [config_from_args(argparse.Namespace(**{**vars(args), "student": student}), device)
               for student in (args.student.split(",") if args.student else [None])]
    cfg, batch_sizes = configs[0]
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    log(f"device {device}, torch.get_num_threads() = {torch.get_num_threads()}, batch sizes {batch_sizes}")

    machine = machine_info(device)
    peak, source, measured = device_peak_flops(device, cfg.amp)
    machine.peak_flops, machine.peak_source, machine.measured_flops = peak, source, measured
    machine.memory_method = CUDA_MEMORY_METHOD if device.type == "cuda" else (
        CPU_MEMORY_METHOD if _reset_rss_peak() else CPU_MEMORY_FALLBACK)
    log(f"peak {peak / 1e9:.1f} GFLOP/s ({source})")

    report = BenchReport(config=cfg, machine=machine,
                         command=" ".join(["python -m afm_ray.bench", *(sys.argv[1:] if argv is None else argv)]))
    control = None if args.control == "none" else args.control
    if control is not None and control not in METHODS:
        raise SystemExit(f"error: --control {control!r} is not a method; use one of {', '.join(METHODS)} or none")
    for i, (student_cfg, _) in enumerate(configs):  # the A/A control once, after the first student
        report.rows += bench_methods(student_cfg, args.methods, batch_sizes=batch_sizes, peak_flops=peak,
                                     control=control if i == 0 else None, progress=log)
    if not args.no_augment:
        reference_row = next((r for r in report.rows if r.method == "advfunmatch" and r.batch == cfg.batch_size),
                             report.rows[0] if report.rows else None)
        step_s = None if reference_row is None else reference_row.batch / reference_row.ours_ips
        report.share_of = "" if reference_row is None else f"our {reference_row.method} step"
        report.augment = bench_augment(cfg, step_seconds=step_s)
    if args.eval:
        aa_samples = args.aa_samples or (512 if device.type == "cuda" else 64)
        report.evals, report.eval_note = bench_eval(cfg, batch_size=args.eval_batch_size,
                                                    aa_samples=aa_samples, peak_flops=peak)
    machine.load_end = os.getloadavg()[0]
    if device.type == "cpu":
        # Measured again at the end, and the better of the two kept: on a shared machine one
        # measurement can land in a busy moment and understate the peak.
        peak_end, _, measured_end = device_peak_flops(device, cfg.amp)
        machine.measured_flops = {op: max(v, measured_end[op]) for op, v in measured.items()}
        if peak_end > peak:
            machine.peak_flops = peak_end
            for row in report.rows:
                row.peak_fraction = row.ours_flops_per_s / peak_end
            for e in report.evals:
                e.peak_fraction = None if e.flops_per_s is None else e.flops_per_s / peak_end

    text = to_markdown(report)
    out = Path(args.out or _default_out(device))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)
    log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
