"""The AutoAttack gate of staged evaluation in a sweep (`eval.aa_policy: candidates`): may this
trial's AutoAttack still matter, given the trials that finished?

- `FinishedTrials`, a named Ray actor (no resources) created by the sweep driver, holds the final
  objectives of every trial that completed with AutoAttack measured, and answers
  afm_ray.search.staged_aa.aa_verdict for a trial about to run AutoAttack.
- `FinishedTrialsFeed`, a Tune callback on the driver, adds each trial that completes; on the
  first step of a resumed sweep it also adds the trials finished before the interruption.
- `aa_gate(name)` is what a Train worker calls after PGD-20 (afm_ray.evaluate.protocol.final_evaluation);
  if the actor cannot be reached it answers "run AutoAttack": skipping is only ever an optimisation.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import ray
from ray.tune import Callback

from afm_ray.names import AA_SKIPPED_METRIC, FINAL_RESULT_FLAG, Objective
from afm_ray.search.staged_aa import aa_verdict

NAMESPACE = "afm_ray"


def actor_name(sweep_name: str) -> str:
    return f"afm-ray-finished:{sweep_name}"


@ray.remote(num_cpus=0)
class FinishedTrials:
    def __init__(self, objectives: Sequence[Objective]):
        self.objectives = tuple(objectives)
        self.finished: dict[str, dict[str, float]] = {}

    def add(self, trial_id: str, metrics: dict[str, float]) -> None:
        self.finished[trial_id] = metrics

    def verdict(self, metrics: dict[str, float], margin: float) -> str | None:
        return aa_verdict(metrics, self.finished.items(), self.objectives, margin)

    def size(self) -> int:
        return len(self.finished)


def start_finished_trials(sweep_name: str, objectives: Sequence[Objective]) -> Any:
    """The sweep's actor of finished trials (it lives as long as the driver's Ray job)."""
    options = dict(name=actor_name(sweep_name), namespace=NAMESPACE, get_if_exists=True)
    return FinishedTrials.options(**options).remote(tuple(objectives))


def _finished_metrics(result: dict[str, Any] | None, objectives: Sequence[Objective]) -> dict[str, float] | None:
    """The objectives of a trial that completed with every objective measured (a skipped AutoAttack
    leaves aa_acc unmeasured: such a trial is no evidence against another); None for any other."""
    if not result or not result.get(FINAL_RESULT_FLAG) or result.get(AA_SKIPPED_METRIC):
        return None
    metrics = {}
    for objective in objectives:
        value = result.get(objective.metric)
        if not isinstance(value, (int, float)):
            return None
        metrics[objective.metric] = float(value)
    return metrics


class FinishedTrialsFeed(Callback):
    """Tune callback: every trial that completes with its objectives measured joins the actor.

    It holds the actor's name, not a handle: Tune pickles its callbacks with the experiment,
    and a resumed sweep's driver starts a new actor under the same name.
    """

    def __init__(self, actor: str, objectives: Sequence[Objective]):
        self.actor = actor
        self.objectives = list(objectives)
        self._primed = False

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_primed": False}

    def on_step_begin(self, iteration: int, trials: list, **info: Any) -> None:
        if self._primed:
            return
        self._primed = True  # a resumed sweep: the trials that finished before come back finished
        for trial in trials:
            if trial.status == "TERMINATED":
                self._add(trial)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._add(trial)

    def _add(self, trial: Any) -> None:
        metrics = _finished_metrics(trial.last_result, self.objectives)
        if metrics is not None:
            ray.get_actor(self.actor, namespace=NAMESPACE).add.remote(trial.trial_id, metrics)


def aa_gate(actor_name: str) -> Callable[[dict[str, float], float], str | None]:
    """The worker side: ask the named actor whether this trial's AutoAttack can matter."""

    def gate(metrics: dict[str, float], margin: float) -> str | None:
        try:
            actor = ray.get_actor(actor_name, namespace=NAMESPACE)
            return ray.get(actor.verdict.remote(metrics, margin), timeout=60)
        except Exception:  # no actor (e.g. a restarted head): AutoAttack runs, nothing is lost
            return None

    return gate
