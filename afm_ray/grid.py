"""The `grid` sampler of a search space: every point of a finite space, each once.

A study that compares methods, augmentation policies and seeds wants each combination exactly
once, not a search. Optuna's `GridSampler` takes a product of value lists, so a conditional key
(`when:`) would repeat a point for every value of a key that does not apply to it. Optuna's
`BruteForceSampler` walks the define-by-run tree instead: the keys a trial asks for depend on
the values asked before, and no combination is drawn twice while untried ones remain (running
trials count as tried, so parallel trials never duplicate one).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import optuna


class GridSampler(optuna.samplers.BruteForceSampler):
    """`BruteForceSampler` for a sweep that Ray Tune drives (num_samples = the grid's size)."""

    def __init__(self, seed: int | None = None) -> None:
        with warnings.catch_warnings():  # experimental since Optuna 3.1, stable in use since
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            super().__init__(seed=seed)

    def after_trial(
        self, study: Any, trial: Any, state: optuna.trial.TrialState, values: Sequence[float] | None
    ) -> None:
        # The parent calls study.stop() once the tree is exhausted, which only works inside
        # study.optimize(); Tune asks for exactly num_samples trials and stops by itself.
        return None
