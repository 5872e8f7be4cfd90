"""Methods: each loss equals its formula and its stored value; each unit equals its loss, runs
its inner maximisation uphill, leaves the teacher untouched and the modes as they were."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from afm_ray.attacks import pgd
from afm_ray.losses import (
    adaad_loss,
    advfunmatch_loss,
    akd_loss,
    ard_loss,
    funmatch_loss,
    pgd_at_loss,
    rslad_loss,
    trades_loss,
)
from afm_ray.methods import AKD, ARD, METHODS, AdaAD, AttackSpec, _attack_model, build_method

NUM_CLASSES = 5
LABEL_FREE = ("advfunmatch", "funmatch", "rslad", "adaad")
LABELLED = ("akd", "ard", "pgd_at", "trades")
ATTACKED = tuple(name for name, cls in METHODS.items() if cls.uses_attack)


# --------------------------------------------------------------------------------------------
# Pure losses: fixed logits, an independent computation from the formula, a stored value.


def _fixed_logits() -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    return tuple(torch.randn(4, NUM_CLASSES, generator=g) * 3 for _ in range(4))


S_ADV, S_CLEAN, T_ADV, T_CLEAN = _fixed_logits()
# Mixup-style soft labels; the last row is one-hot.
Y_SOFT = (
    0.7 * F.one_hot(torch.tensor([0, 2, 4, 1]), NUM_CLASSES).float()
    + 0.3 * F.one_hot(torch.tensor([3, 3, 0, 1]), NUM_CLASSES).float()
)


def ref_kl(target_logits, input_logits, tau=1.0):
    """KL(p || q) = mean_b sum_c p (log p - log q), p = softmax(target / tau), in float64."""
    p = torch.softmax(target_logits.double() / tau, dim=1)
    q = torch.softmax(input_logits.double() / tau, dim=1)
    return (p * (p.log() - q.log())).sum(dim=1).mean()


def ref_ce(logits, y):
    """-mean_b sum_c y log softmax(logits), in float64."""
    return -(y.double() * torch.softmax(logits.double(), dim=1).log()).sum(dim=1).mean()


def _akd_reference():
    target = 0.3 * Y_SOFT.double() + 0.7 * torch.softmax(T_CLEAN.double() / 2.0, dim=1)
    ce = -(target * torch.softmax(S_ADV.double(), dim=1).log()).sum(dim=1).mean()
    return {"loss": ce, "ce_adv": ce}


# name -> (the pure function at fixed logits, the formula computed here, stored values)
PURE_CASES = {
    "advfunmatch": (
        lambda: advfunmatch_loss(S_ADV, T_ADV, 2.0),
        lambda: {"loss": 4.0 * ref_kl(T_ADV, S_ADV, 2.0), "kl_adv": ref_kl(T_ADV, S_ADV, 2.0)},
        {"loss": 4.398619651794434, "kl_adv": 1.0996549129486084},
    ),
    "funmatch": (
        lambda: funmatch_loss(S_CLEAN, T_CLEAN, 3.0),
        lambda: {"loss": 9.0 * ref_kl(T_CLEAN, S_CLEAN, 3.0), "kl_clean": ref_kl(T_CLEAN, S_CLEAN, 3.0)},
        {"loss": 2.1922266483306885, "kl_clean": 0.24358072876930237},
    ),
    "rslad": (
        lambda: rslad_loss(S_ADV, S_CLEAN, T_CLEAN, 2.0, 5 / 6),
        lambda: {
            "loss": 5 / 6 * ref_kl(T_CLEAN, S_ADV, 2.0) + 1 / 6 * ref_kl(T_CLEAN, S_CLEAN, 2.0),
            "kl_adv": ref_kl(T_CLEAN, S_ADV, 2.0),
            "kl_clean": ref_kl(T_CLEAN, S_CLEAN, 2.0),
        },
        {"loss": 0.7315431237220764, "kl_adv": 0.7853260636329651, "kl_clean": 0.4626283347606659},
    ),
    "adaad": (
        lambda: adaad_loss(S_ADV, T_ADV, S_CLEAN, T_CLEAN, 1.5, 0.7),
        lambda: {
            "loss": 0.7 * ref_kl(T_ADV, S_ADV, 1.5) + 0.3 * ref_kl(T_CLEAN, S_CLEAN, 1.5),
            "kl_adv": ref_kl(T_ADV, S_ADV, 1.5),
            "kl_clean": ref_kl(T_CLEAN, S_CLEAN, 1.5),
        },
        {"loss": 1.3854981660842896, "kl_adv": 1.6888127326965332, "kl_clean": 0.6777644753456116},
    ),
    "akd": (
        lambda: akd_loss(S_ADV, T_CLEAN, Y_SOFT, 2.0, 0.3),
        _akd_reference,
        {"loss": 3.0621206760406494, "ce_adv": 3.0621206760406494},
    ),
    "ard": (
        lambda: ard_loss(S_ADV, S_CLEAN, T_CLEAN, Y_SOFT, 4.0, 0.6),
        lambda: {
            "loss": 0.6 * 16.0 * ref_kl(T_CLEAN, S_ADV, 4.0) + 0.4 * ref_ce(S_CLEAN, Y_SOFT),
            "kl_adv": ref_kl(T_CLEAN, S_ADV, 4.0),
            "ce_clean": ref_ce(S_CLEAN, Y_SOFT),
        },
        {"loss": 3.8086447715759277, "kl_adv": 0.21866050362586975, "ce_clean": 4.273759365081787},
    ),
    "pgd_at": (
        lambda: pgd_at_loss(S_ADV, Y_SOFT),
        lambda: {"loss": ref_ce(S_ADV, Y_SOFT), "ce_adv": ref_ce(S_ADV, Y_SOFT)},
        {"loss": 2.9094655513763428, "ce_adv": 2.9094655513763428},
    ),
    "trades": (
        lambda: trades_loss(S_CLEAN, S_ADV, Y_SOFT, 6.0),
        lambda: {
            "loss": ref_ce(S_CLEAN, Y_SOFT) + 6.0 * ref_kl(S_CLEAN, S_ADV),
            "ce_clean": ref_ce(S_CLEAN, Y_SOFT),
            "kl_adv": ref_kl(S_CLEAN, S_ADV),
        },
        {"loss": 24.135778427124023, "ce_clean": 4.273759365081787, "kl_adv": 3.3103365898132324},
    ),
}


def test_every_method_has_a_pinned_loss():
    assert set(PURE_CASES) == set(METHODS)


@pytest.mark.parametrize("name", sorted(PURE_CASES))
def test_pure_loss_matches_formula_and_stored_value(name):
    loss_fn, formula, stored = PURE_CASES[name]
    out, expected = loss_fn(), formula()
    assert set(out) == set(stored) == set(expected)
    for key, value in out.items():
        assert value.dim() == 0
        assert value.item() == pytest.approx(expected[key].item(), rel=1e-6, abs=1e-6), key
        assert value.item() == pytest.approx(stored[key], abs=1e-5), key


def test_pure_losses_take_class_indices_as_one_hot():
    idx = torch.tensor([0, 2, 4, 1])
    one_hot = F.one_hot(idx, NUM_CLASSES).float()
    assert pgd_at_loss(S_ADV, idx)["loss"].item() == pytest.approx(pgd_at_loss(S_ADV, one_hot)["loss"].item())
    assert akd_loss(S_ADV, T_CLEAN, idx, 2.0, 0.3)["loss"].item() == pytest.approx(
        akd_loss(S_ADV, T_CLEAN, one_hot, 2.0, 0.3)["loss"].item()
    )


def test_soft_labels_of_the_wrong_shape_are_refused():
    with pytest.raises(ValueError, match=r"shape \(4, 3\)"):
        pgd_at_loss(S_ADV, torch.ones(4, 3) / 3)


def test_weight_zero_terms_may_be_omitted():
    assert set(adaad_loss(S_ADV, T_ADV, None, None, 1.0, 1.0)) == {"loss", "kl_adv"}
    assert set(ard_loss(S_ADV, None, T_CLEAN, None, 30.0, 1.0)) == {"loss", "kl_adv"}
    with pytest.raises(ValueError, match="alpha=0.5"):
        adaad_loss(S_ADV, T_ADV, None, None, 1.0, 0.5)


# --------------------------------------------------------------------------------------------
# Method units on a tiny seeded student and teacher.


def tiny_cnn(width: int, seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, width, 3, padding=1),
        nn.BatchNorm2d(width),
        nn.ReLU(),
        nn.Conv2d(width, width, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(width * 16, NUM_CLASSES),  # no global pooling: input-sensitive
    )


@pytest.fixture
def student() -> nn.Module:
    return tiny_cnn(8, seed=1).train()


@pytest.fixture
def teacher() -> nn.Module:
    # Parameters left requiring grad on purpose: the methods alone must keep .grad off them.
    return tiny_cnn(16, seed=2).eval()


@pytest.fixture
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    x = torch.rand(8, 1, 8, 8, generator=g)
    a, b = torch.arange(8) % NUM_CLASSES, (torch.arange(8) + 2) % NUM_CLASSES
    y = 0.6 * F.one_hot(a, NUM_CLASSES).float() + 0.4 * F.one_hot(b, NUM_CLASSES).float()
    return x, y


NO_ATTACK = AttackSpec(eps=0.1, step_size=0.025, steps=0, random_start="none")
ATTACK = AttackSpec(eps=0.1, step_size=0.025, steps=3)

# Default instances plus non-default ones that switch on the alpha < 1 branches.
UNITS = [build_method(name) for name in METHODS] + [
    AdaAD(alpha=0.7, tau=2.0),
    ARD(alpha=0.5, tau=4.0),
    AKD(lam=0.2, tau=3.0),
    build_method("rslad", alpha=0.5),
]


def _expected(method, s, t, y):
    """The pure loss at x' = x: s and t are the student (train mode) and teacher logits at x."""
    name = method.name
    if name == "advfunmatch":
        return advfunmatch_loss(s, t, method.tau)
    if name == "funmatch":
        return funmatch_loss(s, t, method.tau)
    if name == "rslad":
        return rslad_loss(s, s, t, method.tau, method.alpha)
    if name == "adaad":
        clean = method.alpha != 1.0
        return adaad_loss(s, t, s if clean else None, t if clean else None, method.tau, method.alpha)
    if name == "akd":
        return akd_loss(s, t, y, method.tau, method.lam)
    if name == "ard":
        return ard_loss(s, s if method.alpha != 1.0 else None, t, y, method.tau, method.alpha)
    if name == "pgd_at":
        return pgd_at_loss(s, y)
    if name == "trades":
        return trades_loss(s, s, y, method.beta)
    raise AssertionError(name)


@pytest.mark.parametrize("method", UNITS, ids=repr)
def test_unit_without_attack_equals_its_pure_loss(method, student, teacher, batch):
    x, y = batch
    out = method(student, teacher, x, y, NO_ATTACK)
    with torch.no_grad():
        expected = _expected(method, student(x), teacher(x), y)
    assert set(out) == set(expected)
    for key in expected:
        torch.testing.assert_close(out[key], expected[key], rtol=1e-5, atol=1e-6, msg=key)


def _objective_at(objective, z, student, teacher):
    """The inner objective as the attack evaluates it: both models in eval mode."""
    modes = [(m, m.training) for m in (*student.modules(), *teacher.modules())]
    student.eval()
    try:
        with torch.no_grad():
            return objective(z).item()
    finally:
        for m, flag in modes:
            m.training = flag


@pytest.mark.parametrize("name", ATTACKED)
def test_inner_maximisation_increases_its_objective(name, student, teacher, batch):
    x, y = batch
    method = build_method(name)
    objective = method.inner_objective(student, teacher, x, y)
    kwargs = dict(
        eps=0.3,
        step_size=0.05,
        norm="linf",
        models=(student, teacher),
        random_start=method.random_start(AttackSpec(eps=0.3, step_size=0.05, steps=10)),
    )
    torch.manual_seed(4)  # the same random start twice: 0 steps, then 10
    x_start = pgd(objective, x, steps=0, **kwargs)
    torch.manual_seed(4)
    x_adv = pgd(objective, x, steps=10, **kwargs)
    before = _objective_at(objective, x_start, student, teacher)
    after = _objective_at(objective, x_adv, student, teacher)
    # Random tiny nets are nearly flat; 10 steps still gain well over 1 % (TRADES: from ~0).
    assert after > before * 1.01 + 1e-4, (before, after)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_teacher_frozen_modes_restored_student_trained(name, student, teacher, batch):
    x, y = batch
    student[1].eval()  # a frozen BatchNorm inside a training student must stay frozen
    modes_before = [m.training for m in student.modules()]
    out = build_method(name)(student, teacher, x, y, ATTACK)
    assert [m.training for m in student.modules()] == modes_before
    assert student.training
    assert not any(m.training for m in teacher.modules())
    assert out["loss"].dim() == 0 and out["loss"].requires_grad
    assert all(not v.requires_grad for k, v in out.items() if k != "loss")
    out["loss"].backward()
    assert all(p.grad is None for p in teacher.parameters())
    grads = [p.grad for p in student.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


# Student forwards in the final loss (through the wrapper) and teacher forwards per batch, at
# the defaults; the attack adds `steps` student forwards (TRADES one more for p(x)) and, for
# the methods whose inner objective evaluates T(x'), `steps` teacher forwards.
FINAL_STUDENT_FORWARDS = {
    "advfunmatch": 1,
    "rslad": 2,
    "adaad": 1,
    "akd": 1,
    "ard": 1,
    "pgd_at": 1,
    "trades": 2,
    "funmatch": 1,
}
TEACHER_FORWARDS = {
    "advfunmatch": ATTACK.steps + 1,
    "rslad": 1,
    "adaad": ATTACK.steps + 1,
    "akd": 1,
    "ard": 1,
    "pgd_at": 0,
    "trades": 0,
    "funmatch": 1,
}


def _count_calls(module: nn.Module) -> list[int]:
    calls = [0]
    module.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


@pytest.mark.parametrize("name", sorted(METHODS))
def test_no_redundant_forwards(name, student, teacher, batch):
    x, y = batch
    student_calls, teacher_calls = _count_calls(student), _count_calls(teacher)
    build_method(name)(student, teacher, x, y, ATTACK)
    attack_calls = (ATTACK.steps + (name == "trades")) if METHODS[name].uses_attack else 0
    assert student_calls[0] == FINAL_STUDENT_FORWARDS[name] + attack_calls
    assert teacher_calls[0] == TEACHER_FORWARDS[name]


@pytest.mark.skipif(torch.cuda.is_available(), reason="DataParallel on a CPU model needs a CPU-only torch")
@pytest.mark.parametrize("name", sorted(METHODS))
def test_attack_bypasses_the_parallel_wrapper(name, student, teacher, batch):
    # DDP and DataParallel are handled alike; DataParallel runs without a process group.
    x, y = batch
    wrapped = nn.DataParallel(student)
    wrapper_calls = _count_calls(wrapped)
    out = build_method(name)(wrapped, teacher, x, y, ATTACK)
    out["loss"].backward()
    assert wrapper_calls[0] == FINAL_STUDENT_FORWARDS[name]
    assert all(p.grad is not None for p in student.parameters())


@pytest.mark.skipif(torch.cuda.is_available(), reason="DataParallel on a CPU model needs a CPU-only torch")
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # importing torch._dynamo
def test_attack_model_strips_parallel_wrappers_and_keeps_compiled_modules(student):
    compiled = torch.compile(student)  # lazy: nothing is compiled until it is called
    assert _attack_model(nn.DataParallel(student)) is student
    assert _attack_model(torch.compile(nn.DataParallel(student))) is student
    assert _attack_model(compiled) is compiled  # the attack is most of a step: keep it compiled
    assert _attack_model(nn.DataParallel(compiled)) is compiled


@pytest.mark.parametrize("name", sorted(METHODS))
def test_default_random_start_is_the_methods_own_and_can_be_overridden(name):
    method = build_method(name)
    official = {"rslad": "normal", "adaad": "normal", "trades": "normal"}.get(name, "uniform")
    assert method.random_start(AttackSpec(eps=0.1, step_size=0.01, steps=1)) == official
    assert method.random_start(AttackSpec(eps=0.1, step_size=0.01, steps=1, random_start="default")) == official
    assert method.random_start(AttackSpec(eps=0.1, step_size=0.01, steps=1, random_start="none")) == "none"


@pytest.mark.parametrize("name", LABEL_FREE)
def test_label_free_methods_run_without_labels(name, student, teacher, batch):
    x, _ = batch
    out = build_method(name)(student, teacher, x, None, ATTACK)
    assert torch.isfinite(out["loss"])
    assert not build_method(name).uses_labels


@pytest.mark.parametrize("name", LABELLED)
def test_label_methods_refuse_missing_labels(name, student, teacher, batch):
    x, _ = batch
    assert build_method(name).uses_labels
    with pytest.raises(ValueError, match=f"{name} needs labels y"):
        build_method(name)(student, teacher, x, None, ATTACK)


@pytest.mark.parametrize("name", ["pgd_at", "akd"])
def test_class_indices_give_the_same_loss_as_one_hot(name, student, teacher, batch):
    x, _ = batch
    idx = torch.arange(8) % NUM_CLASSES
    a = build_method(name)(student, teacher, x, idx, NO_ATTACK)["loss"]
    b = build_method(name)(student, teacher, x, F.one_hot(idx, NUM_CLASSES).float(), NO_ATTACK)["loss"]
    torch.testing.assert_close(a, b)


def test_teacher_problems_are_reported(student, teacher, batch):
    x, y = batch
    with pytest.raises(ValueError, match="rslad needs a teacher"):
        build_method("rslad")(student, None, x, y, ATTACK)
    teacher.train()
    with pytest.raises(ValueError, match=r"teacher is in train mode; call teacher.eval\(\)"):
        build_method("advfunmatch")(student, teacher, x, y, ATTACK)
    # Methods without a teacher ignore one that is passed.
    assert torch.isfinite(build_method("pgd_at")(student, teacher, x, y, ATTACK)["loss"])


# --------------------------------------------------------------------------------------------
# Registry and hyperparameters.


def test_registry_and_defaults():
    assert set(METHODS) == {"advfunmatch", "rslad", "adaad", "akd", "ard", "funmatch", "pgd_at", "trades"}
    assert build_method("rslad").tau == 1.0 and build_method("rslad").alpha == pytest.approx(5 / 6)
    assert (build_method("ard").tau, build_method("ard").alpha) == (30.0, 1.0)
    assert build_method("adaad").alpha == 1.0
    assert build_method("trades").beta == 6.0
    assert {n for n, c in METHODS.items() if c.needs_teacher} == {
        "advfunmatch",
        "rslad",
        "adaad",
        "akd",
        "ard",
        "funmatch",
    }
    assert build_method("ard", tau=4, alpha=0.5).tau == 4.0


def test_unknown_method_lists_the_known_ones():
    with pytest.raises(ValueError, match="unknown method 'kd'.*advfunmatch.*trades"):
        build_method("kd")


def test_unknown_hyperparameter_names_it_and_the_valid_ones():
    with pytest.raises(ValueError, match="no hyperparameter 'temperature'; valid: tau, alpha"):
        build_method("rslad", temperature=2.0)
    with pytest.raises(ValueError, match="no hyperparameter 'tau'; valid: beta"):
        build_method("trades", tau=2.0)
    with pytest.raises(ValueError, match="no hyperparameter 'beta'; valid: none"):
        build_method("pgd_at", beta=1.0)


def test_none_means_the_default():
    assert build_method("trades", tau=None, alpha=None, beta=None, lam=None).beta == 6.0


@pytest.mark.parametrize(
    "name, hparams, bad",
    [
        ("advfunmatch", {"tau": 0.0}, "tau=0.0"),
        ("ard", {"tau": -1.0}, "tau=-1.0"),
        ("adaad", {"alpha": 1.5}, "alpha=1.5"),
        ("rslad", {"alpha": -0.1}, "alpha=-0.1"),
        ("trades", {"beta": -6.0}, "beta=-6.0"),
        ("akd", {"lam": 1.2}, "lam=1.2"),
        ("akd", {"lam": float("nan")}, "lam=nan"),
        ("funmatch", {"tau": "2"}, "tau='2'"),
    ],
)
def test_invalid_hyperparameter_values(name, hparams, bad):
    with pytest.raises(ValueError, match=f"{name}: {bad} is invalid"):
        build_method(name, **hparams)


@pytest.mark.parametrize(
    "kwargs, bad",
    [
        ({"eps": -0.1}, "eps=-0.1"),
        ({"steps": 2.5}, "steps=2.5"),
        ({"norm": "l1"}, "norm='l1'"),
        ({"random_start": "gaussian"}, "random_start='gaussian'"),
    ],
)
def test_attack_spec_validation(kwargs, bad):
    with pytest.raises(ValueError, match=bad):
        AttackSpec(**{"eps": 0.1, "step_size": 0.01, "steps": 1, **kwargs})
