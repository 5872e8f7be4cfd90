"""What a sweep leaves behind when it stops early.

A sweep records itself in three places: an MLflow parent run, an Optuna study and a folder
under --storage (Tune's experiment state, trial folders, the teacher copy). `SweepRecords`
notes which of them this invocation created, so that when the sweep stops with an exception
or an interrupt:

- before its first trial started, everything it created is removed again (the parent run is
  marked FAILED and deleted, the study deleted, the sweep folder removed): the same command
  starts it afresh, and no RUNNING run or empty study is left to confuse `pareto` or Optuna;
- once a trial has started (or when resuming), nothing recorded is touched: the parent run is
  marked FAILED (KILLED for an interrupt) and the line to resume is printed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

from afm_ray.names import PARENT_TAG
from afm_ray.storage import remove_tree
from afm_ray.sweep.plan import SweepPlan
from afm_ray.tracking.mlflow_runs import tags_match


class SweepRecords:
    """The records of one invocation of `run_sweep`; see the module docstring."""

    def __init__(self, plan: SweepPlan):
        self.name = plan.name
        self.sweep_dir = plan.sweep_dir
        self.tracking_uri = plan.tracking_uri
        self.optuna_url = plan.optuna_url
        self.resume = plan.resume
        self.resume_hint = plan.resume_command()
        self.parent_id: str | None = None
        self.study_created = False

    def _client(self) -> Any:
        from mlflow.tracking import MlflowClient

        return MlflowClient(self.tracking_uri)

    def trials_started(self) -> bool:
        """Whether any trial has left a record: an MLflow child run or an Optuna trial."""
        if self.parent_id is not None:
            client = self._client()
            experiment = client.get_run(self.parent_id).info.experiment_id
            if client.search_runs([experiment], filter_string=tags_match({PARENT_TAG: self.parent_id})):
                return True
        if self.study_created:
            import optuna

            with contextlib.suppress(KeyError):  # the study was never written
                return bool(optuna.load_study(study_name=self.name, storage=self.optuna_url).trials)
        return False

    def abandon(self, exc: BaseException, log: Callable[[str], None]) -> None:
        """Leave consistent records after `exc` stopped the sweep (see the module docstring)."""
        interrupted = isinstance(exc, KeyboardInterrupt)
        what = "interrupted" if interrupted else "failed"
        try:
            started = self.resume or self.trials_started()
            if not started:
                self._remove()
                log(f"sweep {self.name}: {what} before its first trial; nothing was kept (run the command again)")
                return
            if self.parent_id is not None:
                self._client().set_terminated(self.parent_id, status="KILLED" if interrupted else "FAILED")
        except Exception as cleanup_error:  # never hide the error that stopped the sweep
            log(f"sweep {self.name}: could not tidy its records after it {what} ({type(cleanup_error).__name__})")
        log(f"sweep {self.name}: {what}; what it recorded is kept: continue with  {self.resume_hint}")

    def _remove(self) -> None:
        if self.parent_id is not None:
            client = self._client()
            client.set_terminated(self.parent_id, status="FAILED")
            client.delete_run(self.parent_id)
        if self.study_created:
            import optuna

            with contextlib.suppress(KeyError):
                optuna.delete_study(study_name=self.name, storage=self.optuna_url)
        remove_tree(self.sweep_dir)  # checked absent at the start (not resuming): all of it is ours
