"""Confirm a front before trusting it: more test images, more training seeds.

    python -m afm_ray.pareto --experiment NAME --confirm [--samples N] [--seeds K] [--register MODEL]

The candidates are the Pareto front and the trials dominated only within noise
(`afm_ray.pareto.ranking.rank_trials` marks them). For each candidate:

- ``reevaluate``: its logged student (safetensors, `afm_ray.tracking.student_model`) is scored with the trial's
  own protocol (eval.attacks, eval.eps, the evaluation seed) on N test images (0, the default: the
  whole test split), as a Ray task with the trial's resources;
- ``retrain`` (K times): the trial's config with a new ``run.seed`` is trained again as a Ray Train run
  (the sweep's `TorchTrainer`, with its workers and resources) and scored on the same images.

Each is an MLflow run (role ``confirmation``) under its trial's run, tagged with the trial
(``afm_ray.confirms``), the kind, the seed and N. A finished one is reused and an unfinished one
(interrupted) is run again in place, so running the command again continues without duplicates.
A candidate's confirmed accuracy is the mean over its students with `afm_ray.stats.mean_interval`
(the seeds' spread and the test images' binomial noise); the front is recomputed on those.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import ray
from mlflow import MlflowClient
from mlflow.entities import Metric
from safetensors.torch import load as load_safetensors

from afm_ray import names
from afm_ray.config import from_flat
from afm_ray.data import load_run_data
from afm_ray.devices import resolve_device
from afm_ray.errors import ConfigError, TrackingError, UserError
from afm_ray.evaluate.protocol import evaluate_model
from afm_ray.models import build_model
from afm_ray.names import CI_HIGH, CI_LOW, Objective
from afm_ray.stats import mean_interval
from afm_ray.sweep.local_ray import connect_or_start
from afm_ray.sweep.retrain import retrain_task, sweep_runtime
from afm_ray.sweep.retrain import state_bytes as _state_bytes
from afm_ray.sweep.trial import TrialRuntime
from afm_ray.tracking.mlflow_runs import METHOD_COLUMN, client_for, column, tag_column, tags_match
from afm_ray.tracking.run_config import trial_config
from afm_ray.tracking.student_model import SPEC_FILE, WEIGHTS_FILE, fetch_student, load_student, log_student

SEED_STRIDE = 1000  # retrain i of a trial with seed s uses s + 1000 * i: far from the seeds a sweep varies
_DERIVED = ("excluded", "front", "rank", "pareto", "within_noise", "ties")  # rank_trials' own columns


class ConfirmError(UserError):
    """Some confirmations failed; the message names them, and running --confirm again retries them."""


@dataclass(frozen=True)
class Job:
    """One confirmation of one trial: a re-evaluation of its student, or a retrain with a seed."""

    trial_run: str
    kind: str  # names.CONFIRM_KINDS
    seed: int | None = None

    def tags(self, samples: int) -> dict[str, str]:
        return {
            names.ROLE_TAG: "confirmation",
            names.PARENT_TAG: self.trial_run,
            names.CONFIRMS_TAG: self.trial_run,
            names.CONFIRM_KIND_TAG: self.kind,
            names.CONFIRM_SEED_TAG: "" if self.seed is None else str(self.seed),
            names.CONFIRM_SAMPLES_TAG: str(samples),
        }


def retrain_seeds(seed: int, k: int) -> list[int]:
    """The K new seeds of a trial trained with ``seed``."""
    return [seed + SEED_STRIDE * (i + 1) for i in range(k)]


def _find_run(client: MlflowClient, experiment_id: str, job: Job, samples: int) -> Any:
    tags = {k: v for k, v in job.tags(samples).items() if k != names.PARENT_TAG}
    found = client.search_runs([experiment_id], tags_match(tags), max_results=10)
    finished = [r for r in found if r.info.status == "FINISHED"]
    return (finished or sorted(found, key=lambda r: r.info.start_time))[0] if found else None


def _sweep_runtime(client: MlflowClient, sweep_run: str) -> TrialRuntime:
    return sweep_runtime(client, sweep_run, "confirm")


def _reevaluate(model_spec: dict[str, Any], weights: bytes, flat: dict[str, Any], samples: int) -> dict[str, float]:
    cfg = from_flat(flat)
    model = build_model(**model_spec)
    model.load_state_dict(load_safetensors(weights))
    model = model.to(resolve_device(cfg.run.device))
    return evaluate_model(model, cfg, load_run_data(cfg), samples=samples, log=lambda line: None)


def confirm_candidates(
    ranked: pd.DataFrame,
    *,
    tracking_uri: str | None = None,
    samples: int = 0,
    seeds: int = 0,
    address: str | None = None,
    log: Callable[[str], None] = print,
) -> pd.DataFrame:
    """The front's candidates (front and within noise) of ``ranked``, confirmed: a frame in the layout of
    `afm_ray.tracking.mlflow_runs.load_trials` whose accuracies are the confirmed means and intervals,
    ready for `afm_ray.pareto.ranking.rank_trials` (``ranked`` keeps the sweep's own values)."""
    if samples < 0 or seeds < 0:
        raise ConfigError(f"--samples {samples} / --seeds {seeds}: expected >= 0 (samples 0 = the whole test split)")
    candidates = ranked[ranked["pareto"] | ranked["within_noise"]]
    if candidates.empty:
        raise TrackingError("no candidate to confirm: no trial is on the front")
    client = client_for(tracking_uri)
    experiment_id = str(candidates["experiment_id"].iloc[0])
    configs = {row["run_id"]: trial_config(row) for _, row in candidates.iterrows()}
    jobs = []
    for run_id, flat in configs.items():
        jobs.append(Job(run_id, "reevaluate"))
        jobs += [Job(run_id, "retrain", s) for s in retrain_seeds(int(flat["run.seed"]), seeds)]
    done: dict[Job, dict[str, float]] = {}
    todo: list[tuple[Job, str | None]] = []
    for job in jobs:
        run = _find_run(client, experiment_id, job, samples)
        if run is not None and run.info.status == "FINISHED":
            done[job] = dict(run.data.metrics)
        else:
            todo.append((job, run.info.run_id if run is not None else None))
    images = "the whole test split" if samples == 0 else f"{samples} test images"
    log(
        f"confirm: {len(candidates)} candidate(s) on {images}, {seeds} retrain(s) each: "
        f"{len(done)} of {len(jobs)} confirmations already done, {len(todo)} to run"
    )
    if todo:
        _run_jobs(client, experiment_id, todo, configs, candidates, samples, done, address, log)
    return _confirmed_frame(candidates, jobs, done)


def _run_jobs(
    client: MlflowClient,
    experiment_id: str,
    todo: list[tuple[Job, str | None]],
    configs: dict[str, dict[str, Any]],
    candidates: pd.DataFrame,
    samples: int,
    done: dict[Job, dict[str, float]],
    address: str | None,
    log: Callable[[str], None],
) -> None:
    parents = dict(zip(candidates["run_id"], column(candidates, tag_column(names.PARENT_TAG)), strict=True))
    runtimes = {p: _sweep_runtime(client, p) for p in set(parents.values())}
    started = not ray.is_initialized()
    if started:
        connect_or_start(address)
    pending, failed = {}, []
    try:
        for job, run_id in todo:
            runtime = runtimes[parents[job.trial_run]]
            flat = {**configs[job.trial_run], "eval.samples": samples}
            if run_id is None:
                name = f"confirm-{job.trial_run[:8]}-{job.kind}" + ("" if job.seed is None else f"-seed{job.seed}")
                run_id = client.create_run(experiment_id, run_name=name, tags=job.tags(samples)).info.run_id
            else:  # interrupted before: continue in the same run
                client.update_run(run_id, status="RUNNING")
            if job.kind == "reevaluate":
                model, spec = fetch_student(client, f"runs:/{job.trial_run}")
                weights = _state_bytes(model)
                resources = runtime.resources
                task = ray.remote(_reevaluate).options(num_cpus=resources.cpus, num_gpus=resources.gpus_per_worker)
                ref = task.remote(spec["model"], weights, flat, samples)
            else:  # waits on its Train run, whose workers hold the resources (as a sweep's trial does)
                task = retrain_task()
                ref = task.remote({**flat, "run.seed": job.seed}, runtime, f"confirm-{job.trial_run}-seed{job.seed}")
            pending[ref] = (job, run_id)
        while pending:
            [ref], _ = ray.wait(list(pending), num_returns=1)
            job, run_id = pending.pop(ref)
            try:
                out = ray.get(ref)
            except Exception as exc:  # the others go on; the next --confirm retries this one
                why = " ".join(str(exc).split())[-500:]
                client.set_tag(run_id, "afm_ray.confirm_error", why)
                client.set_terminated(run_id, status="FAILED")
                failed.append(f"{job.kind} of run {job.trial_run}" + (f" seed {job.seed}" if job.seed else ""))
                log(f"confirm: FAILED {failed[-1]}: {why[-200:]}")
                continue
            done[job] = _log_confirmation(client, run_id, job, out)
            log(_done_line(job, done[job]))
    finally:
        if started:
            ray.shutdown()
    if failed:
        raise ConfirmError(f"{len(failed)} confirmation(s) failed ({'; '.join(failed)}); run --confirm again to retry")


def _log_confirmation(client: MlflowClient, run_id: str, job: Job, out: Any) -> dict[str, float]:
    metrics = out if job.kind == "reevaluate" else out[0]
    keep = {k: float(v) for k, v in metrics.items() if k in names.FINAL_METRICS or k.startswith(("eval/", "time/"))}
    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(k, v, now, 0) for k, v in keep.items()])
    if job.kind == "retrain":  # the retrained student, as the sweep logs a trial's
        with tempfile.TemporaryDirectory(prefix="afm_ray_confirm_") as tmp:
            (Path(tmp) / SPEC_FILE).write_bytes(out[1])
            (Path(tmp) / WEIGHTS_FILE).write_bytes(out[2])
            model, spec = load_student(tmp)
        log_student(client, run_id, model, input_shape=tuple(spec["input_shape"]))
    client.set_terminated(run_id, status="FINISHED")
    return keep


def _done_line(job: Job, metrics: dict[str, float]) -> str:
    accs = "  ".join(f"{m}={metrics[m]:.4f}" for m in names.ACCURACY_METRICS if m in metrics)
    seed = "" if job.seed is None else f" seed {job.seed}"
    return f"confirmed {job.kind}{seed} of run {job.trial_run[:8]}: {accs} on {int(metrics['eval/n_samples'])} images"


def _confirmed_frame(candidates: pd.DataFrame, jobs: Sequence[Job], done: dict[Job, dict[str, float]]) -> pd.DataFrame:
    rows = []
    for _, row in candidates.iterrows():
        row = row.drop([c for c in _DERIVED if c in row.index])
        students = [done[j] for j in jobs if j.trial_run == row["run_id"] and j in done]
        n = students[0]["eval/n_samples"]
        for metric in names.ACCURACY_METRICS:
            values = [s[metric] for s in students if metric in s]
            if values:
                mean, low, high = mean_interval(values, n)
                row[f"metrics.{metric}"], row[f"metrics.{metric}{CI_LOW}"], row[f"metrics.{metric}{CI_HIGH}"] = (
                    mean,
                    low,
                    high,
                )
        row["metrics.eval/n_samples"], row["metrics.confirm/students"] = n, float(len(students))
        seeds = [int(float(row.get("params.run.seed", 0)))] + [j.seed for j in jobs if j.trial_run == row["run_id"]]
        row["params.confirm.seeds"] = ",".join(str(s) for s in seeds if s is not None)
        rows.append(row)
    return pd.DataFrame(rows).reset_index(drop=True)


def format_comparison(sweep: pd.DataFrame, confirmed: pd.DataFrame, objectives: Sequence[Objective]) -> str:
    """Per candidate: each accuracy objective in the sweep (``sweep``: its images) and confirmed (mean [95%],
    students)."""
    lines = []
    before_rows = sweep.set_index("run_id")
    for _, row in confirmed.iterrows():
        method = row.get(METHOD_COLUMN, "?")
        cells = []
        for o in (o for o in objectives if o.metric in names.ACCURACY_METRICS):
            swept = before_rows.loc[row["run_id"]]
            before, n_before = swept.get(f"metrics.{o.metric}"), swept.get("metrics.eval/n_samples")
            after, low, high = (row.get(f"metrics.{o.metric}{end}") for end in ("", CI_LOW, CI_HIGH))
            cells.append(
                f"{o.metric} {100 * before:.2f} ({int(n_before or 0)} img) -> {100 * after:.2f} "
                f"[{100 * low:.1f}, {100 * high:.1f}]"
            )
        students = int(row["metrics.confirm/students"])
        lines.append(
            f"  run {row['run_id'][:8]} {method}: {'  '.join(cells)}  "
            f"({int(row['metrics.eval/n_samples'])} img, {students} student(s): seeds {row['params.confirm.seeds']})"
        )
    return "\n".join(["sweep -> confirmed (mean over students, 95% interval):", *lines])
