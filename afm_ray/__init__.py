"""afm-ray: hyperparameter sweeps of adversarial robustness distillation on Ray.

The commands are `python -m afm_ray.train | teacher | evaluate | sweep | pareto | export`. From
Python, the handful of calls README.md and docs/guide.md use are importable from here:

    import afm_ray

    client = afm_ray.client_for("sqlite:///mlflow.db")
    model, spec = afm_ray.fetch_student(client, "models:/afm-students@pareto-1")
    ranked = afm_ray.rank_trials(afm_ray.load_trials("afm-ray-default"), ["aa_acc:max", "clean_acc:max"])

They are imported on first use, so `import afm_ray.config` (or any light module) does not pull in
torch, MLflow or Ray.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# name -> the module that owns it
_PUBLIC = {
    "Objective": "afm_ray.names",
    "from_flat": "afm_ray.config",
    "load_search_space": "afm_ray.search.space",
    "client_for": "afm_ray.tracking.mlflow_runs",
    "load_trials": "afm_ray.tracking.mlflow_runs",
    "rank_trials": "afm_ray.pareto.ranking",
    "fetch_student": "afm_ray.tracking.student_model",
    "load_student": "afm_ray.tracking.student_model",
}
__all__ = ["__version__", *_PUBLIC]


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'afm_ray' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
