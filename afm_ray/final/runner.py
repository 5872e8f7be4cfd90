"""The final stage on Ray: every (configuration, seed) job is a Ray Train run of the full schedule
(afm_ray.sweep.retrain: the sweep's trainer, workers and resources), then an evaluation task with one
worker's resources (afm_ray.final.evaluation: clean and resumable AutoAttack), each recorded as one
MLflow run (role ``final``), a child of its trial's run when it came from one.

Resumable at every step: a finished job's run is reused (never run twice); a job whose student was
already logged goes straight to its evaluation, whose AutoAttack state (in the storage, beside the
Train run) skips the attacks that ran; an unfinished Train run continues from its last checkpoint
(Train V2, same run name and storage). So the same command, run again, continues.

At most as many jobs run at once as the cluster holds at its largest size (afm_ray.sweep.capacity, the
sweep's rule; never unbounded); each finished stage prints one line.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from mlflow import MlflowClient
from mlflow.entities import Metric, Param

from afm_ray import names
from afm_ray.credentials import redact_uri
from afm_ray.errors import UserError, one_line
from afm_ray.final.evaluation import AA_STATE_FILE, evaluate_weights
from afm_ray.final.plan import Configuration
from afm_ray.names import TRAIN_TEACHER
from afm_ray.storage import is_uri
from afm_ray.sweep.capacity import cluster_capacity, resolve_concurrency
from afm_ray.sweep.console import QuietConsole, log_file_beside, say
from afm_ray.sweep.driver import prepare_teacher
from afm_ray.sweep.local_ray import connect_or_start
from afm_ray.sweep.retrain import cancel_jobs, next_finished, retrain_task, state_bytes
from afm_ray.sweep.trial import TrialRuntime
from afm_ray.tracking.mlflow_runs import tags_match
from afm_ray.tracking.student_model import fetch_student, log_student

ROLE = "final"
STAGE_TAG = "afm_ray.final_stage"  # "trained" once the student is logged: a rerun goes to its evaluation
ERROR_TAG = "afm_ray.final_error"


class FinalStageError(UserError):
    """Some jobs failed; the message names them, and running the same command again retries them."""


@dataclass(frozen=True)
class FinalJob:
    """One configuration trained with one seed, then evaluated."""

    config: Configuration
    seed: int

    @property
    def name(self) -> str:
        return self.config.job_name(self.seed)

    @property
    def state_location(self) -> str:
        """Where its AutoAttack state lives: beside its Train run, where a rerun looks."""
        return f"{self.config.storage}/final/{self.name}/{AA_STATE_FILE}"

    def train_config(self, samples: int) -> dict[str, Any]:
        """The Train run's config: its own final evaluation is clean accuracy only, AutoAttack follows
        as a resumable task."""
        return {**self.config.space.fixed, "run.seed": self.seed, "eval.samples": samples,
                "eval.attacks": "clean", "eval.aa_policy": "all"}  # fmt: skip

    def tags(self, samples: int) -> dict[str, str]:
        tags = {
            names.ROLE_TAG: ROLE,
            names.FINAL_OF_TAG: self.config.key,
            names.FINAL_SEED_TAG: str(self.seed),
            names.FINAL_SAMPLES_TAG: str(samples),
            names.FINAL_CONFIG_TAG: self.config.identity,
        }
        if self.config.trial_run:
            tags[names.PARENT_TAG] = self.config.trial_run
        return tags


def experiment_for(client: MlflowClient, experiment: str) -> str:
    """The id of ``experiment``, created if it does not exist (a recipe's first final stage)."""
    found = client.get_experiment_by_name(experiment)
    return found.experiment_id if found is not None else client.create_experiment(experiment)


def find_run(client: MlflowClient, experiment_id: str, job: FinalJob, samples: int) -> Any:
    """The job's MLflow run from an earlier call: a finished one first, else the oldest; None if none."""
    tags = {k: v for k, v in job.tags(samples).items() if k != names.PARENT_TAG}
    found = client.search_runs([experiment_id], tags_match(tags), max_results=10)
    finished = [r for r in found if r.info.status == "FINISHED"]
    return (finished or sorted(found, key=lambda r: r.info.start_time))[0] if found else None


def existing_results(
    client: MlflowClient, experiment_id: str, jobs: Sequence[FinalJob], samples: int
) -> tuple[dict[tuple[str, int], dict[str, float]], list[tuple[FinalJob, Any]]]:
    """(metrics of the finished jobs by (configuration key, seed), [(job, its unfinished run or None)])."""
    done, todo = {}, []
    for job in jobs:
        run = find_run(client, experiment_id, job, samples)
        if run is not None and run.info.status == "FINISHED":
            done[(job.config.key, job.seed)] = dict(run.data.metrics)
        else:
            todo.append((job, run))
    return done, todo


def run_final_stage(
    todo: Sequence[tuple[FinalJob, Any]],
    *,
    client: MlflowClient,
    experiment_id: str,
    samples: int,
    address: str | None,
    max_concurrent: int = 0,
    verbose: bool = False,
    log: Callable[[str], None] = say,
) -> dict[tuple[str, int], dict[str, float]]:
    """Run ``todo`` (from `existing_results`) on Ray; the metrics of each job that finished. A job that
    fails is tagged with why and left for the next call; a FinalStageError names them at the end.
    What Ray and MLflow print meanwhile goes to final.log beside its Train runs, unless ``verbose``."""
    started_ray = not ray.is_initialized()
    log_file = log_file_beside(f"{todo[0][0].config.storage}/final", "final.log")
    try:
        with QuietConsole(log_file, verbose=verbose):
            if started_ray:
                connect_or_start(address)
            try:
                return _run(todo, client, experiment_id, samples, max_concurrent, started_ray, log)
            finally:
                if started_ray:
                    ray.shutdown()
    finally:
        if not verbose and log_file.is_file():
            log(f"log: {log_file}   (Ray and MLflow output; --verbose shows it here)")


def _run(
    todo: Sequence[tuple[FinalJob, Any]],
    client: MlflowClient,
    experiment_id: str,
    samples: int,
    max_concurrent: int,
    started_ray: bool,
    log: Callable[[str], None],
) -> dict[tuple[str, int], dict[str, float]]:
    todo = _with_teachers(todo, log)
    capacity = cluster_capacity(started_ray)
    limit = min(
        resolve_concurrency(job.config.space.resources, max_concurrent, len(todo), capacity).trials for job, _ in todo
    )
    log(f"final stage: {len(todo)} job(s) to run, at most {limit} at a time on this cluster")
    queue, pending, results, failed = list(todo), {}, {}, []
    running, finished, started = 0, 0, time.monotonic()

    def launch(job: FinalJob, run: Any) -> None:
        if run is None:
            run_id = client.create_run(experiment_id, run_name=job.name, tags=job.tags(samples)).info.run_id
            _log_params(client, run_id, job.train_config(samples))
        else:  # interrupted before: continue in the same run
            run_id = run.info.run_id
            client.update_run(run_id, status="RUNNING")
        if run is not None and run.data.tags.get(STAGE_TAG) == "trained":
            model, spec = fetch_student(client, f"runs:/{run_id}")
            pending[_evaluate(job, spec["model"], state_bytes(model), samples)] = (job, "evaluate", run_id)
            return
        runtime = TrialRuntime(
            job.config.space.resources,
            storage_path=f"{job.config.storage}/final",
            max_failures=job.config.space.max_failures,
        )
        pending[retrain_task().remote(job.train_config(samples), runtime, job.name)] = (job, "train", run_id)

    try:
        while queue or pending:
            while queue and running < limit:
                launch(*queue.pop(0))
                running += 1
            ref = next_finished(pending)
            if ref is None:
                continue
            job, stage, run_id = pending.pop(ref)
            what = f"{job.config.label} seed {job.seed}"
            try:
                out = ray.get(ref)
            except Exception as exc:  # the others go on; the next call retries this one
                why = one_line(exc)[-500:]
                client.set_tag(run_id, ERROR_TAG, why)
                client.set_terminated(run_id, status="FAILED")
                failed.append(f"{stage} of {what}")
                running -= 1
                log(f"final: FAILED {stage} of {what}: {why[-200:]}")
                continue
            elapsed = (time.monotonic() - started) / 60
            if stage == "train":
                metrics, spec_bytes, weights = out
                # the training run's own keys as a trial logs them; its end-of-run (clean) scores apart
                kept = ("student/", "time/", "train/", "val/", "run/")
                _log_metrics(
                    client, run_id, {k if k.startswith(kept) else f"train_final/{k}": v for k, v in metrics.items()}
                )
                model, spec = _student(spec_bytes, weights)
                log_student(client, run_id, model, input_shape=tuple(spec["input_shape"]))
                client.set_tag(run_id, STAGE_TAG, "trained")
                log(f"final: trained {what} ({metrics.get('epoch', 0):.0f} epochs, {elapsed:.1f} min)")
                pending[_evaluate(job, spec["model"], weights, samples)] = (job, "evaluate", run_id)
                continue
            _log_metrics(client, run_id, out)
            client.set_terminated(run_id, status="FINISHED")
            results[(job.config.key, job.seed)] = out
            running -= 1
            finished += 1
            resumed = f", AutoAttack resumed after {out['eval/aa_attacks_resumed']:.0f} attack(s)" if out.get(
                "eval/aa_attacks_resumed") else ""  # fmt: skip
            log(
                f"final: done {what}: clean {100 * out['clean_acc']:.2f}%, AutoAttack {100 * out['aa_acc']:.2f}% on "
                f"{out['eval/n_samples']:.0f} images{resumed} ({finished}/{len(todo)} jobs, {elapsed:.1f} min)"
            )
    except KeyboardInterrupt:
        cancel_jobs(client, {ref: run_id for ref, (_, _, run_id) in pending.items()})
        raise
    if failed:
        raise FinalStageError(
            f"{len(failed)} job(s) failed ({'; '.join(failed)}); run the same command again to retry them"
        )
    return results


def _with_teachers(todo: Sequence[tuple[FinalJob, Any]], log: Callable[[str], None]) -> list[tuple[FinalJob, Any]]:
    """Configurations whose teacher.checkpoint is `train` get the teacher trained (or reused from the
    cache) once, as a sweep does, and written to their storage; their identity (runs, names) is kept."""
    prepared: dict[str, Configuration] = {}
    out = []
    for job, run in todo:
        config = job.config
        if config.cfg.teacher.checkpoint == TRAIN_TEACHER:
            if config.key not in prepared:
                runtime = TrialRuntime(config.space.resources, f"{config.storage}/final", config.space.max_failures)
                keys, _ = prepare_teacher(config.space, runtime, log)
                space = dataclasses.replace(config.space, fixed={**config.space.fixed, **keys})
                prepared[config.key] = dataclasses.replace(config, space=space)
            job = dataclasses.replace(job, config=prepared[config.key])
        out.append((job, run))
    return out


def _evaluate(job: FinalJob, model_spec: dict[str, Any], weights: bytes, samples: int) -> Any:
    r = job.config.space.resources
    task = ray.remote(evaluate_weights).options(num_cpus=r.cpus_per_worker, num_gpus=r.gpus_per_worker)
    flat = {**job.config.space.fixed, "run.seed": job.seed}
    return task.remote(model_spec, weights, flat, samples, job.state_location)


def _student(spec_bytes: bytes, weights: bytes) -> tuple[Any, dict[str, Any]]:
    import tempfile

    from afm_ray.tracking.student_model import SPEC_FILE, WEIGHTS_FILE, load_student

    with tempfile.TemporaryDirectory(prefix="afm_ray_final_") as tmp:
        (Path(tmp) / SPEC_FILE).write_bytes(spec_bytes)
        (Path(tmp) / WEIGHTS_FILE).write_bytes(weights)
        return load_student(tmp)


def _log_params(client: MlflowClient, run_id: str, flat: dict[str, Any]) -> None:
    """The job's whole config as params (credentials in URIs as ***), so the run re-runs from its params."""
    params = [Param(k, redact_uri(str(v)) if is_uri(str(v)) else str(v)[:6000]) for k, v in sorted(flat.items())]
    for i in range(0, len(params), 100):
        client.log_batch(run_id, params=params[i : i + 100])


def _log_metrics(client: MlflowClient, run_id: str, metrics: dict[str, Any]) -> None:
    now = int(time.time() * 1000)
    batch = [Metric(k, float(v), now, 0) for k, v in metrics.items() if isinstance(v, (int, float))]
    for i in range(0, len(batch), 500):
        client.log_batch(run_id, metrics=batch[i : i + 500])
