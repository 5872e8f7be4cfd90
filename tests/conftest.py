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


@pytest.fixture(scope="session")
def postgres():
    """A real PostgreSQL server for the session (tests/postgres.py), started on first use. No server
    binaries fails the test unless $AFM_RAY_ALLOW_NO_POSTGRES=1 (then it skips); a server that does
    not start always fails it."""
    from postgres import ALLOW_NONE_ENV, server_binaries, start_postgres, stop_postgres

    if server_binaries() is None and os.environ.get(ALLOW_NONE_ENV) == "1":
        pytest.skip(f"no PostgreSQL server binaries and ${ALLOW_NONE_ENV}=1")
    try:
        server = start_postgres()
    except FileNotFoundError as exc:
        pytest.fail(f"{exc}; or set {ALLOW_NONE_ENV}=1 to skip the PostgreSQL tests", pytrace=False)
    yield server
    stop_postgres(server)


@pytest.fixture
def pg_database(postgres):
    """The name of a new, empty database on the session's server, owned by the test role."""
    return postgres.create_database()
