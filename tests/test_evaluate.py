"""The evaluation protocol and its metric keys (afm_ray.evaluate.protocol): one worker, a tiny digits
model, the real attacks (CPU, seconds)."""

from __future__ import annotations

import logging

import pytest
import torch
from helpers import digits_cnn
from torch import nn

from afm_ray.config import from_flat
from afm_ray.data import ImageDataset, fixed_test_subset
from afm_ray.devices import WorkerContext
from afm_ray.evaluate.protocol import evaluate_model, evaluate_sharded, format_results

ONE_WORKER = WorkerContext(0, 1, torch.device("cpu"))
ATTACKS = ("clean", "pgd20", "pgd10", "cw", "aa")


@pytest.fixture(scope="module")
def digits_model():
    """A tiny CNN trained for a few steps on sklearn digits, and the images it did not train on."""
    return digits_cnn()


def module_flags(model: nn.Module) -> list[bool]:
    return [m.training for m in model.modules()]


def test_keys_and_attacks_ordered_by_strength(digits_model):
    model, x, y = digits_model
    lines = []
    res = evaluate_sharded(
        model, x[:64], y[:64], eps=0.2, norm="linf", attack_names=ATTACKS, batch_size=32, ctx=ONE_WORKER,
        seed=0, progress=lines.append,
    )  # fmt: skip
    assert set(res) == {
        "eval/n_samples",
        "eval/batch_size",
        *(f"{a}_acc" for a in ATTACKS),
        *(f"eval/{a}_images_per_s" for a in ATTACKS),
    }
    assert res["eval/n_samples"] == 64 and res["eval/batch_size"] == 32
    assert all(res[f"eval/{a}_images_per_s"] > 0 for a in ATTACKS)
    assert res["clean_acc"] > 0.7  # the model did learn
    assert res["clean_acc"] >= res["pgd20_acc"] >= res["aa_acc"]
    assert res["pgd20_acc"] < res["clean_acc"]  # eps 0.2 on digits is a real attack
    assert res["cw_acc"] <= res["clean_acc"]
    assert all(0.0 <= res[f"{a}_acc"] <= 1.0 for a in ATTACKS)
    # progress: one line per attack plus AutoAttack's own log, forwarded.
    assert any(line.startswith("pgd20: ") for line in lines) and any(line.startswith("cw: ") for line in lines)
    assert any(line.startswith("aa: ") and "apgd-ce" in line for line in lines)
    # FAB inside AutoAttack calls .backward(): still no parameter gradient may accumulate.
    assert all(p.grad is None for p in model.parameters())
    assert all(p.requires_grad for p in model.parameters())
    aa_logger = logging.getLogger("auto-attack")
    assert not aa_logger.handlers and aa_logger.propagate  # handler removed, logger untouched


def test_eps_zero_is_clean(digits_model):
    model, x, y = digits_model
    for norm in ("linf", "l2"):
        res = evaluate_sharded(
            model, x, y, eps=0.0, norm=norm, attack_names=("clean", "pgd20", "cw"), batch_size=256, ctx=ONE_WORKER
        )
        assert res["pgd20_acc"] == res["clean_acc"] == res["cw_acc"]
        assert res["eval/n_samples"] == len(x)


def test_seeded_attacks_are_reproducible_and_leave_the_callers_rng_alone(digits_model):
    model, x, y = digits_model
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    kwargs = dict(eps=0.1, norm="linf", batch_size=64, ctx=ONE_WORKER, seed=7)
    a = evaluate_sharded(model, x, y, attack_names=("pgd20",), **kwargs)
    assert torch.equal(torch.rand(3), expected_next)  # caller's RNG stream untouched
    b = evaluate_sharded(model, x, y, attack_names=("clean", "pgd20"), **kwargs)
    assert a["pgd20_acc"] == b["pgd20_acc"]  # results do not depend on which attacks ran before


def test_restores_modes_and_leaves_no_grads(digits_model):
    model, x, y = digits_model
    model.train()
    model[0].eval()
    before = module_flags(model)
    evaluate_sharded(
        model, x[:32], y[:32], eps=0.1, norm="linf", attack_names=("clean", "pgd10", "cw"), batch_size=32,
        ctx=ONE_WORKER,
    )  # fmt: skip
    assert module_flags(model) == before
    assert all(p.grad is None for p in model.parameters())
    model.eval()


def test_evaluate_model_scores_the_fixed_subset_with_intervals(digits_model):
    """The subset is the first `samples` of a permutation seeded by data.seed: the same images for every
    model; each accuracy carries its Wilson interval and the keys evaluate_sharded gives."""
    model, x, y = digits_model
    n = len(x)
    data = ImageDataset("digits", (x * 255).to(torch.uint8), y, (x * 255).to(torch.uint8), y, 10, (0.0,), (1.0,))
    cfg = from_flat({"data.name": "digits", "data.seed": 7, "eval.attacks": "clean", "eval.batch_size": 64})
    res = evaluate_model(model, cfg, data, samples=50, log=lambda line: None)
    idx = torch.randperm(n, generator=torch.Generator().manual_seed(7))[:50]
    with torch.no_grad():
        clean = (model(x[idx]).argmax(1) == y[idx]).float().mean().item()
    assert res["clean_acc"] == pytest.approx(clean, abs=1 / 50)  # uint8 round trip may flip one image
    assert torch.equal(fixed_test_subset(data, 50, 7)[1], y[idx])
    assert res["eval/n_samples"] == 50 and res["clean_acc_ci_low"] < res["clean_acc"] < res["clean_acc_ci_high"]
    assert {"params", "eval/eps", "eval/seconds", "eval/clean_images_per_s"} <= set(res)
    full = evaluate_model(model, cfg, data, samples=0, log=lambda line: None)
    assert full["eval/n_samples"] == n
    assert format_results(full).startswith(f"robust accuracy on {n} test images at eps=0.1")


def test_unknown_attack_is_refused(digits_model):
    model, x, y = digits_model
    with pytest.raises(ValueError, match="pgd7"):
        evaluate_sharded(model, x, y, eps=0.1, norm="linf", attack_names=("pgd7",), batch_size=64, ctx=ONE_WORKER)
