"""What a single run (`train`, `teacher`, `evaluate`) checks before it computes anything: the
device is there, the data is where the config says, the checkpoints it reads exist, and the
folders it writes take writes. Each failure is a one-line UserError (afm_ray.errors); the
sweep has its own plan checks (afm_ray.sweep.plan)."""

from __future__ import annotations

from collections.abc import Sequence

from afm_ray.checkpoints import check_teacher_checkpoint, checkpoint_file
from afm_ray.config import ExperimentConfig
from afm_ray.data import check_available
from afm_ray.devices import resolve_device
from afm_ray.errors import CheckpointNotFoundError, DataError, StorageError, one_line
from afm_ray.names import TRAIN_TEACHER
from afm_ray.storage import probe_writable
from afm_ray.teacher import check_cache_writable, teacher_cache_dir


def check_run(
    cfg: ExperimentConfig,
    *,
    reads: Sequence[str] = ("teacher.checkpoint", "run.resume_from"),
    writes_output: bool = False,
    trains_teacher: bool = False,
) -> None:
    """Everything `cfg` needs that can be checked in milliseconds, cheapest first.

    `reads`: the checkpoint keys the run loads (when set). `writes_output`: the run writes
    checkpoints under run.output_dir. `trains_teacher`: the run trains the teacher unless the
    cache already holds it (then the cache must take writes).
    """
    resolve_device(cfg.run.device)
    try:
        check_available(cfg.data.name, cfg.data.root or None)
    except DataError as exc:
        raise type(exc)(f"data.root: {one_line(exc)}") from None
    for key in reads:
        section, name = key.split(".")
        path = getattr(getattr(cfg, section), name)
        if path and path != TRAIN_TEACHER:  # "train": the teacher is trained (or taken from the cache)
            try:
                checkpoint_file(path)
            except CheckpointNotFoundError as exc:
                raise CheckpointNotFoundError(f"{key}: {one_line(exc)}") from None
            if key == "teacher.checkpoint":
                check_teacher_checkpoint(cfg)
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
