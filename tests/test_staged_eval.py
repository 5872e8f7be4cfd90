"""Staged evaluation: AutoAttack is skipped only where PGD-20 (an upper bound on it) already shows
that a finished trial dominates, and a worker that skips it reports so instead of an aa_acc."""

from __future__ import annotations

import pytest
import torch

from afm_ray.config import ConfigError, from_flat
from afm_ray.data import load_dataset
from afm_ray.devices import worker_context
from afm_ray.evaluate.protocol import final_evaluation
from afm_ray.models import build_model, model_kwargs
from afm_ray.names import AA_SKIP_REASON_KEY, AA_SKIPPED_METRIC, FINAL_RESULT_FLAG, Objective
from afm_ray.search.staged_aa import aa_verdict, optimistic_vector

TWO = (Objective("clean_acc", "max"), Objective("aa_acc", "max"))
FINISHED = [("t1", {"clean_acc": 0.90, "aa_acc": 0.50}), ("t2", {"clean_acc": 0.97, "aa_acc": 0.30})]


@pytest.mark.parametrize(
    "clean, pgd20, skipped_by",
    [
        (0.85, 0.40, "t1"),  # t1: clean 0.90 >= 0.85, aa 0.50 >= 0.40 + 0.01
        (0.90, 0.49, "t1"),  # equal clean; aa 0.50 clears 0.49 + 0.01 exactly: still strictly better than aa <= 0.49
        (0.95, 0.20, "t2"),  # only t2 is clean enough
        (0.85, 0.495, None),  # 0.495 + 0.01 > 0.50: AutoAttack could still tie or beat t1
        (0.91, 0.45, None),  # cleaner than t1, not robust enough for t2: could be on the front
        (0.99, 0.05, None),  # the cleanest of all: always a candidate
    ],
)
def test_autoattack_is_skipped_only_when_its_pgd20_bound_is_dominated(clean, pgd20, skipped_by):
    reason = aa_verdict({"clean_acc": clean, "pgd20_acc": pgd20}, FINISHED, TWO, margin=0.01)
    if skipped_by is None:
        assert reason is None
    else:
        assert reason.startswith(f"dominated by finished trial {skipped_by}:") and "pgd20_acc" in reason


def test_the_bound_covers_every_objective_and_direction():
    three = (*TWO, Objective("latency_ms", "min"))
    finished = [("fast", {"clean_acc": 0.9, "aa_acc": 0.5, "latency_ms": 1.0})]
    assert aa_verdict({"clean_acc": 0.8, "pgd20_acc": 0.3, "latency_ms": 2.0}, finished, three, 0.01)
    # Faster than every finished trial: on the front whatever its AutoAttack, so AutoAttack runs.
    assert aa_verdict({"clean_acc": 0.8, "pgd20_acc": 0.3, "latency_ms": 0.5}, finished, three, 0.01) is None
    assert optimistic_vector({"clean_acc": 0.8, "pgd20_acc": 0.3, "latency_ms": 2.0}, three, 0.01) == [
        0.8,
        pytest.approx(0.31),
        2.0,
    ]
    # Without a PGD-20 result there is no bound: AutoAttack runs; nor is a finished trial evidence
    # if it lacks an objective.
    assert aa_verdict({"clean_acc": 0.1}, FINISHED, TWO, 0.01) is None
    assert aa_verdict({"clean_acc": 0.1, "pgd20_acc": 0.0}, [("x", {"clean_acc": 0.9})], TWO, 0.01) is None
    # With no margin, equality is not domination: an identical vector shares the front.
    assert aa_verdict({"clean_acc": 0.90, "pgd20_acc": 0.50}, FINISHED, TWO, 0.0) is None
    assert aa_verdict({"clean_acc": 0.89, "pgd20_acc": 0.50}, FINISHED, TWO, 0.0).startswith("dominated by")
    with pytest.raises(ValueError):
        aa_verdict({"clean_acc": 0.1, "pgd20_acc": 0.0}, FINISHED, TWO, -0.01)


def test_eval_policy_is_validated():
    assert from_flat({"eval.aa_policy": "candidates"}).eval.aa_policy == "candidates"
    with pytest.raises(ConfigError, match="eval.aa_policy: unknown value 'some'"):
        from_flat({"eval.aa_policy": "some"})
    with pytest.raises(ConfigError, match="eval.attacks needs pgd20"):
        from_flat({"eval.aa_policy": "candidates", "eval.attacks": "clean,aa"})
    with pytest.raises(ConfigError, match="eval.aa_margin: got -0.1"):
        from_flat({"eval.aa_margin": -0.1})


@pytest.fixture(scope="module")
def digits_student():
    cfg = from_flat({"data.name": "digits", "student.width": 4, "eval.samples": 6, "eval.attacks": "clean,pgd20,cw,aa"})
    data = load_dataset("digits")
    torch.manual_seed(0)
    model = build_model("small_cnn", **model_kwargs(cfg.student, data)).eval()
    return cfg, data, model


def _evaluate(digits_student, policy, gate):
    cfg, data, model = digits_student
    cfg = from_flat({**{"data.name": "digits", "student.width": 4, "eval.samples": 6}, "eval.aa_policy": policy})
    asked = []

    def recording_gate(metrics, margin):
        asked.append((dict(metrics), margin))
        return gate

    result = final_evaluation(
        cfg, model, data, worker_context("cpu"), lambda line: None, batch_size=8, aa_gate=recording_gate
    )
    return result, asked


def test_worker_skips_autoattack_when_the_gate_says_it_cannot_matter(digits_student):
    result, asked = _evaluate(digits_student, "candidates", "dominated by finished trial t1: ...")
    assert "aa_acc" not in result and "eval/aa_images_per_s" not in result  # AutoAttack never ran
    assert result[AA_SKIPPED_METRIC] == 1.0 and result[AA_SKIP_REASON_KEY].startswith("dominated by")
    assert result[FINAL_RESULT_FLAG] == 1.0 and {"clean_acc", "pgd20_acc", "cw_acc", "params", "latency_ms"} <= set(
        result
    )
    # The gate saw every other result (the bound and the exact objectives) and the margin.
    ((metrics, margin),) = asked
    assert metrics["pgd20_acc"] == result["pgd20_acc"] and "aa_acc" not in metrics and margin == 0.01


def test_worker_runs_autoattack_when_the_gate_finds_no_dominating_trial(digits_student):
    result, asked = _evaluate(digits_student, "candidates", None)
    assert len(asked) == 1 and AA_SKIPPED_METRIC not in result and "eval/aa_images_per_s" in result
    assert result["aa_acc"] <= result["pgd20_acc"] <= result["clean_acc"]


def test_policy_all_never_asks(digits_student):
    result, asked = _evaluate(digits_student, "all", "would skip")
    assert asked == [] and "aa_acc" in result and "eval/aa_images_per_s" in result
