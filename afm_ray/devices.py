"""Which device a run uses, and which precision its training step runs in."""

from __future__ import annotations

import functools

import torch

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


def amp_dtype_for(setting: str, device: torch.device) -> torch.dtype | None:
    """run.amp -> the autocast dtype of the training step (None = fp32); see RunConfig.amp."""
    if setting == "bf16" or (setting == "auto" and (device.type == "cuda" or cpu_has_native_bf16())):
        return torch.bfloat16
    return None


@functools.lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 in hardware (AVX512-BF16 or AMX); elsewhere torch emulates
    it, slower than fp32."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:  # not Linux: no way to tell here, stay on fp32
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags
