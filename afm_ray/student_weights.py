"""Which weights are the student: averaged (student.average), then selected (student.select).

The rule, per epoch: the *evaluated* weights are the training weights (average none), their
exponential moving average (ema) or their stochastic weight average (swa). Validation
(`val/clean_acc`, `val/pgd10_acc` on the held-out part of the training split) scores the evaluated
weights; `select: last` keeps the last epoch's evaluated weights, `select: best_pgd` the evaluated
weights of the epoch with the highest `val/pgd10_acc` (the earliest on a tie, as the official AdaAD
code's `if acc > best`). So best_pgd with ema picks among the per-epoch EMA weights. The student that is
evaluated on the test split, checkpointed as `model`, logged and exported is the selected one.

- EMA (Polyak averaging as in Rebuffi et al. 2021, Gowal et al. 2020): after every optimiser step
  theta_avg <- d_t theta_avg + (1 - d_t) theta with d_t = min(decay, (1 + t) / (10 + t)), t the
  updates so far (TensorFlow's ExponentialMovingAverage warm-up, so a short run is not an average
  dominated by the initial weights). Floating-point buffers (batch-norm running statistics) are
  averaged the same way, integer buffers copied (timm's ModelEmaV2).
- SWA (Izmailov et al. 2018): the equal-weight mean of the weights at the end of each epoch after
  the first floor(swa_start x epochs) epochs, on the run's own learning-rate schedule (no SWA
  learning rate); its batch-norm statistics are then recomputed (torch.optim.swa_utils.update_bn:
  running statistics reset, momentum None for a cumulative mean, train mode for the batch-norm layers
  only, no gradients) on the clean training images, all of them and in order on every rank.

Under DDP the parameters are the same on every rank but batch-norm buffers and validation noise are
not: the evaluated weights and the validation score are taken from rank 0 (broadcast), so every rank
selects and averages the same weights.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from afm_ray.names import AVERAGED_METRIC, SELECTED_EPOCH_METRIC, SELECTED_VAL_METRIC


def ema_decay_at(decay: float, updates: int) -> float:
    """The decay of the EMA's update number ``updates`` (0-based): min(decay, (1 + t) / (10 + t))."""
    return min(decay, (1.0 + updates) / (10.0 + updates))


@torch.no_grad()
def ema_update(average: list[Tensor], current: list[Tensor], decay: float) -> None:
    """average <- decay * average + (1 - decay) * current, in place, for floating tensors; other
    tensors (batch-norm's num_batches_tracked) are copied."""
    floats = [(a, c) for a, c in zip(average, current, strict=True) if a.is_floating_point()]
    if floats:
        torch._foreach_lerp_([a for a, _ in floats], [c for _, c in floats], 1.0 - decay)
    for a, c in zip(average, current, strict=True):
        if not a.is_floating_point():
            a.copy_(c)


@torch.no_grad()
def swa_update(average: list[Tensor], current: list[Tensor], n_averaged: int) -> None:
    """The running mean of ``n_averaged`` snapshots takes one more: average += (current - average) / (n + 1)."""
    for a, c in zip(average, current, strict=True):
        if a.is_floating_point():
            a.add_(c - a, alpha=1.0 / (n_averaged + 1))
        else:
            a.copy_(c)


def best_epoch(curve: Mapping[int, float]) -> tuple[int, float]:
    """(epoch, score) of the highest score of a recorded curve {epoch: val/pgd10_acc}; the earliest on a tie."""
    if not curve:
        raise ValueError("no epochs recorded: nothing to select from")
    epoch = min(curve, key=lambda e: (-curve[e], e))
    return epoch, curve[epoch]


def _tensors(model: nn.Module) -> list[Tensor]:
    return [*model.parameters(), *model.buffers()]


def _batch_norms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@torch.no_grad()
def recompute_batch_norm(model: nn.Module, images: Tensor, batch_size: int, *, channels_last: bool = False) -> None:
    """Batch-norm running statistics of ``model`` recomputed over ``images`` (uint8 or float in [0, 1]),
    as torch.optim.swa_utils.update_bn does: statistics reset, a cumulative mean (momentum None), the
    batch-norm layers alone in train mode; every module's mode and momentum restored after."""
    norms = _batch_norms(model)
    if not norms:
        return
    modes = [(m, m.training) for m in model.modules()]
    momenta = [(bn, bn.momentum) for bn in norms]
    try:
        model.eval()
        for bn in norms:
            bn.reset_running_stats()
            bn.momentum = None
            bn.train()
        device = next(model.parameters()).device
        for start in range(0, len(images), batch_size):
            x = images[start : start + batch_size].to(device)
            x = x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()
            model(x.contiguous(memory_format=torch.channels_last) if channels_last else x)
    finally:
        for bn, momentum in momenta:
            bn.momentum = momentum
        for m, flag in modes:
            m.training = flag


def _broadcast_from_rank0(tensors: list[Tensor], world_size: int) -> None:
    if world_size > 1:
        for t in tensors:
            dist.broadcast(t, src=0)


class StudentWeights:
    """The state of student.select and student.average during one run (see the module docstring).

    The loop calls `after_step` after each optimiser step, `end_epoch` before validating (it returns
    the weights to validate), `observe` with their val/pgd10_acc, and finally evaluates `student()`.
    `state_dict`/`load_state_dict` carry the average and the best epoch so far through checkpoints.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        select: str,
        average: str,
        epochs: int,
        ema_decay: float = 0.999,
        swa_start: float = 0.75,
        bn_images: Tensor | None = None,
        bn_batch_size: int = 256,
        channels_last: bool = False,
        world_size: int = 1,
    ) -> None:
        if select not in ("last", "best_pgd") or average not in ("none", "ema", "swa"):
            raise ValueError(f"select={select!r} or average={average!r} is unknown")
        self.model = model  # the unwrapped training module
        self.select, self.average = select, average
        self.ema_decay = ema_decay
        # SWA averages the epochs after this many (1-based epochs swa_first_epoch .. epochs).
        self.swa_first_epoch = math.floor(swa_start * epochs) + 1
        self.bn_images, self.bn_batch_size, self.channels_last = bn_images, bn_batch_size, channels_last
        self.world_size = world_size
        self.n_averaged = 0  # EMA updates or SWA snapshots in the average
        self.averaged: nn.Module | None = None
        if average != "none":
            self.averaged = copy.deepcopy(model).eval().requires_grad_(False)
        self.best: nn.Module | None = None  # best_pgd: a copy of the selected epoch's evaluated weights
        self.selected_epoch = 0
        self.selected_score = math.nan
        self._evaluated: nn.Module = model

    @property
    def tracks_selection(self) -> bool:
        """Whether the student differs from the training weights (so a checkpoint keeps both)."""
        return self.select != "last" or self.average != "none"

    def after_step(self) -> None:
        """Fold the weights after an optimiser step into the EMA."""
        if self.average != "ema":
            return
        assert self.averaged is not None
        ema_update(_tensors(self.averaged), _tensors(self.model), ema_decay_at(self.ema_decay, self.n_averaged))
        self.n_averaged += 1

    def end_epoch(self, epoch: int) -> nn.Module:
        """After training epoch ``epoch`` (1-based): update SWA, and return the weights to validate."""
        if self.average == "swa" and epoch >= self.swa_first_epoch:
            assert self.averaged is not None
            if self.n_averaged == 0:
                for a, c in zip(_tensors(self.averaged), _tensors(self.model), strict=True):
                    a.copy_(c)
            else:
                swa_update(_tensors(self.averaged), _tensors(self.model), self.n_averaged)
            self.n_averaged += 1
            if self.bn_images is not None:
                recompute_batch_norm(
                    self.averaged, self.bn_images, self.bn_batch_size, channels_last=self.channels_last
                )
        evaluated = self.averaged if self.averaged is not None and self.n_averaged > 0 else self.model
        if self.tracks_selection:
            _broadcast_from_rank0(_tensors(evaluated), self.world_size)
        self._evaluated = evaluated
        return evaluated

    def observe(self, epoch: int, val_pgd10_acc: float) -> None:
        """Record the validation score of epoch ``epoch``'s evaluated weights (rank 0's on every rank)."""
        score = torch.tensor([val_pgd10_acc], dtype=torch.float64, device=_device(self._evaluated))
        _broadcast_from_rank0([score], self.world_size)
        value = float(score.item())
        if self.select == "last" or self.best is None or value > self.selected_score:
            self.selected_epoch, self.selected_score = epoch, value
            if self.select == "best_pgd":
                self._keep_best(self._evaluated.state_dict())

    def _keep_best(self, state: Mapping[str, Tensor]) -> None:
        if self.best is None:
            self.best = copy.deepcopy(self.model).eval().requires_grad_(False)
        self.best.load_state_dict(state)

    def student(self) -> nn.Module:
        """The selected weights as a module: the last evaluated weights, or the copy of the best epoch's."""
        return self.best if self.select == "best_pgd" and self.best is not None else self._evaluated

    def metrics(self) -> dict[str, float]:
        return {
            SELECTED_EPOCH_METRIC: float(self.selected_epoch),
            SELECTED_VAL_METRIC: self.selected_score,
            AVERAGED_METRIC: float(self.n_averaged),
        }

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs besides the training weights and the student (plain tensors and numbers)."""
        return {
            "n_averaged": self.n_averaged,
            "selected_epoch": self.selected_epoch,
            "selected_score": self.selected_score,
            "averaged": self.averaged.state_dict() if self.averaged is not None else None,
        }

    def load_state_dict(self, state: Mapping[str, Any], student: Mapping[str, Tensor]) -> None:
        """Restore from a checkpoint: ``state`` from `state_dict`, ``student`` the checkpoint's selected weights."""
        self.n_averaged = int(state["n_averaged"])
        self.selected_epoch = int(state["selected_epoch"])
        self.selected_score = float(state["selected_score"])
        if self.averaged is not None and state.get("averaged") is not None:
            self.averaged.load_state_dict(state["averaged"])
        if self.select == "best_pgd" and self.selected_epoch > 0:
            self._keep_best(student)
        if self.averaged is not None and self.n_averaged > 0:
            self._evaluated = self.averaged


def _device(model: nn.Module) -> torch.device:
    for t in _iter_tensors(model):
        return t.device
    return torch.device("cpu")


def _iter_tensors(model: nn.Module) -> Iterator[Tensor]:
    yield from model.parameters()
    yield from model.buffers()


def describe(metrics: Mapping[str, float], select: str, average: str, epochs: int) -> str:
    """One line for a run's summary: which epoch's weights are the student, and how they were averaged."""
    averaging = {"none": "the weights as trained", "ema": "the EMA of the weights", "swa": "the SWA of the weights"}
    n = int(metrics.get(AVERAGED_METRIC, 0))
    detail = f" ({n} {'steps' if average == 'ema' else 'epochs'} averaged)" if average != "none" else ""
    score = metrics.get(SELECTED_VAL_METRIC, math.nan)
    why = "the last epoch" if select == "last" else "the best val/pgd10_acc on the held-out split"
    return (
        f"student: epoch {int(metrics.get(SELECTED_EPOCH_METRIC, 0))} of {epochs} ({why}, val/pgd10_acc "
        f"{score:.4f}), {averaging[average]}{detail}"
    )
