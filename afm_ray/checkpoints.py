"""Checkpoint files: one `checkpoint.pt` per directory, loadable with `weights_only=True`.

A checkpoint holds the model's state dict, the flat config that built it and a description
of its data (class count, image shape, normalisation: `DataSpec`), so the model rebuilds from
the file alone, without the dataset; plus the optimiser and scheduler state when it is a
training checkpoint.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from afm_ray.config import ExperimentConfig, from_flat
from afm_ray.cost import dataset_shapes
from afm_ray.data import ImageDataset
from afm_ray.errors import CheckpointError, CheckpointNotFoundError, ConfigError, one_line
from afm_ray.models import build_model, model_kwargs
from afm_ray.storage import is_uri, local_file
from afm_ray.weight_layouts import WRAPPER_KEYS, to_our_layout, unwrap_state_dict

FILENAME = "checkpoint.pt"


@dataclass(frozen=True)
class DataSpec:
    """What a model needs from its dataset, without the images: class count, (C, H, W) and the
    per-channel normalisation (and the dataset's name, for messages)."""

    num_classes: int
    image_shape: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    name: str = ""

    @classmethod
    def of(cls, data: ImageDataset | DataSpec) -> DataSpec:
        return cls(data.num_classes, tuple(data.image_shape), tuple(data.mean), tuple(data.std), data.name)

    def to_dict(self) -> dict[str, Any]:
        """Plain ints, floats, lists and a string: loadable with torch.load(weights_only=True)."""
        return {
            "name": self.name,
            "num_classes": int(self.num_classes),
            "image_shape": [int(v) for v in self.image_shape],
            "mean": [float(v) for v in self.mean],
            "std": [float(v) for v in self.std],
        }

    @classmethod
    def from_dict(cls, values: Any) -> DataSpec:
        """The inverse of to_dict; ValueError when `values` is not one."""
        try:
            shape = tuple(int(v) for v in values["image_shape"])
            mean, std = tuple(float(v) for v in values["mean"]), tuple(float(v) for v in values["std"])
            spec = cls(int(values["num_classes"]), shape, mean, std, str(values.get("name", "")))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"not a data description ({type(exc).__name__}: {exc})") from None
        if len(shape) != 3 or len(mean) != shape[0] or len(std) != shape[0] or spec.num_classes < 1:
            raise ValueError(f"not a consistent data description: {values}")
        return spec


def save_training_state(
    directory: str | Path,
    *,
    model: nn.Module,
    config: Mapping[str, Any],
    epoch: int,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    metrics: Mapping[str, float] | None = None,
    data: ImageDataset | DataSpec | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write `checkpoint.pt` in `directory` atomically; `data` describes the model's dataset, so
    `load_model` can rebuild the model without loading the data. `model` is the student (what
    `load_model` rebuilds); `extra` holds what else a resumed run needs (`train_model`: the training
    weights when they are not the student, `student_weights`: afm_ray.student_weights' state)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {
        "model": model.state_dict(),
        "config": dict(config),
        "epoch": epoch,
        "metrics": dict(metrics or {}),
    }
    if data is not None:
        state["data"] = DataSpec.of(data).to_dict()
    if optimizer is not None:
        state["optimizer"] = optimizer.state_dict()
    if scheduler is not None:
        state["scheduler"] = scheduler.state_dict()
    state.update(extra or {})
    path = directory / FILENAME
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)  # atomic: a crash mid-write never leaves a truncated checkpoint
    return path


def checkpoint_file(path: str | Path) -> Path:
    """Accept the checkpoint directory or the file itself, local or at a URI (s3://, gs://)."""
    if is_uri(path):
        try:
            return local_file(str(path), FILENAME)
        except FileNotFoundError as exc:
            raise CheckpointNotFoundError(f"no checkpoint: {exc}") from None
    path = Path(path)
    file = path / FILENAME if path.is_dir() else path
    if not file.is_file():
        raise CheckpointNotFoundError(
            f"no checkpoint at {str(path)!r}: expected a directory containing {FILENAME} or the file itself"
        )
    return file


def load_training_state(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    file = checkpoint_file(path)
    try:
        state = torch.load(file, map_location=map_location, weights_only=True)
    except Exception as exc:  # a pickle of arbitrary objects, a truncated or empty file, not torch at all
        raise CheckpointError(
            f"{file}: not a loadable afm-ray checkpoint ({type(exc).__name__}: {one_line(exc)})"
        ) from None
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise CheckpointError(f"{file}: not an afm-ray checkpoint (expected keys 'model' and 'config')")
    if not isinstance(state["config"], Mapping):
        raise CheckpointError(f"{file}: its stored config is a {type(state['config']).__name__}, expected a mapping")
    return state


def stored_config(state: Mapping[str, Any], file: str | Path) -> ExperimentConfig:
    """The config a checkpoint was trained with; a bad one is blamed on the checkpoint."""
    try:
        return from_flat(state["config"])
    except ConfigError as exc:
        raise CheckpointError(f"{file}: its stored config is invalid ({exc})") from None


def load_resume_state(
    path: str | Path, model: nn.Module, optimizer: Any, scheduler: Any, student_weights: Any = None
) -> int:
    """Load a training checkpoint into `model` (its training weights), `optimizer`, `scheduler` and
    `student_weights` (an afm_ray.student_weights.StudentWeights: the average, the best epoch so far);
    returns its epoch."""
    file = checkpoint_file(path)
    state = load_training_state(file)
    missing = [k for k in ("optimizer", "scheduler", "epoch") if k not in state]
    if missing:
        raise CheckpointError(
            f"run.resume_from {path}: {file} holds no {', '.join(missing)}; resume needs a training checkpoint"
        )
    try:
        model.load_state_dict(state.get("train_model", state["model"]))
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if student_weights is not None and "student_weights" in state:
            student_weights.load_state_dict(state["student_weights"], state["model"])
        return int(state["epoch"])
    except (RuntimeError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"run.resume_from {path}: does not fit this run's model ({one_line(exc)})") from None


def load_model(
    path: str | Path,
    data: ImageDataset | DataSpec | None = None,
    *,
    device: torch.device | str = "cpu",
    fallback: Any = None,
) -> tuple[nn.Module, ExperimentConfig | None]:
    """Rebuild the model a checkpoint holds, checked against `data`; returns it and its config.

    An afm-ray checkpoint names its architecture in its stored config (`student.*`); a bare
    state dict (from elsewhere) is built as `fallback` (an object with arch/width/depth) says.
    With `data` None, the checkpoint's own data description is used, so no dataset is read.
    Loading always uses `weights_only=True`: a checkpoint can never run code.
    """
    file, spec, weights, stored, state = _model_state(path, fallback)
    if data is None:
        data = _stored_data(state, stored, file)
    model = build_model(spec.arch, **model_kwargs(spec, data))
    notes: list[str] = []
    if stored is None:  # a state dict from elsewhere: RobustBench's or a training script's key names
        weights, notes = to_our_layout(weights, spec.arch, data.image_shape[0])
    _check_state_dict(model.state_dict(), weights, file, _described(spec), data, notes)
    model.load_state_dict(weights)
    return model.to(device), stored


def _described(spec: Any) -> str:
    """'wrn' (depth 34, width 10): the architecture as teacher.* names it, for messages."""
    sizes = ", ".join(f"{k} {getattr(spec, k)}" for k in ("depth", "width") if getattr(spec, k, 0))
    return f"{spec.arch!r}" + (f" ({sizes})" if sizes else "")


def _model_state(path: str | Path, fallback: Any) -> tuple[Path, Any, Mapping[str, torch.Tensor], Any, Any]:
    """(file, architecture spec, weights, stored config or None, the whole loaded state) of a
    checkpoint; see load_model."""
    file = checkpoint_file(path)
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(
            f"checkpoint {file}: cannot be loaded with weights_only=True "
            f"({type(exc).__name__}: {one_line(exc)}); save a state dict, not a pickled module"
        ) from None
    stored = None
    if isinstance(state, dict) and "model" in state and "config" in state:
        if not isinstance(state["config"], Mapping):
            raise CheckpointError(f"checkpoint {file}: its stored config is not a mapping")
        stored = stored_config(state, file)
        spec, weights = stored.student, state["model"]
    elif (found := unwrap_state_dict(state)) is not None:  # plain, or wrapped by a training script
        if fallback is None:
            raise CheckpointError(
                f"checkpoint {file} is a bare state dict: say which architecture it is (teacher.arch)"
            )
        spec, weights = fallback, found
    else:
        raise CheckpointError(
            f"checkpoint {file}: expected an afm-ray checkpoint or a state dict of tensors "
            f"(plain or under {'/'.join(WRAPPER_KEYS)})"
        )
    if not isinstance(weights, Mapping) or not all(isinstance(v, torch.Tensor) for v in weights.values()):
        raise CheckpointError(f"checkpoint {file}: its 'model' entry is not a state dict of tensors")
    return file, spec, weights, stored, state


def check_teacher_checkpoint(cfg: ExperimentConfig, path: str | Path | None = None) -> None:
    """A teacher checkpoint (`path`, default teacher.checkpoint) loads (weights only) and holds the
    architecture teacher.arch names; when the dataset's shapes are known without reading it, its keys and
    shapes are checked too (on the meta device: nothing allocated), so a mismatch fails before any compute."""
    path = cfg.teacher.checkpoint if path is None else path
    file, spec, weights, stored, state = _model_state(path, cfg.teacher)
    _check_teacher_arch(path, stored, cfg)
    shapes = dataset_shapes(cfg)  # the one table of dataset facts
    if shapes is None:  # Parquet: checked once the data is loaded
        return
    c = shapes.channels
    data = DataSpec(shapes.classes, (c, shapes.side, shapes.side), (0.0,) * c, (1.0,) * c, cfg.data.name)
    with torch.device("meta"):
        model = build_model(spec.arch, **model_kwargs(spec, data))
    notes: list[str] = []
    if stored is None:
        weights, notes = to_our_layout(weights, spec.arch, data.image_shape[0])
    _check_state_dict(model.state_dict(), weights, file, _described(spec), data, notes)


def _check_teacher_arch(path: str | Path, stored: ExperimentConfig | None, cfg: ExperimentConfig | None) -> None:
    if stored is not None and cfg is not None and cfg.teacher.arch != stored.student.arch:
        raise ConfigError(
            f"teacher.checkpoint {path} holds a {stored.student.arch!r} but teacher.arch is "
            f"{cfg.teacher.arch!r}; set teacher.arch={stored.student.arch}"
        )


def checkpoint_data_spec(path: str | Path) -> DataSpec:
    """The data description an afm-ray checkpoint was trained with (read from it, no dataset)."""
    file, _, _, stored, state = _model_state(path, None)
    return _stored_data(state, stored, file)


def _stored_data(state: Any, stored: ExperimentConfig | None, file: Path) -> DataSpec:
    """The data description a checkpoint holds."""
    if stored is None:
        raise CheckpointError(f"checkpoint {file} is a bare state dict: pass the data it was trained on")
    if not (isinstance(state, dict) and "data" in state):
        raise CheckpointError(f"checkpoint {file} holds no data description ('data'); save it with save_training_state")
    try:
        return DataSpec.from_dict(state["data"])
    except ValueError as exc:
        raise CheckpointError(f"checkpoint {file}: {exc}") from None


def _check_state_dict(
    expected: Mapping[str, torch.Tensor],
    weights: Mapping[str, torch.Tensor],
    file: Path,
    arch: str,
    data: ImageDataset | DataSpec,
    notes: list[str] | None = None,
) -> None:
    """Every key of the architecture is there with its shape, and nothing else: else one line that
    says what did not match (and, for a state dict from elsewhere, how its keys were mapped)."""
    mapped = f" [read as: {'; '.join(notes)}]" if notes else ""
    missing = [k for k in expected if k not in weights]
    unexpected = [k for k in weights if k not in expected]
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint {file} does not match architecture {arch}: {len(missing)} keys missing {missing[:3]}, "
            f"{len(unexpected)} unexpected {unexpected[:3]}{mapped}"
        )
    for key, tensor in expected.items():
        if weights[key].shape != tensor.shape:
            hint = ""
            if tensor.ndim >= 1 and tensor.shape[0] == data.num_classes != weights[key].shape[0]:
                hint = (
                    f" (the checkpoint has {weights[key].shape[0]} classes, dataset {data.name} has {data.num_classes})"
                )
            raise CheckpointError(
                f"checkpoint {file}: {key} has shape {tuple(weights[key].shape)}, "
                f"{arch} expects {tuple(tensor.shape)}{hint}{mapped}"
            )


def load_teacher(
    path: str | Path, data: ImageDataset, *, device: torch.device | str = "cpu", cfg: ExperimentConfig | None = None
) -> nn.Module:
    """Load a frozen teacher (eval mode, no parameter gradients) and check it fits `data`.

    `path` is an afm-ray checkpoint (its stored config names the architecture, which must
    agree with `cfg.teacher.arch`) or a bare state dict built as `cfg.teacher` describes.
    """
    model, stored = load_model(path, data, device=device, fallback=cfg.teacher if cfg is not None else None)
    _check_teacher_arch(path, stored, cfg)
    return model.eval().requires_grad_(False)
