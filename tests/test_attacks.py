"""Behaviour of the shared PGD routine and the evaluation attacks (CPU, seconds)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import digits_cnn
from torch import nn

from afm_ray.attacks import ATTACKS, cw_margin_loss, pgd, robust_predictions

NORMS = ("linf", "l2")
STARTS = ("uniform", "normal", "none")
TOL = 1e-6


def tiny_cnn(in_channels: int = 3, num_classes: int = 10, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(in_channels, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(16, num_classes),
    )


def linear_model(seed: int = 0, in_features: int = 3 * 8 * 8, num_classes: int = 10) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(in_features, num_classes))


def batch(seed: int = 1, shape=(8, 3, 8, 8)) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(shape, generator=g)
    # Pixels exactly on the box faces: the [0,1] clamp must act there.
    x[0, 0, 0] = 0.0
    x[1, 0, 0] = 1.0
    y = torch.randint(0, 10, (shape[0],), generator=g)
    return x, y


def ce_objective(model: nn.Module, y: torch.Tensor):
    return lambda z: F.cross_entropy(model(z), y)


def assert_in_ball(x_adv: torch.Tensor, x: torch.Tensor, eps: float, norm: str) -> None:
    delta = (x_adv - x).flatten(1)
    dist = delta.abs().amax(dim=1) if norm == "linf" else delta.norm(dim=1)
    assert (dist <= eps + TOL).all(), f"{norm} distance {dist.max().item()} > eps {eps}"
    assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0


def module_flags(*models: nn.Module) -> list[bool]:
    return [m.training for model in models for m in model.modules()]


# ---------------------------------------------------------------------------------------- pgd


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("random_start", STARTS)
def test_pgd_stays_in_ball_and_box(norm, random_start):
    model = linear_model()
    x, y = batch()
    eps = 0.1 if norm == "linf" else 0.5
    # A step far larger than eps: only the projection keeps the point inside.
    x_adv = pgd(ce_objective(model, y), x, eps=eps, step_size=3 * eps, steps=5, norm=norm, random_start=random_start)
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype and not x_adv.requires_grad
    assert_in_ball(x_adv, x, eps, norm)


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("random_start", STARTS)
def test_pgd_steps_zero_returns_projected_start(norm, random_start):
    x, _ = batch()
    calls = []
    eps = 0.1

    def objective(z):
        calls.append(1)
        return z.sum()

    x_adv = pgd(objective, x, eps=eps, step_size=eps / 4, steps=0, norm=norm, random_start=random_start)
    assert not calls
    assert_in_ball(x_adv, x, eps, norm)
    if random_start == "none":
        assert torch.equal(x_adv, x)
    else:
        assert not torch.equal(x_adv, x)


def test_pgd_random_starts_have_their_documented_scale():
    x = torch.full((16, 3, 8, 8), 0.5)
    eps = 0.1
    uni = pgd(lambda z: z.sum(), x, eps=eps, step_size=0, steps=0, random_start="uniform") - x
    assert uni.abs().max() <= eps + TOL and uni.abs().max() > 0.9 * eps  # fills the linf box
    nor = pgd(lambda z: z.sum(), x, eps=eps, step_size=0, steps=0, random_start="normal") - x
    assert 0.0005 < nor.std() < 0.002  # 0.001 N(0, 1), official RSLAD/AdaAD code
    l2 = pgd(lambda z: z.sum(), x, eps=0.5, step_size=0, steps=0, norm="l2", random_start="uniform") - x
    radii = l2.flatten(1).norm(dim=1)
    assert (radii <= 0.5 + TOL).all() and (radii > 0.4).all()  # uniform in a 192-d ball: near the surface


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("random_start", STARTS)
def test_pgd_increases_ce_of_fixed_random_linear_model(norm, random_start):
    model = linear_model(seed=3)
    x, y = batch(seed=4)
    y = model(x).argmax(1)  # start from correctly classified points: the attack has work to do
    eps = 8 / 255 if norm == "linf" else 0.5
    obj = ce_objective(model, y)
    x_adv = pgd(obj, x, eps=eps, step_size=eps / 4, steps=10, norm=norm, random_start=random_start)
    with torch.no_grad():
        clean, adv = obj(x), obj(x_adv)
    assert adv > clean + 0.1, (clean, adv)
    # Against a random start alone, the steps must add a lot.
    start = pgd(obj, x, eps=eps, step_size=eps / 4, steps=0, norm=norm, random_start=random_start)
    with torch.no_grad():
        assert adv > obj(start) + 0.1


@pytest.mark.parametrize("norm", NORMS)
def test_pgd_step_direction_is_sign_or_per_sample_normalised_gradient(norm):
    # objective = sum_i <w_i, z_i>: its gradient w.r.t. sample i is w_i (different per sample).
    g = torch.Generator().manual_seed(0)
    w = torch.randn(4, 3, 5, 5, generator=g)
    w[1] *= 100.0  # a per-batch (not per-sample) normalisation would shrink the others' steps
    x = torch.full_like(w, 0.5)
    step = 0.05
    x_adv = pgd(lambda z: (w * z).sum(), x, eps=1.0, step_size=step, steps=1, norm=norm, random_start="none")
    if norm == "linf":
        expected = step * w.sign()
    else:
        expected = step * w / w.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
        assert torch.allclose((x_adv - x).flatten(1).norm(dim=1), torch.full((4,), step), atol=1e-6)
    assert torch.allclose(x_adv - x, expected, atol=1e-6)


def test_pgd_l2_projection_is_radial():
    # Ascent along a fixed direction from the centre: the l2 projection must land on
    # the sphere along that direction (scaling delta, not clipping coordinates).
    w = torch.zeros(1, 1, 4, 4)
    w[0, 0, 0, 0], w[0, 0, 1, 1] = 3.0, 4.0
    x = torch.full_like(w, 0.5)
    x_adv = pgd(lambda z: (w * z).sum(), x, eps=0.2, step_size=0.15, steps=3, norm="l2", random_start="none")
    assert torch.allclose(x_adv - x, 0.2 * w / 5.0, atol=1e-6)


def test_pgd_restores_exact_module_modes_and_sets_eval_during_attack():
    student = tiny_cnn()
    student.train()
    student[1].eval()  # frozen BN inside a training model must stay eval
    teacher = tiny_cnn(seed=1)
    teacher.eval()
    teacher[1].train()  # and the odd opposite case must come back too
    before = module_flags(student, teacher)
    seen = []
    x, y = batch()

    def objective(z):
        seen.append(module_flags(student, teacher))
        return F.kl_div(
            F.log_softmax(student(z), 1), F.log_softmax(teacher(z), 1), reduction="batchmean", log_target=True
        )

    pgd(objective, x, eps=0.03, step_size=0.01, steps=2, models=(student, teacher))
    assert seen and all(not any(flags) for flags in seen)
    assert module_flags(student, teacher) == before


def test_pgd_restores_modes_when_objective_raises():
    student = tiny_cnn()
    student.train()
    student[1].eval()
    before = module_flags(student)

    def objective(z):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        pgd(objective, batch()[0], eps=0.03, step_size=0.01, steps=3, models=(student,))
    assert module_flags(student) == before


def test_pgd_leaves_no_parameter_grad_on_student_or_teacher():
    student, teacher = tiny_cnn(), tiny_cnn(seed=1)
    assert all(p.requires_grad for p in teacher.parameters())  # worst case: teacher not frozen
    x, y = batch()

    def objective(z):
        return F.cross_entropy(student(z), y) + F.cross_entropy(teacher(z), y)

    pgd(objective, x, eps=0.03, step_size=0.01, steps=3, models=(student, teacher))
    assert all(p.grad is None for p in [*student.parameters(), *teacher.parameters()])
    assert x.grad is None


def test_pgd_works_under_no_grad_and_with_input_requiring_grad():
    model = linear_model()
    x, y = batch()
    x.requires_grad_(True)
    with torch.no_grad():
        x_adv = pgd(ce_objective(model, y), x, eps=0.03, step_size=0.01, steps=2)
    assert not torch.equal(x_adv, x.detach()) and not x_adv.requires_grad and x.grad is None


def test_pgd_loop_makes_no_host_sync(monkeypatch):
    # .item()/bool()/tolist() on a CUDA tensor block the host; the loop must not call them.
    model = linear_model()
    x, y = batch()

    def forbid(*_args, **_kwargs):
        raise AssertionError("host sync inside pgd")

    for name in ("item", "tolist", "__bool__"):
        monkeypatch.setattr(torch.Tensor, name, forbid)
    pgd(ce_objective(model, y), x, eps=0.03, step_size=0.01, steps=3, norm="l2")
    pgd(ce_objective(model, y), x, eps=0.03, step_size=0.01, steps=3, norm="linf")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_pgd_on_cuda_has_no_sync_and_stays_on_device():
    model = linear_model().cuda()
    x, y = (t.cuda() for t in batch())
    torch.cuda.set_sync_debug_mode("error")
    try:
        for norm in NORMS:
            x_adv = pgd(ce_objective(model, y), x, eps=0.03, step_size=0.01, steps=3, norm=norm)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert x_adv.device == x.device
    assert_in_ball(x_adv, x, 0.03, "l2")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(norm="l1"), "norm='l1'"),
        (dict(random_start="gauss"), "random_start='gauss'"),
        (dict(eps=-1.0), "eps=-1.0"),
    ],
)
def test_pgd_rejects_bad_arguments(kwargs, match):
    args = dict(eps=0.1, step_size=0.01, steps=1) | kwargs
    with pytest.raises(ValueError, match=match):
        pgd(lambda z: z.sum(), batch()[0], **args)


def test_pgd_rejects_non_scalar_objective():
    with pytest.raises(ValueError, match="scalar"):
        pgd(lambda z: z.flatten(1).sum(1), batch()[0], eps=0.1, step_size=0.01, steps=1)


def test_cw_margin_loss_values():
    logits = torch.tensor([[1.0, 3.0, 2.0], [5.0, 1.0, 0.0]])
    y = torch.tensor([0, 0])
    # sample 0: max other 3 - 1 = 2; sample 1: max other 1 - 5 = -4
    assert torch.allclose(cw_margin_loss(logits, y), torch.tensor(-2.0))


def test_robust_predictions_is_per_sample_bool(digits_model):
    model, x, y = digits_model
    clean = robust_predictions(model, x, y, attack="clean", eps=0.1, batch_size=50)
    adv = robust_predictions(model, x, y, attack="pgd20", eps=0.1, batch_size=50, seed=0)
    assert clean.dtype == torch.bool and clean.shape == y.shape
    # A point misclassified clean is misclassified by pgd20 too (step 0 is not kept, but a
    # wrong clean point is almost never fixed by an ascent on its own CE loss).
    assert (adv & ~clean).sum() <= 1
    assert adv.sum() < clean.sum()


def test_attack_names_cover_protocol():
    assert set(ATTACKS) == {"clean", "pgd20", "pgd10", "cw", "aa"}


@pytest.fixture(scope="module")
def digits_model():
    """A tiny CNN trained for a few steps on sklearn digits, and the images it did not train on."""
    return digits_cnn()
