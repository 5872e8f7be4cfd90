"""Shared test set-up."""

import os

import pytest
import torch

# Tiny tensors on a small shared machine run fastest single-threaded (and stay deterministic).
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Teachers trained by tests go to a per-session cache, never the user's ~/.cache."""
    monkeypatch.setenv("AFM_RAY_CACHE", str(tmp_path_factory.getbasetemp() / "afm_cache"))
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", os.environ.get("MLFLOW_ALLOW_FILE_STORE", "false"))
