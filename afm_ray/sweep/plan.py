"""What a sweep resolves before anything starts: where it stores, what it is called, where it
tracks. Ray-free and storage-free (reads only), so a bad plan is refused in seconds, before
Ray Tune is imported or any node is requested."""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path
from urllib.parse import urlparse

from afm_ray.config import ExperimentConfig
from afm_ray.data import check_available
from afm_ray.endpoints import bounded, check_mlflow_server, probe_timeout_s
from afm_ray.errors import ConfigError, DataError, StorageError, TrackingError, UserError, one_line
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


def check_sweep_name(root: str, name: str, resume: bool) -> None:
    """The name is one folder name; a new sweep's folder must not exist yet, a resumed one's must."""
    if not re.fullmatch(r"[A-Za-z0-9_][\w.-]*", name):
        raise ConfigError(f"--name {name!r}: use letters, digits, '_', '-' and '.' (it names a folder and a study)")
    exists = name in list_dirs(root)
    if resume and not exists:
        raise ConfigError(f"--resume: no sweep {name!r} under {root}; check --name and --storage")
    if not resume and exists:
        raise ConfigError(f"sweep {root}/{name} already exists; pass --resume to continue it or --name for a new one")


def check_tracking_uri(uri: str, timeout_s: float | None = None, experiment: str | None = None) -> None:
    """Fail fast, before Ray starts, if the tracking backend cannot be reached; creates nothing
    (a SQLite store that does not exist yet is only checked for a writable folder)."""
    parsed = urlparse(uri)
    if parsed.scheme in ("http", "https"):
        check_mlflow_server(uri, timeout_s)
    elif parsed.scheme == "sqlite":
        path = Path(uri[len("sqlite:///") :]) if uri.startswith("sqlite:///") else None
        if path is None or not path.is_absolute():
            raise TrackingError(f"tracking URI {uri!r}: use an absolute SQLite URI, e.g. sqlite:////abs/path/mlflow.db")
        _check_sqlite_file(path, f"tracking URI {uri!r}")
        if not path.exists():
            return  # the sweep creates it; nothing in it to check
    elif parsed.scheme in ("", "file"):
        raise TrackingError(
            f"tracking URI {uri!r}: MLflow's file store is disabled; use sqlite:///<absolute path> "
            f"or http://host:port of an mlflow server"
        )
    from mlflow.tracking import MlflowClient

    try:
        client = MlflowClient(uri)
        client.search_experiments(max_results=1)
        found = client.get_experiment_by_name(experiment) if experiment else None
    except Exception as exc:
        raise TrackingError(f"tracking URI {uri!r} is not usable: {one_line(exc)}") from None
    if found is not None and found.lifecycle_stage == "deleted":
        raise TrackingError(
            f"MLflow experiment {experiment!r} is deleted at {uri}; restore it (mlflow experiments restore "
            f"--experiment-id {found.experiment_id}) or pick another --experiment"
        )


def _check_sqlite_file(path: Path, label: str) -> None:
    """A SQLite file can be created in its folder, or is there and is an SQLite database."""
    if path.is_dir():
        raise UserError(f"{label}: {path} is a directory, expected an SQLite file")
    if path.exists():
        with open(path, "rb") as fh:
            header = fh.read(16)
        if header and header != b"SQLite format 3\x00":
            raise UserError(f"{label}: {path} exists but is not an SQLite database")
        if not os.access(path, os.W_OK):
            raise UserError(f"{label}: {path} is not writable")
    elif not path.parent.is_dir() or not os.access(path.parent, os.W_OK):
        raise UserError(f"{label}: folder {path.parent} does not exist or is not writable")


def check_optuna_storage(url: str) -> None:
    """--optuna-storage is an SQLAlchemy URL Optuna can open: an SQLite file that can be created
    (or is a database), or a server that answers; checked without creating anything."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    label = f"--optuna-storage {url!r}"
    try:
        parsed = make_url(url)
        parsed.get_dialect()
    except ArgumentError:
        raise StorageError(f"{label}: not an SQLAlchemy URL; e.g. sqlite:////abs/path/optuna.db") from None
    except NoSuchModuleError as exc:
        raise StorageError(f"{label}: {one_line(exc)}; use sqlite, postgresql or mysql") from None
    except ImportError as exc:
        raise StorageError(f"{label}: its database driver is not installed ({one_line(exc)})") from None
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database or ""
        if database in ("", ":memory:"):
            raise StorageError(f"{label}: an in-memory database would lose the study; name a file")
        try:
            _check_sqlite_file(Path(database).expanduser().resolve(), label)
        except UserError as exc:
            raise StorageError(str(exc)) from None
        return
    if parsed.host:
        port = parsed.port or {"postgresql": 5432, "mysql": 3306}.get(parsed.get_backend_name(), 0)
        try:
            timeout_s = probe_timeout_s()
            bounded(lambda: socket.create_connection((parsed.host, port), timeout=timeout_s).close(), timeout_s + 1)
        except (OSError, TimeoutError) as exc:
            raise StorageError(f"{label}: no database answers at {parsed.host}:{port} ({one_line(exc)})") from None


def check_storage_writable(root: str) -> None:
    """--storage must take writes before a teacher trains or a trial starts: write and delete a
    probe object there (local folder or s3://, gs://, ... through pyarrow)."""
    try:
        probe_writable(root)
    except Exception as exc:  # PermissionError, pyarrow's OSError for a bucket, a missing scheme
        reason = one_line(exc)
        raise StorageError(
            f"--storage {root}: not writable ({reason}); pass a folder or bucket you can write"
        ) from None


def check_dataset_reachable(cfg: ExperimentConfig) -> None:
    """The dataset is where the workers will read it (data.name / data.root), checked by listing
    its files, not by reading its images."""
    try:
        check_available(cfg.data.name, cfg.data.root or None)
    except DataError as exc:
        raise type(exc)(f"data.root: {one_line(exc)}") from None
