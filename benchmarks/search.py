"""The search benchmark: hypervolume against compute, for searchers replayed on recorded trials.

    python benchmarks/search.py [--seeds 10] [--json OUT] [--doc docs/search_<machine>.md]   # the benchmark
    python benchmarks/search.py export --tracking-uri URI --optuna-storage URL --out PARQUET

The committed table benchmarks/data/search_table_mnist5k.parquet was made by

    python benchmarks/record_search_table.py --out REC --trials 160            # the recording (hours)
    python benchmarks/search.py export --tracking-uri sqlite:///REC/mlflow.db \\
        --optuna-storage sqlite:///REC/optuna.db --out benchmarks/data/search_table_mnist5k.parquet

The recording runs the sweep itself on the embedded default space (search_spaces/default.yaml:
5000 MNIST digits at 14x14, small-CNN students, 5 epochs, final evaluation on 200 test images)
with uniform random sampling, full training and full evaluation each: 150 completed trials (of 160
drawn; the recording was stopped there, on the 2-core machine over four sessions).
benchmarks/search_table.py describes the table, benchmarks/search_replay.py how a searcher is
replayed against it (nearest recorded configuration, with replacement; the sweep's own MO-ASHA
and staged-evaluation code on the recorded curves and seconds).

Measures, per searcher and seed: the hypervolume of the (clean_acc, aa_acc) front it has found
by each amount of compute, with the reference point at the worst recorded value of each
objective. Regret = the hypervolume of the table's whole front minus the searcher's. The budget
is ``--budget-trials`` (40) full trials' worth of compute (the table's mean full-trial cost).
Headline (``--json``):

- ``regret_ratio_vs_random``: the default searcher's median regret at the full budget over
  random search's median regret there; q25/q75 are the default's regret quartiles over random's
  median regret; ``seeds`` the number of seeds.
- ``multi_fidelity``: the smallest compute fraction (of the full budget) at which the shipped
  multi-fidelity configuration's median hypervolume reaches 95% of the full-budget default's
  median hypervolume at the full budget (``compute_fraction``), and the ratio of the two there
  (``hv_fraction``); if it never gets there, the ratio at the full budget and fraction 1.0,
  with ``reached`` false.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

if str(Path(__file__).resolve().parent) not in sys.path:  # sibling modules, as in bench.py
    sys.path.insert(0, str(Path(__file__).resolve().parent))

from search_replay import Searcher, Table, hv_curve, quartiles, replay, skipped_on_front  # noqa: E402
from search_table import export_table, read_table  # noqa: E402

from afm_ray.devices import cpu_model_name  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
DEFAULT_TABLE = REPO / "benchmarks" / "data" / "search_table_mnist5k.parquet"
GRID_POINTS = 201
# The searcher that runs each --default-sampler with the sweep's own start-up formula.
DEFAULT_LABELS = {
    "tpe": "tpe startup budget/3 (max 10)",
    "nsga2": "nsga2 pop budget/4",
    "gp": "gp startup budget/3 (max 10)",
}
FRACTIONS = (0.25, 0.5, 1.0)


def _gp(seed: int, num_samples: int) -> Any:
    import optuna

    from afm_ray.search.specs import default_startup_trials

    return optuna.samplers.GPSampler(
        seed=seed, n_startup_trials=default_startup_trials(num_samples), warn_independent_sampling=False
    )


def searchers(
    default_sampler: dict[str, Any], mo_asha: dict[str, Any], margin: float, *, gp: bool = False
) -> list[Searcher]:
    """The samplers compared for the default, then the default with multi-fidelity and staging.
    ``gp``: also Optuna's GP sampler (about a CPU-minute per seed, ten times the others together)."""
    gp_searcher = [Searcher(DEFAULT_LABELS["gp"], {"name": "gp"}, build=_gp)] if gp else []
    return [
        Searcher("random", {"name": "random"}),
        Searcher("nsga2 pop 50 (old default)", {"name": "nsga2", "population_size": 50}),
        Searcher(DEFAULT_LABELS["nsga2"], {"name": "nsga2"}),
        Searcher("tpe startup 4", {"name": "tpe", "n_startup_trials": 4}),
        Searcher(DEFAULT_LABELS["tpe"], {"name": "tpe"}),
        *gp_searcher,
        Searcher("default + staged AA", default_sampler, aa_policy="candidates", aa_margin=margin),
        Searcher("default + MO-ASHA rf 2", default_sampler, scheduler={**mo_asha, "reduction_factor": 2}),
        Searcher("default + MO-ASHA rf 3", default_sampler, scheduler={**mo_asha, "reduction_factor": 3}),
        Searcher(
            "default + MO-ASHA + staged AA",
            default_sampler,
            scheduler=mo_asha,
            aa_policy="candidates",
            aa_margin=margin,
        ),
    ]


def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    frame, space_yaml, info = read_table(Path(args.table))
    table = Table(frame, space_yaml)
    budget = args.budget_trials * float(np.mean(table.full_cost_s))
    grid = np.linspace(0.0, budget, GRID_POINTS)
    default_sampler = {"name": args.default_sampler, **({"n_startup_trials": args.startup} if args.startup else {})}
    mo_asha = {"name": "mo_asha", "grace_period": 1, "reduction_factor": args.reduction_factor}
    chosen = searchers(default_sampler, mo_asha, args.aa_margin, gp=args.gp)
    if args.only:
        chosen = [s for s in chosen if any(o in s.label for o in args.only)]
    results: dict[str, dict[str, Any]] = {}
    for searcher in chosen:
        started = time.perf_counter()
        curves, logs = [], []
        for seed in range(args.seeds):
            log = replay(
                table,
                searcher,
                seed=seed,
                budget_s=budget,
                num_samples=args.budget_trials,
                workers=args.workers,
                draw=args.draw,
            )
            curves.append(hv_curve(table, log, grid))
            logs.append(log)
        results[searcher.label] = summarise(table, searcher, np.array(curves), logs, budget)
        print(
            f"{searcher.label:<36} regret@budget median {results[searcher.label]['regret'][1.0][1]:.4f}  "
            f"({time.perf_counter() - started:.0f} s)",
            flush=True,
        )
    return {"table": table, "info": info, "grid": grid, "budget": budget, "results": results, "args": vars(args)}


def summarise(table: Table, searcher: Searcher, curves: np.ndarray, logs: list, budget: float) -> dict[str, Any]:
    regret = table.true_hv - curves
    at = {f: int(round(f * (GRID_POINTS - 1))) for f in FRACTIONS}
    trials = [len(log.trials) for log in logs]
    in_budget = [[t for t in log.trials if log.workers * t.started < budget] for log in logs]
    stopped = [np.mean([t.state == "stopped" for t in ts]) for ts in in_budget]
    evaluated = [[t for t in ts if t.state in ("complete", "aa_skipped")] for ts in in_budget]
    skipped = [np.mean([t.state == "aa_skipped" for t in ev]) if ev else 0.0 for ev in evaluated]
    aa_saved = [sum(table.aa_s[t.row] for t in ev if t.state == "aa_skipped") for ev in evaluated]
    aa_spent = [sum(table.aa_s[t.row] for t in ev if t.state == "complete") for ev in evaluated]
    return {
        "curves": curves,
        "regret": {f: quartiles(regret[:, i]) for f, i in at.items()},
        "hv": {f: quartiles(curves[:, i]) for f, i in at.items()},
        "trials": quartiles(trials),
        "stopped_fraction": float(np.mean(stopped)),
        "aa_skipped_fraction": float(np.mean(skipped)),
        "aa_seconds_saved_fraction": float(np.sum(aa_saved) / max(np.sum(aa_saved) + np.sum(aa_spent), 1e-9)),
        "skipped_on_front": int(sum(skipped_on_front(table, log) for log in logs)),
        "seeds": len(logs),
        "distinct_rows": quartiles([len({t.row for t in log.trials}) for log in logs]),
    }


def headline(bench: dict[str, Any], default_label: str, mf_label: str) -> dict[str, Any]:
    res = bench["results"]
    random_median = res["random"]["regret"][1.0][1]
    q25, med, q75 = res[default_label]["regret"][1.0]
    full_hv = float(np.median(res[default_label]["curves"][:, -1]))
    mf_median = np.median(res[mf_label]["curves"], axis=0)
    reached = np.flatnonzero(mf_median >= 0.95 * full_hv)
    i = int(reached[0]) if reached.size else len(mf_median) - 1
    at40 = int(round(0.4 * (GRID_POINTS - 1)))
    return {
        "regret_ratio_vs_random": {
            "median": med / random_median,
            "q25": q25 / random_median,
            "q75": q75 / random_median,
            "seeds": res[default_label]["seeds"],
        },
        "multi_fidelity": {
            "hv_fraction": float(mf_median[i] / full_hv),
            "compute_fraction": float(bench["grid"][i] / bench["budget"]),
            "reached": bool(reached.size),
            "hv_fraction_at_0.4": float(mf_median[at40] / full_hv),
            "configuration": mf_label,
            "full_budget": default_label,
        },
    }


def plot(bench: dict[str, Any], path: Path, labels: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table, grid = bench["table"], bench["grid"]
    x = grid / np.mean(table.full_cost_s)
    fig, ax = plt.subplots(figsize=(8, 5))
    for label in labels:
        curves = bench["results"][label]["curves"]
        q25, med, q75 = np.percentile(curves, [25, 50, 75], axis=0)
        (line,) = ax.plot(x, med, label=label, lw=1.6)
        ax.fill_between(x, q25, q75, color=line.get_color(), alpha=0.12)
    ax.axhline(table.true_hv, color="k", ls="--", lw=1, label="front of all recorded trials")
    ax.set_xlabel("compute (full-trial equivalents; 1 = the table's mean full trial)")
    ax.set_ylabel("hypervolume of (clean, AutoAttack) front")
    ax.set_ylim(
        bottom=0.8 * float(np.min([np.median(bench["results"][lb]["curves"][:, len(grid) // 10]) for lb in labels]))
    )
    ax.set_title(f"median and IQR over {bench['results'][labels[0]]['seeds']} seeds")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def noise_section(t: Any) -> list[str]:
    """How much of the table's spread a sampler could learn: the binomial noise of one accuracy
    on n_samples images against the spread between configurations."""
    n = float(t["n_samples"].median())
    aa = t["aa_acc"].to_numpy(float)
    binomial_sd = float(np.sqrt(np.median(aa) * (1 - np.median(aa)) / n))
    by_method = t.groupby("param:method.name")["aa_acc"].agg(["mean", "std", "count"]).sort_values("mean")
    top = np.sort(aa)[::-1][:8]
    rows = ", ".join(
        f"{m} {r['mean']:.3f} (sd {r['std']:.3f}, {int(r['count'])} trials)" for m, r in by_method.iterrows()
    )
    return [
        "## Signal and noise in the table",
        "",
        f"One AutoAttack accuracy on {n:.0f} images has a binomial standard deviation of {binomial_sd:.3f} at the "
        f"table's median ({np.median(aa):.3f}). AutoAttack accuracy by method, mean (sd between its trials): {rows}. "
        f"The 8 best AutoAttack accuracies span {top[-1]:.3f}-{top[0]:.3f}, "
        f"{(top[0] - top[-1]) / binomial_sd:.1f} binomial standard deviations"
        + (
            ": the front is drawn from a broad plateau of configurations that one evaluation cannot tell apart, "
            "which bounds what any sampler can learn here beyond avoiding the poor regions."
            if top[0] - top[-1] < 2 * binomial_sd
            else ": the best configurations stand out of the evaluation noise."
        ),
    ]


def markdown(bench: dict[str, Any], head: dict[str, Any], command: str, plot_name: str) -> str:
    table, args = bench["table"], bench["args"]
    t = table.frame
    lines = [
        "# Search benchmark (CPU)",
        "",
        f"Made by `{command}` on {cpu_model_name()} ({platform.python_version()}), {time.strftime('%Y-%m-%d')}.",
        "",
        "## The table",
        "",
        f"{len(t)} configurations drawn uniformly at random over the embedded default space "
        "(`search_spaces/default.yaml`: "
        "5000 MNIST digits at 14x14, small-CNN students, 5 epochs, clean / PGD-20 / CW / AutoAttack on 200 test "
        "images), each trained and evaluated in full by the sweep itself on the 2-core CPU machine "
        "(`benchmarks/record_search_table.py`, exported to `benchmarks/data/search_table_mnist5k.parquet`).",
        f"Mean full trial {np.mean(table.full_cost_s):.0f} s: per-trial fixed cost {table.fixed_cost_s:.0f} s "
        f"(median Ray start-up/tear-down {table.overhead_s:.0f} s + set-up {table.setup_s:.0f} s), "
        f"training {np.mean([e.sum() for e in table.epoch_s]):.0f} s, final evaluation {t['eval_s'].mean():.0f} s "
        f"of which AutoAttack {t['eval_aa_s'].mean():.0f} s. Front of all recorded trials: "
        f"{len(table.true_front)} trials, hypervolume {table.true_hv:.4f} with the reference point "
        f"(clean {table.reference[0]:.3f}, AutoAttack {table.reference[1]:.3f}), the worst recorded values. "
        "Accuracies are on 200 images: one image is 0.005, a 95% interval at 50% is about +-0.07. "
        "The seconds are as recorded: the machine was at times shared with other jobs (tests), which "
        "slowed some trials; every searcher replays the same seconds, so the comparison is unaffected, "
        "but the absolute hours carry that noise.",
        "",
        "## Hypervolume against compute",
        "",
        f"![hypervolume vs compute]({plot_name})",
        "",
        f"Budget: {args['budget_trials']} full trials' worth ({bench['budget'] / 3600:.2f} CPU-slot-hours), "
        f"{args['workers']} trials at a time, {args['seeds']} seeds (0..{args['seeds'] - 1}). "
        "Regret = hypervolume of the table's front minus the searcher's; median [q25, q75] over seeds.",
        "",
        "| searcher | regret @ 25% | regret @ 50% | regret @ 100% | trials (median) | distinct configs | "
        "stopped early | AA skipped | AA seconds saved | skipped trials that belonged on the front |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for label, r in bench["results"].items():
        cells = " | ".join(
            f"{r['regret'][f][1]:.4f} [{r['regret'][f][0]:.4f}, {r['regret'][f][2]:.4f}]" for f in FRACTIONS
        )
        lines.append(
            f"| {label} | {cells} | {r['trials'][1]:.0f} | {r['distinct_rows'][1]:.0f} | "
            f"{100 * r['stopped_fraction']:.0f}% | {100 * r['aa_skipped_fraction']:.0f}% | "
            f"{100 * r['aa_seconds_saved_fraction']:.0f}% | {r['skipped_on_front']} |"
        )
    lines += ["", *noise_section(t)]
    if not head:  # --only left out a searcher the headline compares
        return "\n".join(lines) + "\n"
    rr, mf = head["regret_ratio_vs_random"], head["multi_fidelity"]
    lines += [
        "",
        "## Headline",
        "",
        "```json",
        json.dumps(head, indent=2),
        "```",
        "",
        f"- Default ({mf['full_budget']}) regret at the full budget: {rr['median']:.2f}x random search's "
        f"median [q25 {rr['q25']:.2f}, q75 {rr['q75']:.2f}] (target <= 0.6).",
        f"- {mf['configuration']}: {'reaches' if mf['reached'] else 'does not reach'} 95% of the full-budget "
        f"default's hypervolume; {100 * mf['hv_fraction']:.1f}% at {100 * mf['compute_fraction']:.0f}% of the "
        f"compute; {100 * mf['hv_fraction_at_0.4']:.1f}% at 40% (target: >= 95% at <= 40%).",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["export"]:
        parser = argparse.ArgumentParser(prog="search.py export", description="MLflow + Optuna -> the Parquet table")
        parser.add_argument("--tracking-uri", required=True)
        parser.add_argument("--optuna-storage", required=True)
        parser.add_argument("--experiment", default="afm-ray-search-record")
        parser.add_argument("--study", default="search-record")
        parser.add_argument("--out", default=str(DEFAULT_TABLE))
        a = parser.parse_args(argv[1:])
        frame = export_table(a.tracking_uri, a.optuna_storage, a.experiment, a.study, Path(a.out))
        print(f"{len(frame)} completed trials -> {a.out}")
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--table", default=str(DEFAULT_TABLE))
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--budget-trials", type=int, default=40)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument(
        "--default-sampler", default="tpe", choices=("tpe", "nsga2"), help="the sampler shipped as the default"
    )
    parser.add_argument("--startup", type=int, default=0, help="its n_startup_trials (0 = the sweep's formula)")
    parser.add_argument("--reduction-factor", type=float, default=3)
    parser.add_argument("--aa-margin", type=float, default=0.01)
    parser.add_argument("--draw", choices=("once", "replace"), default="once", help="see benchmarks/search_replay.py")
    parser.add_argument("--gp", action="store_true", help="also replay Optuna's GP sampler (slow)")
    parser.add_argument("--only", nargs="*", help="run only searchers whose label contains one of these")
    parser.add_argument("--json", help="write the headline numbers here")
    parser.add_argument("--doc", help="write the Markdown record here (and the plot beside it)")
    args = parser.parse_args(argv)
    bench = run_benchmark(args)
    labels = list(bench["results"])
    default_label = DEFAULT_LABELS[args.default_sampler]
    mf_label = "default + MO-ASHA + staged AA"
    head = headline(bench, default_label, mf_label) if {"random", default_label, mf_label} <= set(labels) else {}
    print(json.dumps(head, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(head, indent=2) + "\n")
    if args.doc:
        doc = Path(args.doc)
        png = doc.with_suffix(".png")
        plot(bench, png, labels)
        command = "python benchmarks/search.py " + " ".join(argv)
        doc.write_text(markdown(bench, head, command, png.name))
    return 0


if __name__ == "__main__":
    sys.exit(main())
