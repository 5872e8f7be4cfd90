"""teacher.checkpoint and teacher.select: which checkpoints teach, and the teacher (or ensemble) they make.

teacher.checkpoint is one checkpoint or several, comma-separated (an ensemble, afm_ray.ensemble). Each
is a checkpoint file (or a folder holding `checkpoint.pt`), or a folder of epoch checkpoints, from which
teacher.select picks one:

- afm-ray's layout, which a teacher the project trains keeps in its cache entry (and a sweep copies
  to its storage): `checkpoint.pt` (the last epoch) and `epochs/epoch_NNNN.pt` (the weights of every
  epoch) with `epochs/index.json` (each epoch's val/clean_acc and val/pgd10_acc on the teacher's own
  held-out split); local or at a URI;
- a local folder of files or folders named with their epoch (`epoch_12.pt`, `model-12.pth`,
  `checkpoint_epoch0012/`: the last number in the name is the epoch), e.g. an official script's saves.

teacher.select: `last` (the folder's `checkpoint.pt`, else its highest epoch), `best_pgd` (the epoch
with the highest val/pgd10_acc, the earliest on a tie; needs those numbers: afm-ray's checkpoints
carry them) or `epoch:N`. A single checkpoint takes `last` only.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from afm_ray.checkpoints import FILENAME, check_teacher_checkpoint, checkpoint_file, load_teacher
from afm_ray.config import ExperimentConfig
from afm_ray.data import ImageDataset
from afm_ray.ensemble import TeacherEnsemble
from afm_ray.errors import CheckpointError, CheckpointNotFoundError, ConfigError, one_line
from afm_ray.storage import is_uri, local_file

EPOCHS_DIR = "epochs"
INDEX = "index.json"
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt", ".tar", ".bin")


def epoch_file_name(epoch: int) -> str:
    return f"epoch_{epoch:04d}.pt"


@dataclass(frozen=True)
class EpochCheckpoint:
    epoch: int
    path: str  # local path or URI of the checkpoint
    val_pgd10_acc: float | None = None  # None: not recorded (a checkpoint from elsewhere)


def epoch_checkpoints(folder: str) -> list[EpochCheckpoint] | None:
    """The epoch checkpoints of a folder, by epoch; None when ``folder`` is one checkpoint (a file, or
    a folder with `checkpoint.pt` and no `epochs/`)."""
    if is_uri(folder):
        try:
            index = local_file(f"{folder.rstrip('/')}/{EPOCHS_DIR}", INDEX)
        except FileNotFoundError:
            return None
        return _read_index(index, f"{folder.rstrip('/')}/{EPOCHS_DIR}")
    root = Path(folder).expanduser()
    if not root.is_dir():
        return None
    if (root / EPOCHS_DIR / INDEX).is_file():
        return _read_index(root / EPOCHS_DIR / INDEX, str(root / EPOCHS_DIR))
    if (root / EPOCHS_DIR).is_dir():
        root = root / EPOCHS_DIR
    elif (root / FILENAME).is_file():
        return None
    found: dict[int, str] = {}
    for child in sorted(root.iterdir()):
        numbers = re.findall(r"\d+", child.stem if child.is_file() else child.name)
        usable = (child.is_file() and child.suffix in CHECKPOINT_SUFFIXES) or (child / FILENAME).is_file()
        if numbers and usable:
            epoch = int(numbers[-1])
            if epoch in found:
                raise CheckpointError(f"teacher.checkpoint {folder}: epoch {epoch} twice ({found[epoch]}, {child})")
            found[epoch] = str(child)
    return [EpochCheckpoint(e, found[e], _recorded_score(found[e])) for e in sorted(found)] or None


def _read_index(index: Path, base: str) -> list[EpochCheckpoint]:
    try:
        rows = json.loads(Path(index).read_text())
        return sorted(
            (EpochCheckpoint(int(r["epoch"]), f"{base}/{r['file']}", r.get("val/pgd10_acc")) for r in rows),
            key=lambda c: c.epoch,
        )
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{index}: not an epoch index ({type(exc).__name__}: {one_line(exc)})") from None


def _recorded_score(path: str) -> float | None:
    """val/pgd10_acc as an afm-ray checkpoint records it (read without loading its tensors); None if absent."""
    try:
        state = torch.load(checkpoint_file(path), map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # not loadable: found out (and said in one line) when it is loaded
        return None
    value = state.get("metrics", {}).get("val/pgd10_acc") if isinstance(state, dict) else None
    return float(value) if isinstance(value, (int, float)) else None


def resolve_member(path: str, select: str) -> str:
    """The checkpoint of member ``path`` that teacher.select ``select`` names (see the module docstring)."""
    epochs = epoch_checkpoints(path)
    if epochs is None:
        if select != "last":
            raise ConfigError(
                f"teacher.select {select}: teacher.checkpoint {path} is one checkpoint, not a folder of epoch "
                "checkpoints; use teacher.select=last, or give the folder of a teacher's epochs"
            )
        return path
    if select == "last":
        if not is_uri(path) and (Path(path).expanduser() / FILENAME).is_file():
            return str(Path(path).expanduser() / FILENAME)
        if is_uri(path):
            return f"{path.rstrip('/')}/{FILENAME}"
        return epochs[-1].path
    if select == "best_pgd":
        unscored = [c for c in epochs if c.val_pgd10_acc is None]
        if unscored:
            raise ConfigError(
                f"teacher.select best_pgd: {unscored[0].path} records no val/pgd10_acc (not an afm-ray checkpoint); "
                "pick the epoch with teacher.select=epoch:N"
            )
        return min(epochs, key=lambda c: (-float(c.val_pgd10_acc or 0.0), c.epoch)).path
    n = int(select.split(":", 1)[1])
    chosen = [c for c in epochs if c.epoch == n]
    if not chosen:
        held = f"epochs {epochs[0].epoch}..{epochs[-1].epoch}" if len(epochs) > 1 else f"epoch {epochs[0].epoch}"
        raise ConfigError(f"teacher.select: {select} but teacher.checkpoint {path} holds {held}")
    return chosen[0].path


def resolve_members(cfg: ExperimentConfig) -> list[str]:
    """The checkpoint each member of teacher.checkpoint teaches with, teacher.select applied; a missing
    member fails in one line naming it."""
    resolved = []
    for member in cfg.teacher.members:
        try:
            checkpoint = resolve_member(member, cfg.teacher.select)
            checkpoint_file(checkpoint)
        except CheckpointNotFoundError as exc:
            raise CheckpointNotFoundError(f"teacher.checkpoint: {one_line(exc)}") from None
        resolved.append(checkpoint)
    return resolved


def check_teachers(cfg: ExperimentConfig) -> list[str]:
    """Before any compute: every member is there, teacher.select can pick from it, and it loads (weights
    only) as the architecture teacher.arch names. Returns the checkpoints that will teach."""
    resolved = resolve_members(cfg)
    for checkpoint in resolved:
        check_teacher_checkpoint(cfg, checkpoint)
    return resolved


def load_teachers(
    cfg: ExperimentConfig, data: ImageDataset, *, device: torch.device | str = "cpu", tau: float = 1.0
) -> nn.Module:
    """The frozen teacher of ``cfg``: one checkpoint's model, or the ensemble of several read at ``tau``."""
    members: Sequence[nn.Module] = [
        load_teacher(checkpoint, data, device=device, cfg=cfg) for checkpoint in resolve_members(cfg)
    ]
    if len(members) == 1:
        return members[0]
    return TeacherEnsemble(members, tau).to(device).eval().requires_grad_(False)
