"""The head keeps no state, and no credential is written in a cluster file.

MLflow's backend store and the Optuna study must live in a database that outlives the head (the
PostgreSQL of clusters/README.md: RDS, Cloud SQL, or the StatefulSet of kuberay/postgres.yaml),
never in a file on it: a head that is preempted, recreated or torn down takes a SQLite file with
it, and `--resume` finds an empty study. MLflow's artifacts go to the bucket. The URLs carry a
password, so they come from the cloud's secret store or a Kubernetes Secret into the head's
environment (MLFLOW_BACKEND_STORE_URI for `mlflow server`, AFM_RAY_OPTUNA_STORAGE for
`python -m afm_ray.sweep`), never from a config, a command line or Ray's stored job entrypoint.
"""

from __future__ import annotations

import re
import shlex
from typing import Any

BUCKETS = ("s3://", "gs://")
SERVER_STORES = ("postgresql://", "postgresql+", "mysql://", "mysql+", "http://", "https://")
MLFLOW_STORE_ENV = "MLFLOW_BACKEND_STORE_URI"
OPTUNA_STORE_ENV = "AFM_RAY_OPTUNA_STORAGE"
# scheme://user:password@ with a literal password (a $VARIABLE is filled in at run time, from a secret).
CREDENTIAL = re.compile(r"\b[a-z][a-z0-9+.-]*://[^\s/:@$'\"]+:(?!\$)[^\s/@'\"]+@", re.I)


def is_file_store(uri: str) -> bool:
    """A store that is a file where the process runs: sqlite:, file:, or a plain path."""
    uri = uri.strip("'\"")
    return uri.startswith(("sqlite:", "file:", "/", "./", "~")) or "://" not in uri


def credential_problems(texts: list[str]) -> list[str]:
    """A password written into a cluster file is a password in git: it must come from the secret store."""
    problems = []
    for text in texts:
        for match in CREDENTIAL.finditer(text):
            shown = match.group(0).split("://", 1)[0]
            problems.append(
                f"a {shown}:// URL with a password is written in the file ({text.strip()[:40]!r}...): keep it in "
                f"the cloud's secret store or a Kubernetes Secret and pass it through the environment "
                f"({MLFLOW_STORE_ENV}, {OPTUNA_STORE_ENV})"
            )
    return problems


def _flag(words: list[str], flag: str) -> str | None:
    for i, word in enumerate(words):
        if word == flag and i + 1 < len(words):
            return words[i + 1]
        if word.startswith(flag + "="):
            return word.split("=", 1)[1]
    return None


def mlflow_server_problems(command: str, at: str, env: set[str]) -> list[str]:
    """An `mlflow server` command: its store in a database (given in `env` when not on the command line),
    its artifacts in the bucket. `env`: the variables the server's environment gets from a secret."""
    if "mlflow server" not in command:
        return []
    try:
        words = shlex.split(command.split("mlflow server", 1)[1])
    except ValueError:
        words = command.split("mlflow server", 1)[1].split()
    problems = []
    store = _flag(words, "--backend-store-uri")
    if store is not None and is_file_store(store):
        problems.append(
            f"{at}: MLflow's store {store} is a file on the head: a lost or recreated head loses every run; "
            f"use the PostgreSQL database, its URL in {MLFLOW_STORE_ENV} from the secret store (clusters/README.md)"
        )
    elif store is None and MLFLOW_STORE_ENV not in env:
        problems.append(
            f"{at}: the MLflow server gets no --backend-store-uri and no {MLFLOW_STORE_ENV} from a secret, so its "
            "store is a file in its working directory on the head; give it the PostgreSQL URL from the secret store"
        )
    artifacts = _flag(words, "--artifacts-destination") or _flag(words, "--default-artifact-root")
    if artifacts is None or not artifacts.startswith(BUCKETS):
        problems.append(
            f"{at}: MLflow's artifacts go to {artifacts or 'its working directory'} on the head; pass "
            "--artifacts-destination s3://BUCKET/mlflow-artifacts (or gs://)"
        )
    return problems


def sweep_store_problems(args: list[str], at: str, env: set[str] | None) -> list[str]:
    """The stores a `python -m afm_ray.sweep` on a cluster uses: none a file on the head.

    `env`: the variables the driver's environment gets from a secret, None where the command's
    cluster is not known (a README command: then a missing --optuna-storage is left to the config)."""
    problems = []
    optuna = _flag(args, "--optuna-storage")
    if optuna is not None and is_file_store(optuna):
        problems.append(
            f"{at}: --optuna-storage {optuna} is a file on the head: a lost or recreated head loses the study "
            f"and --resume cannot continue; leave the flag out and give the head {OPTUNA_STORE_ENV} (PostgreSQL) "
            "from the secret store"
        )
    elif optuna is None and env is not None and OPTUNA_STORE_ENV not in env:
        problems.append(
            f"{at}: the sweep gets no --optuna-storage and the head no {OPTUNA_STORE_ENV} from a secret: the study "
            "would be a file on the head"
        )
    tracking = _flag(args, "--tracking-uri")
    if tracking is not None and is_file_store(tracking):
        problems.append(
            f"{at}: --tracking-uri {tracking} is a file on the head; log to the MLflow server "
            "(http://127.0.0.1:5000), whose store is PostgreSQL"
        )
    return problems


def secret_env(container: dict[str, Any]) -> set[str]:
    """The variables a Kubernetes container takes from a Secret (valueFrom.secretKeyRef, envFrom secretRef)."""
    found = {
        e.get("name")
        for e in container.get("env") or []
        if isinstance(e, dict) and ((e.get("valueFrom") or {}).get("secretKeyRef") or {}).get("name")
    }
    if any(isinstance(e, dict) and e.get("secretRef") for e in container.get("envFrom") or []):
        found |= {MLFLOW_STORE_ENV, OPTUNA_STORE_ENV}  # a whole Secret as the environment: its keys are not known
    return found
