"""What the final stage will run, resolved before anything starts (no Ray): the configurations (a
sweep's front, named trials, or recipes), each with --set overrides on top, K seeds each, and what
that costs.

A configuration taken from a trial keeps the trial's whole recorded config (afm_ray.tracking.run_config)
and its sweep's resources and storage; one taken from a recipe (afm_ray.final.recipes) keeps the
recipe's. Every (configuration, seed) is one job: a Ray Train run of the full schedule, then clean
and AutoAttack accuracy on the test images (afm_ray.final.evaluation).

The cost is afm_ray.cost's accounting: FLOPs per job, then device hours and dollars on each GPU of
the shipped clusters (cost.DEVICES), or CPU seconds. Where the configuration comes from a trial
that recorded its own wall time (`time/worker_s`), the time on this cluster is also estimated from
that: the trial's seconds per FLOP, scaled to the job's FLOPs.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd
from mlflow import MlflowClient

from afm_ray import names
from afm_ray.config import ExperimentConfig, apply_overrides, from_flat
from afm_ray.cost import (
    CPU_GFLOPS_EVAL,
    CPU_GFLOPS_TRAIN,
    CPU_TRIAL_OVERHEAD_S,
    DEVICES,
    EVAL_RATE_FRACTION,
    eval_flops_per_image,
    trial_flops,
)
from afm_ray.errors import ConfigError, TrackingError
from afm_ray.final.recipes import Published, Recipe, published_for, run_space
from afm_ray.names import Objective
from afm_ray.pareto.ranking import rank_trials
from afm_ray.search.space import SearchSpace
from afm_ray.tracking.mlflow_runs import column, search_runs, sweep_objectives, tag_column, trial_filter
from afm_ray.tracking.run_config import sweep_space, trial_config

SEED_STRIDE = 1000  # seed i of a configuration with run.seed s is s + 1000 * i (i = 0 keeps the trial's own)
FINAL_ATTACKS = ("clean", "aa")  # what every student is scored on: clean and AutoAttack standard


@dataclass(frozen=True)
class Configuration:
    """One configuration to train for the full schedule: from a trial run, or from a recipe."""

    key: str  # the trial's run id, or "recipe:<name>": what its final runs are tagged with
    label: str  # what a user reads: "run 1a2b3c4d (trial 917f2149)" or "recipe rslad_cifar10_resnet18"
    space: SearchSpace  # fixed: the whole config, overrides applied; resources; max_failures
    storage: str  # its Train runs and AutoAttack states live under <storage>/final/
    trial_run: str | None = None
    recipe: Recipe | None = None
    calibration: tuple[float, float] | None = None  # (FLOPs, seconds) of the trial as its sweep ran it
    # sha256 prefix of the config as planned, the seed aside: a --set that changes the config makes new
    # runs; kept when a teacher to train is replaced by its path, so reruns find the same runs
    identity: str = ""

    def __post_init__(self) -> None:
        if not self.identity:
            flat = {k: v for k, v in self.space.fixed.items() if k != "run.seed"}
            digest = hashlib.sha256(json.dumps(flat, sort_keys=True, default=str).encode()).hexdigest()[:12]
            object.__setattr__(self, "identity", digest)

    @functools.cached_property
    def cfg(self) -> ExperimentConfig:
        return self.space.base

    def seeds(self, k: int) -> list[int]:
        return [self.cfg.run.seed + SEED_STRIDE * i for i in range(k)]

    def job_name(self, seed: int) -> str:
        """The Train run's name and the AutoAttack state's folder: stable, so a rerun continues them."""
        short = self.key.removeprefix("recipe:") if self.recipe else self.key[:8]
        return f"final-{short}-{self.identity[:8]}-seed{seed}"

    def published(self) -> tuple[Recipe, Published] | None:
        return published_for(self.cfg)


def from_recipes(recipes: Sequence[Recipe], overrides: Mapping[str, Any], storage: str) -> list[Configuration]:
    out = []
    for recipe in recipes:
        out.append(
            Configuration(
                key=f"recipe:{recipe.name}",
                label=f"recipe {recipe.name}",
                space=recipe.space(overrides),
                storage=storage,
                recipe=recipe,
            )
        )
    return out


def experiment_id(client: MlflowClient, experiment: str) -> str:
    exp = client.get_experiment_by_name(experiment)
    if exp is None and experiment.isdigit():
        exp = client.get_experiment(experiment)
    if exp is None:
        known = ", ".join(sorted(e.name for e in client.search_experiments(max_results=50))) or "none"
        raise TrackingError(f"--experiment: experiment {experiment!r} not found (experiments: {known})")
    if exp.lifecycle_stage == "deleted":
        raise TrackingError(f"--experiment: experiment {experiment!r} is deleted")
    return exp.experiment_id


def select_trials(trials: pd.DataFrame, refs: Sequence[str], experiment: str) -> pd.DataFrame:
    """The trial runs named by ``refs``: a run id, a unique run id prefix, a run name or a Tune trial id."""
    if trials.empty:
        raise TrackingError(f"--trial {refs[0]!r}: experiment {experiment!r} has no trial runs; run a sweep first")
    picked = []
    tune_ids = column(trials, tag_column(names.TRIAL_ID_TAG)).astype("string")
    run_names = column(trials, "tags.mlflow.runName").astype("string")
    for ref in refs:
        hits = trials[
            (trials["run_id"] == ref)
            | trials["run_id"].str.startswith(ref)
            | (run_names == ref).fillna(False)
            | (tune_ids == ref).fillna(False)
        ]
        if len(hits) != 1:
            why = "matches no trial run" if hits.empty else f"matches {len(hits)} trial runs"
            raise TrackingError(
                f"--trial {ref!r}: {why} of experiment {experiment!r} (give a run id, a unique prefix, a run name or "
                f"a Tune trial id; it has {len(trials)} trial run(s)"
                + (", e.g. " + trials["run_id"].iloc[0] + ")" if len(trials) else ")")
            )
        picked.append(hits.iloc[0])
    return pd.DataFrame(picked).drop_duplicates("run_id")


def front_trials(client: MlflowClient, trials: pd.DataFrame) -> pd.DataFrame:
    """The Pareto front of ``trials`` on the objectives their sweep recorded (else clean and AutoAttack)."""
    objectives = sweep_objectives(client, trials) or Objective.parse_all(("aa_acc:max", "clean_acc:max"))
    ranked = rank_trials(trials, objectives)
    front = ranked[ranked["pareto"]]
    if front.empty:
        raise TrackingError(
            "no trial is on the front (no completed trial with its objectives); name trials with --trial"
        )
    return front


def from_trials(
    client: MlflowClient,
    experiment: str,
    refs: Sequence[str],
    overrides: Mapping[str, Any],
    storage: str | None,
    *,
    sweep: str | None = None,
) -> list[Configuration]:
    """Configurations of the named trials (``refs``) or, with none named, of the front of the experiment's
    trials (of one sweep if ``sweep`` is a parent run id)."""
    exp_id = experiment_id(client, experiment)
    trials = search_runs(client, exp_id, trial_filter(None, sweep))
    if refs:
        chosen = select_trials(trials, refs, experiment)
    else:
        if trials.empty:
            raise TrackingError(f"experiment {experiment!r} has no trial runs; run a sweep first, or use --recipe")
        chosen = front_trials(client, trials)
    spaces: dict[str, tuple[SearchSpace, str]] = {}
    out = []
    for _, row in chosen.iterrows():
        flat = trial_config(row)
        parent = row.get(tag_column(names.PARENT_TAG))
        if not isinstance(parent, str) or not parent:
            raise TrackingError(
                f"trial run {row['run_id']} has no sweep run ({names.PARENT_TAG}): cannot tell its resources"
            )
        if parent not in spaces:
            spaces[parent] = sweep_space(client, parent)
        swept, sweep_storage = spaces[parent]
        apply_overrides(flat, overrides, source=f"trial run {row['run_id']}")  # a bad --set fails here, in one line
        fixed = {**flat, **overrides}
        tune_id = row.get(tag_column(names.TRIAL_ID_TAG))
        out.append(
            Configuration(
                key=str(row["run_id"]),
                label=f"run {row['run_id'][:8]}" + (f" (trial {tune_id})" if isinstance(tune_id, str) else ""),
                space=run_space(f"trial-{row['run_id'][:8]}", fixed, swept.resources, swept.max_failures),
                storage=(storage or sweep_storage).rstrip("/"),
                trial_run=str(row["run_id"]),
                calibration=_calibration(flat, row),
            )
        )
    return out


def _calibration(flat: Mapping[str, Any], row: pd.Series) -> tuple[float, float] | None:
    """(FLOPs, seconds) of the trial as its sweep ran it, when it recorded its worker's wall time."""
    seconds = row.get("metrics.time/worker_s")
    if seconds is None or not isinstance(seconds, float) or math.isnan(seconds) or seconds <= 0:
        return None
    cfg = from_flat(flat)
    attacks = [a for a in cfg.eval_attacks if a != "aa" or pd.notna(row.get("metrics.aa_acc"))]
    flops = job_flops(cfg, attacks)
    return (flops["train"] + flops["evaluation"], float(seconds)) if flops else None


def job_flops(cfg: ExperimentConfig, attacks: Sequence[str] = FINAL_ATTACKS) -> dict[str, float] | None:
    """Training (with per-epoch validation) and evaluation FLOPs of one job of ``cfg``, scored with
    ``attacks`` on its ``eval.samples`` test images; None when the data's shapes are unknown before
    reading them (parquet)."""
    f = trial_flops(cfg, {cfg.method.name: 1.0}, float(cfg.attack.steps))
    if f is None:
        return None
    train = (f["train_flops_per_epoch"] + f["val_flops_per_epoch"]) * f["epochs"]
    evaluation = f["eval_images"] * eval_flops_per_image(attacks, f["student_forward_flops"])
    return {"train": train, "evaluation": evaluation, "images": f["eval_images"]}


def job_cost(config: Configuration, samples: int) -> dict[str, Any]:
    """What one job of ``config`` costs: FLOPs, hours and dollars on each GPU of cost.DEVICES (GPU
    configurations) or CPU hours, and the hours calibrated on the trial's own wall time if recorded."""
    cfg = from_flat({**config.space.fixed, "eval.samples": samples})
    flops = job_flops(cfg)
    if flops is None:
        return {"available": False, "reason": f"data.name {cfg.data.name}: image shapes are known only once read"}
    r = config.space.resources
    out: dict[str, Any] = {"available": True, "flops": flops, "gpus": r.gpus, "devices": {}}
    if r.gpus_per_worker > 0:
        for device in DEVICES:
            rate = device.train_tflops * 1e12 * r.gpus
            hours = (flops["train"] / rate + flops["evaluation"] / (rate * EVAL_RATE_FRACTION)) / 3600
            spot, on_demand = device.usd_per_hour
            out["devices"][device.name] = {
                "hours": hours,
                "gpu_hours": hours * r.gpus,
                "usd": (hours * r.gpus * spot, hours * r.gpus * on_demand),
            }
    else:
        seconds = (
            CPU_TRIAL_OVERHEAD_S
            + flops["train"] / (CPU_GFLOPS_TRAIN * 1e9 * r.cpus)
            + flops["evaluation"] / (CPU_GFLOPS_EVAL * 1e9 * r.cpus)
        )
        out["devices"]["cpu"] = {"hours": seconds / 3600, "gpu_hours": 0.0, "usd": None}
    if config.calibration:
        trial_flops_, trial_s = config.calibration
        out["calibrated_hours"] = (flops["train"] + flops["evaluation"]) * trial_s / trial_flops_ / 3600
    return out


def check_samples(samples: int) -> None:
    if samples < 0:
        raise ConfigError(f"--samples {samples}: expected >= 0 (0 = the whole test split)")


def check_seeds(seeds: int) -> None:
    if seeds < 1:
        raise ConfigError(f"--seeds {seeds}: expected >= 1 (seeds per configuration; 3 gives an interval over seeds)")


def _hours(hours: float) -> str:
    return f"{hours:.3g} h" if hours >= 1 else f"{hours * 60:.3g} min"


def format_plan(configs: Sequence[Configuration], seeds: int, samples: int) -> str:
    """The plan printed before any work: each configuration with its budget, seeds, images and the
    published number to compare with, then each job's and the whole stage's estimated cost."""
    totals: dict[str, list[float]] = {}
    lines = [f"final stage: {len(configs)} configuration(s) x {seeds} seed(s) = {len(configs) * seeds} job(s)"]
    calibrated = 0.0
    for config in configs:
        cfg = from_flat({**config.space.fixed, "eval.samples": samples})
        cost = job_cost(config, samples)
        images = f"{cost['flops']['images']:.0f}" if cost.get("available") else ("all" if not samples else str(samples))
        published = config.published()
        pub = (
            f"published AutoAttack {100 * published[1].aa_acc:.2f}% ({published[0].name})"
            if published
            else "no published number for this setting"
        )
        r, seed_list = config.space.resources, ", ".join(map(str, config.seeds(seeds)))
        lines += [
            f"  {config.label}: {cfg.method.name}, {cfg.student.arch} <- {cfg.teacher.arch}, "
            f"{cfg.optim.epochs} epochs, eps {cfg.train_eps:.4g} train / {cfg.eval_eps:.4g} eval; seeds {seed_list}; "
            f"clean + AutoAttack on {images} test images; {pub}",
            f"    resources per job: {r.num_workers} worker(s) x ({r.cpus_per_worker:g} CPU, "
            f"{r.gpus_per_worker:g} GPU); runs under {redact(config.storage)}/final",
        ]
        if config.recipe and config.recipe.not_applied:
            keys = ", ".join(f"{k}={v}" for k, v in config.recipe.not_applied.items())
            lines.append(f"    not applied (this build's config has no such key yet): {keys}")
        if not cost.get("available"):
            lines.append(f"    cost: not available ({cost['reason']})")
            continue
        f = cost["flops"]
        each = []
        for device, d in cost["devices"].items():
            usd = f" (${d['usd'][0]:.2f} spot / ${d['usd'][1]:.2f} on-demand)" if d["usd"] else ""
            each.append(f"{device} {_hours(d['hours'])}{usd}")
            t = totals.setdefault(device, [0.0, 0.0, 0.0, 0.0])
            t[0] += d["hours"] * seeds
            t[1] += d["gpu_hours"] * seeds
            if d["usd"]:
                t[2] += d["usd"][0] * seeds
                t[3] += d["usd"][1] * seeds
        lines.append(
            f"    per job: {f['train'] / 1e12:.3g} TFLOP training, {f['evaluation'] / 1e12:.3g} TFLOP evaluation; "
            + ", ".join(each)
        )
        if "calibrated_hours" in cost:
            calibrated += cost["calibrated_hours"] * seeds
            lines.append(
                f"    on this cluster, from the trial's own recorded time: ~{_hours(cost['calibrated_hours'])} per job"
            )
    for device, (hours, gpu_hours, spot, on_demand) in totals.items():
        money = f", {gpu_hours:.3g} GPU-hours, ${spot:.2f} spot / ${on_demand:.2f} on-demand" if gpu_hours else ""
        lines.append(f"total on {device}: {_hours(hours)} of job time{money}")
    if calibrated:
        lines.append(
            f"total from the trials' recorded times: ~{_hours(calibrated)} of job time (divide by jobs at once)"
        )
    lines.append(
        "estimates: afm_ray.cost's FLOP counts at its assumed throughputs (within a factor of about two); "
        "AutoAttack sized at 85% clean and 50% robust accuracy"
    )
    return "\n".join(lines)


def redact(uri: str) -> str:
    from afm_ray.credentials import redact_uri

    return redact_uri(uri)
