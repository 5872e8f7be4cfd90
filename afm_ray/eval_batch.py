"""Evaluation batch sizes that fill the device (`eval.batch_size: 0`, the default).

An evaluation attack holds one forward + input-gradient graph of the model per batch, so its
memory grows linearly with the batch, and its speed depends on the batch very differently per
device:

- CUDA: bigger is better until memory runs out. The per-image peak is measured at two small
  batches (the difference cancels fixed costs such as cuDNN workspaces), and the batch is the
  largest power of two whose graph fits in a share of the free memory. An attack that still
  runs out of memory halves its batch and goes on (attacks.robust_predictions).
- CPU: memory rarely binds, and large batches are SLOWER per image (measured on the 2-core dev
  machine, ResNet-18 at 32x32: 8.9 ms per image at batch 16-32, 18 ms at 256), so the batch
  is the largest one within 5% of the best per-image time among powers of two, probed with
  timed forward + input-gradient passes.

Either way the batch never exceeds the number of images to attack.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from afm_ray.models import eval_mode

# Share of the free device memory an evaluation batch may plan for: AutoAttack keeps a few
# per-image buffers beside the graph, and the allocator needs room to fragment.
CUDA_MEMORY_SHARE = 0.6
CPU_MEMORY_SHARE = 0.25
# CPU probing: sizes tried, and when to stop (a probe this slow is already past the knee).
CPU_PROBE_SIZES = (16, 32, 64, 128, 256, 512, 1024)
CPU_PROBE_MAX_SECONDS = 2.0
CPU_NEAR_BEST = 1.05
LARGEST = 4096


@dataclass(frozen=True)
class BatchChoice:
    batch_size: int
    reason: str  # one line saying what bound the choice, for logs and the bench record


def _attack_pass(model: nn.Module, x: torch.Tensor) -> None:
    """One forward and input-gradient pass, what each attack step costs (no parameter grads)."""
    x = x.detach().requires_grad_(True)
    loss = model(x).float().logsumexp(dim=1).sum()
    torch.autograd.grad(loss, x)


def _probe_input(batch: int, image_shape: tuple[int, ...], device: torch.device, channels_last: bool) -> torch.Tensor:
    # Its own generator: how many probes run depends on timing, the caller's RNG stream must not.
    x = torch.rand(batch, *image_shape, generator=torch.Generator().manual_seed(0)).to(device)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def _cuda_bytes_per_image(
    model: nn.Module, image_shape: tuple[int, ...], device: torch.device, channels_last: bool, probe: int = 16
) -> float:
    # Warm-up first: cuBLAS/cuDNN allocate workspaces on their first call, which would
    # otherwise land in the first probe only and shrink the measured slope.
    _attack_pass(model, _probe_input(probe, image_shape, device, channels_last))
    peaks = []
    for batch in (probe, 2 * probe):
        x = _probe_input(batch, image_shape, device, channels_last)
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        _attack_pass(model, x)
        torch.cuda.synchronize(device)
        peaks.append(torch.cuda.max_memory_allocated(device) - base)
        del x
    slope = (peaks[1] - peaks[0]) / probe
    return slope if slope > 0 else peaks[1] / (2 * probe)  # no growth measured: the plain average


def _saved_bytes_per_image(
    model: nn.Module, image_shape: tuple[int, ...], device: torch.device, channels_last: bool, probe: int = 4
) -> float:
    """Bytes autograd saves per image for the backward pass: the activation footprint."""
    saved = [0]

    def count(t: torch.Tensor) -> torch.Tensor:
        saved[0] += t.numel() * t.element_size()
        return t

    totals = []
    for batch in (probe, 2 * probe):
        saved[0] = 0
        with torch.autograd.graph.saved_tensors_hooks(count, lambda t: t):
            _attack_pass(model, _probe_input(batch, image_shape, device, channels_last))
        totals.append(saved[0])
    return max(totals[1] - totals[0], 1) / probe


def _available_ram_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import os

    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _floor_pow2(n: float) -> int:
    return 1 << max(0, int(n).bit_length() - 1) if n >= 1 else 1


def choose_eval_batch_size(
    model: nn.Module,
    image_shape: tuple[int, ...],
    device: torch.device | str,
    *,
    n_images: int,
    largest: int = LARGEST,
    channels_last: bool = False,
) -> BatchChoice:
    """The batch size for attacking `n_images` images of `image_shape` with `model` on `device`.

    The model's train/eval flags and its parameters' gradients are left as they were.
    """
    device = torch.device(device)
    if n_images < 1:
        raise ValueError(f"n_images={n_images} must be >= 1")
    cap = min(largest, n_images)
    with eval_mode((model,)):
        if device.type == "cuda":
            return _choose_cuda(model, image_shape, device, cap, channels_last)
        return _choose_cpu(model, image_shape, device, cap, channels_last)


def _choose_cuda(
    model: nn.Module, image_shape: tuple[int, ...], device: torch.device, cap: int, channels_last: bool
) -> BatchChoice:
    per_image = _cuda_bytes_per_image(model, image_shape, device, channels_last)
    free, _ = torch.cuda.mem_get_info(device)
    usable = free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    fits = _floor_pow2(CUDA_MEMORY_SHARE * usable / max(per_image, 1.0))
    batch = min(cap, fits)
    bound = "all images in one batch" if batch == cap and cap < fits else f"{CUDA_MEMORY_SHARE:.0%} of free memory"
    return BatchChoice(
        batch, f"batch {batch}: {bound} ({per_image / 2**20:.2f} MiB per image measured, {usable / 2**30:.1f} GiB free)"
    )


def _choose_cpu(
    model: nn.Module, image_shape: tuple[int, ...], device: torch.device, cap: int, channels_last: bool
) -> BatchChoice:
    # Saved activations, their gradients and the transients of one layer: ~3x the saved bytes.
    per_image = 3 * _saved_bytes_per_image(model, image_shape, device, channels_last)
    memory_cap = max(1, int(CPU_MEMORY_SHARE * _available_ram_bytes() / per_image))
    sizes = [b for b in CPU_PROBE_SIZES if b <= min(cap, memory_cap)] or [min(cap, memory_cap)]
    if cap < sizes[-1] * 2 and cap <= min(CPU_PROBE_SIZES[-1], memory_cap) and cap not in sizes:
        sizes.append(cap)  # one batch holding every image is a candidate of its own
    per_image_s: dict[int, float] = {}
    _attack_pass(model, _probe_input(sizes[0], image_shape, device, channels_last))  # warm-up
    for batch in sizes:
        x = _probe_input(batch, image_shape, device, channels_last)
        seconds = _timed_attack_pass(model, x)
        if seconds <= CPU_PROBE_MAX_SECONDS:
            seconds = min(seconds, _timed_attack_pass(model, x))  # best of two: timing noise
        per_image_s[batch] = seconds / batch
        best = min(per_image_s.values())
        if seconds > CPU_PROBE_MAX_SECONDS or per_image_s[batch] > 1.5 * best:
            break  # past the knee: larger batches only get slower
    # The largest batch within 5% of the fastest: fewer batches, less per-batch attack overhead.
    best = min(per_image_s.values())
    batch = max(b for b, t in per_image_s.items() if t <= CPU_NEAR_BEST * best)
    timings = ", ".join(f"{b}: {1e3 * t:.2f}" for b, t in per_image_s.items())
    return BatchChoice(batch, f"batch {batch}: fastest per image on cpu (ms per image by batch: {timings})")


def _timed_attack_pass(model: nn.Module, x: torch.Tensor) -> float:
    started = time.perf_counter()
    _attack_pass(model, x)
    return time.perf_counter() - started


def resolve_eval_batch_size(
    setting: int,
    model: nn.Module,
    image_shape: tuple[int, ...],
    device: torch.device | str,
    *,
    n_images: int,
    channels_last: bool = False,
    log: Callable[[str], None] | None = None,
) -> int:
    """`eval.batch_size` as configured (>= 1), or chosen for this model and device (0)."""
    if setting >= 1:
        return setting
    choice = choose_eval_batch_size(model, image_shape, device, n_images=max(1, n_images), channels_last=channels_last)
    if log is not None:
        log(f"evaluation {choice.reason}")
    return choice.batch_size
