"""What a command checks before it computes anything or any node is requested: each check takes
milliseconds (network probes give up after a bounded time-out), creates nothing but a probe
object it deletes, and fails as one line (an afm_ray.errors.UserError).

- a single run (`train`, `teacher`, `evaluate`): `check_run`: device, data, the checkpoints it
  reads, the folders it writes;
- a sweep: `sweep_checks`: data reachable, storage writable, the teacher there (or explicitly
  `train`, with its cost), the tracking store and the Optuna storage usable; no Ray.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from urllib.parse import urlparse

from afm_ray.checkpoints import checkpoint_file
from afm_ray.config import ExperimentConfig
from afm_ray.cost import teacher_cost
from afm_ray.credentials import redact_text, redact_uri
from afm_ray.data import check_available
from afm_ray.databases import (
    SERVER_BACKENDS,
    check_separate_stores,
    check_tables,
    is_server_url,
    probe_database,
    schema_lock,
)
from afm_ray.devices import resolve_device
from afm_ray.endpoints import check_mlflow_server
from afm_ray.errors import (
    CheckpointNotFoundError,
    ConfigError,
    DataError,
    StorageError,
    TrackingError,
    UserError,
    one_line,
)
from afm_ray.names import TRAIN_TEACHER, needs_teacher
from afm_ray.search.space import SearchSpace
from afm_ray.storage import file_size, probe_writable
from afm_ray.teacher.members import check_teachers, resolve_members
from afm_ray.teacher.training import check_cache_writable, teacher_cache_dir, teacher_training_config

# What to pass when a dataset is not where data.root says: the key and a value of the right shape.
DATA_ROOT_FIX = {
    "cifar10": "--set data.root=DIR, the folder that holds cifar-10-batches-py/",
    "cifar100": "--set data.root=DIR, the folder that holds cifar-100-python/",
    "parquet": "--set data.root=DIR_OR_URI of the train*.parquet and test*.parquet files",
    "mnist5k": "--set data.root=PATH of mnist_5k.csv.gz, or --set data.name=digits (ships with scikit-learn)",
}


def check_dataset(cfg: ExperimentConfig) -> str:
    """The dataset is where the workers will read it (data.name / data.root), checked by listing
    its files, not by reading its images; returns the line that says so. The error names the key
    and the fix (`--set data.root=...`)."""
    try:
        check_available(cfg.data.name, cfg.data.root or None)
    except DataError as exc:
        fix = DATA_ROOT_FIX.get(cfg.data.name)
        raise type(exc)(f"data.root: {redact_text(one_line(exc))}" + (f"; fix: {fix}" if fix else "")) from None
    return f"data: {cfg.data.name}" + (f" at {redact_uri(cfg.data.root)}" if cfg.data.root else "")


def check_run(
    cfg: ExperimentConfig,
    *,
    reads: Sequence[str] = ("teacher.checkpoint", "run.resume_from"),
    writes_output: bool = False,
    trains_teacher: bool = False,
) -> None:
    """Everything a single run of `cfg` needs, cheapest first.

    `reads`: the checkpoint keys the run loads (when set). `writes_output`: the run writes
    checkpoints under run.output_dir. `trains_teacher`: the run trains the teacher unless the
    cache already holds it (then the cache must take writes).
    """
    resolve_device(cfg.run.device)
    check_dataset(cfg)
    for key in reads:
        section, name = key.split(".")
        path = getattr(getattr(cfg, section), name)
        if key == "teacher.checkpoint" and not cfg.teacher.trained_here:
            check_teachers(cfg)  # every member (an ensemble's several), teacher.select, keys and shapes
        elif path and path != TRAIN_TEACHER:  # "train": the teacher is trained (or taken from the cache)
            try:
                checkpoint_file(path)
            except CheckpointNotFoundError as exc:
                raise CheckpointNotFoundError(f"{key}: {one_line(exc)}") from None
    if writes_output:
        try:
            probe_writable(cfg.run.output_dir)
        except OSError as exc:
            raise StorageError(
                f"run.output_dir {cfg.run.output_dir}: not writable ({one_line(exc)}); set it to a folder you can write"
            ) from None
    if (
        trains_teacher
        and cfg.teacher.checkpoint in ("", TRAIN_TEACHER)
        and not (teacher_cache_dir(cfg) / "checkpoint.pt").is_file()
    ):
        check_cache_writable(cfg)


def check_tracking_uri(uri: str, timeout_s: float | None = None, experiment: str | None = None) -> None:
    """Fail fast, before Ray starts, if the tracking backend cannot be reached; creates nothing
    (a SQLite store that does not exist yet is only checked for a writable folder)."""
    parsed, shown = urlparse(uri), redact_uri(uri)  # messages name the URI without its credentials
    if parsed.scheme in ("http", "https"):
        check_mlflow_server(uri, timeout_s)
    elif parsed.scheme == "sqlite":
        path = Path(uri[len("sqlite:///") :]) if uri.startswith("sqlite:///") else None
        if path is None or not path.is_absolute():
            raise TrackingError(
                f"tracking URI {shown!r}: use an absolute SQLite URI, e.g. sqlite:////abs/path/mlflow.db"
            )
        _check_sqlite_file(path, f"tracking URI {shown!r}")
        if not path.exists():
            return  # the sweep creates it; nothing in it to check
    elif is_server_url(uri):  # MLflow's SQL store on PostgreSQL, MySQL, ...: the server, the login, the database
        label = f"tracking URI {shown!r}"
        check_tables(probe_database(uri, label, TrackingError, timeout_s), label, "mlflow", TrackingError)
    elif parsed.scheme in ("", "file"):
        raise TrackingError(
            f"tracking URI {shown!r}: MLflow's file store is disabled; use sqlite:///<absolute path> "
            f"or http://host:port of an mlflow server"
        )
    from mlflow.tracking import MlflowClient

    try:
        with schema_lock(uri):  # the first use of a new database creates MLflow's tables: one sweep at a time
            client = MlflowClient(uri)
            client.search_experiments(max_results=1)
        found = client.get_experiment_by_name(experiment) if experiment else None
    except Exception as exc:
        raise TrackingError(f"tracking URI {shown!r} is not usable: {redact_text(one_line(exc))}") from None
    if found is not None and found.lifecycle_stage == "deleted":
        raise TrackingError(
            f"MLflow experiment {experiment!r} is deleted at {shown}; restore it (mlflow experiments restore "
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


def check_optuna_storage(url: str, tracking_uri: str | None = None) -> None:
    """--optuna-storage is an SQLAlchemy URL Optuna can open: an SQLite file that can be created
    (or is a database), or a database server that answers, takes the login and has the database,
    which is not MLflow's (`tracking_uri`); checked without creating anything."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    label = f"--optuna-storage {redact_uri(url)!r}"
    try:
        parsed = make_url(url)
        parsed.get_dialect()
    except ArgumentError:
        raise StorageError(f"{label}: not an SQLAlchemy URL; e.g. sqlite:////abs/path/optuna.db") from None
    except NoSuchModuleError as exc:
        raise StorageError(f"{label}: {one_line(exc)}; use sqlite, postgresql or mysql") from None
    except ImportError as exc:
        raise StorageError(f"{label}: its database driver is not installed ({one_line(exc)})") from None
    if tracking_uri is not None:
        check_separate_stores(tracking_uri, url, StorageError)
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database or ""
        if database in ("", ":memory:"):
            raise StorageError(f"{label}: an in-memory database would lose the study; name a file")
        try:
            _check_sqlite_file(Path(database).expanduser().resolve(), label)
        except UserError as exc:
            raise StorageError(str(exc)) from None
        return
    if parsed.get_backend_name() in SERVER_BACKENDS:
        check_tables(probe_database(url, label, StorageError), label, "optuna", StorageError)


def check_storage_writable(root: str) -> str:
    """--storage must take writes before a teacher trains or a trial starts: write and delete a
    probe object there (local folder or s3://, gs://, ... through pyarrow)."""
    try:
        probe_writable(root)
    except Exception as exc:  # PermissionError, pyarrow's OSError for a bucket, a missing scheme
        reason = redact_text(one_line(exc))
        raise StorageError(
            f"--storage {redact_uri(root)}: not writable ({reason}); pass a folder or bucket you can write"
        ) from None
    return f"storage: {redact_uri(root)} takes writes"


def teacher_methods(space: SearchSpace) -> list[str]:
    """The methods of `space` (fixed or searched) that distil a teacher."""
    methods = [space.base.method.name]
    methods += [c for d in space.search if d.key == "method.name" for c in d.choices]
    return sorted({m for m in methods if needs_teacher(m)})


def check_teacher(space: SearchSpace) -> str:
    """The teacher every trial distils exists (local or URI; its size is read, not its bytes), or
    the space says `teacher.checkpoint: train`: then the estimated cost of training it is the line
    returned. An empty teacher.checkpoint is refused, with that estimate, when a method needs one."""
    methods = teacher_methods(space)
    if not methods:
        return "teacher: none needed"
    cfg = space.base
    given = cfg.teacher.checkpoint
    if given in ("", TRAIN_TEACHER):
        cached = teacher_cache_dir(cfg) / "checkpoint.pt"
        if given == TRAIN_TEACHER and cached.is_file():
            return f"teacher: trained already, reused from the cache {cached}"
        cost = teacher_cost(cfg, teacher_training_config(cfg), on_gpu=space.resources.gpus_per_worker > 0)
        if given == "":
            raise ConfigError(
                f"teacher.checkpoint is empty but {', '.join(methods)} {'distils' if len(methods) == 1 else 'distil'} "
                "a teacher: give a checkpoint with --set teacher.checkpoint=PATH (or an s3://, gs:// URI), or "
                f"--set teacher.checkpoint={TRAIN_TEACHER} to have the sweep train one first: {cost}"
            )
        return f"teacher: to be trained before the first trial: {cost}"
    sizes = []
    for member in resolve_members_or_uris(cfg):
        try:
            sizes.append(file_size(member, "checkpoint.pt"))
        except FileNotFoundError as exc:
            raise ConfigError(
                f"teacher.checkpoint: {exc}; give an existing checkpoint, or {TRAIN_TEACHER!r} to have the sweep "
                "train one"
            ) from None
    if len(sizes) == 1:
        return f"teacher: {redact_uri(given)} ({sizes[0] / 1e6:.1f} MB)"
    return (
        f"teacher: an ensemble of {len(sizes)} ({', '.join(f'{s / 1e6:.1f}' for s in sizes)} MB): {redact_uri(given)}"
    )


def resolve_members_or_uris(cfg: ExperimentConfig) -> list[str]:
    """The checkpoints teacher.select picks from each member; a member that is not there is returned as
    it is (its size check says so in one line)."""
    try:
        return resolve_members(cfg)
    except CheckpointNotFoundError:
        return list(cfg.teacher.members)


def check_local_resources(space: SearchSpace) -> str:
    """Without --address the sweep starts a Ray on this machine: it must hold one trial's GPUs and
    CPUs, or no trial would ever start (a local Ray does not grow)."""
    r = space.resources
    if r.gpus_per_worker > 0:
        import torch

        have = torch.cuda.device_count()
        if have < r.gpus:
            raise ConfigError(
                f"resources: a trial needs {r.gpus:g} GPU(s) ({r.num_workers} worker(s) x {r.gpus_per_worker:g}) and "
                f"this machine has {have or 'none'}: a local Ray would never start it; pass --address of a cluster "
                "with GPUs (clusters/README.md)"
            )
    cpus = os.cpu_count() or 1
    if r.cpus > cpus:
        raise ConfigError(
            f"resources: a trial needs {r.cpus:g} CPUs ({r.num_workers} worker(s) x {r.cpus_per_worker:g}) and this "
            f"machine has {cpus}: lower resources.cpus_per_worker in the space, or pass --address of a bigger cluster"
        )
    gpus = f", {r.gpus:g} GPU(s)" if r.gpus_per_worker > 0 else ""
    return f"resources: a trial takes {r.cpus:g} CPU(s){gpus}; this machine fits {int(cpus // max(r.cpus, 1e-9))}"


def check_cluster_resources(address: str, space: SearchSpace) -> str:
    """The dry run's look at a running cluster (--address): its nodes, CPUs and GPUs now, and how many
    trials fit at once. It joins as a driver and leaves, starting nothing. No GPU yet where trials need
    one is not a failure: an autoscaling cluster adds GPU workers once trials ask for them."""
    import math

    import ray

    try:
        ray.init(address=address, log_to_driver=False, logging_level="ERROR")
        total = ray.cluster_resources()
        nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise UserError(f"resources: could not join Ray at {redact_uri(address)} ({one_line(exc)})") from None
    finally:
        ray.shutdown()
    r = space.resources
    cpus, gpus = total.get("CPU", 0.0), total.get("GPU", 0.0)
    fits = [cpus / max(r.cpus, 1e-9)] + ([gpus / r.gpus] if r.gpus_per_worker > 0 else [])
    now = math.floor(min(fits) + 1e-9)
    line = f"resources: {nodes} node(s) with {cpus:g} CPUs, {gpus:g} GPUs now; a trial takes {r.cpus:g} CPU(s)"
    line += f", {r.gpus:g} GPU(s)" if r.gpus_per_worker > 0 else ""
    if now >= 1:
        return f"{line}: {now} trial(s) at a time"
    return f"{line}: none fits now; trials wait until the autoscaler adds workers (clusters/README.md)"


def sweep_checks(
    space: SearchSpace, storage_root: str, tracking_uri: str, experiment: str | None = None
) -> list[tuple[str, Callable[[], str]]]:
    """(name, check) of everything a sweep verifies before Ray starts, cheapest first: each check
    returns one line saying what it found, or raises a UserError of one line. (A sweep on a local
    Ray adds `check_local_resources`; a cluster's resources are the dry run's to ask.)"""

    def tracking() -> str:  # last: it may ask a server over the network
        check_tracking_uri(tracking_uri, experiment=experiment)
        return f"tracking: {redact_uri(tracking_uri)} answers"

    return [
        ("data", lambda: check_dataset(space.base)),
        ("storage", lambda: check_storage_writable(storage_root)),
        ("teacher", lambda: check_teacher(space)),
        ("tracking", tracking),
    ]
