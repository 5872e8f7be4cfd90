"""The search benchmark: hypervolume against compute, for searchers replayed on recorded trials.

    python benchmarks/search.py [--tables mnist5k digits] [--seeds 100] [--json OUT] [--doc MARKDOWN]
    python benchmarks/search.py export --tracking-uri URI --optuna-storage URL --out PARQUET

The tables (benchmarks/data/search_table_<name>.parquet) are recorded by the sweep itself with
uniform random sampling, full training and full evaluation (benchmarks/record_search_table.py,
whose docstring gives each table's command). benchmarks/search_replay.py says how a searcher is
replayed against a table; benchmarks/search_denoise.py how each recorded configuration's
denoised value (the score) is estimated, and checked on held-out rows.

Per table, draw mode (``once``: the recorded pool, each row at most once with its recorded
result; ``surrogate``: every configuration asked for is measured, a new noisy measurement
around the table's smoother there) and budget (``--budgets``, in full trials' worth of compute), every searcher is
replayed for ``--seeds`` seeds; the multi-fidelity variants (MO-ASHA, staged AutoAttack) at the
headline budget for ``--mf-seeds``. Regret = hypervolume of the denoised front of all rows
(under ``surrogate`` also of a dense uniform sample of the space) minus the hypervolume of the
denoised values of the configurations a searcher completed.

Headline (``--json``), at the headline budget and draw mode, over every table:

- ``regret_ratio_vs_random``: the default searcher's regret over uniform random search's
  (``uniform_random``: each recorded row equally likely): ``mean_ratio`` (ratio of mean regrets)
  with ``ci95`` (paired bootstrap over seeds), ``median`` (ratio of median regrets) with
  ``median_ci95``; pooled = the mean over tables of each table's ratio (each table's seeds
  resampled); ``by_table`` and ``by_budget`` hold the rest.
- ``baselines``: every full-fidelity searcher's mean and median regret per table and its ratio
  to uniform random search (``uniform_random``, ``random_mapped``: Optuna's random sampler mapped
  to the nearest row, as every sampler is; ``cell_greedy``).
- ``multi_fidelity``: for the shipped multi-fidelity configuration, the first compute fraction
  at which its median hypervolume reaches 95% of the full-budget default's median
  (``compute_fraction``, with a bootstrap interval) and the fraction reached there
  (``hv_fraction``); ``random_hv_fraction``: uniform random search's median hypervolume at that
  same compute, as a fraction of the same target; ``front_trials_stopped`` (per run, by rung)
  and ``front_trials_skipped``: trials stopped early or not given AutoAttack although their
  measured values were on the front of everything the run drew. Top level = the table where it
  needs the most compute; ``by_table`` and ``variants`` hold every table and variant.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pickle
import platform
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

if str(Path(__file__).resolve().parent) not in sys.path:  # sibling modules, as in bench.py
    sys.path.insert(0, str(Path(__file__).resolve().parent))

from search_denoise import RESTARTS, cross_validate, fit  # noqa: E402
from search_replay import DRAWS, Searcher, Table, front_losses, hv_curve, replay  # noqa: E402
from search_stats import pooled_ratio_with_interval, ratio_with_interval, reach_with_interval  # noqa: E402
from search_table import export_table, read_table  # noqa: E402

from afm_ray.devices import cpu_model_name  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "benchmarks" / "data"
GRID_POINTS = 201
FRACTIONS = (0.25, 0.5, 1.0)
BASELINE = "uniform_random"
MF_TARGET = 0.95


def table_path(name: str) -> Path:
    return DATA / f"search_table_{name}.parquet"


def sampler_searchers(default: Searcher) -> list[Searcher]:
    """Full-fidelity searchers: the baselines, then the samplers (each with the sweep's own defaults)."""
    out = [
        Searcher(BASELINE, policy="uniform_rows"),
        Searcher("random_mapped", {"name": "random"}),
        Searcher("cell_greedy", policy="cell_greedy", startup=10),
        Searcher("tpe", {"name": "tpe"}),
        Searcher("tpe startup 4", {"name": "tpe", "n_startup_trials": 4}),
        Searcher("nsga2", {"name": "nsga2"}),
    ]
    if default.label not in {s.label for s in out}:
        out.append(default)
    return out


def mf_searchers(default: Searcher, mo_asha: dict[str, Any], margin: float, aa_margin: float) -> list[Searcher]:
    """The default sampler with MO-ASHA (as shipped, and with a promotion margin) + staged
    AutoAttack, and uniform random search with the shipped combination."""
    with_margin = {**mo_asha, "margin": margin}
    return [
        replace(
            default,
            label=f"{default.label} + MO-ASHA + staged AA",
            scheduler=mo_asha,
            aa_policy="candidates",
            aa_margin=aa_margin,
        ),
        replace(
            default,
            label=f"{default.label} + MO-ASHA margin {margin:g} + staged AA",
            scheduler=with_margin,
            aa_policy="candidates",
            aa_margin=aa_margin,
        ),
        Searcher(
            f"{BASELINE} + MO-ASHA + staged AA",
            policy="uniform_rows",
            scheduler=mo_asha,
            aa_policy="candidates",
            aa_margin=aa_margin,
        ),
    ]


@dataclass
class Prepared:
    name: str
    table: Table
    info: dict[str, Any]
    fit: dict[str, Any]
    digest: str = ""  # of the table's bytes, the smoother's settings and the replay code: names cached results


def _code_digest() -> str:
    """The code a cached result depends on: a change to any of it recomputes everything."""
    h = hashlib.sha256()
    for path in (
        Path(__file__).parent / "search_replay.py",
        Path(__file__).parent / "search_denoise.py",
        REPO / "afm_ray" / "search" / "mo_asha.py",
        REPO / "afm_ray" / "search" / "staged_aa.py",
        REPO / "afm_ray" / "search" / "samplers.py",
        REPO / "afm_ray" / "domination.py",
    ):
        h.update(path.read_bytes())
    return h.hexdigest()


def _cached(cache: Path | None, key: str, compute: Any) -> Any:
    """``compute()``, or its result pickled under ``cache`` by an earlier run with the same key."""
    if cache is None:
        return compute()
    path = cache / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.pkl"
    if path.exists():
        return pickle.loads(path.read_bytes())
    value = compute()
    cache.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(pickle.dumps(value))
    tmp.replace(path)  # whole files only: an interrupted run leaves nothing half-written
    return value


def prepare(
    name: str, path: Path | None = None, *, check: bool = True, restarts: int = RESTARTS, cache: Path | None = None
) -> Prepared:
    """A recorded table with its denoised values (and the held-out check of the smoother)."""
    path = path or table_path(name)
    digest = hashlib.sha256(path.read_bytes() + f"{restarts}".encode() + _code_digest().encode()).hexdigest()
    frame, space_yaml, info = read_table(path)
    plain = Table(frame, space_yaml)
    smoother = _cached(cache, f"smoother {digest}", lambda: fit(plain.frame, plain.space, restarts=restarts))
    table = Table(frame, space_yaml, smoother=smoother)
    checked = _cached(cache, f"check {digest}", lambda: cross_validate(plain.frame, plain.space)) if check else {}
    return Prepared(
        name,
        table,
        info,
        {"kernels": smoother.kernels, "noise_sd": np.sqrt(smoother.noise_var).tolist(), **checked},
        digest,
    )


_TABLES: dict[str, Table] = {}


def _init(tables: dict[str, Table]) -> None:
    import warnings

    warnings.filterwarnings("ignore")  # Optuna's experimental-feature notes, once per ask
    _TABLES.update(tables)


def _run(task: tuple[str, str, int, Searcher, int, int]) -> dict[str, Any]:
    name, draw, budget_trials, searcher, seed, workers = task
    table = _TABLES[name]
    budget = budget_trials * float(np.mean(table.full_cost_s))
    log = replay(table, searcher, seed=seed, budget_s=budget, num_samples=budget_trials, workers=workers, draw=draw)
    grid = np.linspace(0.0, budget, GRID_POINTS)
    in_budget = [t for t in log.trials if workers * t.started < budget]
    evaluated = [t for t in in_budget if t.state in ("complete", "aa_skipped")]
    losses = front_losses(table, log)
    front = set(table.true_front)
    recorded = table.true_hv_recorded - hv_curve(table, log, grid[-1:], recorded=True)[0] if draw == "once" else np.nan
    curve = hv_curve(table, log, grid)
    return {
        "curve": curve,
        "regret": table.best_hv(draw) - curve,
        "recorded_regret": float(recorded),
        "trials": len(log.trials),
        "distinct": len({t.row for t in log.trials}),
        "cross_cell": float(np.mean([t.cross_cell for t in log.trials])) if log.trials else 0.0,
        "stopped": float(np.mean([t.state == "stopped" for t in in_budget])) if in_budget else 0.0,
        "aa_skipped": float(np.mean([t.state == "aa_skipped" for t in evaluated])) if evaluated else 0.0,
        "aa_saved_s": float(sum(table.aa_s[t.row] for t in evaluated if t.state == "aa_skipped")),
        "aa_spent_s": float(sum(table.aa_s[t.row] for t in evaluated if t.state == "complete")),
        "front_stopped": losses["stopped"],
        "front_skipped": losses["skipped"],
        # The table's denoised front rows this run drew, and whether it stopped them early.
        "table_front_draws": [(t.row, t.state == "stopped") for t in log.trials if t.row in front],
    }


def run_all(
    prepared: Sequence[Prepared],
    groups: Sequence[tuple[str, str, int, Sequence[Searcher], int]],
    *,
    workers: int,
    jobs: int,
    cache: Path | None = None,
) -> dict[tuple[str, str, int, str], list[dict[str, Any]]]:
    """Replay every (table, draw, budget, searcher) group for its seeds; results by group, in seed order.
    With ``cache``, a replay an earlier run already made (same table, settings, seed and code) is read back."""
    tasks = [
        (name, draw, budget, s, seed, workers)
        for name, draw, budget, searchers, seeds in groups
        for s in searchers
        for seed in range(seeds)
    ]
    tables = {p.name: p.table for p in prepared}
    digests = {p.name: p.digest for p in prepared}
    keys = [f"replay {digests[t[0]]} {t[1:3]} {t[3]!r} {t[4:]}" for t in tasks]
    started = time.perf_counter()
    if jobs > 1:
        with ProcessPoolExecutor(jobs, initializer=_init, initargs=(tables,)) as pool:
            results = list(pool.map(_run, tasks, chunksize=4))
    else:
        _init(tables)
        results = []
        for i, (task, key) in enumerate(zip(tasks, keys, strict=True)):
            results.append(_cached(cache, key, lambda task=task: _run(task)))
            if (i + 1) % 100 == 0:
                print(
                    f"{i + 1}/{len(tasks)} replays, {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True
                )
    print(f"{len(tasks)} replays in {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
    out: dict[tuple[str, str, int, str], list[dict[str, Any]]] = {}
    for (name, draw, budget, s, _seed, _w), r in zip(tasks, results, strict=True):
        out.setdefault((name, draw, budget, s.label), []).append(r)
    return out


# ---------------------------------------------------------------------------------------------
# summaries


def regrets(table: Table, runs: list[dict[str, Any]], fraction: float = 1.0) -> np.ndarray:
    i = int(round(fraction * (GRID_POINTS - 1)))
    return np.array([r["regret"][i] for r in runs])


def compare(table: Table, runs: list[dict[str, Any]], base: list[dict[str, Any]]) -> dict[str, Any]:
    a, b = regrets(table, runs), regrets(table, base)
    mean_ratio, ci = ratio_with_interval(a, b, stat="mean")
    median, median_ci = ratio_with_interval(a, b, stat="median")
    return {
        "mean_regret": float(a.mean()),
        "median_regret": float(np.median(a)),
        "mean_ratio": mean_ratio,
        "ci95": ci,
        "median": median,
        "median_ci95": median_ci,
        "seeds": len(a),
    }


def pooled(tables: dict[str, Table], runs: dict[str, list], base: dict[str, list]) -> dict[str, Any]:
    pairs = [(regrets(tables[n], runs[n]), regrets(tables[n], base[n])) for n in runs]
    mean_ratio, ci = pooled_ratio_with_interval(pairs, stat="mean")
    median, median_ci = pooled_ratio_with_interval(pairs, stat="median")
    return {
        "mean_ratio": mean_ratio,
        "ci95": ci,
        "median": median,
        "median_ci95": median_ci,
        "seeds": min(len(a) for a, _ in pairs),
        "tables": list(runs),
    }


def run_stats(table: Table, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """What a searcher did in its runs: trials, pool use, early stops, skipped AutoAttack, front losses."""
    stopped_by_rung: dict[int, float] = {}
    for r in runs:
        for rung, n in r["front_stopped"].items():
            stopped_by_rung[int(rung)] = stopped_by_rung.get(int(rung), 0.0) + n / len(runs)
    draws: dict[int, list[bool]] = {}
    for r in runs:
        for row, stopped in r["table_front_draws"]:
            draws.setdefault(int(row), []).append(stopped)
    corner = {
        int(row): {
            "clean": float(table.score[row][0]),
            "aa": float(table.score[row][1]),
            "drawn": len(s),
            "stopped": int(sum(s)),
        }
        for row, s in sorted(draws.items())
    }
    spent = sum(r["aa_spent_s"] for r in runs)
    saved = sum(r["aa_saved_s"] for r in runs)
    return {
        "trials": float(np.median([r["trials"] for r in runs])),
        "distinct": float(np.median([r["distinct"] for r in runs])),
        "cross_cell": float(np.mean([r["cross_cell"] for r in runs])),
        "stopped": float(np.mean([r["stopped"] for r in runs])),
        "aa_skipped": float(np.mean([r["aa_skipped"] for r in runs])),
        "aa_seconds_saved": float(saved / max(saved + spent, 1e-9)),
        "front_trials_stopped": float(sum(stopped_by_rung.values())),
        "front_trials_stopped_by_rung": {k: stopped_by_rung[k] for k in sorted(stopped_by_rung)},
        "runs_with_front_trial_stopped": float(np.mean([bool(r["front_stopped"]) for r in runs])),
        "front_trials_skipped": float(np.mean([r["front_skipped"] for r in runs])),
        "table_front_rows": corner,
        "recorded_regret_mean": float(np.mean([r["recorded_regret"] for r in runs])),
    }


def mf_summary(
    table: Table, runs: list[dict[str, Any]], full: list[dict[str, Any]], random: list[dict[str, Any]]
) -> dict[str, Any]:
    """Multi-fidelity against the full-budget default (``full``) and uniform random search at equal compute."""
    curves = np.array([r["curve"] for r in runs])
    full_curves = np.array([r["curve"] for r in full])
    random_curves = np.array([r["curve"] for r in random])
    target = float(np.median(full_curves[:, -1]))
    i, ci = reach_with_interval(curves, full_curves, MF_TARGET)
    at = len(curves[0]) - 1 if i is None else i
    med, rand_med = np.median(curves, axis=0), np.median(random_curves, axis=0)
    stats = run_stats(table, runs)
    return {
        "hv_fraction": float(med[at] / target),
        "compute_fraction": float(at / (GRID_POINTS - 1)),
        "reached": i is not None,
        "compute_fraction_ci95": [None if v is None else v / (GRID_POINTS - 1) for v in ci],
        "random_hv_fraction": float(rand_med[at] / target),
        "hv_vs_random": {
            str(f): float(med[int(round(f * (GRID_POINTS - 1)))] / rand_med[int(round(f * (GRID_POINTS - 1)))])
            for f in FRACTIONS
        },
        "mean_regret": {str(f): float(np.mean(regrets(table, runs, f))) for f in FRACTIONS},
        "front_trials_stopped": stats["front_trials_stopped"],
        "front_trials_stopped_by_rung": stats["front_trials_stopped_by_rung"],
        "runs_with_front_trial_stopped": stats["runs_with_front_trial_stopped"],
        "front_trials_skipped": stats["front_trials_skipped"],
        "seeds": len(runs),
    }


@dataclass
class Plan:
    tables: list[str]
    draws: list[str]
    budgets: list[int]
    headline_budget: int
    headline_draw: str
    seeds: int
    mf_seeds: int
    default: Searcher
    samplers: list[Searcher]
    mf: list[Searcher]
    shipped_mf: str


def make_plan(args: argparse.Namespace) -> Plan:
    default = Searcher(
        args.default_label,
        {"name": args.default_sampler, **({"n_startup_trials": args.startup} if args.startup else {})},
    )
    mo_asha = {"name": "mo_asha", "grace_period": args.grace_period, "reduction_factor": args.reduction_factor}
    if args.mo_asha_margin:
        mo_asha["margin"] = args.mo_asha_margin
    mf = mf_searchers(default, mo_asha, args.margin_variant, args.aa_margin)
    shipped = f"{default.label} + MO-ASHA + staged AA"
    return Plan(
        tables=args.tables,
        draws=args.draws,
        budgets=args.budgets,
        headline_budget=args.headline_budget,
        headline_draw=args.headline_draw,
        seeds=args.seeds,
        mf_seeds=args.mf_seeds,
        default=default,
        samplers=sampler_searchers(default),
        mf=mf,
        shipped_mf=shipped,
    )


def sampler_groups(plan: Plan) -> list[tuple[str, int, list[Searcher]]]:
    """(draw, budget, searchers) replayed at full fidelity: every searcher at the headline draw and
    budget and at the headline budget of the other draws; the budget sweep for uniform random
    search, cell-greedy and the default only (what its claim needs, at a third of the compute)."""
    sweep = [s for s in plan.samplers if s.label in (BASELINE, "cell_greedy", plan.default.label)]
    groups = []
    for draw in plan.draws:
        for budget in plan.budgets:
            if budget == plan.headline_budget:
                groups.append((draw, budget, plan.samplers))
            elif draw == plan.headline_draw:
                groups.append((draw, budget, sweep))
    return groups


def pool_lasts(p: Prepared, draw: str, budget: int) -> bool:
    """Under draw "once" a table smaller than the budget runs out (every searcher draws every row):
    such a (table, budget) is not replayed."""
    return draw != "once" or len(p.table.frame) >= budget


def run_benchmark(
    plan: Plan, prepared: list[Prepared], *, workers: int, jobs: int, cache: Path | None = None
) -> dict[str, Any]:
    """Multi-fidelity variants run at the headline draw and budget only."""
    groups = []
    for p in prepared:
        for draw, budget, searchers in sampler_groups(plan):
            if pool_lasts(p, draw, budget):
                groups.append((p.name, draw, budget, searchers, plan.seeds))
        groups.append((p.name, plan.headline_draw, plan.headline_budget, plan.mf, plan.mf_seeds))
    results = run_all(prepared, groups, workers=workers, jobs=jobs, cache=cache)
    tables = {p.name: p.table for p in prepared}
    out: dict[str, Any] = {"samplers": {}, "mf": {}}
    for p in prepared:
        t = p.table
        for draw, budget, searchers in sampler_groups(plan):
            if not pool_lasts(p, draw, budget):
                continue
            base = results[(p.name, draw, budget, BASELINE)]
            for s in searchers:
                runs = results[(p.name, draw, budget, s.label)]
                out["samplers"][(p.name, draw, budget, s.label)] = {
                    **compare(t, runs, base),
                    **run_stats(t, runs),
                    "regret_at": {str(f): float(np.mean(regrets(t, runs, f))) for f in FRACTIONS},
                }
        draw = plan.headline_draw
        full = results[(p.name, draw, plan.headline_budget, plan.default.label)]
        random = results[(p.name, draw, plan.headline_budget, BASELINE)]
        for s in plan.mf:
            runs = results[(p.name, draw, plan.headline_budget, s.label)]
            out["mf"][(p.name, draw, s.label)] = {**mf_summary(t, runs, full, random), **run_stats(t, runs)}
    out["pooled"] = {}
    for draw, budget, searchers in sampler_groups(plan):
        present = [p for p in prepared if pool_lasts(p, draw, budget)]
        if not present:
            continue
        for s in searchers:
            runs = {p.name: results[(p.name, draw, budget, s.label)] for p in present}
            base = {p.name: results[(p.name, draw, budget, BASELINE)] for p in present}
            out["pooled"][(draw, budget, s.label)] = pooled(tables, runs, base)
    out["curves"] = {
        key: np.median([r["curve"] for r in runs], axis=0)
        for key, runs in results.items()
        if key[2] == plan.headline_budget
    }
    return out


def headline(plan: Plan, bench: dict[str, Any]) -> dict[str, Any]:
    d, b = plan.headline_draw, plan.headline_budget
    pooled_default = bench["pooled"][(d, b, plan.default.label)]
    by_table = {}
    for name in plan.tables:
        r = bench["samplers"][(name, d, b, plan.default.label)]
        by_table[name] = {k: r[k] for k in ("mean_ratio", "ci95", "median", "median_ci95", "seeds")}
    by_budget = {
        str(budget): {k: bench["pooled"][(d, budget, plan.default.label)][k] for k in ("mean_ratio", "ci95", "median")}
        for budget in plan.budgets
    }
    other = [x for x in plan.draws if x != d and (x, b, plan.default.label) in bench["pooled"]]
    by_draw = {x: {k: bench["pooled"][(x, b, plan.default.label)][k] for k in ("mean_ratio", "ci95")} for x in other}
    baselines = {}
    for s in plan.samplers:
        p = bench["pooled"][(d, b, s.label)]
        baselines[s.label] = {
            "cross_cell": float(np.mean([bench["samplers"][(n, d, b, s.label)]["cross_cell"] for n in plan.tables])),
            "mean_ratio": p["mean_ratio"],
            "ci95": p["ci95"],
            "median": p["median"],
            # The other draw modes at the same budget: under "once" a focused sampler's asks are
            # answered from other cells once its cell is used up (cross_cell).
            "by_draw": {
                x: {
                    "mean_ratio": bench["pooled"][(x, b, s.label)]["mean_ratio"],
                    "ci95": bench["pooled"][(x, b, s.label)]["ci95"],
                    "tables": bench["pooled"][(x, b, s.label)]["tables"],
                    "cross_cell": float(
                        np.mean(
                            [
                                bench["samplers"][(n, x, b, s.label)]["cross_cell"]
                                for n in bench["pooled"][(x, b, s.label)]["tables"]
                            ]
                        )
                    ),
                }
                for x in other
            },
            "by_table": {
                name: {
                    "mean_regret": bench["samplers"][(name, d, b, s.label)]["mean_regret"],
                    "median_regret": bench["samplers"][(name, d, b, s.label)]["median_regret"],
                }
                for name in plan.tables
            },
        }
    mf_by_table = {name: bench["mf"][(name, d, plan.shipped_mf)] for name in plan.tables}
    worst = max(plan.tables, key=lambda n: (not mf_by_table[n]["reached"], mf_by_table[n]["compute_fraction"]))
    keys = (
        "hv_fraction",
        "compute_fraction",
        "compute_fraction_ci95",
        "reached",
        "random_hv_fraction",
        "front_trials_stopped",
        "front_trials_stopped_by_rung",
        "runs_with_front_trial_stopped",
        "front_trials_skipped",
        "seeds",
    )
    return {
        "regret_ratio_vs_random": {
            **{k: pooled_default[k] for k in ("median", "mean_ratio", "ci95", "median_ci95", "seeds", "tables")},
            "searcher": plan.default.label,
            "random": BASELINE,
            "budget_trials": b,
            "draw": d,
            "by_table": by_table,
            "by_budget": by_budget,
            "by_draw": by_draw,
        },
        "baselines": baselines,
        "multi_fidelity": {
            "configuration": plan.shipped_mf,
            "full_budget": plan.default.label,
            "table": worst,
            **{k: mf_by_table[worst][k] for k in keys},
            "by_table": {n: {k: m[k] for k in keys} for n, m in mf_by_table.items()},
            "variants": {
                s.label: {n: {k: bench["mf"][(n, d, s.label)][k] for k in keys} for n in plan.tables} for s in plan.mf
            },
        },
    }


# ---------------------------------------------------------------------------------------------
# the record


def _ci(ci: Sequence[float | None]) -> str:
    return "[" + ", ".join("-" if v is None else f"{v:.2f}" for v in ci) + "]"


def table_section(p: Prepared, draws: Sequence[str]) -> list[str]:
    t, f = p.table, p.table.frame
    n = float(f["n_samples"].median())
    aa = f["aa_acc"].to_numpy(float)
    binomial_sd = float(np.sqrt(np.median(aa) * (1 - np.median(aa)) / n))
    epochs = len(t.epoch_s[0])
    by_method = f.groupby("param:method.name")["aa_acc"].agg(["mean", "std", "count"]).sort_values("mean")
    methods = ", ".join(f"{m} {r['mean']:.3f} (sd {r['std']:.3f}, {int(r['count'])})" for m, r in by_method.iterrows())
    front = ", ".join(f"({t.score[i][0]:.3f}, {t.score[i][1]:.3f})" for i in t.true_front)
    cv = p.fit
    lines = [
        f"## Table `{p.name}`",
        "",
        f"{len(f)} completed trials (`benchmarks/data/search_table_{p.name}.parquet`), {epochs} epochs each, final "
        f"evaluation on {n:.0f} test images. Mean full trial {np.mean(t.full_cost_s):.0f} s: fixed cost "
        f"{t.fixed_cost_s:.0f} s (median Ray start-up/tear-down {t.overhead_s:.0f} s + set-up {t.setup_s:.0f} s), "
        f"training {np.mean([e.sum() for e in t.epoch_s]):.0f} s, final evaluation {f['eval_s'].mean():.0f} s of "
        f"which AutoAttack {f['eval_aa_s'].mean():.0f} s. Seconds are as recorded on a shared 2-core machine; "
        "every searcher replays the same seconds.",
        "",
        f"Noise: one AutoAttack accuracy on {n:.0f} images has a binomial sd of {binomial_sd:.3f} at the table's "
        f"median ({np.median(aa):.3f}); AutoAttack by method, mean (sd, trials): {methods}. The recorded front "
        f"has {len(t.recorded_front)} trials (hypervolume {t.true_hv_recorded:.4f}); "
        f"the denoised front {len(t.true_front)} "
        f"(hypervolume {t.true_hv:.4f}): {front} (clean, AutoAttack), reference point "
        f"({t.reference[0]:.3f}, {t.reference[1]:.3f}), the worst values of the table.",
    ]
    if "clean_acc" in cv:
        lines += [
            "",
            f"Denoising ({cv['folds']}-fold held-out check of the smoother on {cv['rows']} rows): "
            + "; ".join(
                f"{m}: held-out RMSE {cv[m]['rmse']:.3f} against {cv[m]['noise_rmse']:.3f} from the noise alone, "
                f"R^2 {cv[m]['r2']:.2f}, 95% predictive intervals cover {100 * cv[m]['coverage95']:.0f}%"
                for m in ("clean_acc", "aa_acc")
            )
            + f". Learned seed-to-seed sd (clean, AutoAttack): {cv['noise_sd'][0]:.3f}, {cv['noise_sd'][1]:.3f}.",
        ]
    return lines


def verdicts(plan: Plan, bench: dict[str, Any]) -> list[str]:
    """One sentence per table and budget: does the default beat uniform random search (the upper
    end of the 95% interval of the ratio of mean regrets below 1), at the headline draw."""
    lines = ["## Does the default beat uniform random search?", ""]
    d = plan.headline_draw
    for budget in plan.budgets:
        for name in plan.tables:
            r = bench["samplers"].get((name, d, budget, plan.default.label))
            if r is None:
                continue
            low, high = r["ci95"]
            if high < 1:
                verdict = "yes: the whole interval is below 1"
            elif low > 1:
                verdict = "no: it is worse than uniform random search (the whole interval is above 1)"
            else:
                verdict = "not shown: the interval contains 1"
            lines.append(
                f"- `{name}`, budget {budget}, draw `{d}`: ratio of mean regrets {r['mean_ratio']:.2f} "
                f"[{low:.2f}, {high:.2f}], of medians {r['median']:.2f} {_ci(r['median_ci95'])}: {verdict}."
            )
    return lines


def markdown(plan: Plan, prepared: list[Prepared], bench: dict[str, Any], head: dict[str, Any], command: str) -> str:
    lines = [
        "# Search benchmark (CPU)",
        "",
        f"Made by `{command}` on {cpu_model_name()}, {os.cpu_count()} cores shared with other jobs "
        f"(Python {platform.python_version()}), "
        f"{time.strftime('%Y-%m-%d')}; {plan.seeds} seeds (0..{plan.seeds - 1}) per full-fidelity searcher, "
        f"{plan.mf_seeds} per multi-fidelity variant; intervals are paired-bootstrap 95% intervals over seeds. "
        "docs/search.md says what these numbers mean for a sweep.",
        "",
        "Regret = hypervolume of the denoised front of the whole table minus that of the denoised values of the "
        "configurations the searcher completed; ratio = the searcher's mean (or median) regret over uniform random "
        "search's, same seeds. Budgets are in full trials' worth of compute (the table's mean full trial), 2 trials "
        "at a time. `once`: each recorded trial drawn at most once, with its recorded result; `surrogate`: every "
        "configuration asked for measured where asked, a new noisy measurement around the table's smoother there "
        "(regret then from the denoised front of the rows and of 20000 uniform points of the space).",
        "",
    ]
    for p in prepared:
        lines += table_section(p, plan.draws) + [""]
    lines += ["![hypervolume vs compute](search_cpu.png)", "", "## Samplers (full fidelity)", ""]
    for draw, budget, searchers in sampler_groups(plan):
        if (draw, budget, BASELINE) not in bench["pooled"]:
            continue
        names = bench["pooled"][(draw, budget, BASELINE)]["tables"]
        left_out = [n for n in plan.tables if n not in names]
        lines += [
            f"### draw `{draw}`, budget {budget} trials",
            "",
            *(
                [f"Not replayed on {', '.join(left_out)}: fewer rows than the budget, the pool would run out.", ""]
                if left_out
                else []
            ),
            "| searcher | "
            + " | ".join(f"{n}: mean regret, ratio of means [95%], ratio of medians [95%]" for n in names)
            + " | pooled ratio of means [95%] | asks answered from another cell |",
            "|---|" + "---|" * (len(names) + 2),
        ]
        for s in searchers:
            cells = []
            for n in names:
                r = bench["samplers"][(n, draw, budget, s.label)]
                cells.append(
                    f"{r['mean_regret']:.4f}, {r['mean_ratio']:.2f} {_ci(r['ci95'])}, "
                    f"{r['median']:.2f} {_ci(r['median_ci95'])}"
                )
            pl = bench["pooled"][(draw, budget, s.label)]
            cross = np.mean([bench["samplers"][(n, draw, budget, s.label)]["cross_cell"] for n in names])
            lines.append(
                f"| {s.label} | "
                + " | ".join(cells)
                + f" | {pl['mean_ratio']:.2f} {_ci(pl['ci95'])} | {100 * cross:.0f}% |"
            )
        lines.append("")
    lines += [
        f"## Multi-fidelity (budget {plan.headline_budget} trials)",
        "",
        f"Against the full-budget `{plan.default.label}` (its median final hypervolume = 100%) and uniform random "
        "search at the same compute. Front trials stopped / skipped: per run, trials stopped early (by the rung's "
        "epoch) or not given AutoAttack although their measured values were on the front of everything the run drew.",
        "",
    ]
    for draw in [plan.headline_draw]:
        lines += [
            f"### draw `{draw}`",
            "",
            "| variant | table | reaches 95% at compute [95%] | hv there | uniform random there "
            "| hv / uniform random at 25%, 50%, 100% | trials (median) | distinct rows | stopped early | AA skipped "
            "| AA seconds saved | front trials stopped per run (by rung) "
            "| runs with one | front trials skipped per run |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for s in plan.mf:
            for n in plan.tables:
                m = bench["mf"][(n, draw, s.label)]
                rungs = ", ".join(f"e{k}: {v:.2f}" for k, v in m["front_trials_stopped_by_rung"].items()) or "-"
                reach = f"{100 * m['compute_fraction']:.0f}%" if m["reached"] else "not reached"
                ci = m["compute_fraction_ci95"]
                lines.append(
                    f"| {s.label} | {n} | {reach} [{'-' if ci[0] is None else f'{100 * ci[0]:.0f}%'}, "
                    f"{'-' if ci[1] is None else f'{100 * ci[1]:.0f}%'}] | {100 * m['hv_fraction']:.1f}% | "
                    f"{100 * m['random_hv_fraction']:.1f}% | "
                    + ", ".join(f"{m['hv_vs_random'][str(f)]:.3f}" for f in FRACTIONS)
                    + f" | {m['trials']:.0f} | {m['distinct']:.0f} | {100 * m['stopped']:.0f}% | "
                    f"{100 * m['aa_skipped']:.0f}% | "
                    f"{100 * m['aa_seconds_saved']:.0f}% | {m['front_trials_stopped']:.2f} ({rungs}) | "
                    f"{100 * m['runs_with_front_trial_stopped']:.0f}% | {m['front_trials_skipped']:.2f} |"
                )
        lines.append("")
    lines += [
        "### The table's denoised front under MO-ASHA",
        "",
        "How often each row of a table's denoised front was stopped early when a variant drew it (all its runs, "
        f"draw `{plan.headline_draw}`).",
        "",
        "| variant | table | front row (clean, AutoAttack): stopped / drawn |",
        "|---|---|---|",
    ]
    for s in plan.mf:
        if not s.scheduler:
            continue
        for n in plan.tables:
            rows = bench["mf"][(n, plan.headline_draw, s.label)]["table_front_rows"]
            cells = "; ".join(f"({r['clean']:.3f}, {r['aa']:.3f}): {r['stopped']}/{r['drawn']}" for r in rows.values())
            lines.append(f"| {s.label} | {n} | {cells} |")
    lines += ["", *verdicts(plan, bench), "", "## Headline", "", "```json", json.dumps(head, indent=2), "```", ""]
    return "\n".join(lines)


def plot(plan: Plan, prepared: list[Prepared], bench: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [BASELINE, "cell_greedy", plan.default.label, plan.shipped_mf, f"{BASELINE} + MO-ASHA + staged AA"]
    fig, axes = plt.subplots(
        len(plan.draws), len(prepared), figsize=(5.5 * len(prepared), 4 * len(plan.draws)), squeeze=False
    )
    for i, draw in enumerate(plan.draws):
        for j, p in enumerate(prepared):
            ax = axes[i][j]
            x = np.linspace(0, plan.headline_budget, GRID_POINTS)
            for label in labels:
                curve = bench["curves"].get((p.name, draw, plan.headline_budget, label))
                if curve is not None:
                    ax.plot(x, p.table.best_hv(draw) - curve, label=label, lw=1.5)
            ax.set_yscale("log")
            ax.set_title(f"{p.name}, draw {draw}: median regret", fontsize=9)
            ax.set_xlabel("compute (full trials' worth)")
            ax.set_ylabel("hypervolume regret")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    return x


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["export"]:
        parser = argparse.ArgumentParser(prog="search.py export", description="MLflow + Optuna -> the Parquet table")
        parser.add_argument("--tracking-uri", required=True)
        parser.add_argument("--optuna-storage", required=True)
        parser.add_argument("--experiment", default="afm-ray-search-record")
        parser.add_argument("--study", default="search-record")
        parser.add_argument("--out", required=True)
        a = parser.parse_args(argv[1:])
        frame = export_table(a.tracking_uri, a.optuna_storage, a.experiment, a.study, Path(a.out))
        print(f"{len(frame)} completed trials -> {a.out}")
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tables", nargs="+", default=["mnist5k", "digits"], help="names under benchmarks/data/")
    parser.add_argument("--table-file", nargs="*", default=[], metavar="NAME=PARQUET", help="a table at another path")
    parser.add_argument("--seeds", type=int, default=100)
    parser.add_argument("--mf-seeds", type=int, default=30)
    parser.add_argument("--budgets", type=int, nargs="+", default=[20, 40, 80])
    parser.add_argument("--headline-budget", type=int, default=40)
    parser.add_argument("--draws", nargs="+", choices=DRAWS, default=list(DRAWS))
    parser.add_argument("--headline-draw", choices=DRAWS, default="surrogate")
    parser.add_argument("--workers", type=int, default=2, help="trials at a time in each replayed sweep")
    parser.add_argument("--jobs", type=int, default=1, help="processes replaying (the machine is shared: 1)")
    parser.add_argument("--default-sampler", default="tpe", choices=("tpe", "nsga2", "random"))
    parser.add_argument("--default-label", default="tpe")
    parser.add_argument("--startup", type=int, default=0, help="its n_startup_trials (0 = the sweep's formula)")
    parser.add_argument("--grace-period", type=int, default=1)
    parser.add_argument("--reduction-factor", type=float, default=3)
    parser.add_argument("--mo-asha-margin", type=float, default=0.0, help="the shipped MO-ASHA's margin")
    parser.add_argument(
        "--margin-variant",
        type=float,
        default=0.03,
        help="the MO-ASHA margin variant's margin (validation binomial sd)",
    )
    parser.add_argument("--aa-margin", type=float, default=0.01)
    parser.add_argument("--no-check", action="store_true", help="skip the smoother's held-out check (quick runs)")
    parser.add_argument("--smoother-restarts", type=int, default=RESTARTS, help="optimiser restarts per objective")
    parser.add_argument(
        "--cache", type=Path, help="keep each replay here and reuse it in a later run (same table, settings, code)"
    )
    parser.add_argument("--json", help="write the headline numbers here")
    parser.add_argument("--doc", help="write the Markdown record here (and the plot beside it)")
    args = parser.parse_args(argv)
    files = dict(item.split("=", 1) for item in args.table_file)
    args.tables = list(dict.fromkeys([*args.tables, *files]))
    if args.headline_budget not in args.budgets or args.headline_draw not in args.draws:
        parser.error("--headline-budget must be one of --budgets and --headline-draw one of --draws")
    plan = make_plan(args)
    prepared = [
        prepare(
            n,
            Path(files[n]) if n in files else None,
            check=not args.no_check,
            restarts=args.smoother_restarts,
            cache=args.cache,
        )
        for n in plan.tables
    ]
    bench = run_benchmark(plan, prepared, workers=args.workers, jobs=args.jobs, cache=args.cache)
    head = _jsonable(headline(plan, bench))
    print(json.dumps(head, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(head, indent=2) + "\n")
    if args.doc:
        doc = Path(args.doc)
        plot(plan, prepared, bench, doc.with_suffix(".png"))
        shown = [a for i, a in enumerate(argv) if a != "--cache" and (i == 0 or argv[i - 1] != "--cache")]
        command = "python benchmarks/search.py " + " ".join(shown)  # the cache folder changes no number
        doc.write_text(markdown(plan, prepared, bench, head, command))
    return 0


if __name__ == "__main__":
    sys.exit(main())
