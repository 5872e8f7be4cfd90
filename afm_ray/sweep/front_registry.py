"""Staged evaluation in a sweep (`eval.aa_policy: candidates`): the finished trials' objectives,
where the training workers can ask for them.

- `FrontRegistry`, a named Ray actor (no resources) created by the sweep driver, holds the
  final objectives of every trial that completed with AutoAttack measured, and answers
  afm_ray.staged_eval.aa_verdict for a trial about to run AutoAttack.
- `FrontRegistryFeed`, a Tune callback on the driver, adds each trial that completes; on the
  first step of a resumed sweep it also adds the trials finished before the interruption.
- `registry_gate(name)` is what a Train worker calls after PGD-20 (afm_ray.train.final_evaluation);
  if the actor cannot be reached it answers "run AutoAttack": skipping is only ever an optimisation.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import ray
from ray.tune import Callback

from afm_ray.names import AA_SKIPPED_METRIC, FINAL_RESULT_FLAG
from afm_ray.staged_eval import aa_verdict

NAMESPACE = "afm_ray"


def registry_name(sweep_name: str) -> str:
    return f"afm-ray-front:{sweep_name}"


@ray.remote(num_cpus=0)
class FrontRegistry:
    def __init__(self, objectives: Sequence[tuple[str, str]]):
        self.objectives = [tuple(o) for o in objectives]
        self.finished: dict[str, dict[str, float]] = {}

    def add(self, trial_id: str, metrics: dict[str, float]) -> None:
        self.finished[trial_id] = metrics

    def verdict(self, metrics: dict[str, float], margin: float) -> str | None:
        return aa_verdict(metrics, self.finished.items(), self.objectives, margin)

    def size(self) -> int:
        return len(self.finished)


def start_registry(sweep_name: str, objectives: Sequence[Any]) -> Any:
    """The sweep's registry actor (a fresh one; it lives as long as the driver's Ray job)."""
    pairs = [(o.metric, o.mode) for o in objectives]
    return FrontRegistry.options(name=registry_name(sweep_name), namespace=NAMESPACE, get_if_exists=True).remote(pairs)


def _finished_metrics(result: dict[str, Any] | None, objectives: Sequence[Any]) -> dict[str, float] | None:
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


class FrontRegistryFeed(Callback):
    """Tune callback: every trial that completes with its objectives measured joins the registry.

    It holds the registry's name, not a handle: Tune pickles its callbacks with the experiment,
    and a resumed sweep's driver starts a new registry under the same name.
    """

    def __init__(self, registry: str, objectives: Sequence[Any]):
        self.registry = registry
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
            ray.get_actor(self.registry, namespace=NAMESPACE).add.remote(trial.trial_id, metrics)


def registry_gate(sweep_registry: str) -> Callable[[dict[str, float], float], str | None]:
    """The worker side: ask the named registry whether this trial's AutoAttack can matter."""

    def gate(metrics: dict[str, float], margin: float) -> str | None:
        try:
            actor = ray.get_actor(sweep_registry, namespace=NAMESPACE)
            return ray.get(actor.verdict.remote(metrics, margin), timeout=60)
        except Exception:  # no registry (e.g. a restarted head): AutoAttack runs, nothing is lost
            return None

    return gate
