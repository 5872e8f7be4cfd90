"""Numbers and configs as people read them: 4 significant digits, an l_inf budget on 8-bit images
as x/255, durations in s / min / h / days, device time in GPU-hours, and a method's
hyperparameters shown only where the method has them (no `method.tau=None` for PGD-AT).

Standard library only (and afm_ray.names): the sweep's lines, the dry run and the pareto table
all format through here, so a value reads the same everywhere.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

from afm_ray.names import METHOD_HPARAMS

# Datasets of 8-bit images whose l_inf budgets are written in 255ths (8/255); MNIST-like data
# conventionally writes them as decimals (0.3).
EPS_IN_255THS = ("cifar10", "cifar100", "parquet")
EPS_KEYS = ("attack.eps", "attack.step_size", "eval.eps")


def sig4(value: float) -> str:
    """4 significant digits: 0.1123, 1.799, 2.5e-05."""
    return f"{value:.4g}"


def eps_text(eps: float, data_name: str = "", norm: str = "linf") -> str:
    """An attack budget: '8/255' (or '8.23/255') on CIFAR-like data under l_inf, else 4 digits."""
    if norm == "linf" and data_name in EPS_IN_255THS:
        return f"{eps * 255:.3g}/255"
    return sig4(eps)


def method_uses(method: str, key: str) -> bool:
    """Whether config key ``key`` means something for ``method``: `method.tau` does not for PGD-AT."""
    section, _, field = key.partition(".")
    if section != "method" or field == "name" or method not in METHOD_HPARAMS:
        return True
    return field in METHOD_HPARAMS[method]


def value_text(key: str, value: Any, data_name: str = "", norm: str = "linf") -> str:
    """One config value: floats to 4 digits (budgets as x/255 where that is the unit), whole floats
    as integers ('2', not '2.0'), strings as given."""
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            return value
        if "." not in value and "e" not in value.lower():
            return value  # an integer written as one
        value = number
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if key in EPS_KEYS and value > 0:
        return eps_text(float(value), data_name, norm)
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return sig4(value) if isinstance(value, float) else str(value)


def config_text(config: Mapping[str, Any], keys: Iterable[str], sep: str = "  ") -> str:
    """``key=value`` of each of ``keys`` that ``config`` has, for people: no None, no hyperparameter the
    trial's method does not use; data.name and attack.norm (when present) choose how budgets read."""
    method = str(config.get("method.name", ""))
    data, norm = str(config.get("data.name", "")), str(config.get("attack.norm", "linf"))
    shown = []
    for key in keys:
        value = config.get(key)
        if value is None or value == "None" or (isinstance(value, float) and math.isnan(value)):
            continue
        if method_uses(method, key):
            shown.append(f"{key}={value_text(key, value, data, norm)}")
    return sep.join(shown)


def duration_text(seconds: float) -> str:
    """'40 s', '2.4 min', '12 min', '3.4 h', '2.1 days'."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 10 * 60:
        return f"{seconds / 60:.1f} min"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    if seconds < 48 * 3600:
        return f"{seconds / 3600:.2g} h" if seconds < 10 * 3600 else f"{seconds / 3600:.0f} h"
    return f"{seconds / 86400:.2g} days"


def gpu_hours_text(hours: float) -> str:
    """'0.52 GPU-h', '12 GPU-h', '1,800 GPU-h'."""
    if hours >= 100:
        return f"{hours:,.0f} GPU-h"
    return f"{hours:.2g} GPU-h" if hours < 10 else f"{hours:.0f} GPU-h"
