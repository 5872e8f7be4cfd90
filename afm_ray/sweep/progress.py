"""What a sweep prints: one line per trial event instead of Tune's status tables, and its summary."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from ray.tune import Callback

from afm_ray.credentials import redact_uri
from afm_ray.domination import non_dominated
from afm_ray.names import AA_SKIPPED_METRIC, FINAL_RESULT_FLAG, Objective
from afm_ray.sweep.plan import SweepPlan

SHOWN_CONFIG_KEYS = ("method.name", "attack.eps", "attack.steps", "method.tau", "augment.policy", "optim.lr")


class TrialProgress(Callback):
    def __init__(self, objectives: Sequence[Objective] = ()):
        self.objectives = [o.metric for o in objectives]
        self._started: dict[str, float] = {}

    def _print(self, trial: Any, text: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] trial {trial.trial_id}: {text}", flush=True)

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._started[trial.trial_id] = time.monotonic()
        shown = "  ".join(f"{k}={_fmt(trial.config[k])}" for k in SHOWN_CONFIG_KEYS if k in trial.config)
        self._print(trial, f"started  {shown}")

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


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def print_summary(results: Any, plan: SweepPlan, *, elapsed: float) -> None:
    """The end of a sweep: trials completed (stopped, skipped), its Pareto-optimal trials, the next commands."""
    space, name, experiment = plan.space, plan.name, plan.experiment
    rows = []
    for result in results:
        m = dict(result.metrics or {})
        if m.get(FINAL_RESULT_FLAG) and all(isinstance(m.get(o.metric), (int, float)) for o in space.objectives):
            m["config"] = result.config or {}
            rows.append(m)
    finals = [dict(r.metrics or {}) for r in results]
    stopped = sum(1 for m in finals if m and not m.get(FINAL_RESULT_FLAG) and "epoch" in m)
    skipped = sum(1 for m in finals if m.get(FINAL_RESULT_FLAG) and m.get(AA_SKIPPED_METRIC))
    notes = (f", {stopped} stopped early" if stopped else "") + (f", {skipped} AutoAttack skipped" if skipped else "")
    print()
    print(f"sweep {name}: {len(rows)}/{len(results)} trials completed{notes} in {elapsed / 60:.1f} min")
    if rows:
        objectives = space.objectives
        front = non_dominated([[r[o.metric] for o in objectives] for r in rows], [o.mode for o in objectives])
        last = objectives[-1]
        best = sorted((rows[i] for i in front), key=lambda r: -r[last.metric] if last.mode == "max" else r[last.metric])
        print("Pareto-optimal trials:")
        keys = ["method.name", "attack.eps", "attack.steps", "method.tau", "augment.policy"]
        for r in best:
            cfg = r.get("config", {})
            desc = "  ".join(f"{k}={cfg[k]}" for k in keys if k in cfg)
            objs = "  ".join(f"{o.metric}={r[o.metric]:.3f}" for o in objectives)
            print(f"  {r.get('trial_id', '?')}: {objs}  {desc}")
    print()
    tracking_uri, optuna_url = redact_uri(plan.tracking_uri), redact_uri(plan.optuna_url)
    print(f"MLflow:  mlflow ui --backend-store-uri {tracking_uri}   (experiment {experiment!r})")
    print(f"Pareto:  python -m afm_ray.pareto --experiment {experiment!r} --tracking-uri {tracking_uri}")
    print(f"Optuna:  optuna-dashboard {optuna_url}   (study {name!r})")
