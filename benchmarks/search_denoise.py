"""The denoised objective of a recorded table: a Gaussian-process smoother of each objective over
the searched keys, and a held-out check of how well it predicts a trial it did not see.

Why: each recorded accuracy is one draw, on a few hundred test images (binomial noise) of one
training run (seed noise). Scoring a searcher by the hypervolume of those draws rewards finding
the one lucky draw, not a good configuration. The smoother's posterior mean at a recorded
configuration is what that configuration scores on average, as far as the table can tell.

The model, per objective: accuracies standardised; features = one-hot categorical keys and the
numeric keys scaled to [0, 1] (log-scaled for log-uniform keys; a conditional key that does not
apply at 0.5, the method's one-hot says which apply); kernel = constant x RBF with one length
scale per feature + a white-noise term (the seed-to-seed spread, learned); each row's own
binomial variance p(1-p)/n added on the diagonal (known, not learned). Hyperparameters by
maximum marginal likelihood (scikit-learn, ``RESTARTS`` random restarts by default, fixed seed).

Held-out check (``cross_validate``): 10-fold; per objective the held-out RMSE against the
recorded value, the RMSE a perfect smoother would have (the noise alone: sqrt(white + binomial)),
R^2 of the held-out predictions, and the coverage of the held-out 95% predictive intervals.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from afm_ray.search.space import SearchSpace

OBJECTIVE_METRICS = ("clean_acc", "aa_acc")
RESTARTS = 3  # of the marginal-likelihood optimiser, per objective


@dataclass
class Smoother:
    """One fitted GP per objective; ``mean`` is the denoised value of each row it was fitted on,
    ``predict`` the denoised value anywhere in the space (the surrogate)."""

    mean: np.ndarray  # (rows, objectives)
    noise_var: np.ndarray  # (objectives,) learned seed-to-seed variance, accuracy units^2
    kernels: list[str] = field(default_factory=list)
    models: list[tuple[Any, float, float]] = field(default_factory=list)  # (GP, mean, sd) per objective

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Denoised objectives at feature rows ``x`` (see ``features``), clipped to [0, 1]."""
        out = [mu + sd * gp.predict(np.atleast_2d(x)) for gp, mu, sd in self.models]
        return np.clip(np.stack(out, axis=1), 0.0, 1.0)


def features(frame: pd.DataFrame, space: SearchSpace) -> np.ndarray:
    """The smoother's inputs for rows with columns ``param:<key>`` (NaN where a key does not apply)."""
    cols: list[np.ndarray] = []
    for dist in space.search:
        x = frame[f"param:{dist.key}"]
        if dist.kind == "choice":
            values = x.astype(str).to_numpy()
            cols += [(values == str(c)).astype(float) for c in dist.choices]
            continue
        v = x.to_numpy(float)
        if dist.kind == "loguniform":
            scaled = (np.log(v) - math.log(dist.low)) / (math.log(dist.high) - math.log(dist.low))
        else:
            scaled = (v - dist.low) / (dist.high - dist.low)
        cols.append(np.where(np.isnan(scaled), 0.5, scaled))
    return np.stack(cols, axis=1)


def features_of(params: dict[str, Any], space: SearchSpace) -> np.ndarray:
    """``features`` of one configuration given as a mapping (the replay's hot path: no DataFrame)."""
    out: list[float] = []
    for dist in space.search:
        value = params.get(dist.key, np.nan)
        if dist.kind == "choice":
            out += [float(str(value) == str(c)) for c in dist.choices]
        elif value is None or (isinstance(value, float) and math.isnan(value)):
            out.append(0.5)
        elif dist.kind == "loguniform":
            out.append((math.log(value) - math.log(dist.low)) / (math.log(dist.high) - math.log(dist.low)))
        else:
            out.append((float(value) - dist.low) / (dist.high - dist.low))
    return np.array([out])


def _fit_one(
    x: np.ndarray, y: np.ndarray, n: np.ndarray, seed: int, restarts: int = RESTARTS
) -> tuple[Any, float, float]:
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.gaussian_process import GaussianProcessRegressor
    from sklearn.gaussian_process.kernels import RBF, ConstantKernel, WhiteKernel

    mu, sd = float(np.mean(y)), float(np.std(y)) or 1.0
    p = np.clip(y, 0.5 / n, 1 - 0.5 / n)
    binomial = p * (1 - p) / n / sd**2
    kernel = ConstantKernel(1.0, (1e-2, 1e2)) * RBF(np.ones(x.shape[1]), (1e-2, 1e3)) + WhiteKernel(0.1, (1e-6, 1.0))
    gp = GaussianProcessRegressor(kernel, alpha=binomial, n_restarts_optimizer=restarts, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # a length scale at its bound: that key does not matter
        gp.fit(x, (y - mu) / sd)
    return gp, mu, sd


def fit(frame: pd.DataFrame, space: SearchSpace, seed: int = 0, restarts: int = RESTARTS) -> Smoother:
    x = features(frame, space)
    n = frame["n_samples"].to_numpy(float)
    noise, kernels, models = [], [], []
    for metric in OBJECTIVE_METRICS:
        y = frame[metric].to_numpy(float)
        gp, mu, sd = _fit_one(x, y, n, seed, restarts)
        noise.append(float(gp.kernel_.k2.noise_level) * sd**2)
        kernels.append(str(gp.kernel_))
        models.append((gp, mu, sd))
    smoother = Smoother(np.zeros((len(frame), len(models))), np.array(noise), kernels, models)
    # predict: the latent mean (the WhiteKernel adds only to K(X, X), not to K(X*, X)).
    smoother.mean = smoother.predict(x)
    return smoother


def cross_validate(frame: pd.DataFrame, space: SearchSpace, folds: int = 10, seed: int = 0) -> dict[str, Any]:
    """Held-out fit of the smoother, per objective (see the module docstring)."""
    from scipy.stats import norm

    x = features(frame, space)
    n = frame["n_samples"].to_numpy(float)
    order = np.random.default_rng(seed).permutation(len(frame))
    out: dict[str, Any] = {"folds": folds, "rows": len(frame)}
    for metric in OBJECTIVE_METRICS:
        y = frame[metric].to_numpy(float)
        pred, pred_sd, noise_sd = np.zeros(len(y)), np.zeros(len(y)), np.zeros(len(y))
        for k in range(folds):
            test = order[k::folds]
            train = np.setdiff1d(order, test)
            gp, mu, sd = _fit_one(x[train], y[train], n[train], seed)
            m, s = gp.predict(x[test], return_std=True)  # s includes the white (seed) noise
            p = np.clip(m * sd + mu, 0.5 / n[test], 1 - 0.5 / n[test])
            binomial = p * (1 - p) / n[test]
            pred[test] = mu + sd * m
            pred_sd[test] = np.sqrt((s * sd) ** 2 + binomial)
            noise_sd[test] = np.sqrt(gp.kernel_.k2.noise_level * sd**2 + binomial)
        z = norm.ppf(0.975)
        residual = y - pred
        out[metric] = {
            "rmse": float(np.sqrt(np.mean(residual**2))),
            "noise_rmse": float(np.sqrt(np.mean(noise_sd**2))),
            "r2": float(1 - np.sum(residual**2) / np.sum((y - y.mean()) ** 2)),
            "coverage95": float(np.mean(np.abs(residual) <= z * pred_sd)),
        }
    return out
