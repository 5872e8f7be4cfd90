"""Which weights are the student: the EMA and SWA updates on fixed tensors, batch-norm statistics
recomputed for SWA, selection on a recorded curve, and `StudentWeights` as the loop drives it."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from afm_ray.models import build_model
from afm_ray.names import AVERAGED_METRIC, SELECTED_EPOCH_METRIC, SELECTED_VAL_METRIC
from afm_ray.student_weights import (
    StudentWeights,
    best_epoch,
    describe,
    ema_decay_at,
    ema_update,
    recompute_batch_norm,
    swa_update,
)


def test_ema_update_on_fixed_tensors():
    average = [torch.tensor([1.0, 2.0]), torch.tensor(3, dtype=torch.long)]
    current = [torch.tensor([3.0, 6.0]), torch.tensor(7, dtype=torch.long)]
    ema_update(average, current, 0.9)
    assert torch.allclose(average[0], torch.tensor([1.2, 2.4]))  # 0.9 * avg + 0.1 * current
    assert average[1].item() == 7  # an integer buffer (num_batches_tracked) is copied
    assert current[0].tolist() == [3.0, 6.0]  # the model's own tensors are untouched


def test_ema_decay_is_warmed_up():
    assert ema_decay_at(0.999, 0) == pytest.approx(0.1)  # (1 + 0) / (10 + 0)
    assert ema_decay_at(0.999, 90) == pytest.approx(91 / 100)
    assert ema_decay_at(0.999, 10**6) == 0.999
    assert ema_decay_at(0.5, 100) == 0.5


def test_swa_update_is_the_running_mean():
    snapshots = [torch.tensor([1.0, -2.0]), torch.tensor([4.0, 0.0]), torch.tensor([7.0, 8.0])]
    average = [snapshots[0].clone()]
    for n, snapshot in enumerate(snapshots[1:], start=1):
        swa_update(average, [snapshot], n)
    assert torch.allclose(average[0], torch.tensor([4.0, 2.0]))


def test_selection_on_a_recorded_curve_takes_the_earliest_best():
    curve = {1: 0.30, 2: 0.52, 3: 0.55, 4: 0.55, 5: 0.41}  # robust overfitting after epoch 4
    assert best_epoch(curve) == (3, 0.55)
    with pytest.raises(ValueError, match="no epochs"):
        best_epoch({})


def test_batch_norm_recomputed_like_update_bn():
    torch.manual_seed(0)
    model = nn.Sequential(nn.BatchNorm2d(1), nn.Flatten(), nn.Linear(4, 2)).eval()
    model[0].running_mean.fill_(9.0)
    images = (torch.rand(20, 1, 2, 2) * 255).to(torch.uint8)
    recompute_batch_norm(model, images, batch_size=20)  # one batch: the statistics of all 20 images exactly
    x = images.float() / 255
    assert torch.allclose(model[0].running_mean, x.mean(dim=(0, 2, 3)), atol=1e-6)
    assert torch.allclose(model[0].running_var, x.var(dim=(0, 2, 3), unbiased=True), atol=1e-6)
    assert not model.training and not model[0].training  # modes and momentum restored
    assert model[0].momentum == 0.1


def _model() -> nn.Module:
    torch.manual_seed(0)
    return build_model("small_cnn", num_classes=3, in_channels=1, mean=[0.5], std=[0.5], width=2)


def _step(model: nn.Module, seed: int) -> None:
    """Something like an optimiser step: every parameter moves, batch-norm statistics too."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
        model.train()(torch.rand(4, 1, 8, 8, generator=g))


def test_ema_weights_follow_the_formula_and_are_what_is_evaluated():
    model = _model()
    weights = StudentWeights(model, select="last", average="ema", epochs=2, ema_decay=0.95)
    expected = [t.detach().clone() for t in [*model.parameters(), *model.buffers()]]
    for t in range(12):
        _step(model, t)
        weights.after_step()
        d = min(0.95, (1 + t) / (10 + t))
        current = [*model.parameters(), *model.buffers()]
        expected = [
            e * d + c.detach() * (1 - d) if e.is_floating_point() else c.clone()
            for e, c in zip(expected, current, strict=True)
        ]
    evaluated = weights.end_epoch(1)
    assert evaluated is not model and not evaluated.training
    for e, a in zip(expected, [*evaluated.parameters(), *evaluated.buffers()], strict=True):
        assert torch.allclose(e, a, atol=1e-6)
    weights.observe(1, 0.5)
    assert weights.student() is evaluated
    assert weights.metrics() == {SELECTED_EPOCH_METRIC: 1.0, SELECTED_VAL_METRIC: 0.5, AVERAGED_METRIC: 12.0}


def test_swa_averages_epochs_after_the_start_and_recomputes_batch_norm():
    model = _model()
    images = (torch.rand(64, 1, 8, 8) * 255).to(torch.uint8)
    weights = StudentWeights(model, select="last", average="swa", epochs=4, swa_start=0.5, bn_images=images)
    snapshots = []
    for epoch in range(1, 5):
        _step(model, epoch)
        evaluated = weights.end_epoch(epoch)
        weights.observe(epoch, 0.1 * epoch)
        if epoch <= 2:
            assert evaluated is model  # before the start the evaluated weights are the trained ones
        else:
            snapshots.append([p.detach().clone() for p in model.parameters()])
    assert weights.n_averaged == 2
    for p, a, b in zip(evaluated.parameters(), *snapshots, strict=False):
        assert torch.allclose(p, (a + b) / 2, atol=1e-6)
    bn = next(m for m in evaluated.modules() if isinstance(m, nn.BatchNorm2d))
    assert bn.num_batches_tracked.item() == 1  # recomputed over the images (one batch), not averaged


def test_best_pgd_keeps_the_best_epochs_weights_through_a_checkpoint():
    model = _model()
    weights = StudentWeights(model, select="best_pgd", average="none", epochs=4)
    kept = {}
    for epoch, score in zip(range(1, 5), (0.2, 0.6, 0.6, 0.4), strict=True):
        _step(model, epoch)
        assert weights.end_epoch(epoch) is model  # no averaging: the trained weights are evaluated
        weights.observe(epoch, score)
        kept[epoch] = {k: v.clone() for k, v in model.state_dict().items()}
    assert weights.selected_epoch == 2  # the earliest of the tied best
    student = weights.student()
    assert student is not model
    assert all(torch.equal(v, kept[2][k]) for k, v in student.state_dict().items())

    # A resumed run gets the best so far back from the checkpoint's student and state.
    resumed = StudentWeights(_model(), select="best_pgd", average="none", epochs=4)
    resumed.load_state_dict(weights.state_dict(), student.state_dict())
    assert resumed.selected_epoch == 2 and resumed.selected_score == 0.6
    assert all(torch.equal(v, kept[2][k]) for k, v in resumed.student().state_dict().items())
    resumed.observe(5, 0.59)  # not better: the selection stays
    assert resumed.selected_epoch == 2


def test_unknown_choices_are_refused_and_the_summary_names_the_choice():
    with pytest.raises(ValueError, match="unknown"):
        StudentWeights(_model(), select="best", average="none", epochs=1)
    line = describe({SELECTED_EPOCH_METRIC: 7, SELECTED_VAL_METRIC: 0.4531, AVERAGED_METRIC: 90}, "best_pgd", "ema", 10)
    assert line.startswith("student: epoch 7 of 10") and "EMA" in line and "90 steps" in line
    assert math.isnan(StudentWeights(_model(), select="last", average="none", epochs=1).selected_score)
