"""How the benchmarks measure: the machine they ran on, time, memory and FLOPs.

Pure functions of a step callable and the device, shared by benchmarks/bench.py (the
performance record) and benchmarks/fidelity.py (which describes its machine the same way).
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import gc
import os
import platform
import re
import resource
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

__all__ = [
    "CPU_MEMORY_FALLBACK",
    "CPU_MEMORY_METHOD",
    "CUDA_MEMORY_METHOD",
    "GPU_PEAK_TFLOPS",
    "MachineInfo",
    "Timings",
    "count_flops",
    "device_peak_flops",
    "gpu_peak_flops",
    "machine_info",
    "paired_ratio_quartiles",
    "peak_memory",
    "reset_rss_peak",
    "sync",
    "time_steps",
]

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


@dataclass
class MachineInfo:
    """The machine a record was measured on, and what its peak FLOP/s and memory figures mean."""

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


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA kernels run asynchronously); a no-op on the CPU."""
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


def time_steps(
    steps: Mapping[str, Callable[[], object]], *, iters: int, warmup: int, device: torch.device
) -> dict[str, Timings]:
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
            sync(device)
            wall, cpu = time.perf_counter(), time.process_time()
            step()
            sync(device)
            times[name].wall.append(time.perf_counter() - wall)
            times[name].cpu.append(time.process_time() - cpu)
    return times


def paired_ratio_quartiles(slow: Sequence[float], fast: Sequence[float]) -> tuple[float, float, float]:
    """Lower quartile, median and upper quartile of slow[i] / fast[i] over interleaved iterations.

    Each pair ran back to back, so a change in background load cancels within a pair; the
    median of the pairs is steadier than the ratio of the two medians on a shared machine.
    """
    ratios = [s / f for s, f in zip(slow, fast, strict=True)]
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


def reset_rss_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


CPU_MEMORY_METHOD = (
    "peak RSS above the RSS before the step: VmHWM after resetting it through "
    "/proc/self/clear_refs, freed heap returned with malloc_trim first"
)
CPU_MEMORY_FALLBACK = "growth of getrusage ru_maxrss over the step (0 if an earlier step peaked higher)"
CUDA_MEMORY_METHOD = (
    "torch.cuda.max_memory_allocated over the step minus memory_allocated before it: what the "
    "step adds (activations, autograd graph, gradients, batch) on top of weights, optimizer "
    "state and data"
)


def peak_memory(step: Callable[[], object], device: torch.device) -> tuple[int, str]:
    """Peak bytes of one call and how they were measured (see the *_MEMORY_METHOD strings)."""
    gc.collect()
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        step()
        sync(device)
        return int(torch.cuda.max_memory_allocated(device)) - before, CUDA_MEMORY_METHOD
    _malloc_trim()
    try:
        before = _proc_status_kib("VmRSS")
        if reset_rss_peak():
            step()
            return max(0, _proc_status_kib("VmHWM") - before) * 1024, CPU_MEMORY_METHOD
    except (OSError, KeyError):
        pass
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    step()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024, CPU_MEMORY_FALLBACK


def matmul_flops_per_s(
    device: torch.device, dtype: torch.dtype = torch.float32, n: int = 2048, iters: int = 10
) -> float:
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
    seconds = min(
        time_steps({"conv": lambda: F.conv2d(x, w, padding=1)}, iters=iters, warmup=2, device=device)["conv"].wall
    )
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
        measured = {
            f"{matmul_n}x{matmul_n} matmul": matmul_flops_per_s(device, dtype, n=matmul_n),
            "3x3 conv 256->256 at 14x14": conv_flops_per_s(device, dtype),
        }
        source = (
            f"measured in this run: the faster of a {matmul_n}x{matmul_n} {label} matmul and a {label} "
            "3x3 256->256-channel convolution at 14x14, batch 128; best of 10 calls each, at the start and "
            "the end of the run; not a datasheet peak"
        )
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
        name=name,
        device=device.type,
        cores=os.cpu_count() or 1,
        threads=torch.get_num_threads(),
        torch_version=torch.__version__,
        python_version=platform.python_version(),
        date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        load_start=os.getloadavg()[0],
    )
