"""What a sweep resolves before anything starts: where it stores, what it is called, where it
tracks. Ray-free and storage-free (reads only), so a bad plan is refused in seconds, before
Ray Tune is imported or any node is requested."""

from __future__ import annotations

import os
import re
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

from afm_ray.config import ExperimentConfig
from afm_ray.data import check_available
from afm_ray.errors import ConfigError, DataError, StorageError
from afm_ray.storage import is_uri, list_dirs, probe_writable


def storage_root(storage: str | None) -> str:
    """--storage as Ray wants it: a URI as given, or an absolute local path (default ./ray_results)."""
    if storage and is_uri(storage):
        return storage.rstrip("/")
    return str(Path(storage or "ray_results").expanduser().resolve())


def newest_sweep(root: str, space_name: str) -> str | None:
    """The newest `<space name>-<timestamp>` sweep under `root`, for --resume without --name."""
    names = sorted(n for n in list_dirs(root) if re.fullmatch(re.escape(space_name) + r"-\d{8}-\d{6}", n))
    return names[-1] if names else None


def check_tracking_uri(uri: str, timeout_s: float = 5.0) -> None:
    """Fail fast, before Ray starts, if the tracking backend cannot be reached."""
    parsed = urlparse(uri)
    if parsed.scheme in ("http", "https"):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s) as response:
                if response.status != 200:
                    raise ConfigError(f"MLflow server {uri} answered /health with HTTP {response.status}")
        except (TimeoutError, urllib.error.URLError, ConnectionError) as exc:
            reason = getattr(exc, "reason", exc)
            raise ConfigError(
                f"MLflow tracking server {uri} is unreachable ({reason}); start it "
                f"(mlflow server --host 127.0.0.1 --port 5000) or pass another --tracking-uri"
            ) from None
    elif parsed.scheme == "sqlite":
        path = Path(uri[len("sqlite:///") :]) if uri.startswith("sqlite:///") else None
        if path is None or not path.is_absolute():
            raise ConfigError(f"tracking URI {uri!r}: use an absolute SQLite URI, e.g. sqlite:////abs/path/mlflow.db")
        if not path.parent.is_dir() or not os.access(path.parent, os.W_OK):
            raise ConfigError(f"tracking URI {uri!r}: folder {path.parent} does not exist or is not writable")
    elif parsed.scheme in ("", "file"):
        raise ConfigError(
            f"tracking URI {uri!r}: MLflow's file store is disabled; use sqlite:///<absolute path> "
            f"or http://host:port of an mlflow server"
        )
    from mlflow.tracking import MlflowClient

    try:
        MlflowClient(uri).search_experiments(max_results=1)
    except Exception as exc:
        raise ConfigError(f"tracking URI {uri!r} is not usable: {str(exc).splitlines()[0]}") from None


def check_storage_writable(root: str) -> None:
    """--storage must take writes before a teacher trains or a trial starts: write and delete a
    probe object there (local folder or s3://, gs://, ... through pyarrow)."""
    try:
        probe_writable(root)
    except Exception as exc:  # PermissionError, pyarrow's OSError for a bucket, a missing scheme
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise StorageError(
            f"--storage {root}: not writable ({reason}); pass a folder or bucket you can write"
        ) from None


def check_dataset_reachable(cfg: ExperimentConfig) -> None:
    """The dataset is where the workers will read it (data.name / data.root), checked by listing
    its files, not by reading its images."""
    try:
        check_available(cfg.data.name, cfg.data.root or None)
    except (FileNotFoundError, ValueError) as exc:
        raise DataError(f"data.root: {str(exc).splitlines()[0]}") from None
