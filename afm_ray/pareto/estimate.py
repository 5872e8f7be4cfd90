"""What re-running a sweep's trials will cost on the same cluster, from the sweep's own recorded times.

A confirmation (afm_ray.pareto.confirm) re-evaluates trials' students on N test images and retrains
their configs with new seeds; before it starts, it prints this estimate. Every figure comes from
what the sweep's trial runs logged in MLflow, measured on the cluster that would run the jobs:

- training: ``time/worker_s - time/eval_s`` of the trial (its epochs, validation included);
- evaluation on N images: the sum over the trial's attacks of N / ``eval/<attack>_images_per_s``
  (else ``time/eval_s`` scaled from the trial's ``eval/n_samples`` to N);
- Ray's own share of a trial (start-up, placement, tear-down, logging the student):
  ``time/trial_s - time/worker_s``, the median over the sweep's trials (a sweep that did not log
  ``time/trial_s`` gets `ASSUMED_RAY_S`); a re-evaluation, one Ray task, pays `REEVALUATE_START_S`.

The jobs run side by side as the cluster fits them (`slots`); the wall time is that of handing
them out in order to the first free slot. AutoAttack's time per image depends on how many images
stay robust, so a trial's own rate is the best predictor, and a rough one: treat it as +-30%.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence
from dataclasses import dataclass

import pandas as pd

from afm_ray.display import duration_text
from afm_ray.tracking.mlflow_runs import column

ASSUMED_RAY_S = 30.0  # Ray's share of a trial when the sweep did not log time/trial_s (2-core CPU, measured)
REEVALUATE_START_S = 5.0  # one Ray task: a worker process, the dataset read, the student fetched


@dataclass(frozen=True)
class JobCost:
    """One job's estimated seconds and what they are made of."""

    trial_run: str
    kind: str  # names.CONFIRM_KINDS
    train_s: float
    eval_s: float
    ray_s: float

    @property
    def seconds(self) -> float:
        return self.train_s + self.eval_s + self.ray_s


def _metric(row: pd.Series, key: str) -> float:
    value = row.get(f"metrics.{key}")
    return float(value) if value is not None and not pd.isna(value) else math.nan


def eval_seconds(row: pd.Series, images: float) -> float:
    """Seconds to evaluate the trial's student on ``images`` test images, at the trial's own rates."""
    attacks = [a.strip() for a in str(row.get("params.eval.attacks") or "").split(",") if a.strip()]
    rates = [_metric(row, f"eval/{a}_images_per_s") for a in attacks]
    if attacks and all(r > 0 for r in rates):
        return sum(images / r for r in rates)
    measured, n = _metric(row, "time/eval_s"), _metric(row, "eval/n_samples")
    return measured * images / n if n > 0 and measured >= 0 else math.nan


def ray_seconds(trials: pd.DataFrame) -> float:
    """Ray's median share of a trial of these runs' sweeps (`ASSUMED_RAY_S` where none was logged)."""
    overhead = (column(trials, "metrics.time/trial_s") - column(trials, "metrics.time/worker_s")).dropna()
    overhead = overhead[overhead >= 0]
    return float(overhead.median()) if len(overhead) else ASSUMED_RAY_S


def job_cost(row: pd.Series, kind: str, images: float, ray_s: float) -> JobCost:
    """The cost of one confirmation job of trial ``row`` (a `load_trials` row) on ``images`` images."""
    evaluation = eval_seconds(row, images)
    if kind == "reevaluate":
        return JobCost(row["run_id"], kind, 0.0, evaluation, REEVALUATE_START_S)
    train = _metric(row, "time/worker_s") - _metric(row, "time/eval_s")
    return JobCost(row["run_id"], kind, train, evaluation, ray_s)


def wall_seconds(costs: Sequence[float], slots: int) -> float:
    """Wall time of jobs handed out in order, each to the first free of ``slots`` slots."""
    free = [0.0] * max(1, slots)
    for cost in costs:
        start = heapq.heappop(free)
        heapq.heappush(free, start + cost)
    return max(free)


def slots_for(cluster: dict[str, float], cpus: float, gpus: float) -> int:
    """How many jobs of ``cpus`` CPUs and ``gpus`` GPUs the cluster runs at once (at least 1)."""
    fits = [cluster.get("CPU", 1.0) / max(cpus, 1e-9)]
    if gpus > 0:
        fits.append(cluster.get("GPU", 0.0) / gpus)
    return max(1, math.floor(min(fits) + 1e-9))


def describe(costs: Sequence[JobCost], slots: int, images: float) -> str:
    """The estimate's line: total wall time at ``slots`` at a time, and what one job of each kind takes."""
    if not costs:
        return "nothing to run"
    if any(math.isnan(c.seconds) for c in costs):
        return "not available: the sweep's trials did not log time/worker_s, time/eval_s and eval/n_samples"
    wall = wall_seconds([c.seconds for c in costs], slots)
    parts = []
    for kind, label in (("retrain", "a retrain"), ("reevaluate", "a re-evaluation")):
        mine = [c for c in costs if c.kind == kind]
        if not mine:
            continue
        train, evaluation, ray = (sum(getattr(c, f) for c in mine) / len(mine) for f in ("train_s", "eval_s", "ray_s"))
        what = [f"training {duration_text(train)}"] if kind == "retrain" else []
        what += [f"evaluation {duration_text(evaluation)} on {images:.0f} images", f"Ray {duration_text(ray)}"]
        parts.append(f"{label} ~{duration_text(train + evaluation + ray)} ({', '.join(what)})")
    return (
        f"~{duration_text(wall)} on this cluster, {slots} job(s) at a time, from the sweep's own recorded trial "
        f"times: {'; '.join(parts)}; treat it as +-30%"
    )
