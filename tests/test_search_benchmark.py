"""The search benchmark's replay (benchmarks/search_replay.py, benchmarks/search.py) on a synthetic
table over the default space: known objectives, curves and seconds, so every number it reports
can be checked by hand. The recorded table itself is data, not a test input.
"""

from __future__ import annotations

import os
import sys
from importlib import resources
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

from search import GRID_POINTS  # noqa: E402
from search_replay import Searcher, Table, hv_curve, replay, skipped_on_front  # noqa: E402

from afm_ray.domination import hypervolume, pareto_mask  # noqa: E402
from afm_ray.search.space import parse_search_space  # noqa: E402

EPOCHS, EPOCH_S, AA_S, PRE_AA_S, SETUP_S, OVERHEAD_S = 5, 10.0, 20.0, 5.0, 5.0, 10.0
ROWS = 36


def default_space_text() -> str:
    return resources.files("afm_ray.search_spaces").joinpath("default.yaml").read_text()


@pytest.fixture(scope="module")
def table() -> Table:
    """ROWS configurations drawn over the default space; clean falls and robust accuracy rises with
    attack.eps (a trade-off, so the front has several members); PGD-20 is 0.05 above AutoAttack."""
    text = default_space_text()
    space = parse_search_space(yaml.safe_load(text))
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=3))
    keys = [d.key for d in space.search]
    rows = []
    for _ in range(ROWS):
        trial = study.ask()
        space.define_by_run()(trial)
        p = trial.params
        study.tell(trial, 0.0)
        t = (p["attack.eps"] - 0.06) / 0.08  # 0..1
        bonus = 0.02 * (p["method.name"] == "advfunmatch") + 0.01 * np.log(p["optim.lr"] / 0.03)
        clean, aa = 0.97 - 0.10 * t + bonus, 0.40 + 0.20 * t + bonus
        ramp = np.arange(1, EPOCHS + 1) / EPOCHS
        rows.append(
            {
                **{f"param:{k}": p.get(k, np.nan) for k in keys},
                "clean_acc": clean,
                "aa_acc": aa,
                "pgd20_acc": aa + 0.05,
                "cw_acc": aa + 0.03,
                "val/clean_acc": list(clean * ramp),
                "val/pgd10_acc": list((aa + 0.05) * ramp),
                "time/epoch_s": [EPOCH_S] * EPOCHS,
                "eval_clean_s": 1.0,
                "eval_pgd20_s": 2.0,
                "eval_cw_s": PRE_AA_S - 3.0,
                "eval_aa_s": AA_S,
                "eval_s": PRE_AA_S + AA_S + 1.0,
                "worker_s": SETUP_S + EPOCHS * EPOCH_S + PRE_AA_S + AA_S + 1.0,
                "setup_s": SETUP_S,
                "n_samples": 200,
                "wall_s": OVERHEAD_S + SETUP_S + EPOCHS * EPOCH_S + PRE_AA_S + AA_S + 1.0,
            }
        )
    return Table(pd.DataFrame(rows), text)


def test_table_front_reference_and_costs_follow_their_definitions(table):
    values = table.frame[["clean_acc", "aa_acc"]].to_numpy()
    assert np.allclose(table.reference, values.min(axis=0))
    assert set(table.true_front) == set(np.flatnonzero(pareto_mask(values, ["max", "max"])))
    assert table.true_hv == pytest.approx(hypervolume(values, ["max", "max"], values.min(axis=0)))
    assert table.fixed_cost_s == pytest.approx(OVERHEAD_S + SETUP_S)
    full = OVERHEAD_S + SETUP_S + EPOCHS * EPOCH_S + PRE_AA_S + AA_S + 1.0
    assert np.allclose(table.full_cost_s, full) and np.allclose(table.aa_s, AA_S)


def test_nearest_answers_a_recorded_configuration_with_its_own_row(table):
    for row in (0, 7, ROWS - 1):
        params = {
            c[len("param:") :]: v for c, v in table.frame.loc[row].items() if c.startswith("param:") and pd.notna(v)
        }
        assert table.nearest(params) == row
        assert table.nearest(params, used={row}) != row  # drawn once: the next nearest


def test_random_search_given_every_row_finds_the_whole_front_at_full_cost(table):
    full = float(table.full_cost_s[0])
    log = replay(
        table, Searcher("random", {"name": "random"}), seed=0, budget_s=ROWS * full, num_samples=ROWS, workers=2
    )
    assert sorted(t.row for t in log.trials) == list(range(ROWS))  # draw once: each row exactly once
    assert all(t.state == "complete" and t.seconds == pytest.approx(full) for t in log.trials)
    grid = np.linspace(0, ROWS * full, GRID_POINTS)
    curve = hv_curve(table, log, grid)
    assert curve[-1] == pytest.approx(table.true_hv) and np.all(np.diff(curve) >= -1e-12)
    assert curve[0] == 0.0  # nothing is complete before the first trial's cost


def test_mo_asha_replay_stops_trials_at_rungs_and_they_cost_only_their_epochs(table):
    full = float(table.full_cost_s[0])
    searcher = Searcher(
        "mf", {"name": "random"}, scheduler={"name": "mo_asha", "grace_period": 1, "reduction_factor": 3}
    )
    log = replay(table, searcher, seed=1, budget_s=20 * full, num_samples=40, workers=2)
    stopped = [t for t in log.trials if t.state == "stopped"]
    assert stopped and any(t.state == "complete" for t in log.trials)
    for t in stopped:  # rungs at epochs 1 and 3 of 5; a stopped trial never evaluates
        assert t.epochs in (1, 3)
        assert t.seconds == pytest.approx(OVERHEAD_S + SETUP_S + t.epochs * EPOCH_S)
    done_rows = {t.row for t in log.trials if t.state == "complete"}
    at, _, _ = log.completions()
    assert len(at) == len(done_rows) and not ({t.row for t in stopped} & done_rows)


def test_staged_replay_skips_autoattack_only_when_pgd20_is_dominated(table):
    full = float(table.full_cost_s[0])
    searcher = Searcher("staged", {"name": "random"}, aa_policy="candidates", aa_margin=0.0)
    log = replay(table, searcher, seed=2, budget_s=ROWS * full, num_samples=ROWS, workers=1)
    skipped = [t for t in log.trials if t.state == "aa_skipped"]
    assert skipped, "the synthetic table has dominated configurations"
    for t in skipped:
        assert t.seconds == pytest.approx(full - AA_S)  # the AutoAttack seconds are saved
        clean, pgd = table.values[t.row][0], table.frame.at[t.row, "pgd20_acc"]
        before = [u for u in log.trials if u.state == "complete" and u.ended <= t.started + t.seconds]
        assert any(table.values[u.row][0] >= clean and table.values[u.row][1] >= pgd for u in before)
    assert skipped_on_front(table, log) == 0  # PGD-20 >= AutoAttack: nothing skipped belonged on the front


def test_uniform_rows_draws_each_row_once_per_run_in_a_seeded_order(table):
    full = float(table.full_cost_s[0])
    orders = []
    for seed in (0, 1):
        log = replay(
            table, Searcher("u", policy="uniform_rows"), seed=seed, budget_s=ROWS * full, num_samples=ROWS, workers=2
        )
        rows = [t.row for t in log.trials]
        assert sorted(rows) == list(range(ROWS)) and not any(t.cross_cell for t in log.trials)
        orders.append(rows)
    assert orders[0] != orders[1]


def test_the_sampler_is_told_the_measured_row_and_answers_from_another_cell_are_counted(table):
    """A sampler that always asks for one (method, augmentation) cell: the cell's k rows answer its
    first k asks; every later ask is answered from another cell and counted; the study holds, for
    every told trial, the parameters of the row measured (not the ones asked for)."""
    cell = {"method.name": "adaad", "augment.policy": "crop_flip"}
    k = int(
        ((table.frame["param:method.name"] == "adaad") & (table.frame["param:augment.policy"] == "crop_flip")).sum()
    )
    assert 0 < k < ROWS
    studies = []

    def build(seed: int, num_samples: int) -> optuna.samplers.BaseSampler:
        return optuna.samplers.PartialFixedSampler(cell, optuna.samplers.RandomSampler(seed=seed))

    original = optuna.create_study

    def capture(*args, **kwargs):
        studies.append(original(*args, **kwargs))
        return studies[-1]

    full = float(table.full_cost_s[0])
    optuna.create_study = capture
    try:
        log = replay(table, Searcher("fixed", build=build), seed=0, budget_s=ROWS * full, num_samples=ROWS, workers=1)
    finally:
        optuna.create_study = original
    assert [t.cross_cell for t in log.trials] == [False] * k + [True] * (ROWS - k)
    told = [t for t in studies[0].trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(told) == ROWS
    for trial, logged in zip(told, log.trials, strict=True):  # workers=1: told in the order logged
        assert trial.params == table.row_params(logged.row)


def test_cell_greedy_draws_from_the_cell_with_the_best_mean_after_its_start_up(table):
    full = float(table.full_cost_s[0])
    log = replay(
        table, Searcher("g", policy="cell_greedy", startup=6), seed=0, budget_s=12 * full, num_samples=12, workers=1
    )
    first, rest = log.trials[:6], log.trials[6:]
    # workers=1: the 7th trial is chosen after the first 6 completed; its cell is the one whose
    # trials have the best mean single-point hypervolume (reference: the worst values seen).
    seen = np.array([t.observed for t in first])
    gain = np.prod(seen - seen.min(axis=0), axis=1)
    cells = np.array([table.cells[t.row] for t in first])
    best = max(set(cells.tolist()), key=lambda c: gain[cells == c].mean())
    assert rest and table.cells[rest[0].row] == best


def test_ratio_intervals_are_paired_bootstrap_percentiles_over_seeds():
    from search_stats import pooled_ratio_with_interval, ratio_with_interval

    b = np.array([0.1, 0.2, 0.3, 0.4])
    ratio, ci = ratio_with_interval(0.5 * b, b, stat="mean")
    assert ratio == pytest.approx(0.5) and ci == pytest.approx([0.5, 0.5])  # paired: every resample 0.5
    a = np.array([0.05, 0.3, 0.1, 0.1])
    ratio, (low, high) = ratio_with_interval(a, b, stat="median")
    assert ratio == pytest.approx(np.median(a) / np.median(b)) and low <= ratio <= high
    pooled, (low, high) = pooled_ratio_with_interval([(0.5 * b, b), (b, b)], stat="mean")
    assert pooled == pytest.approx(0.75) and low == pytest.approx(0.75) and high == pytest.approx(0.75)
    with pytest.raises(ValueError):
        ratio_with_interval(a, b[:3])


def test_search_benchmark_json_from_the_committed_tables(tmp_path):
    """The real command on the committed tables, cut to 2 seeds and a 10-trial budget: the headline
    JSON has every field the docs quote, with the types and ranges they need."""
    import json
    import subprocess

    repo = Path(__file__).resolve().parent.parent
    out = tmp_path / "search.json"
    command = [sys.executable, str(repo / "benchmarks" / "search.py"), "--seeds", "2", "--mf-seeds", "2"]
    command += ["--budgets", "10", "--headline-budget", "10", "--draws", "surrogate", "--no-check"]
    command += ["--smoother-restarts", "0", "--json", str(out)]
    subprocess.run(command, check=True, cwd=repo, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    head = json.loads(out.read_text())

    ratio = head["regret_ratio_vs_random"]
    assert ratio["seeds"] == 2 and ratio["tables"] == ["mnist5k", "digits"]
    assert isinstance(ratio["median"], float) and isinstance(ratio["mean_ratio"], float)
    low, high = ratio["ci95"]
    assert low <= ratio["mean_ratio"] <= high or not np.isfinite(ratio["mean_ratio"])
    assert set(ratio["by_table"]) == {"mnist5k", "digits"}

    baselines = head["baselines"]
    assert {"uniform_random", "random_mapped", "cell_greedy", "tpe"} <= set(baselines)
    assert baselines["uniform_random"]["mean_ratio"] == 1.0
    for entry in baselines.values():
        for name in ("mnist5k", "digits"):
            regret = entry["by_table"][name]
            assert np.isfinite(regret["mean_regret"]) and np.isfinite(regret["median_regret"])
        assert isinstance(entry["cross_cell"], float) and 0.0 <= entry["cross_cell"] <= 1.0

    mf = head["multi_fidelity"]
    assert 0.0 < mf["compute_fraction"] <= 1.0 and mf["hv_fraction"] > 0.0 and mf["random_hv_fraction"] >= 0.0
    assert mf["front_trials_stopped"] >= 0.0 and mf["front_trials_skipped"] >= 0.0
    assert isinstance(mf["front_trials_stopped_by_rung"], dict)
    assert sum(mf["front_trials_stopped_by_rung"].values()) == pytest.approx(mf["front_trials_stopped"])
    assert mf["table"] in ("mnist5k", "digits") and set(mf["by_table"]) == {"mnist5k", "digits"}
