"""What several test modules build: sklearn's digits as tensors, a small student trained on them, an
MLflow store in a folder. Fixtures over these live in tests/conftest.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from mlflow import MlflowClient

from afm_ray.models import build_model


def digits() -> tuple[torch.Tensor, torch.Tensor]:
    """sklearn's 1797 digits as (N, 1, 8, 8) floats in [0, 1] (values /16) and int64 labels."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    return torch.tensor(x / 16.0, dtype=torch.float32).reshape(-1, 1, 8, 8), torch.tensor(y)


def trained_student(seed: int = 0, steps: int = 30, x: torch.Tensor | None = None, y: torch.Tensor | None = None):
    """afm-ray's small CNN (width 4, BatchNorm, normalisation inside) trained a little on digits, so its
    logits have a realistic scale; in eval mode."""
    if x is None or y is None:
        x, y = digits()
    torch.manual_seed(seed)
    model = build_model("small_cnn", num_classes=10, in_channels=1, mean=[0.3], std=[0.4], width=4)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval()


def digits_cnn(steps: int = 100) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """A plain tiny CNN (no normalisation, no BatchNorm) trained for ``steps`` Adam steps on the first 1500
    digits, and the 297 images it did not train on: a model the attacks can really hurt."""
    x, y = digits()
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(8 * 64, 10)
    )
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        idx = torch.randint(0, 1500, (128,))
        loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.zero_grad(set_to_none=True)
    return model, x[1500:], y[1500:]


def mlflow_store(root: Path, experiment: str) -> dict[str, Any]:
    """A SQLite MLflow store under ``root`` with one experiment whose artifacts live beside it."""
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(uri, uri)
    exp = client.create_experiment(experiment, artifact_location=str(root / "artifacts"))
    return {"uri": uri, "client": client, "exp": exp, "root": root}
