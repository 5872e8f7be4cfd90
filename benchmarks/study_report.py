"""Write the markdown report of a seed-replicated study (search_spaces/study_methods*.yaml) from MLflow.

    python benchmarks/study_report.py --experiment afm-ray-study --sweep study-cpu \
        [--tracking-uri URI] --out docs/study_cpu.md [--csv docs/study_cpu.csv] [--notes PATH]

Per method and augmentation policy: the mean over seeds of each accuracy with its 95% interval
(`afm_ray.stats.mean_interval`: the seeds' spread and the test images' binomial noise), the seeds,
and the image count. Then the augmentation claim: for each method with both policies, the
difference strong - crop_flip (Welch's t interval over seeds), and the difference of those
differences between AdvFunMatch and PGD-AT. Only completed trials count; a missing one is listed.
``--notes`` adds a hand-written reading of the numbers, verbatim, after the generated part.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd

from afm_ray import names
from afm_ray.devices import cpu_model_name
from afm_ray.stats import mean_interval, t_quantile
from afm_ray.tracking.mlflow_runs import client_for, load_trials

METRICS = [m for m in names.ACCURACY_METRICS]
BASELINE = "crop_flip"


def completed(trials: pd.DataFrame) -> pd.DataFrame:
    ok = (trials.get(f"tags.{names.TRIAL_STATUS_TAG}") == "completed") & (trials["status"] == "FINISHED")
    frame = trials[ok].copy()
    frame["method"] = frame["params.method.name"]
    frame["policy"] = frame["params.augment.policy"]
    frame["seed"] = frame["params.run.seed"].astype(int)
    return frame.sort_values(["method", "policy", "seed"])


def summary_rows(frame: pd.DataFrame, metrics: list[str]) -> list[dict]:
    rows = []
    for (method, policy), group in frame.groupby(["method", "policy"], sort=False):
        n = group["metrics.eval/n_samples"].astype(float)
        row = {"method": method, "policy": policy, "seeds": ",".join(map(str, group["seed"])), "n": int(n.min())}
        row["n_mixed"] = n.nunique() > 1
        for metric in metrics:
            values = group[f"metrics.{metric}"].astype(float).dropna().tolist()
            row[metric] = mean_interval(values, n.min()) if values else (math.nan,) * 3
        rows.append(row)
    return rows


def welch(a: list[float], b: list[float]) -> tuple[float, float, float]:
    """(mean(a) - mean(b), low, high): Welch's 95% t interval over the seeds of each side."""
    if len(a) < 2 or len(b) < 2:
        return statistics.fmean(a) - statistics.fmean(b), math.nan, math.nan
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    diff, se = statistics.fmean(a) - statistics.fmean(b), math.sqrt(va + vb)
    if se == 0:
        return diff, diff, diff
    dof = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    half = t_quantile(0.95, round(dof)) * se
    return diff, diff - half, diff + half


def interaction(d1: tuple[list, list], d2: tuple[list, list]) -> tuple[float, float, float]:
    """(strong - base) of method 1 minus (strong - base) of method 2, with a Welch-style 95% interval."""
    parts = [d1[0], d1[1], d2[0], d2[1]]
    if any(len(p) < 2 for p in parts):
        return math.nan, math.nan, math.nan
    means = [statistics.fmean(p) for p in parts]
    var = [statistics.variance(p) / len(p) for p in parts]
    diff = (means[0] - means[1]) - (means[2] - means[3])
    se = math.sqrt(sum(var))
    dof = sum(var) ** 2 / sum(v**2 / (len(p) - 1) for v, p in zip(var, parts, strict=True)) if se else 1
    half = t_quantile(0.95, max(1, round(dof))) * se
    return diff, diff - half, diff + half


def _pct(value: float) -> str:
    return "-" if math.isnan(value) else f"{100 * value:.1f}"


def _signed(diff: float, low: float, high: float) -> str:
    if math.isnan(diff):
        return "-"
    text = f"{100 * diff:+.1f}"
    return text if math.isnan(low) else f"{text} [{100 * low:+.1f}, {100 * high:+.1f}]"


def _verdict(low: float, high: float) -> str:
    if math.isnan(low):
        return "too few seeds"
    return "positive" if low > 0 else "negative" if high < 0 else "not resolved (interval spans 0)"


def render(frame: pd.DataFrame, trials: pd.DataFrame, args: argparse.Namespace, sweep: dict) -> str:
    metrics = [m for m in METRICS if f"metrics.{m}" in frame.columns and frame[f"metrics.{m}"].notna().any()]
    rows = summary_rows(frame, metrics)
    first = frame.iloc[0]
    p = lambda key: first.get(f"params.{key}", "?")  # noqa: E731
    command = (
        " ".join(["python", "benchmarks/study_report.py", *sys.argv[1:]]) if args.command is None else args.command
    )
    # Keys pinned on the command line (--set) are in every run's params but not in the space's source.
    pinned = "".join(f" --set {k}={v}" for k, v in sweep.get("pinned", {}).items())
    out = [
        "# Seed-replicated study of the distillation methods (embedded data, CPU)",
        "",
        f"Study: `python -m afm_ray.sweep --space {sweep.get('space', '?')}{pinned} --name {sweep.get('name', '?')}` "
        f"(a grid: every combination once), then `{command}`.",
        "",
        f"Machine: {cpu_model_name()}, {os.cpu_count()} cores; Ray 1 CPU per trial. "
        f"Report written {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC"
        + (f"; the sweep ran {sweep['wall_s'] / 3600:.1f} h of wall time." if sweep.get("wall_s") else "."),
        "",
        f"Budget, the same for every run: data {p('data.name')} at {p('data.image_size')} px, student "
        f"{p('student.arch')} width {p('student.width')}, teacher {p('teacher.arch')} width {p('teacher.width')} "
        f"({p('teacher.method')}, {p('teacher.epochs')} epochs; one teacher for all, trained once), "
        f"{p('optim.epochs')} epochs, batch {p('optim.batch_size')}, lr {p('optim.lr')} {p('optim.schedule')}, "
        f"training attack eps {p('attack.eps')} with {p('attack.steps')} PGD steps, each method's own defaults "
        "(docs/methods.md).",
        "",
        f"Evaluation: {', '.join(metrics)} at eps {p('eval.eps')} on "
        + ("the whole test split" if str(p("eval.samples")) == "0" else "the fixed test subset")
        + f" ({int(frame['metrics.eval/n_samples'].min())} images), protocol in docs/methods.md. "
        "Seeds (`run.seed`) change the student's initialisation, batch order, augmentation and attack starts; "
        "the data split and the teacher stay fixed.",
        "",
    ]
    if sweep.get("teacher"):
        out += [f"Teacher: {sweep['teacher']}.", ""]
    missing = len(trials) - len(frame)
    if missing:
        out += [f"Not counted: {missing} trial run(s) that did not complete (failed, stopped or still running).", ""]
    out += [
        "## Accuracy per method and policy",
        "",
        "Mean over seeds in %, with the 95% interval in brackets (the seeds' t interval and the test images' "
        "Wilson interval, combined in quadrature).",
        "",
        "| method | policy | seeds | images | " + " | ".join(f"{m} %" for m in metrics) + " |",
        "|---|---|---|---:|" + "---:|" * len(metrics),
    ]
    for row in rows:
        cells = [f"{_pct(row[m][0])} [{_pct(row[m][1])}, {_pct(row[m][2])}]" for m in metrics]
        out.append(f"| {row['method']} | {row['policy']} | {row['seeds']} | {row['n']} | " + " | ".join(cells) + " |")
    out += ["", "## Strong augmentation against crop_flip", ""]
    deltas: dict[str, dict[str, tuple]] = {}
    for method, group in frame.groupby("method", sort=False):
        policies = [q for q in group["policy"].unique() if q != BASELINE]
        if BASELINE not in set(group["policy"]) or not policies:
            continue
        for strong in policies:
            deltas.setdefault(method, {})
            for metric in metrics:
                a = group.loc[group["policy"] == strong, f"metrics.{metric}"].astype(float).tolist()
                b = group.loc[group["policy"] == BASELINE, f"metrics.{metric}"].astype(float).tolist()
                deltas[method][metric] = (strong, a, b, welch(a, b))
    if deltas:
        out += [
            "Difference of the means over seeds, strong policy minus crop_flip, in points, with Welch's 95% "
            "interval over the seeds (the test images are the same for both policies, so their noise is "
            "shared and left out).",
            "",
            "| method | strong policy | " + " | ".join(f"Δ {m}" for m in metrics) + " |",
            "|---|---|" + "---:|" * len(metrics),
        ]
        for method, per in deltas.items():
            strong = next(iter(per.values()))[0]
            out.append(f"| {method} | {strong} | " + " | ".join(_signed(*per[m][3]) for m in metrics) + " |")
        if "advfunmatch" in deltas and "pgd_at" in deltas:
            out += [
                "",
                "The claim (AdvFunMatch gains more from strong augmentation than adversarial training does): "
                "Δ(AdvFunMatch) − Δ(PGD-AT), in points:",
                "",
                "| metric | Δ(AdvFunMatch) − Δ(PGD-AT) [95%] | sign |",
                "|---|---:|---|",
            ]
            for metric in metrics:
                afm, pgd = deltas["advfunmatch"][metric], deltas["pgd_at"][metric]
                diff, low, high = interaction((afm[1], afm[2]), (pgd[1], pgd[2]))
                out.append(f"| {metric} | {_signed(diff, low, high)} | {_verdict(low, high)} |")
    out += ["", "## Every run", "", "| method | policy | seed | " + " | ".join(metrics) + " | run |", "|---|---|---:|"]
    out[-1] += "---:|" * len(metrics) + "---|"
    for _, r in frame.iterrows():
        cells = " | ".join(_pct(float(r[f"metrics.{m}"])) for m in metrics)
        out.append(f"| {r['method']} | {r['policy']} | {r['seed']} | {cells} | {r['run_id'][:8]} |")
    if args.notes:
        out += ["", Path(args.notes).read_text().rstrip()]
    return "\n".join(out) + "\n"


def _pinned(space: str, trials: pd.DataFrame) -> dict[str, str]:
    """Fixed keys whose value in the runs differs from the space's: what `--set` pinned."""
    from afm_ray.config import from_flat, to_flat
    from afm_ray.errors import UserError
    from afm_ray.search.space import load_search_space

    try:
        fixed = to_flat(from_flat(load_search_space(space).fixed))
    except UserError:  # the space file is gone: nothing to compare with
        return {}
    first = trials.iloc[0]
    return {
        key: str(first[f"params.{key}"])
        for key in load_search_space(space).fixed
        if key != "teacher.checkpoint"  # the sweep replaces "train" by the teacher it trained
        and f"params.{key}" in trials.columns
        and str(first[f"params.{key}"]) != str(fixed[key])
    }


def sweep_info(client, trials: pd.DataFrame) -> dict:
    parents = trials[f"tags.{names.PARENT_TAG}"].dropna().unique()
    if len(parents) != 1:
        return {}
    run = client.get_run(parents[0])
    info = {"space": run.data.params.get("sweep.space", "?"), "name": run.data.params.get("sweep.name", "?")}
    space = info["space"]
    if "search_spaces/" in space:  # the path as a user of the repository types it
        info["space"] = "search_spaces/" + space.split("search_spaces/", 1)[1]
    info["pinned"] = _pinned(run.data.params.get("sweep.space", ""), trials)
    metrics = run.data.metrics
    info["wall_s"] = metrics.get("sweep/wall_s")
    if "teacher/clean_acc" in metrics:
        info["teacher"] = (
            f"clean {100 * metrics['teacher/clean_acc']:.1f}%, PGD-20 {100 * metrics['teacher/pgd20_acc']:.1f}% "
            "(on the fixed evaluation subset)"
        )
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiment", required=True)
    parser.add_argument("--sweep", help="the sweep's run name or id (default: every trial of the experiment)")
    parser.add_argument("--tracking-uri")
    parser.add_argument("--out", required=True, help="markdown file to write")
    parser.add_argument("--csv", help="also write every completed run as CSV")
    parser.add_argument("--notes", help="markdown appended verbatim: the reading of the numbers")
    parser.add_argument("--command", help="the report command as the document shows it (default: this one)")
    args = parser.parse_args(argv)
    trials = load_trials(args.experiment, tracking_uri=args.tracking_uri, sweep=args.sweep)
    frame = completed(trials)
    if frame.empty:
        print("no completed trial yet", file=sys.stderr)
        return 1
    text = render(frame, trials, args, sweep_info(client_for(args.tracking_uri), trials))
    Path(args.out).write_text(text)
    if args.csv:
        keep = ["run_id", "method", "policy", "seed", "metrics.eval/n_samples"]
        keep += [f"metrics.{m}{end}" for m in METRICS for end in ("", "_ci_low", "_ci_high")]
        frame[[c for c in keep if c in frame.columns]].to_csv(args.csv, index=False)
    print(f"wrote {args.out} ({len(frame)} completed runs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
