"""The robust teacher: train one (PGD-AT or TRADES), cached by config hash, or use a checkpoint.

`python -m afm_ray.teacher [--config FILE] [--set key=value ...]` (afm_ray.cli) trains the
teacher that a config needs (once: later calls reuse the cache) and prints its path and
robustness; afm_ray.teacher.members loads it, frozen.

A cache entry is afm_ray.teacher.members' folder of epoch checkpoints: `checkpoint.pt` (the last
epoch's training state) and `epochs/epoch_NNNN.pt` (every epoch's weights, with their per-epoch
validation in `epochs/index.json`), so teacher.select can pick an early-stopped teacher without
training again: the selection is made when the teacher is loaded, not when it is trained, and is
not part of the cache key. The disk cost is one set of weights per epoch (0.1 MB per epoch for the
embedded teacher, 185 MB per epoch for a WRN-34-10).

The teacher's training config depends only on the data, the `teacher.*` section and the
evaluation budget, never on what a sweep varies for the student, so every trial of a sweep
distils the same teacher.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import uuid
from collections.abc import Callable
from pathlib import Path

import torch

from afm_ray.checkpoints import checkpoint_file
from afm_ray.config import ExperimentConfig, from_flat, to_flat
from afm_ray.errors import ConfigError, StorageError, one_line
from afm_ray.storage import probe_writable
from afm_ray.teacher.members import EPOCHS_DIR, INDEX, epoch_file_name
from afm_ray.train.loop import LocalReporter, train_fn_per_worker

#: Names of the folders a teacher trains in, beside its cache entry: .staging-<host>-<pid>-<random>.
STAGING_PREFIX = ".staging-"


def teacher_training_config(cfg: ExperimentConfig) -> ExperimentConfig:
    """The run that trains `cfg`'s teacher: adversarial training at the evaluation budget."""
    t = cfg.teacher
    return from_flat(
        {
            **{k: v for k, v in to_flat(cfg).items() if k.startswith("data.")},
            "student.arch": t.arch,
            "student.width": t.width,
            "student.depth": t.depth,
            "method.name": t.method,
            "optim.epochs": t.epochs,
            # The usual recipe of adversarial training: standard augmentation, PGD-10 at the
            # evaluation budget with step eps/4, SGD 0.1 with cosine decay.
            "augment.policy": "crop_flip",
            "attack.eps": cfg.eval_eps,
            "attack.norm": cfg.attack.norm,
            "attack.steps": 10,
            "eval.eps": cfg.eval_eps,
            "eval.attacks": "clean",
            "run.seed": 0,
            "run.device": cfg.run.device,
        }
    )


def teacher_cache_key(cfg: ExperimentConfig) -> str:
    flat = to_flat(teacher_training_config(cfg))
    # Where it runs and how it is accelerated do not change which teacher it is; nor do the keys that
    # choose among a run's weights (the teacher's run never sets them, and teacher.select picks an epoch
    # of the trained entry), so adding them kept the key of every teacher cached before.
    for key in ("run.device", "run.output_dir", "run.resume_from", "run.compile", "run.channels_last"):
        flat.pop(key, None)
    for key in ("student.select", "student.average", "student.ema_decay", "student.swa_start", "teacher.select"):
        flat.pop(key, None)
    return hashlib.sha256(json.dumps(flat, sort_keys=True).encode()).hexdigest()[:16]


def teacher_cache_dir(cfg: ExperimentConfig) -> Path:
    root = Path(cfg.teacher.cache_dir or os.environ.get("AFM_RAY_CACHE", "~/.cache/afm_ray")).expanduser()
    if not cfg.teacher.cache_dir:
        root = root / "teachers"
    name = f"{cfg.data.name}-{cfg.teacher.arch}-{cfg.teacher.method}-{teacher_cache_key(cfg)}"
    return root.resolve() / name


def ensure_teacher(cfg: ExperimentConfig, *, log: Callable[[str], None] = print, force: bool = False) -> Path:
    """The checkpoint file of `cfg`'s teacher: the given one, a cached one, or a newly trained one
    (teacher.checkpoint "" or "train"). A trained one is its cache entry's last epoch; its folder is
    the folder of epoch checkpoints that teacher.select picks from (afm_ray.teacher.members)."""
    if not cfg.teacher.trained_here:
        if len(cfg.teacher.members) > 1:
            raise ConfigError(f"teacher.checkpoint lists {len(cfg.teacher.members)} teachers; ensure_teacher takes one")
        return checkpoint_file(cfg.teacher.checkpoint)
    target = teacher_cache_dir(cfg)
    if (target / "checkpoint.pt").is_file() and not force:
        if cfg.teacher.select == "last" or (target / EPOCHS_DIR / INDEX).is_file():
            log(f"teacher: reusing {target}")
            return target / "checkpoint.pt"
        log(f"teacher: {target} holds no per-epoch checkpoints (cached before they were kept): training it again")
    check_cache_writable(cfg)
    tcfg = teacher_training_config(cfg)
    log(
        f"teacher: training {tcfg.student.arch} with {tcfg.method.name} for {tcfg.optim.epochs} epochs "
        f"(eps={tcfg.train_eps:.4g}); cached at {target}"
    )
    remove_stale_staging(target.parent)
    # Trained inside a staging folder next to the cache entry, named by host and process and
    # created by the first checkpoint (a run that fails on its data writes nothing): an interrupted
    # run leaves nothing in the cache, and what a killed one leaves is removed by the next
    # ensure_teacher on this host (remove_stale_staging).
    staging = target.parent / f"{STAGING_PREFIX}{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        reporter = LocalReporter(staging / "run", log=lambda line: log(f"teacher: {line}"), keep_all=True)
        train_fn_per_worker(to_flat(tcfg), reporter)
        assert reporter.latest_checkpoint is not None
        shutil.copy2(reporter.latest_checkpoint / "checkpoint.pt", staging / "checkpoint.pt")
        keep_epochs(reporter.checkpoints, staging / EPOCHS_DIR)
        shutil.rmtree(staging / "run")
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)  # atomic: a half-written teacher is never picked up from the cache
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target / "checkpoint.pt"


def keep_epochs(checkpoints: dict[int, Path], folder: Path) -> None:
    """Every epoch's weights (no optimiser state: half the size) as `epoch_NNNN.pt`, and `index.json` with
    each epoch's validation, so teacher.select reads one small file to choose."""
    folder.mkdir(parents=True)
    index = []
    for epoch, directory in sorted(checkpoints.items()):
        state = torch.load(directory / "checkpoint.pt", map_location="cpu", weights_only=True)
        kept = {k: state[k] for k in ("model", "config", "epoch", "metrics", "data") if k in state}
        torch.save(kept, folder / epoch_file_name(epoch))
        metrics = state.get("metrics", {})
        index.append(
            {"epoch": epoch, "file": epoch_file_name(epoch)}
            | {k: float(metrics[k]) for k in ("val/clean_acc", "val/pgd10_acc") if k in metrics}
        )
    (folder / INDEX).write_text(json.dumps(index, indent=1))


def check_cache_writable(cfg: ExperimentConfig) -> None:
    """The teacher cache takes writes: checked before a teacher trains, not after."""
    folder = teacher_cache_dir(cfg).parent
    try:
        probe_writable(str(folder))
    except OSError as exc:
        raise StorageError(
            f"teacher cache {folder}: not writable ({one_line(exc)}); set teacher.cache_dir "
            "(or $AFM_RAY_CACHE) to a folder you can write"
        ) from None


def remove_stale_staging(folder: Path) -> list[Path]:
    """Remove the staging folders that teacher trainings of this host left when they were killed
    (their process is gone); returns what was removed."""
    removed = []
    prefix = f"{STAGING_PREFIX}{socket.gethostname()}-"
    for path in folder.glob(f"{STAGING_PREFIX}*") if folder.is_dir() else ():
        pid = path.name[len(prefix) :].split("-", 1)[0]
        if path.name.startswith(prefix) and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True
