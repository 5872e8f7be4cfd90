"""What a sweep resolves before anything starts: where it stores, what it is called, where it
tracks (a `SweepPlan`). Ray-free and write-free; the checks that must pass before Ray starts are
afm_ray.preflight.sweep_checks."""

from __future__ import annotations

import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

from afm_ray.credentials import redact_uri
from afm_ray.errors import ConfigError
from afm_ray.search.space import SearchSpace
from afm_ray.storage import is_uri, list_dirs


@dataclass(frozen=True)
class SweepPlan:
    """One sweep, resolved: what it searches and where everything it records goes."""

    space: SearchSpace
    name: str  # the folder under storage_root, the Optuna study, the MLflow parent run's name
    experiment: str  # MLflow experiment
    tracking_uri: str
    storage_root: str  # Ray results: an absolute path or a URI
    optuna_url: str  # SQLAlchemy URL of the Optuna storage
    resume: bool = False
    address: str | None = None  # the Ray cluster to join; None starts a local Ray
    verbose: bool = False  # Ray, Tune, Optuna and MLflow print to the terminal (else to `log_file`)

    @property
    def sweep_dir(self) -> str:
        return f"{self.storage_root}/{self.name}"

    @property
    def log_file(self) -> Path:
        """Where the libraries' output goes: the sweep's folder when it is local; with a URI storage a
        local file, copied into the sweep's folder (`log_copy`) when the sweep ends."""
        if is_uri(self.storage_root):
            return Path(tempfile.gettempdir()) / f"afm-ray-{self.name}.log"
        return Path(self.sweep_dir) / "sweep.log"

    @property
    def log_copy(self) -> str | None:
        return f"{self.sweep_dir}/sweep.log" if is_uri(self.storage_root) else None

    def resume_command(self) -> str:
        """The command line that continues this sweep."""
        return f"python -m afm_ray.sweep --resume --name {self.name} --storage {redact_uri(self.storage_root)}" + (
            f" --space {self.space.path}" if self.space.path else ""
        )


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
