"""What a sweep resolves before anything starts: where it stores, what it is called, where it
tracks, and the preflight checks that must pass before Ray Tune is imported or any node is
requested (`preflight`, one line per check; `python -m afm_ray.sweep` runs them on every sweep).
Ray-free, and it writes nothing but a probe object it deletes, so a bad plan is refused in
seconds."""

from __future__ import annotations

import os
import re
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlparse

from afm_ray.config import ExperimentConfig, from_flat
from afm_ray.cost import teacher_cost
from afm_ray.data import check_available
from afm_ray.errors import ConfigError, DataError, StorageError
from afm_ray.methods import build_method
from afm_ray.names import TRAIN_TEACHER
from afm_ray.search_space import SearchSpace
from afm_ray.storage import file_size, is_uri, list_dirs, probe_writable, redact_text, redact_uri
from afm_ray.teacher import teacher_cache_dir, teacher_training_config


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
    parsed, shown = urlparse(uri), redact_uri(uri)  # messages name the URI without its credentials
    if parsed.scheme in ("http", "https"):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s) as response:
                if response.status != 200:
                    raise ConfigError(f"MLflow server {shown} answered /health with HTTP {response.status}")
        except (TimeoutError, urllib.error.URLError, ConnectionError) as exc:
            reason = getattr(exc, "reason", exc)
            raise ConfigError(
                f"MLflow tracking server {shown} is unreachable ({reason}); start it "
                f"(mlflow server --host 127.0.0.1 --port 5000) or pass another --tracking-uri"
            ) from None
    elif parsed.scheme == "sqlite":
        path = Path(uri[len("sqlite:///") :]) if uri.startswith("sqlite:///") else None
        if path is None or not path.is_absolute():
            raise ConfigError(f"tracking URI {shown!r}: use an absolute SQLite URI, e.g. sqlite:////abs/path/mlflow.db")
        if not path.parent.is_dir() or not os.access(path.parent, os.W_OK):
            raise ConfigError(f"tracking URI {shown!r}: folder {path.parent} does not exist or is not writable")
    elif parsed.scheme in ("", "file"):
        raise ConfigError(
            f"tracking URI {shown!r}: MLflow's file store is disabled; use sqlite:///<absolute path> "
            f"or http://host:port of an mlflow server"
        )
    from mlflow.tracking import MlflowClient

    try:
        MlflowClient(uri).search_experiments(max_results=1)
    except Exception as exc:
        raise ConfigError(f"tracking URI {shown!r} is not usable: {redact_text(str(exc).splitlines()[0])}") from None


def check_storage_writable(root: str) -> None:
    """--storage must take writes before a teacher trains or a trial starts: write and delete a
    probe object there (local folder or s3://, gs://, ... through pyarrow)."""
    try:
        probe_writable(root)
    except Exception as exc:  # PermissionError, pyarrow's OSError for a bucket, a missing scheme
        reason = redact_text(str(exc).splitlines()[0]) if str(exc) else type(exc).__name__
        raise StorageError(
            f"--storage {redact_uri(root)}: not writable ({reason}); pass a folder or bucket you can write"
        ) from None


def check_dataset_reachable(cfg: ExperimentConfig) -> None:
    """The dataset is where the workers will read it (data.name / data.root), checked by listing
    its files, not by reading its images."""
    try:
        check_available(cfg.data.name, cfg.data.root or None)
    except (FileNotFoundError, ValueError) as exc:
        raise DataError(f"data.root: {redact_text(str(exc).splitlines()[0])}") from None


def teacher_methods(space: SearchSpace) -> list[str]:
    """The methods of `space` (fixed or searched) that distil a teacher."""
    methods = [space.fixed.get("method.name", ExperimentConfig().method.name)]
    methods += [c for d in space.search if d.key == "method.name" for c in d.choices]
    return sorted({m for m in methods if build_method(m).needs_teacher})


def check_teacher(space: SearchSpace) -> str:
    """The teacher every trial distils exists (local or URI; its size is read, not its bytes), or
    the space says `teacher.checkpoint: train`: then the estimated cost of training it is the line
    returned. An empty teacher.checkpoint is refused, with that estimate, when a method needs one."""
    methods = teacher_methods(space)
    if not methods:
        return "teacher: none needed"
    cfg = from_flat(space.fixed)
    given = cfg.teacher.checkpoint
    if given in ("", TRAIN_TEACHER):
        cached = teacher_cache_dir(cfg) / "checkpoint.pt"
        if given == TRAIN_TEACHER and cached.is_file():
            return f"teacher: trained already, reused from the cache {cached}"
        cost = teacher_cost(cfg, teacher_training_config(cfg), on_gpu=space.resources["gpus_per_worker"] > 0)
        if given == "":
            raise ConfigError(
                f"teacher.checkpoint is empty but {', '.join(methods)} {'distils' if len(methods) == 1 else 'distil'} "
                "a teacher: give a checkpoint (path or "
                f"s3://, gs:// URI), or {TRAIN_TEACHER!r} to have the sweep train one first: {cost}"
            )
        return f"teacher: to be trained before the first trial: {cost}"
    try:
        size = file_size(given, "checkpoint.pt")
    except FileNotFoundError as exc:
        raise ConfigError(
            f"teacher.checkpoint: {exc}; give an existing checkpoint, or {TRAIN_TEACHER!r} to have the sweep train one"
        ) from None
    return f"teacher: {redact_uri(given)} ({size / 1e6:.1f} MB)"


def preflight_checks(space: SearchSpace, storage_root: str, tracking_uri: str) -> list[tuple[str, Callable[[], str]]]:
    """(name, check) of everything a sweep verifies before Ray starts, cheapest first: each check
    returns one line saying what it found, or raises a UserError of one line."""
    cfg = from_flat(space.fixed)

    def data() -> str:
        check_dataset_reachable(cfg)
        return f"data: {cfg.data.name}" + (f" at {redact_uri(cfg.data.root)}" if cfg.data.root else "")

    def storage() -> str:
        check_storage_writable(storage_root)
        return f"storage: {redact_uri(storage_root)} takes writes"

    def tracking() -> str:  # last: it may create an empty SQLite store
        check_tracking_uri(tracking_uri)
        return f"tracking: {redact_uri(tracking_uri)} answers"

    return [("data", data), ("storage", storage), ("teacher", lambda: check_teacher(space)), ("tracking", tracking)]


def preflight(space: SearchSpace, storage_root: str, tracking_uri: str) -> list[str]:
    """Run every preflight check in order; one line each. The first failure raises (a UserError)."""
    return [check() for _, check in preflight_checks(space, storage_root, tracking_uri)]
