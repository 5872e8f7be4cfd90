"""Run a sweep: search space -> Optuna (via Ray Tune) -> Ray Train -> MLflow.

`python -m afm_ray.sweep` (afm_ray/sweep/__main__.py) validates the space, resolves the plan
(afm_ray.sweep.plan) and runs the preflight (afm_ray.preflight), then calls `run_sweep`: a robust
teacher is trained (or reused from cache), then each trial distils it into a student, reporting
per-epoch curves and the final clean / PGD-20 / AutoAttack accuracy to MLflow. The same command
runs unchanged under `ray job submit` on a cluster.
"""

from __future__ import annotations

import dataclasses
import os
import time
import warnings
from pathlib import Path
from typing import Any

import optuna
import ray
from ray import tune
from ray.tune.search.optuna import OptunaSearch

from afm_ray.config import from_flat, to_flat
from afm_ray.credentials import recall, redact_uri, remember
from afm_ray.databases import schema_lock
from afm_ray.errors import ClusterError, ConfigError, UserError, one_line
from afm_ray.evaluate.protocol import evaluate_checkpoint
from afm_ray.names import (
    AA_SKIP_REASON_KEY,
    AA_SKIPPED_METRIC,
    FINAL_RESULT_FLAG,
    SWEEP_OBJECTIVES_PARAM,
    Objective,
)
from afm_ray.preflight import teacher_methods
from afm_ray.search.samplers import build_sampler
from afm_ray.search.space import SearchSpace
from afm_ray.storage import list_dirs, write_bytes
from afm_ray.sweep.aa_gate import FinishedTrialsFeed, actor_name, start_finished_trials
from afm_ray.sweep.capacity import Concurrency, cluster_capacity, resolve_concurrency
from afm_ray.sweep.console import QuietConsole, say
from afm_ray.sweep.lifecycle import SweepRecords
from afm_ray.sweep.local_ray import connect_or_start
from afm_ray.sweep.plan import SweepPlan
from afm_ray.sweep.progress import TrialProgress, print_summary
from afm_ray.sweep.schedulers import build_scheduler
from afm_ray.sweep.trial import TRIAL_DRIVER_RESOURCES, TrialRuntime, train_driver_fn
from afm_ray.teacher.members import EPOCHS_DIR, INDEX, resolve_member
from afm_ray.teacher.training import STAGING_PREFIX, ensure_teacher, remove_stale_staging, teacher_cache_dir
from afm_ray.tracking.trial_tracker import RedactingClient, TrialTracker, start_or_resume_sweep_run


def prepare_teacher(space: SearchSpace, runtime: TrialRuntime, log: Any) -> tuple[dict[str, Any], dict[str, float]]:
    """Train (or reuse) the teacher every trial distils, as a Ray task on a worker's resources.

    Returns the fixed keys to add (teacher.checkpoint) and the teacher's evaluation. When a trial picks
    an epoch of the teacher (teacher.select other than last, fixed or searched), every epoch's weights
    go to the sweep's storage with it (afm_ray.teacher.members' folder layout) and teacher.checkpoint
    names that folder; otherwise only the last epoch's checkpoint goes.
    """
    if not teacher_methods(space):
        return {}, {}
    base = space.base
    if not base.teacher.trained_here:  # given checkpoints (preflight saw they exist)
        return {}, {}
    with_epochs = base.teacher.select != "last" or any(d.key == "teacher.select" for d in space.search)

    cpus = runtime.resources.cpus
    if runtime.resources.gpus_per_worker == 0:  # no trial runs yet: a CPU teacher may use the whole node
        cpus = max(cpus, min(int(ray.available_resources().get("CPU", 1)), 16))

    @ray.remote(num_cpus=cpus, num_gpus=runtime.resources.gpus_per_worker)
    def train_teacher(flat: dict[str, Any]) -> tuple[dict[str, bytes], dict[str, float]]:
        cfg = from_flat(flat)
        path = ensure_teacher(cfg, log=lambda line: print(line, flush=True))
        chosen = resolve_member(str(path.parent), cfg.teacher.select) if with_epochs else path
        scores = evaluate_checkpoint(chosen, cfg, attack_names=("clean", "pgd20"), log=lambda line: None)
        return _entry_files(path.parent, with_epochs), {k: scores[k] for k in ("clean_acc", "pgd20_acc")}

    entry = teacher_cache_dir(base)
    if (entry / "checkpoint.pt").is_file() and (not with_epochs or (entry / EPOCHS_DIR / INDEX).is_file()):
        log(f"teacher: reusing {entry}")
        files, scores = _entry_files(entry, with_epochs), {}
    else:
        log(
            f"teacher: training {base.teacher.arch} ({base.teacher.method}, {base.teacher.epochs} epochs) as a Ray task"
        )
        files, scores = _get_teacher(train_teacher.remote(to_flat(base)), entry.parent)
        for name, payload in files.items():
            write_bytes(str(entry / name), payload)
    # Trials may run on other nodes: they read the teacher from the sweep's storage.
    folder = f"{runtime.storage_path}/teacher"
    for name, payload in files.items():
        write_bytes(f"{folder}/{name}", payload)
    target = folder if with_epochs else f"{folder}/checkpoint.pt"
    log(
        f"teacher: {redact_uri(target)}"
        + (f" (clean {scores['clean_acc']:.3f}, pgd20 {scores['pgd20_acc']:.3f})" if scores else "")
    )
    return {"teacher.checkpoint": target}, scores


def _entry_files(entry: Path, with_epochs: bool) -> dict[str, bytes]:
    """A teacher cache entry's files by relative name: its last checkpoint, and every epoch's if asked."""
    names = ["checkpoint.pt"]
    if with_epochs:
        names += [f"{EPOCHS_DIR}/{p.name}" for p in sorted((entry / EPOCHS_DIR).iterdir())]
    return {name: (entry / name).read_bytes() for name in names}


def _get_teacher(ref: Any, cache_folder: Path) -> Any:
    """ray.get of the teacher task: a UserError in the task (bad data, an unwritable cache) stays
    one line; an interrupt cancels the task and removes what it left in the cache."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as exc:
        cause = getattr(exc, "cause", None)
        if isinstance(cause, UserError):
            raise type(cause)(f"teacher: {one_line(cause)}") from None
        raise
    except KeyboardInterrupt:
        ray.cancel(ref, force=True)
        deadline = time.monotonic() + 10  # the task's process exits, then its staging folder can go
        while time.monotonic() < deadline and any(cache_folder.glob(f"{STAGING_PREFIX}*")):
            remove_stale_staging(cache_folder)
            time.sleep(0.2)
        raise


def uses_staged_evaluation(space: SearchSpace) -> bool:
    """Whether any trial may run with eval.aa_policy: candidates."""
    searched = [d for d in space.search if d.key == "eval.aa_policy"]
    return space.base.eval.aa_policy == "candidates" or any("candidates" in d.choices for d in searched)


def run_sweep(plan: SweepPlan) -> int:
    """Run the sweep `plan` describes (validated, its preflight passed): 0 when every trial ended,
    130 when it was interrupted (what it recorded is kept; `plan.resume_command()` continues it).
    Unless `plan.verbose`, what Ray, Tune, Optuna and MLflow print goes to `plan.log_file`."""
    started = time.monotonic()
    remember(plan.tracking_uri)  # what Tune pickles keeps them redacted; restored here, they come back whole
    remember(plan.optuna_url)
    if plan.resume and not tune.Tuner.can_restore(plan.sweep_dir):
        raise ConfigError(f"--resume: nothing to resume at {plan.sweep_dir}")
    if not plan.resume and plan.name in list_dirs(plan.storage_root):  # SweepRecords may remove what it creates
        raise ConfigError(
            f"sweep {plan.sweep_dir} already exists; pass --resume to continue it or --name for a new one"
        )

    # Objectives are final metrics, absent from per-epoch results; Tune's strict check would
    # reject every epoch's result. Our searcher reads them only from the final result.
    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")
    records = SweepRecords(plan)
    with QuietConsole(plan.log_file, verbose=plan.verbose):
        try:
            try:
                connect_or_start(plan.address)
            except (ConnectionError, RuntimeError, ValueError) as exc:  # auth, version mismatch, a gone head
                raise ClusterError(f"Ray at {plan.address or 'a new local instance'}: {one_line(exc)}") from None
            # Before any trial: a cluster no trial fits is one line, not a sweep that waits forever.
            space = plan.space
            capacity = cluster_capacity(plan.address is None)
            concurrency = resolve_concurrency(space.resources, space.max_concurrent_trials, space.num_samples, capacity)
            return _run_sweep(plan, records, started, concurrency)
        except BaseException as exc:
            records.abandon(exc, say)
            raise
        finally:
            ray.shutdown()  # inside the quiet console: Ray's goodbyes go to the log too
            _name_log(plan)


def _name_log(plan: SweepPlan) -> None:
    """The last line: where the libraries' output went (copied next to the sweep's results when they live
    on a URI), unless the sweep's folder was removed with everything it created."""
    if plan.verbose or not plan.log_file.is_file():
        return
    shown = str(plan.log_file)
    if plan.log_copy:
        try:
            write_bytes(plan.log_copy, plan.log_file.read_bytes())
            shown = f"{redact_uri(plan.log_copy)} (and {plan.log_file})"
        except Exception as exc:  # the sweep's outcome stands; the local copy is still there
            say(f"log: could not copy it to {redact_uri(plan.log_copy)} ({one_line(exc)})")
    say(f"log:     {shown}   (Ray, Tune, Optuna and MLflow output; --verbose shows it here)")


def describe_cluster(resources: dict[str, float], address: str | None) -> str:
    """'a local Ray (2 CPUs)' or 'Ray at ADDRESS (64 CPUs, 8 GPUs)': the resources a sweep sees."""
    counts = [f"{resources.get(k, 0):g} {k}s" for k in ("CPU", "GPU") if resources.get(k, 0) or k == "CPU"]
    return f"{'Ray at ' + redact_uri(address) if address else 'a local Ray'} ({', '.join(counts)})"


def _run_sweep(plan: SweepPlan, records: SweepRecords, started: float, concurrency: Concurrency) -> int:
    log = say
    space, name = plan.space, plan.name
    # Train runs live inside the sweep's folder, next to Tune's own trial folders.
    runtime = TrialRuntime(space.resources, storage_path=plan.sweep_dir, max_failures=space.max_failures)
    cluster = describe_cluster(ray.cluster_resources(), plan.address)
    log(f"sweep {name}: {space.num_samples} trials of {space.path or 'the inline space'} on {cluster}")
    log(f"sweep {name}: at most {concurrency.trials} trials at once: {concurrency.source}")

    teacher_keys, teacher_scores = prepare_teacher(space, runtime, log)
    space = dataclasses.replace(space, fixed={**space.fixed, **teacher_keys})

    client = RedactingClient(plan.tracking_uri)
    parent_params = {  # credentials in a URI never reach MLflow
        "sweep.space": space.path,
        "sweep.name": name,
        "sweep.storage": redact_uri(plan.sweep_dir),
        "sweep.optuna_storage": redact_uri(plan.optuna_url),
        "sweep.study_name": name,
        SWEEP_OBJECTIVES_PARAM: Objective.join(space.objectives),
        "teacher.checkpoint": redact_uri(space.fixed.get("teacher.checkpoint", "")),
    }
    parent_id = start_or_resume_sweep_run(client, plan.experiment, name, parent_params, space.source, plan.resume)
    records.parent_id = parent_id
    for key, value in teacher_scores.items():
        client.log_metric(parent_id, f"teacher/{key}", value)

    callbacks = [
        TrialTracker(
            plan.tracking_uri,
            experiment_name=plan.experiment,
            parent_run_id=parent_id,
            sweep_name=name,
            sweep_dir=plan.sweep_dir,
        ),
        TrialProgress(space.objectives, to_flat(space.base)),
    ]
    if uses_staged_evaluation(space):
        # Finished trials' objectives, for the workers' AutoAttack decision (afm_ray.search.staged_aa).
        # Held until the sweep returns: Ray collects a named actor once no handle to it is left.
        finished_trials = start_finished_trials(name, space.objectives)  # noqa: F841
        runtime = dataclasses.replace(runtime, aa_gate=actor_name(name))
        callbacks.append(FinishedTrialsFeed(actor_name(name), space.objectives))

    # The Tune function only waits on its Train run: it takes no CPU, so on a 2-CPU laptop the trial
    # drivers cannot starve the workers; it reserves the memory it and its Train controller use.
    trainable = tune.with_resources(tune.with_parameters(train_driver_fn, runtime=runtime), TRIAL_DRIVER_RESOURCES)
    if plan.resume:
        tuner = tune.Tuner.restore(plan.sweep_dir, trainable, resume_unfinished=True, resume_errored=True)
    else:
        multi = len(space.objectives) > 1
        records.study_created = True  # OptunaSearch creates the study as it is built
        searcher = CompletedOnlyOptunaSearch(
            space=space.define_by_run(),
            metric=[o.metric for o in space.objectives] if multi else space.objectives[0].metric,
            mode=[o.mode for o in space.objectives] if multi else space.objectives[0].mode,
            sampler=build_sampler(space.sampler, space.seed),
            study_name=name,
            storage=optuna_storage(plan.optuna_url),
        )
        name_metrics(name, plan.optuna_url, [o.metric for o in space.objectives])
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(
                search_alg=searcher,
                scheduler=build_scheduler(space.scheduler, space.base.optim.epochs),
                num_samples=space.num_samples,
                max_concurrent_trials=concurrency.trials,
            ),
            run_config=tune.RunConfig(
                name=name,
                storage_path=plan.storage_root,
                verbose=0,
                callbacks=callbacks,
                failure_config=tune.FailureConfig(max_failures=1),
            ),
        )
    results = tuner.fit()
    elapsed = time.monotonic() - started
    interrupted = results.num_terminated < len(results) or len(results) < space.num_samples
    # An interrupted sweep's parent run stays open for --resume; a finished one is closed.
    client.set_terminated(parent_id, status="KILLED" if interrupted else "FINISHED")
    client.log_metric(parent_id, "sweep/wall_s", elapsed)
    print_summary(results, plan, elapsed=elapsed)
    if interrupted:
        say(f"interrupted: continue with  {plan.resume_command()}")
        return 130
    return 0


class RedactedRDBStorage(optuna.storages.RDBStorage):
    """Optuna's RDBStorage pickled with its URL redacted (Tune saves the searcher, and with it the
    storage, into the sweep's folder); unpickled in the driver that remembered the URL, whole again."""

    def __getstate__(self) -> dict[str, Any]:
        return {**super().__getstate__(), "url": redact_uri(self.url)}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__({**state, "url": recall(state["url"])})


def optuna_storage(optuna_url: str) -> RedactedRDBStorage:
    """The study's storage; its tables are created (on a new database) by one sweep at a time."""
    with schema_lock(optuna_url):
        return RedactedRDBStorage(optuna_url)


def name_metrics(study_name: str, optuna_url: str, metrics: list[str]) -> None:
    """Name the study's objectives, so optuna-dashboard shows "clean_acc", not "Objective 0"."""
    with warnings.catch_warnings():  # experimental in Optuna since 3.2
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.load_study(study_name=study_name, storage=optuna_url).set_metric_names(metrics)


class CompletedOnlyOptunaSearch(OptunaSearch):
    """OptunaSearch that never tells Optuna a truncated result as complete.

    A trial a scheduler stopped early ends with its last per-epoch result, which lacks the
    final metrics: Optuna records it as pruned, so it can never enter the Pareto front. So is a
    trial whose AutoAttack staged evaluation skipped (user attribute `aa_skipped`: why).
    Each Optuna trial also records its Tune trial id, which MLflow runs carry as a tag. A restored searcher
    takes over the trials asked of Optuna after its last save (`restore`).
    """

    def restore(self, checkpoint_path: str) -> None:
        super().restore(checkpoint_path)
        # Optuna trials asked after Tune last saved this searcher (the sweep's driver died in between: Tune saves
        # every ten seconds or so) are RUNNING in the study and unknown here. The next trials take them over,
        # with the parameters they were given, so that the study holds each trial once.
        known = {trial.number for trial in self._ot_trials.values()}
        running = self._ot_study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
        self._unclaimed = [trial._trial_id for trial in running if trial.number not in known]

    def suggest(self, trial_id: str) -> dict | None:
        unclaimed = self.__dict__.get("_unclaimed")
        if unclaimed and trial_id not in self._ot_trials:
            self._ot_trials[trial_id] = optuna.trial.Trial(self._ot_study, unclaimed.pop(0))
        params = super().suggest(trial_id)
        if trial_id in self._ot_trials:
            self._ot_trials[trial_id].set_user_attr("tune_trial_id", trial_id)
        return params

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        # Optuna records a single objective's intermediate values, but our objectives are final
        # metrics that per-epoch results lack (OptunaSearch would raise KeyError on them).
        if isinstance(self.metric, str) and self.metric not in result:
            return
        super().on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if result is not None and result.get(FINAL_RESULT_FLAG) and result.get(AA_SKIPPED_METRIC):
            # Staged evaluation skipped its AutoAttack: dominated, never on the front; PRUNED.
            if trial_id in self._ot_trials:
                self._ot_trials[trial_id].set_user_attr("aa_skipped", str(result.get(AA_SKIP_REASON_KEY, "")))
            result = None
        if result is not None and not result.get(FINAL_RESULT_FLAG):
            result = None
        super().on_trial_complete(trial_id, result=result, error=error)
