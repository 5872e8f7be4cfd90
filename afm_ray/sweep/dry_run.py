"""`python -m afm_ray.sweep --dry-run [--format json]`: the resolved plan of a sweep, and what it
will cost, without starting Ray or touching any storage (it reads the space and counts FLOPs on
the meta device; nothing is written, no tracking server is contacted).

The estimate follows afm_ray.cost (clusters/README.md's accounting): FLOPs per trial, then
seconds at assumed throughputs. With a successive-halving scheduler the expected compute assumes
that 1/reduction_factor of the trials at each rung continue (ASHA's steady state) and that only
trials reaching the last epoch are evaluated; the upper bound trains and evaluates every trial.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from afm_ray.config import ExperimentConfig
from afm_ray.cost import (
    ASSUMED_CLEAN,
    ASSUMED_ROBUST,
    CPU_GFLOPS_EVAL,
    CPU_GFLOPS_TRAIN,
    CPU_TRIAL_OVERHEAD_S,
    DEVICES,
    EVAL_RATE_FRACTION,
    teacher_count,
    trial_flops,
)
from afm_ray.display import duration_text, eps_text, gpu_hours_text, sig4, value_text
from afm_ray.search.mo_asha import rung_milestones
from afm_ray.search.space import SearchSpace
from afm_ray.sweep.capacity import Capacity, machine_capacity, resolve_concurrency


def sampler_plan(space: SearchSpace) -> dict[str, Any]:
    """The sampler, its seed, and how many trials it draws at random before using a model (for
    random search all of them; for a grid none)."""
    spec = {k: v for k, v in dataclasses.asdict(space.sampler).items() if v is not None}
    return {**spec, "n_startup_trials": space.sampler.random_trials(space.num_samples), "seed": space.seed}


def _epoch_range(space: SearchSpace, cfg: ExperimentConfig) -> int:
    for dist in space.search:
        if dist.key == "optim.epochs":
            return int(max(dist.choices) if dist.kind == "choice" else dist.high)
    return cfg.optim.epochs


def scheduler_plan(space: SearchSpace, epochs: int) -> dict[str, Any]:
    """The scheduler, its rungs, and the expected share of trials reaching each stage."""
    s = space.scheduler
    if not s.halving:
        return {"name": s.name, "expected_epochs_per_trial": float(epochs), "evaluated_fraction": 1.0}
    spec = dataclasses.asdict(s)
    rungs = rung_milestones(s.grace_period, s.reduction_factor, epochs)
    # Everyone trains to the first rung; 1/rf of those continue to the next; ... to the end.
    bounds = [*rungs, epochs]
    expected = float(bounds[0])
    for k in range(1, len(bounds)):
        expected += (bounds[k] - bounds[k - 1]) / spec["reduction_factor"] ** k
    evaluated = 1 / spec["reduction_factor"] ** len(rungs)
    return {**spec, "rungs": rungs, "expected_epochs_per_trial": expected, "evaluated_fraction": evaluated}


def _method_mix(space: SearchSpace, cfg: ExperimentConfig) -> dict[str, float]:
    for dist in space.search:
        if dist.key == "method.name":
            return {m: 1 / len(dist.choices) for m in dist.choices}
    return {cfg.method.name: 1.0}


def _steps(space: SearchSpace, cfg: ExperimentConfig) -> tuple[float, float, float]:
    for dist in space.search:
        if dist.key == "attack.steps":
            values = [float(c) for c in dist.choices] if dist.kind == "choice" else [dist.low, dist.high]
            return min(values), sum(values) / len(values), max(values)
    return (float(cfg.attack.steps),) * 3


def estimate(space: SearchSpace, cfg: ExperimentConfig, schedule: dict[str, Any]) -> dict[str, Any]:
    methods = _method_mix(space, cfg)
    low_steps, mean_steps, high_steps = _steps(space, cfg)
    epochs = _epoch_range(space, cfg)
    mean = trial_flops(cfg, methods, mean_steps, epochs)
    if mean is None:
        return {"available": False, "reason": f"data.name {cfg.data.name}: image shapes are known only once read"}
    lows = [trial_flops(cfg, {m: 1.0}, low_steps, epochs) for m in methods]
    highs = [trial_flops(cfg, {m: 1.0}, high_steps, epochs) for m in methods]

    def total(f: dict[str, float], epochs_run: float, evaluated: float) -> float:
        return (f["train_flops_per_epoch"] + f["val_flops_per_epoch"]) * epochs_run + evaluated * f["eval_flops"]

    per_trial = {
        "min": min(total(f, epochs, 1.0) for f in lows),
        "mean": total(mean, epochs, 1.0),
        "max": max(total(f, epochs, 1.0) for f in highs),
    }
    n = space.num_samples
    expected = n * total(mean, schedule["expected_epochs_per_trial"], schedule["evaluated_fraction"])
    r = space.resources
    out: dict[str, Any] = {
        "available": True,
        "flops_per_trial": per_trial,
        "flops_breakdown_mean_trial": {
            "teacher_forward": mean["teacher_forward_flops"],
            "train_per_epoch": mean["train_flops_per_epoch"],
            "validation_per_epoch": mean["val_flops_per_epoch"],
            "final_evaluation": mean["eval_flops"],
            "final_evaluation_without_autoattack": mean["eval_flops_without_aa"],
        },
        "sweep_flops": {"upper_bound": n * per_trial["mean"], "expected": expected},
        "device_hours": {},
    }
    train_share = (mean["train_flops_per_epoch"] + mean["val_flops_per_epoch"]) * epochs
    if r.gpus_per_worker > 0:
        for device in DEVICES:
            rate = device.train_tflops * 1e12 * r.gpus
            trial_s = train_share / rate + mean["eval_flops"] / (rate * EVAL_RATE_FRACTION)
            out["device_hours"][device.name] = {
                "per_trial": trial_s / 3600,
                "sweep_upper_bound": n * trial_s / 3600,
                "sweep_expected": n * trial_s / 3600 * expected / (n * per_trial["mean"]),
            }
    else:
        cores = r.cpus
        trial_s = (
            CPU_TRIAL_OVERHEAD_S
            + train_share / (CPU_GFLOPS_TRAIN * 1e9 * cores)
            + mean["eval_flops"] / (CPU_GFLOPS_EVAL * 1e9 * cores)
        )
        out["device_hours"]["cpu"] = {
            "per_trial": trial_s / 3600,
            "sweep_upper_bound": n * trial_s / 3600,
            "sweep_expected": n * trial_s / 3600 * expected / (n * per_trial["mean"]),
        }
    out["assumptions"] = [
        "FLOPs per image and epoch as in clusters/README.md: a backward to the input ~1 forward, with weight "
        "gradients ~2; forward FLOPs of student and teacher counted on the meta device",
        f"methods drawn evenly from {sorted(methods)}; attack.steps {mean_steps:g} on average "
        f"(range {low_steps:g}-{high_steps:g})",
        f"AutoAttack standard sized at {ASSUMED_CLEAN:.0%} clean and {ASSUMED_ROBUST:.0%} robust accuracy",
        "GPU throughput, effective TFLOP/s in bf16: "
        + ", ".join(f"{d.name} {d.train_tflops:g}" for d in DEVICES)
        + f"; fp32 evaluation at {EVAL_RATE_FRACTION:.0%} of it; treat as +-50%",
        f"CPU: {CPU_GFLOPS_TRAIN:g} GFLOP/s training and {CPU_GFLOPS_EVAL:g} GFLOP/s evaluation per core and "
        f"{CPU_TRIAL_OVERHEAD_S:g} s start-up per trial, measured on the 2-core machine of the search benchmark",
        "expected: 1/reduction_factor of the trials continue at each rung and only trials that finish are "
        "evaluated; staged AutoAttack (eval.aa_policy: candidates) saves more, not counted here",
    ]
    return out


def describe_plan(space: SearchSpace, capacity: Capacity | None = None) -> dict[str, Any]:
    """Everything a sweep of ``space`` would run, resolved, and its estimated cost (Ray-free).

    The trials it runs at once are resolved as the sweep resolves them (afm_ray.sweep.capacity) against
    ``capacity``, the cluster of --address; without one, the space's stated cap, else this machine (where
    a sweep without --address runs).
    """
    cfg = space.base
    epochs = _epoch_range(space, cfg)
    schedule = scheduler_plan(space, epochs)
    if capacity is None and not space.max_concurrent_trials:
        capacity = machine_capacity()
    concurrency = resolve_concurrency(space.resources, space.max_concurrent_trials, space.num_samples, capacity)
    return {
        "space": {
            "name": space.name,
            "path": space.path,
            "experiment": space.experiment,
            "objectives": [str(o) for o in space.objectives],
            "search": {d.key: _describe_distribution(d) for d in space.search},
            "fixed": dict(space.fixed),
        },
        "num_samples": space.num_samples,
        "sampler": sampler_plan(space),
        "scheduler": schedule,
        "resources": dataclasses.asdict(space.resources),
        "max_concurrent_trials": concurrency.trials,
        "max_concurrent_trials_source": concurrency.source,
        "teacher": {
            "checkpoint": cfg.teacher.checkpoint or "(trained here)",
            "members": teacher_count(cfg),
            "select": cfg.teacher.select,
        },
        "student": {"select": cfg.student.select, "average": cfg.student.average},
        "evaluation": {
            "attacks": list(cfg.eval_attacks),
            "samples": cfg.eval.samples,
            "eps": cfg.eval_eps,
            "aa_policy": cfg.eval.aa_policy,
            "aa_margin": cfg.eval.aa_margin,
            "epochs": epochs,
        },
        "estimate": estimate(space, cfg, schedule),
    }


def _describe_distribution(dist: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"kind": dist.kind}
    if dist.kind == "choice":
        out["choices"] = list(dist.choices)
    else:
        out["range"] = [dist.low, dist.high]
    if dist.step:
        out["step"] = dist.step
    if dist.when:
        out["when"] = {k: list(v) for k, v in dist.when}
    return out


def format_plan(plan: dict[str, Any], fmt: str = "text") -> str:
    if fmt == "json":
        return json.dumps(plan, indent=2, default=str)
    s, sampler, sched, est = plan["space"], plan["sampler"], plan["scheduler"], plan["estimate"]
    data = str(s["fixed"].get("data.name", ""))
    ev = plan["evaluation"]
    search = [f"{k} {_short(k, v, data)}" for k, v in s["search"].items()]
    lines = [
        f"space        {s['name']} ({s['path'] or 'inline'}), experiment {s['experiment']}",
        f"objectives   {', '.join(s['objectives'])}",
        "search       " + "\n             ".join(search or ["nothing searched"]),
        f"trials       {plan['num_samples']}, at most {plan['max_concurrent_trials']} at once: "
        f"{plan['max_concurrent_trials_source']}",
        f"sampler      {sampler['name']} (seed {sampler['seed']}): "
        + (
            "every combination of the choices once, in random order"
            if sampler["name"] == "grid"
            else f"{sampler['n_startup_trials']} random start-up trials, then model-based"
            + (" (random throughout)" if sampler["name"] == "random" else "")
        ),
        f"scheduler    {sched['name']}"
        + (
            f": rungs at epochs {sched['rungs']} of {ev['epochs']}, reduction factor "
            f"{sched['reduction_factor']:g}, on {', '.join(sched.get('metrics') or [sched.get('metric', '')])}"
            if "rungs" in sched
            else ""
        )
        + f"; expected {sig4(sched['expected_epochs_per_trial'])} epochs per trial",
        "resources    " + ", ".join(f"{k} {v:g}" for k, v in plan["resources"].items()) + " per trial",
        _teacher_line(plan),
        f"student      select {plan['student']['select']}, average {plan['student']['average']}",
        f"evaluation   {', '.join(ev['attacks'])} on {ev['samples'] or 'all'} test images at eps "
        f"{eps_text(ev['eps'], data)}; AutoAttack policy {ev['aa_policy']}",
    ]
    if not est.get("available"):
        lines.append(f"estimate     not available: {est['reason']}")
    else:
        for device, h in est["device_hours"].items():
            if device == "cpu":
                lines.append(
                    f"estimate     CPU: {duration_text(h['per_trial'] * 3600)} per full trial on "
                    f"{plan['resources']['cpus_per_worker'] * plan['resources']['num_workers']:g} core(s); the sweep "
                    f"~{duration_text(h['sweep_expected'] * 3600)} of trial time "
                    f"(at most {duration_text(h['sweep_upper_bound'] * 3600)}), divided by the trials run at once"
                )
            else:
                lines.append(
                    f"{'estimate' if device == next(iter(est['device_hours'])) else '':<13}{device}: "
                    f"{gpu_hours_text(h['per_trial'])} per full trial; the sweep ~{gpu_hours_text(h['sweep_expected'])}"
                    f" (at most {gpu_hours_text(h['sweep_upper_bound'])})"
                )
        lines.append("assumptions  " + "\n             ".join(est["assumptions"]))
    checks = plan.get("preflight") or []
    for i, check in enumerate(checks):
        status = {"ok": "ok", "failed": "FAILED", "not run": "not run"}[check["status"]]
        lines.append(f"{'preflight' if i == 0 else '':<13}{status:<8} {check['line']}")
    return "\n".join(lines)


def _teacher_line(plan: dict[str, Any]) -> str:
    t, est = plan["teacher"], plan["estimate"]
    members = t["members"]
    line = f"teacher      {t['checkpoint']}, teacher.select {t['select']}"
    if members > 1:
        line += f"; an ensemble of {members} (the mean of their probabilities)"
        if est.get("available"):
            each = est["flops_breakdown_mean_trial"]["teacher_forward"] / members
            line += f": {members} x {each / 1e6:.3g} MFLOP per teacher forward, in every attack step and loss"
    return line


def _short(key: str, dist: dict[str, Any], data: str) -> str:
    """'int [2, 4]', 'uniform [6/255, 10/255]', 'choice crop_flip, randaugment', '... when method.name in a, b'."""
    if "choices" in dist:
        body = f"{dist['kind']} {', '.join(value_text(key, c, data) for c in dist['choices'])}"
    else:
        low, high = dist["range"]
        if dist["kind"] == "int":
            low, high = int(low), int(high)
        body = f"{dist['kind']} [{value_text(key, low, data)}, {value_text(key, high, data)}]"
    if "when" in dist:
        body += " when " + "; ".join(f"{k} in {', '.join(map(str, v))}" for k, v in dist["when"].items())
    return body
