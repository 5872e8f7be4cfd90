"""The Optuna sampler of a search space's `sampler:` spec (afm_ray.search.specs): tpe, nsga2, random, grid.

`grid` runs every point of a finite space once. A study that compares methods, augmentation
policies and seeds wants each combination exactly once, not a search. Optuna's `GridSampler`
takes a product of value lists, so a conditional key (`when:`) would repeat a point for every
value of a key that does not apply to it. Optuna's `BruteForceSampler` walks the define-by-run
tree instead: the keys a trial asks for depend on the values asked before, and no combination
is drawn twice while untried ones remain (running trials count as tried, so parallel trials
never duplicate one).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import optuna

from afm_ray.search.specs import SamplerSpec


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


def build_sampler(spec: SamplerSpec, seed: int) -> Any:
    """The Optuna sampler ``spec`` names, seeded."""
    if spec.name == "grid":
        return GridSampler(seed=seed)
    if spec.name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if spec.name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=spec.population_size)
    # Multivariate, grouped TPE models the joint and the conditional keys (`when:`); the constant
    # liar keeps parallel trials from all being asked the same point.
    return optuna.samplers.TPESampler(
        seed=seed, n_startup_trials=spec.n_startup_trials, multivariate=True, group=True, constant_liar=True
    )
