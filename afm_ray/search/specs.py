"""A search space's `sampler:`, `scheduler:` and `resources:` as typed, validated specs (no Optuna, no Ray).

Samplers: `tpe` (the default: Optuna's multi-objective TPE, `multivariate` and `group` for the
conditional keys, `constant_liar` so that trials running side by side do not all ask for the same
point, after `n_startup_trials` random trials), `nsga2`, `random`, and `grid` (every point of a finite space
once, for studies).

Schedulers (run by afm_ray.sweep.schedulers): `fifo`, `asha` (one objective), `mo_asha`
(several, afm_ray.search.mo_asha). afm_ray.search.samplers builds the Optuna sampler.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from afm_ray.errors import ConfigError, unknown_value
from afm_ray.names import PER_EPOCH_METRICS, Objective

SAMPLERS = ("tpe", "nsga2", "random", "grid")
SAMPLER_FIELDS = {
    "tpe": ("name", "n_startup_trials"),
    "nsga2": ("name", "population_size"),
    "random": ("name",),
    "grid": ("name",),
}
SCHEDULERS = ("fifo", "asha", "mo_asha")
SCHEDULER_FIELDS = {
    "fifo": ("name",),
    "asha": ("name", "metric", "mode", "grace_period", "reduction_factor"),
    "mo_asha": ("name", "metrics", "grace_period", "reduction_factor", "margin"),
}


@dataclass(frozen=True)
class SamplerSpec:
    name: str  # tpe | nsga2 | random | grid
    n_startup_trials: int | None = None  # tpe: random trials before the model is used
    population_size: int | None = None  # nsga2: trials per generation

    def random_trials(self, num_samples: int) -> int:
        """How many of ``num_samples`` trials are drawn at random before a model is used (a grid draws none)."""
        startup = {"tpe": self.n_startup_trials, "nsga2": self.population_size, "grid": 0}.get(self.name, num_samples)
        return min(int(startup or 0), num_samples)


@dataclass(frozen=True)
class SchedulerSpec:
    name: str  # fifo | asha | mo_asha
    metrics: tuple[str, ...] = ()  # per-epoch metrics ranked at each rung (asha: exactly one)
    mode: str = "max"  # asha: the direction of its one metric (mo_asha maximises every metric)
    grace_period: int = 1  # epochs before the first rung
    reduction_factor: float = 3.0  # 1/reduction_factor of the trials at a rung go on
    margin: float = 0.0  # mo_asha: also go on unless led by >= margin in every metric (afm_ray.search.mo_asha)

    @property
    def halving(self) -> bool:
        return self.name in ("asha", "mo_asha")


GIB = 1024**3  # `memory_per_worker` is in GiB; Ray counts its `memory` resource in bytes


@dataclass(frozen=True)
class TrialResources:
    """What one trial's Ray Train run asks for: its workers and each worker's share of a node."""

    num_workers: int = 1
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    memory_per_worker: float = 0.0  # GiB of Ray's `memory` resource (0: none asked)

    @property
    def cpus(self) -> float:
        return self.num_workers * self.cpus_per_worker

    @property
    def gpus(self) -> float:
        return self.num_workers * self.gpus_per_worker

    def worker_bundle(self) -> dict[str, float]:
        """One Train worker's request in Ray's resource names (memory in bytes); what it does not ask, absent."""
        bundle = {"CPU": self.cpus_per_worker, "GPU": self.gpus_per_worker, "memory": self.memory_per_worker * GIB}
        return {name: amount for name, amount in bundle.items() if amount > 0}


RESOURCE_KEYS = tuple(TrialResources.__dataclass_fields__)


def parse_resources(raw: Any, where: str) -> TrialResources:
    spec = _mapping(raw or {}, f"{where}: resources")
    for key in spec:
        if key not in RESOURCE_KEYS:
            raise unknown_value(f"{where}: unknown resources field", key, RESOURCE_KEYS)
    for key, value in spec.items():
        _check_resource(key, value, f"{where}: resources.{key}")
    return TrialResources(**_typed(spec))


def override_resources(resources: TrialResources, flags: Mapping[str, Any]) -> TrialResources:
    """`resources` with the sweep's per-worker flags applied (`flags` by field name: --cpus-per-worker
    is `cpus_per_worker`), each validated like the space's own field."""
    for key, value in flags.items():
        _check_resource(key, value, "--" + key.replace("_", "-"))
    return dataclasses.replace(resources, **_typed(flags))


def _check_resource(key: str, value: Any, label: str) -> None:
    if key == "num_workers":
        positive_int(value, label)
    elif not is_number(value) or value < 0:
        raise ConfigError(f"{label}: expected a number >= 0, got {value!r}")


def _typed(spec: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v if k == "num_workers" else float(v) for k, v in spec.items()}


def default_startup_trials(num_samples: int) -> int:
    """Random trials before a model-based sampler uses what it learned: a third of the budget,
    at least 2 and at most 10 (Optuna's own TPE default)."""
    return max(2, min(10, num_samples // 3))


def parse_sampler(raw: Any, num_samples: int, where: str) -> SamplerSpec:
    spec = _mapping(raw or {"name": "tpe"}, f"{where}: sampler")
    name = spec.get("name", "tpe")
    if name not in SAMPLERS:
        raise unknown_value(f"{where}: sampler.name", name, SAMPLERS)
    for key in spec:
        if key not in SAMPLER_FIELDS[name]:
            raise unknown_value(f"{where}: unknown sampler field for {name}", key, SAMPLER_FIELDS[name])
    if name == "tpe":
        startup = spec.get("n_startup_trials", default_startup_trials(num_samples))
        return SamplerSpec(name, n_startup_trials=positive_int(startup, f"{where}: sampler.n_startup_trials"))
    if name == "nsga2":
        # A generation must fit the budget at least twice, or NSGA-II never leaves its random first one.
        size = spec.get("population_size", max(2, num_samples // 4))
        if not isinstance(size, int) or isinstance(size, bool) or size < 2:
            raise ConfigError(f"{where}: sampler.population_size: expected an integer >= 2, got {size!r}")
        return SamplerSpec(name, population_size=size)
    return SamplerSpec(name)


def parse_scheduler(raw: Any, objectives: Sequence[Objective], where: str) -> SchedulerSpec:
    spec = _mapping(raw or {"name": "fifo"}, f"{where}: scheduler")
    name = spec.get("name", "fifo")
    if name not in SCHEDULERS:
        raise unknown_value(f"{where}: scheduler.name", name, SCHEDULERS)
    for key in spec:
        if key not in SCHEDULER_FIELDS[name]:
            raise unknown_value(f"{where}: unknown scheduler field", key, SCHEDULER_FIELDS[name])
    if name == "fifo":
        return SchedulerSpec(name)
    if name == "asha":
        if len(objectives) != 1:
            raise ConfigError(
                f"{where}: scheduler asha needs a single objective (ASHA ranks trials on one metric); "
                f"got {len(objectives)} objectives; use mo_asha for several"
            )
        metrics = [spec.get("metric", "val/pgd10_acc")]
        mode = spec.get("mode", "max")
        if mode not in ("max", "min"):
            raise ConfigError(f"{where}: scheduler.mode must be max or min, got {mode!r}")
        if metrics[0] not in PER_EPOCH_METRICS:
            raise unknown_value(
                f"{where}: scheduler.metric must be reported every epoch; unknown", metrics[0], PER_EPOCH_METRICS
            )
    else:
        # Validation clean and PGD accuracy, every epoch: the proxies of clean and AutoAttack accuracy.
        metrics, mode = spec.get("metrics", list(PER_EPOCH_METRICS)), "max"
        if not isinstance(metrics, list) or not metrics or len(set(metrics)) != len(metrics):
            raise ConfigError(
                f"{where}: scheduler.metrics must be a list of distinct per-epoch metrics, got {metrics!r}"
            )
        for metric in metrics:
            if metric not in PER_EPOCH_METRICS:
                raise unknown_value(f"{where}: scheduler.metrics: not reported every epoch:", metric, PER_EPOCH_METRICS)
    grace = positive_int(spec.get("grace_period", 1), f"{where}: scheduler.grace_period")
    factor = spec.get("reduction_factor", 2 if name == "asha" else 3)
    if not (is_number(factor) and factor > 1):
        raise ConfigError(f"{where}: scheduler.reduction_factor must be > 1, got {factor!r}")
    margin = spec.get("margin", 0.0)
    if not (is_number(margin) and 0 <= margin < 1):
        raise ConfigError(f"{where}: scheduler.margin must be an accuracy difference in [0, 1), got {margin!r}")
    return SchedulerSpec(name, tuple(metrics), mode, grace, float(factor), float(margin))


def _mapping(value: Any, label: str) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        raise ConfigError(f"{label}: expected a mapping, got {value!r}")
    return dict(value)


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def positive_int(value: Any, label: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{label}: expected an integer >= 1, got {value!r}")
    return value
