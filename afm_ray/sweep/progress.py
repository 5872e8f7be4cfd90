"""What a sweep prints: one line per trial event instead of Tune's status tables, and its summary."""

from __future__ import annotations

import shlex
import time
from collections.abc import Sequence
from typing import Any

from ray.tune import Callback

from afm_ray.config import to_flat
from afm_ray.credentials import redact_uri
from afm_ray.display import config_text
from afm_ray.domination import non_dominated
from afm_ray.names import AA_SKIPPED_METRIC, FINAL_RESULT_FLAG, Objective
from afm_ray.sweep.console import say
from afm_ray.sweep.plan import SweepPlan

# What a trial's lines and the summary show of its config (only where the method uses a key).
SHOWN_CONFIG_KEYS = (
    "method.name",
    "attack.eps",
    "attack.steps",
    "method.tau",
    "augment.policy",
    "optim.lr",
    "optim.weight_decay",
)


class TrialProgress(Callback):
    def __init__(self, objectives: Sequence[Objective] = (), defaults: dict[str, Any] | None = None):
        self.objectives = [o.metric for o in objectives]
        # A trial's config holds the keys the space sets; the rest (e.g. an unsearched weight decay) are
        # the config's defaults, shown too so every line says what the trial trained with.
        self.defaults = defaults or {}
        self._started: dict[str, float] = {}

    def _print(self, trial: Any, text: str) -> None:
        say(f"[{time.strftime('%H:%M:%S')}] trial {trial.trial_id}: {text}")

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._started[trial.trial_id] = time.monotonic()
        self._print(trial, f"started  {config_text({**self.defaults, **trial.config}, SHOWN_CONFIG_KEYS)}")

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        if result.get(FINAL_RESULT_FLAG):
            finals = "  ".join(
                f"{m}={result[m]:.3f}" for m in ("clean_acc", "pgd20_acc", "cw_acc", "aa_acc") if m in result
            )
            self._print(trial, f"final    {finals}")
        elif "epoch" in result:
            self._print(
                trial,
                f"epoch {int(result['epoch']):>3}  loss={result.get('train/loss', float('nan')):.4f}  "
                f"val/clean={result.get('val/clean_acc', float('nan')):.3f}  "
                f"val/pgd={result.get('val/pgd10_acc', float('nan')):.3f}  "
                f"{result.get('train/images_per_s', 0):.0f} img/s",
            )

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        took = time.monotonic() - self._started.get(trial.trial_id, time.monotonic())
        last = trial.last_result or {}
        state = "completed" if last.get(FINAL_RESULT_FLAG) else "stopped early"
        detail = ""
        if "time/worker_s" in last:  # what Ray itself added: start-up, placement, tear-down
            detail = (
                f" (training {last['time/worker_s'] - last['time/eval_s']:.0f} s, final evaluation "
                f"{last['time/eval_s']:.0f} s, Ray overhead {took - last['time/worker_s']:.0f} s)"
            )
        self._print(trial, f"{state} in {took:.0f} s{detail}")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._print(trial, f"FAILED (see {trial.local_path})")


def print_summary(results: Any, plan: SweepPlan, *, elapsed: float) -> None:
    """The end of a sweep: trials completed (stopped, skipped), its Pareto-optimal trials, the next commands."""
    space, name, experiment = plan.space, plan.name, plan.experiment
    rows = []
    for result in results:
        m = dict(result.metrics or {})
        if m.get(FINAL_RESULT_FLAG) and all(isinstance(m.get(o.metric), (int, float)) for o in space.objectives):
            m["config"] = {**to_flat(space.base), **(result.config or {})}
            rows.append(m)
    finals = [dict(r.metrics or {}) for r in results]
    stopped = sum(1 for m in finals if m and not m.get(FINAL_RESULT_FLAG) and "epoch" in m)
    skipped = sum(1 for m in finals if m.get(FINAL_RESULT_FLAG) and m.get(AA_SKIPPED_METRIC))
    notes = (f", {stopped} stopped early" if stopped else "") + (f", {skipped} AutoAttack skipped" if skipped else "")
    say()
    say(f"sweep {name}: {len(rows)}/{len(results)} trials completed{notes} in {elapsed / 60:.1f} min")
    if rows:
        objectives = space.objectives
        front = non_dominated([[r[o.metric] for o in objectives] for r in rows], [o.mode for o in objectives])
        last = objectives[-1]
        best = sorted((rows[i] for i in front), key=lambda r: -r[last.metric] if last.mode == "max" else r[last.metric])
        say("Pareto-optimal trials:")
        for r in best:
            objs = "  ".join(f"{o.metric}={r[o.metric]:.3f}" for o in objectives)
            say(f"  trial {r.get('trial_id', '?')}: {objs}  {config_text(r.get('config', {}), SHOWN_CONFIG_KEYS)}")
    say()
    tracking_uri, optuna_url = redact_uri(plan.tracking_uri), redact_uri(plan.optuna_url)
    say(f"MLflow:  mlflow ui --backend-store-uri {tracking_uri}   (experiment {experiment!r}; runs named by trial)")
    say(f"Pareto:  python -m afm_ray.pareto --experiment {shlex.quote(experiment)} --tracking-uri {tracking_uri}")
    say(f"Optuna:  optuna-dashboard {optuna_url}   (study {name!r})")
