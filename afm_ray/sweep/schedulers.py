"""The space's `scheduler:` as a Ray Tune scheduler: FIFO, ASHA (one objective) or MO-ASHA.

`MOASHAScheduler` is the Tune glue around afm_ray.search.mo_asha.RungLadder (the decision logic, pure
and unit-tested): it reads each trial's per-epoch validation objectives from its results and
answers CONTINUE or STOP. A stopped trial ends with a per-epoch result (no FINAL_RESULT_FLAG), so the
sweep's searcher tells Optuna it was PRUNED and the front never sees it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler

from afm_ray.names import FINAL_RESULT_FLAG
from afm_ray.search.mo_asha import RungLadder
from afm_ray.search.specs import SchedulerSpec


class MOASHAScheduler(FIFOScheduler):
    """Asynchronous successive halving on the non-dominated rank of several per-epoch metrics
    (Schmucker et al. 2021; Syne Tune's MOASHA), one bracket.

    ``metrics``/``modes``: what is ranked at each rung (e.g. val/clean_acc and val/pgd10_acc, both
    max); ``time_attr``: the result key counting epochs; rungs at grace_period * rf**k < max_t.
    """

    def __init__(
        self,
        metrics: Sequence[str],
        modes: Sequence[str],
        *,
        max_t: int,
        grace_period: int = 1,
        reduction_factor: float = 3,
        margin: float = 0.0,
        time_attr: str = "epoch",
    ):
        super().__init__()
        self.metrics = tuple(metrics)
        self.time_attr = time_attr
        self.ladder = RungLadder(
            modes, grace_period=grace_period, reduction_factor=reduction_factor, max_t=max_t, margin=margin
        )
        self.num_stopped = 0

    def set_search_properties(self, metric: str | None, mode: str | None, **spec: Any) -> bool:
        return True  # ranks its own metrics; the searcher's objectives are final metrics

    def on_trial_result(self, tune_controller: Any, trial: Any, result: Mapping[str, Any]) -> str:
        if result.get(FINAL_RESULT_FLAG) or self.time_attr not in result or any(m not in result for m in self.metrics):
            return TrialScheduler.CONTINUE  # the final result (evaluation) or a result without the curves
        keep = self.ladder.on_result(trial.trial_id, float(result[self.time_attr]), [result[m] for m in self.metrics])
        if not keep:
            self.num_stopped += 1
            return TrialScheduler.STOP
        return TrialScheduler.CONTINUE

    def on_trial_error(self, tune_controller: Any, trial: Any) -> None:
        self.ladder.forget(trial.trial_id)  # a retried trial reports its epochs again

    def debug_string(self) -> str:
        sizes = ", ".join(f"epoch {m}: {len(r)}" for m, r in self.ladder.recorded.items())
        return f"Using MO-ASHA: num_stopped={self.num_stopped}; trials recorded per rung: {sizes}"


def build_scheduler(spec: SchedulerSpec, epochs: int) -> TrialScheduler | None:
    """The Tune scheduler of a validated `scheduler:` spec; None for FIFO (Tune's default).
    ``epochs``: the trials' optim.epochs."""
    if spec.name == "asha":
        # max_t one past the last epoch: the final (evaluation) result arrives after it.
        return ASHAScheduler(
            metric=spec.metrics[0],
            mode=spec.mode,
            time_attr="training_iteration",
            max_t=epochs + 1,
            grace_period=spec.grace_period,
            reduction_factor=spec.reduction_factor,
        )
    if spec.name == "mo_asha":
        return MOASHAScheduler(
            spec.metrics,
            ["max"] * len(spec.metrics),
            max_t=epochs,
            grace_period=spec.grace_period,
            reduction_factor=spec.reduction_factor,
            margin=spec.margin,
        )
    return None
