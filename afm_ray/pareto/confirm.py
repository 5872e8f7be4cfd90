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
import ray.train
from mlflow import MlflowClient
from mlflow.entities import Metric
from safetensors.torch import load as load_safetensors

from afm_ray import names
from afm_ray.config import from_flat
from afm_ray.cost import dataset_shapes
from afm_ray.data import load_run_data
from afm_ray.devices import resolve_device
from afm_ray.display import duration_text
from afm_ray.errors import ConfigError, TrackingError, UserError
from afm_ray.evaluate.protocol import evaluate_model
from afm_ray.models import build_model
from afm_ray.names import CI_HIGH, CI_LOW, Objective
from afm_ray.pareto.estimate import describe, job_cost, ray_seconds, slots_for, wall_seconds
from afm_ray.stats import MIN_CONFIRM_IMAGES, MIN_NEW_SEEDS_FOR_T, confirmed_interval, wilson_interval
from afm_ray.sweep.console import QuietConsole, log_file_beside, say
from afm_ray.sweep.local_ray import connect_or_start
from afm_ray.sweep.retrain import cancel_jobs, next_finished, retrain_task, state_bytes, sweep_runtime
from afm_ray.sweep.trial import TrialRuntime
from afm_ray.tracking.mlflow_runs import METHOD_COLUMN, client_for, column, tag_column, tags_match, trial_names
from afm_ray.tracking.run_config import trial_config
from afm_ray.tracking.student_model import (
    SPEC_FILE,
    WEIGHTS_FILE,
    fetch_student,
    load_student,
    log_student,
)

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


def _reevaluate(model_spec: dict[str, Any], weights: bytes, flat: dict[str, Any], samples: int) -> dict[str, float]:
    cfg = from_flat(flat)
    model = build_model(**model_spec)
    model.load_state_dict(load_safetensors(weights))
    model = model.to(resolve_device(cfg.run.device))
    return evaluate_model(model, cfg, load_run_data(cfg), samples=samples, log=lambda line: None)


def confirm_images(candidates: pd.DataFrame, samples: int | None) -> tuple[int, int | None]:
    """(the ``--samples`` value the jobs run with, the images that is, when known): the sweep's own image
    count unless asked (``samples`` None); 0 is the whole test split. Fewer than `MIN_CONFIRM_IMAGES` is a
    ConfigError naming the number to use: a front confirmed on 10 images would be registered as confirmed."""
    swept = pd.to_numeric(column(candidates, "metrics.eval/n_samples"), errors="coerce").max()
    if samples is None:
        samples = int(swept) if swept == swept and swept > 0 else 0
    if samples < 0:
        raise ConfigError(f"--samples {samples}: expected >= 0 (0 = the whole test split)")
    shapes = dataset_shapes(from_flat(trial_config(candidates.iloc[0])))
    split = shapes.test_images if shapes else None
    images = (min(samples, split) if split else samples) if samples else split
    if images is not None and images < MIN_CONFIRM_IMAGES:
        where = f"--samples {samples}" if samples else "the whole test split"
        whole = f" (the whole test split: {split})" if split else ""
        raise ConfigError(
            f"{where}: {images} test images are too few to confirm a front (a 95% interval near 50% is "
            f"+-{100 * (wilson_interval(0.5, images)[1] - 0.5):.0f} points); use --samples {MIN_CONFIRM_IMAGES} or "
            f"more, or --samples 0{whole}"
        )
    return samples, images


def confirm_candidates(
    ranked: pd.DataFrame,
    *,
    tracking_uri: str | None = None,
    samples: int | None = None,
    seeds: int = 0,
    address: str | None = None,
    verbose: bool = False,
    log: Callable[[str], None] = say,
) -> pd.DataFrame:
    """The front's candidates (front and within noise) of ``ranked``, confirmed: a frame in the layout of
    `afm_ray.tracking.mlflow_runs.load_trials` whose accuracies are the confirmed means and intervals,
    ready for `afm_ray.pareto.ranking.rank_trials` (``ranked`` keeps the sweep's own values). It prints its
    plan and estimate (afm_ray.pareto.estimate) before any job runs and a line per finished job.
    ``samples`` None: the sweep's image count; 0: the whole test split (``frame.attrs["samples"]`` says which).
    While its jobs run, what Ray and MLflow print goes to confirm.log beside its Train runs, unless ``verbose``."""
    if seeds < 0:
        raise ConfigError(f"--seeds {seeds}: expected >= 0")
    candidates = ranked[ranked["pareto"] | ranked["within_noise"]]
    if candidates.empty:
        raise TrackingError("no candidate to confirm: no trial is on the front")
    samples, images = confirm_images(candidates, samples)
    client = client_for(tracking_uri)
    experiment_id = str(candidates["experiment_id"].iloc[0])
    configs = {row["run_id"]: trial_config(row) for _, row in candidates.iterrows()}
    labels = dict(zip(candidates["run_id"], trial_names(candidates), strict=True))
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
    what = f"{images} test images" if images else "the whole test split"
    swept = pd.to_numeric(column(candidates, "metrics.eval/n_samples"), errors="coerce").max()
    log(
        f"confirm: {len(candidates)} candidate trial(s) ({int(candidates['pareto'].sum())} on the front, "
        f"{int(candidates['within_noise'].sum())} within noise): {', '.join(labels.values())}"
    )
    log(
        f"confirm: each scored on {what} (the sweep scored {swept:.0f}; --samples to change), "
        + (f"and retrained with {seeds} new seed(s) (run.seed + {SEED_STRIDE}, ...)" if seeds else "no retrain")
        + f"; {len(jobs)} job(s), {len(done)} done before, {len(todo)} to run"
    )
    if todo:
        parents = dict(zip(candidates["run_id"], column(candidates, tag_column(names.PARENT_TAG)), strict=True))
        runtimes = {p: sweep_runtime(client, p, "confirm") for p in set(parents.values())}
        started, clock = not ray.is_initialized(), time.monotonic()  # the wall time counts Ray's start-up
        log_file = log_file_beside(runtimes[parents[todo[0][0].trial_run]].storage_path, "confirm.log")
        with QuietConsole(log_file, verbose=verbose):
            if started and address:  # the cluster's size sets how many jobs run at once: join it first
                connect_or_start(address)
            try:
                resources = runtimes[parents[todo[0][0].trial_run]].resources
                cluster = ray.cluster_resources() if ray.is_initialized() else _this_machine()
                slots = slots_for(cluster, resources.cpus, resources.gpus)
                rows = {row["run_id"]: row for _, row in candidates.iterrows()}
                scored = images or float(swept)  # the whole split of a dataset known only once read: as swept
                ray_s = ray_seconds(ranked)
                costs = [job_cost(rows[job.trial_run], job.kind, scored, ray_s) for job, _ in todo]
                estimate = wall_seconds([c.seconds for c in costs], slots)
                log(f"confirm: estimate {describe(costs, slots, scored)}")
                if started and not address:
                    connect_or_start(None)
                progress = _Progress(len(jobs), len(done), estimate, labels, log, clock)
                _run_jobs(client, experiment_id, todo, configs, samples, done, runtimes, parents, progress, log)
                log(
                    f"confirm: {len(todo)} job(s) in {duration_text(progress.elapsed())} "
                    f"(estimated {duration_text(estimate)})"
                )
            finally:
                if started:
                    ray.shutdown()
        if not verbose and log_file.is_file():
            log(f"log: {log_file}   (Ray and MLflow output; --verbose shows it here)")
    confirmed = _confirmed_frame(candidates, jobs, done)
    confirmed.attrs["samples"] = samples
    return confirmed


def _this_machine() -> dict[str, float]:
    """What a local Ray will have: this machine's CPUs and GPUs."""
    import os

    import torch

    return {"CPU": float(os.cpu_count() or 1), "GPU": float(torch.cuda.device_count())}


def describe_job(job: Job, labels: dict[str, str]) -> str:
    """'retrain seed 1003 of trial 917f2149'."""
    return f"{job.kind}" + ("" if job.seed is None else f" seed {job.seed}") + f" of trial {labels[job.trial_run]}"


class _Progress:
    """A line per finished job: which, its accuracies, how far along, against the estimate."""

    def __init__(
        self, total: int, done: int, estimate: float, labels: dict[str, str], log: Callable[[str], None], started: float
    ):
        self.total, self.done, self.estimate, self.labels, self.log = total, done, estimate, labels, log
        self.started = started

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def finished(self, job: Job, metrics: dict[str, float] | None, error: str | None = None) -> None:
        self.done += 1
        what = (
            f"{job.kind}"
            + ("" if job.seed is None else f" seed {job.seed}")
            + f" of trial {self.labels[job.trial_run]}"
        )
        if error is not None:
            body = f"FAILED {what}: {error}"
        else:
            accs = "  ".join(f"{m}={metrics[m]:.4f}" for m in names.ACCURACY_METRICS if m in metrics)
            body = f"{what}: {accs} on {int(metrics['eval/n_samples'])} images"
        self.log(
            f"confirmed {self.done}/{self.total} [{time.strftime('%H:%M:%S')}] {body} "
            f"({duration_text(self.elapsed())} elapsed of ~{duration_text(self.estimate)} estimated)"
        )


def _run_jobs(
    client: MlflowClient,
    experiment_id: str,
    todo: list[tuple[Job, str | None]],
    configs: dict[str, dict[str, Any]],
    samples: int,
    done: dict[Job, dict[str, float]],
    runtimes: dict[str, TrialRuntime],
    parents: dict[str, str],
    progress: _Progress,
    log: Callable[[str], None],
) -> None:
    pending = {}
    for job, run_id in todo:
        runtime = runtimes[parents[job.trial_run]]
        flat = {**configs[job.trial_run], "eval.samples": samples}
        if run_id is None:
            name = f"confirm-{progress.labels[job.trial_run]}-{job.kind}" + (
                "" if job.seed is None else f"-seed{job.seed}"
            )
            run_id = client.create_run(experiment_id, run_name=name, tags=job.tags(samples)).info.run_id
        else:  # interrupted before: continue in the same run
            client.update_run(run_id, status="RUNNING")
        if job.kind == "reevaluate":
            model, spec = fetch_student(client, f"runs:/{job.trial_run}")
            weights = state_bytes(model)
            resources = runtime.resources
            task = ray.remote(_reevaluate).options(num_cpus=resources.cpus, num_gpus=resources.gpus_per_worker)
            ref = task.remote(spec["model"], weights, flat, samples)
        else:  # waits on its Train run, whose workers hold the resources (as a sweep's trial does)
            task = retrain_task()
            ref = task.remote({**flat, "run.seed": job.seed}, runtime, f"confirm-{job.trial_run}-seed{job.seed}")
        pending[ref] = (job, run_id)
    try:
        _collect(client, pending, done, progress)
    except KeyboardInterrupt:
        cancel_jobs(client, {ref: run_id for ref, (_, run_id) in pending.items()})
        raise


def _collect(
    client: MlflowClient,
    pending: dict[Any, tuple[Job, str]],
    done: dict[Job, dict[str, float]],
    progress: _Progress,
) -> None:
    """Log each job as it finishes; raise ConfirmError at the end if any failed."""
    failed = []
    while pending:
        ref = next_finished(pending)
        if ref is None:
            continue
        job, run_id = pending.pop(ref)
        try:
            out = ray.get(ref)
        except Exception as exc:  # the others go on; the next --confirm retries this one
            why = " ".join(str(exc).split())[-500:]
            client.set_tag(run_id, "afm_ray.confirm_error", why)
            client.set_terminated(run_id, status="FAILED")
            failed.append(
                f"{job.kind} of trial {progress.labels[job.trial_run]}" + (f" seed {job.seed}" if job.seed else "")
            )
            progress.finished(job, None, why[-200:])
            continue
        done[job] = _log_confirmation(client, run_id, job, out)
        progress.finished(job, done[job])
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


def _confirmed_frame(candidates: pd.DataFrame, jobs: Sequence[Job], done: dict[Job, dict[str, float]]) -> pd.DataFrame:
    rows = []
    for _, row in candidates.iterrows():
        row = row.drop([c for c in _DERIVED if c in row.index])
        mine = [j for j in jobs if j.trial_run == row["run_id"] and j in done]
        students = [done[j] for j in mine]
        new_seeds = sum(j.kind == "retrain" for j in mine)
        n = students[0]["eval/n_samples"]
        for metric in names.ACCURACY_METRICS:
            values = [s[metric] for s in students if metric in s]
            if values:  # the rule of afm_ray.stats.confirmed_interval: a t interval needs 2 new seeds
                mean, low, high = confirmed_interval(values, n, new_seeds)
                row[f"metrics.{metric}"], row[f"metrics.{metric}{CI_LOW}"], row[f"metrics.{metric}{CI_HIGH}"] = (
                    mean,
                    low,
                    high,
                )
        row["metrics.eval/n_samples"], row["metrics.confirm/students"] = n, float(len(students))
        row["metrics.confirm/new_seeds"] = float(new_seeds)
        seeds = [int(float(row.get("params.run.seed", 0)))] + [j.seed for j in jobs if j.trial_run == row["run_id"]]
        row["params.confirm.seeds"] = ",".join(str(s) for s in seeds if s is not None)
        rows.append(row)
    return pd.DataFrame(rows).reset_index(drop=True)


def format_comparison(sweep: pd.DataFrame, confirmed: pd.DataFrame, objectives: Sequence[Objective]) -> str:
    """Per candidate trial: each accuracy objective in the sweep (``sweep``: its images) and confirmed (mean
    [95%], students), and which interval that is (afm_ray.stats.confirmed_interval's rule)."""
    lines = []
    before_rows = sweep.set_index("run_id")
    for (_, row), trial in zip(confirmed.iterrows(), trial_names(confirmed), strict=True):
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
        new_seeds = int(row.get("metrics.confirm/new_seeds", students - 1))
        kind = "seeds and images" if new_seeds >= MIN_NEW_SEEDS_FOR_T else "images only"
        lines.append(
            f"  trial {trial} {method}: {'  '.join(cells)}  ({int(row['metrics.eval/n_samples'])} img, "
            f"{students} student(s): seeds {row['params.confirm.seeds']}; interval: {kind})"
        )
    legend = (
        "interval 'images only': the Wilson interval of the mean on the images scored (fewer than "
        f"{MIN_NEW_SEEDS_FOR_T} new seeds: the seeds' spread is not measured); 'seeds and images': a t interval "
        "over the students combined with the images' interval"
    )
    return "\n".join(["sweep -> confirmed (mean over students, 95% interval):", *lines, legend])
