"""Which device a run uses, where a worker sits among its peers, and which precision its training step runs in."""

from __future__ import annotations

import contextlib
import functools
import os
import platform
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from afm_ray.errors import ConfigError


def resolve_device(setting: str) -> torch.device:
    """run.device -> a torch device: auto = CUDA when present, else the CPU."""
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(setting)
    except RuntimeError:
        raise ConfigError(f"run.device: got {setting!r}, expected auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"run.device: {setting!r} requested but no CUDA device is available; use auto or cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(
                f"run.device: {setting!r} but this machine has {torch.cuda.device_count()} CUDA "
                f"device(s); use cuda:0 .. cuda:{torch.cuda.device_count() - 1}"
            )
    return device


@dataclass
class WorkerContext:
    rank: int
    world_size: int
    device: torch.device


def worker_context(device_setting: str, device: torch.device | None = None) -> WorkerContext:
    """Rank and world size from torch.distributed; `device` (the Ray worker's) wins if given."""
    initialized = dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if initialized else (0, 1)
    return WorkerContext(rank, world, device if device is not None else resolve_device(device_setting))


def all_reduce_sum(t: torch.Tensor, world_size: int) -> torch.Tensor:
    """`t` summed over the workers, in place (itself on a single worker)."""
    if world_size > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def amp_dtype_for(setting: str, device: torch.device) -> torch.dtype | None:
    """run.amp -> the autocast dtype of the training step (None = fp32); see RunConfig.amp."""
    if setting == "bf16" or (setting == "auto" and (device.type == "cuda" or cpu_has_native_bf16())):
        return torch.bfloat16
    return None


# oneDNN ISA caps (ONEDNN_MAX_CPU_ISA) below its bf16 kernels.
_ONEDNN_ISAS_WITHOUT_BF16 = {"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI"}


@functools.lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """Whether torch computes bf16 in hardware here (AVX512-BF16 or AMX); elsewhere it emulates
    it, slower than fp32. The CPU must have the instructions, and neither torch's kernels
    (ATEN_CPU_CAPABILITY) nor oneDNN's (ONEDNN_MAX_CPU_ISA) may be capped below them: a capped
    machine emulates bf16 (measured: a benchmark that takes seconds ran for over 15 minutes)."""
    if os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper() in _ONEDNN_ISAS_WITHOUT_BF16:
        return False
    if "AVX512" not in torch.backends.cpu.get_cpu_capability():
        return False
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:  # not Linux: no way to tell here, stay on fp32
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def cpu_model_name() -> str:
    """The CPU's model name (Linux /proc/cpuinfo), else what `platform` knows: for records of
    where a figure was measured."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()
