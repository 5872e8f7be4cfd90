"""The search's multi-fidelity and staged evaluation in a real sweep (real local Ray, MLflow in
SQLite, Optuna RDB storage), on digits with tiny models, two trials one after the other.

Each sweep trains PGD-AT students (no teacher to train) and draws optim.lr from {0.2, 1e-5}
with a seeded random sampler whose seed is chosen here, through the space's own define-by-run
function, so that the first trial learns and the second barely moves from its initialisation.
A small evaluation budget (eps 0.02) keeps robust accuracy close to clean accuracy, so the
second trial is dominated, by construction, at its first validation (MO-ASHA) and at its
PGD-20 (staged evaluation).
"""

from __future__ import annotations

import optuna
import pytest
import yaml
from mlflow.tracking import MlflowClient
from sweeps import TINY_SPACE, run_sweep, trial_runs, write_space

from afm_ray.pareto.ranking import rank_trials
from afm_ray.search.space import parse_search_space
from afm_ray.tracking.mlflow_runs import load_trials

pytestmark = pytest.mark.slow
GOOD, FROZEN = 0.2, 1e-5


def seed_drawing_good_then_frozen(space: dict) -> int:
    """The first sampler seed whose first two suggestions are lr GOOD, then FROZEN."""
    parsed = parse_search_space(space)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    for seed in range(200):
        study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
        drawn = []
        for _ in range(2):
            trial = study.ask()
            parsed.define_by_run()(trial)
            drawn.append(trial.params["optim.lr"])
            study.tell(trial, 0.0)
        if drawn == [GOOD, FROZEN]:
            return seed
    raise AssertionError("no seed draws the good learning rate first")


def two_trial_space(tmp_path, **changes):
    space = yaml.safe_load(yaml.safe_dump(TINY_SPACE))
    fixed = {**space["fixed"], "method.name": "pgd_at", "eval.eps": 0.02, **changes.pop("fixed", {})}
    space.update(
        fixed=fixed,
        num_samples=2,
        max_concurrent_trials=1,
        sampler={"name": "random"},
        search={"optim.lr": {"choice": [GOOD, FROZEN]}},
        **changes,
    )
    space["seed"] = seed_drawing_good_then_frozen(space)
    return write_space(tmp_path, **space)


def optuna_trials(tmp_path, name):
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    return {t.user_attrs["tune_trial_id"]: t for t in study.trials}


def test_mo_asha_stops_a_dominated_trial_which_is_pruned_and_off_the_front(tmp_path):
    space = two_trial_space(
        tmp_path,
        scheduler={"name": "mo_asha", "grace_period": 1, "reduction_factor": 2},
        fixed={"optim.epochs": 3},
    )
    out = run_sweep(tmp_path, space, "--name", "mo").stdout
    assert "1/2 trials completed, 1 stopped early" in out
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    runs = {r.data.params["optim.lr"]: r for r in trial_runs(tracking)}
    stopped, kept = runs[str(FROZEN)], runs[str(GOOD)]
    assert stopped.data.tags["afm_ray.trial_status"] == "early_stopped" and "aa_acc" not in stopped.data.metrics
    history = MlflowClient(tracking).get_metric_history(stopped.info.run_id, "val/clean_acc")
    assert [m.step for m in history] == [1]  # stopped at the rung, epoch 1 of 3
    assert kept.data.tags["afm_ray.trial_status"] == "completed" and "aa_acc" in kept.data.metrics

    states = {tid: t.state for tid, t in optuna_trials(tmp_path, "mo").items()}
    assert states[stopped.data.tags["afm_ray.trial_id"]] == optuna.trial.TrialState.PRUNED
    assert states[kept.data.tags["afm_ray.trial_id"]] == optuna.trial.TrialState.COMPLETE

    ranked = rank_trials(load_trials("tiny-tests", tracking_uri=tracking), ["aa_acc:max", "clean_acc:max"])
    front = set(ranked.loc[ranked["pareto"], "run_id"])
    assert stopped.info.run_id not in front and kept.info.run_id in front


def test_staged_evaluation_skips_autoattack_only_for_a_trial_pgd20_proves_dominated(tmp_path):
    space = two_trial_space(tmp_path, fixed={"eval.aa_policy": "candidates"})
    out = run_sweep(tmp_path, space, "--name", "staged").stdout
    assert "1/2 trials completed, 1 AutoAttack skipped" in out
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    runs = {r.data.params["optim.lr"]: r for r in trial_runs(tracking)}
    first, second = runs[str(GOOD)], runs[str(FROZEN)]
    # The first trial had nothing to be compared with: AutoAttack ran.
    assert "aa_acc" in first.data.metrics and "afm_ray.aa_skipped" not in first.data.tags
    # The second: no AutoAttack, and the recorded reason is a real proof from the first's results.
    m1, m2 = first.data.metrics, second.data.metrics
    assert "aa_acc" not in m2 and m2["eval/aa_skipped"] == 1.0
    reason = second.data.tags["afm_ray.aa_skipped"]
    assert reason.startswith(f"dominated by finished trial {first.data.tags['afm_ray.trial_id']}")
    assert m1["clean_acc"] >= m2["clean_acc"] and m1["aa_acc"] >= m2["pgd20_acc"] + 0.01

    trials = optuna_trials(tmp_path, "staged")
    skipped = trials[second.data.tags["afm_ray.trial_id"]]
    assert skipped.state == optuna.trial.TrialState.PRUNED and skipped.user_attrs["aa_skipped"] == reason
    assert trials[first.data.tags["afm_ray.trial_id"]].state == optuna.trial.TrialState.COMPLETE

    ranked = rank_trials(load_trials("tiny-tests", tracking_uri=tracking), ["aa_acc:max", "clean_acc:max"])
    row = ranked.set_index("run_id").loc[second.info.run_id]
    assert not row["pareto"] and "AutoAttack skipped" in row["excluded"]
