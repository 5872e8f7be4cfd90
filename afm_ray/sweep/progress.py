"""Readable sweep progress: one line per trial event instead of Tune's status tables."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from ray.tune import Callback

from afm_ray.names import FINAL_RESULT_FLAG

SHOWN_CONFIG_KEYS = ("method.name", "attack.eps", "attack.steps", "method.tau", "augment.policy", "optim.lr")


class TrialProgress(Callback):
    def __init__(self, objectives: Sequence[Any] = ()):
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
                f"val/pgd={result.get('val/pgd_acc', float('nan')):.3f}  "
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
