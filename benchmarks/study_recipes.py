"""A seed-replicated study of the paper-grade student choices on the embedded data (digits), on the CPU:

    python benchmarks/study_recipes.py --workdir study_recipes --out docs/study_recipes_cpu.md

Which weights are the student (last vs best_pgd, as trained vs EMA vs SWA), one teacher vs an ensemble
of two, and the last vs an early-stopped teacher, for AKD (the method whose paper names the teacher
techniques), 3 training seeds each, every student scored on every test image (clean, PGD-20,
AutoAttack). Resumable: each finished run is a JSON file under --workdir; running the command again
skips them and rewrites the report. ``--report-only`` rewrites the report from what is there.

Runs per seed (15 in all), each `train_fn_per_worker` in a plain process, two at a time:

- `none`, `ema`, `swa`: student.select best_pgd with student.average none / ema / swa. The same seed
  trains the same weights in all three (averaging and selection do not touch training), so their
  differences are paired. The study scores each run's best_pgd student (its checkpoint's `model`) and
  the last epoch's weights of the same run (its training or averaged weights): 6 students from 3 runs.
- `ensemble`: teacher.checkpoint = the PGD-AT and the TRADES teacher (mean of probabilities); last, none.
- `early_teacher`: the PGD-AT teacher at its best val/pgd10_acc epoch (teacher.select best_pgd).

The reference for the teacher rows is `none`'s last-epoch student (PGD-AT teacher, last epoch).
Every student is scored the same way (afm_ray.evaluate.protocol.evaluate_model: all test images, each
attack seeded by data.seed), so two students differ by their weights, not by attack randomness.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from datetime import datetime, timezone
from multiprocessing import get_context
from pathlib import Path
from typing import Any

STUDY = {
    "data.name": "digits",
    "student.arch": "small_cnn",
    "student.width": 16,
    "teacher.arch": "small_cnn",
    "teacher.width": 32,
    "teacher.epochs": 60,
    "method.name": "akd",
    "optim.epochs": 100,
    "optim.batch_size": 128,
    "optim.lr": 0.1,
    "optim.schedule": "step",  # x0.1 at 50% and 75%: where robust overfitting shows (Rice et al. 2020)
    "attack.eps": 0.1,
    "attack.steps": 3,
    "eval.eps": 0.1,
    "eval.samples": 0,  # every test image
    "eval.attacks": "clean,pgd20,aa",
    "eval.val_samples": 256,
    "eval.batch_size": 512,  # every test image in one batch: AutoAttack's per-batch overhead dominates here
    "student.ema_decay": 0.999,
    "student.swa_start": 0.5,  # the epochs after the first learning-rate decay
    "run.device": "cpu",
}
TEACHER_METHODS = ("pgd_at", "trades")
METRICS = ("clean_acc", "pgd20_acc", "aa_acc")
# (row, run, which weights of the run): the rows of the report.
ROWS = (
    ("last", "none", "last"),
    ("best_pgd", "none", "selected"),
    ("EMA, last", "ema", "last"),
    ("EMA, best_pgd", "ema", "selected"),
    ("SWA, last", "swa", "last"),
    ("SWA, best_pgd", "swa", "selected"),
    ("teacher ensemble of 2, last", "ensemble", "selected"),
    ("early-stopped teacher, last", "early_teacher", "selected"),
)


def run_overrides(run: str, teachers: dict[str, str]) -> dict[str, Any]:
    single = {"teacher.checkpoint": teachers["pgd_at"]}
    return {
        "none": {**single, "student.select": "best_pgd", "student.average": "none"},
        "ema": {**single, "student.select": "best_pgd", "student.average": "ema"},
        "swa": {**single, "student.select": "best_pgd", "student.average": "swa"},
        "ensemble": {"teacher.checkpoint": f"{teachers['pgd_at']},{teachers['trades']}"},
        "early_teacher": {**single, "teacher.select": "best_pgd"},
    }[run]


def train_teacher(workdir: str, base: dict[str, Any], method: str) -> str:
    """One teacher (a worker process; trained once, cached under workdir): its cache folder of epochs."""
    import torch

    torch.set_num_threads(1)
    from afm_ray.config import from_flat
    from afm_ray.teacher.training import ensure_teacher

    flat = {**base, "teacher.method": method, "teacher.cache_dir": str(Path(workdir) / "teachers")}
    cfg = from_flat({**flat, "teacher.select": "best_pgd"})  # best_pgd: the entry must keep every epoch
    return str(ensure_teacher(cfg, log=lambda line: None).parent)


def one_run(name: str, seed: int, config: dict[str, Any], out: str) -> str:
    """Train one student (a worker process), score its last-epoch weights too, and write the JSON record."""
    import torch

    torch.set_num_threads(1)
    from afm_ray.checkpoints import load_training_state
    from afm_ray.config import from_flat
    from afm_ray.data import load_run_data
    from afm_ray.evaluate.protocol import evaluate_model
    from afm_ray.models import build_model, model_kwargs
    from afm_ray.train.loop import LocalReporter, train_fn_per_worker

    started = time.time()
    curve: list[dict[str, float]] = []
    run_dir = Path(out).with_suffix("")
    reporter = LocalReporter(run_dir, log=lambda line: None)
    report = reporter.report

    def keep(metrics: dict[str, float], checkpoint_dir: str | None) -> None:
        if "val/pgd10_acc" in metrics and "clean_acc" not in metrics:
            curve.append({k: float(metrics[k]) for k in ("epoch", "val/clean_acc", "val/pgd10_acc", "train/loss")})
        report(metrics, checkpoint_dir)

    reporter.report = keep  # type: ignore[method-assign]
    # The run's own final evaluation is clean only; every student is scored below the one way (the same
    # images, the attacks seeded alike), so two students of a run differ by their weights, not by noise.
    final = train_fn_per_worker({**config, "eval.attacks": "clean"}, reporter)
    cfg = from_flat(config)
    data = load_run_data(cfg)
    state = load_training_state(reporter.latest_checkpoint)

    def score(weights: dict) -> dict[str, float]:
        model = build_model(cfg.student.arch, **model_kwargs(cfg.student, data))
        model.load_state_dict(weights)
        scores = evaluate_model(model, cfg, data, log=lambda line: None)
        return {k: float(v) for k, v in scores.items() if isinstance(v, (int, float))}

    selected_epoch = int(final["student/selected_epoch"])
    record: dict[str, Any] = {
        "run": name,
        "seed": seed,
        "config": config,
        "selected": {
            **score(state["model"]),
            "student/selected_epoch": float(selected_epoch),
            "epoch": cfg.optim.epochs,
        },
        "curve": curve,
    }
    if selected_epoch == cfg.optim.epochs:
        record["last"] = record["selected"]  # the last epoch was selected: the same weights, scored once
    else:
        averaged = state["student_weights"].get("averaged")
        record["last"] = score(averaged if averaged is not None else state["train_model"])
    record["wall_s"] = time.time() - started
    Path(out).write_text(json.dumps(record, indent=1))
    import shutil

    shutil.rmtree(run_dir, ignore_errors=True)
    return out


def run_all(workdir: Path, seeds: list[int], jobs: int, base: dict[str, Any]) -> None:
    with ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("spawn")) as pool:
        futures = {m: pool.submit(train_teacher, str(workdir), base, m) for m in TEACHER_METHODS}
        teachers = {m: f.result() for m, f in futures.items()}
    print(f"[{datetime.now():%H:%M:%S}] teachers: {teachers}", flush=True)
    (workdir / "teachers.json").write_text(json.dumps(teachers, indent=1))
    results = workdir / "runs"
    results.mkdir(parents=True, exist_ok=True)
    todo = []
    for seed in seeds:
        for name in ("none", "ema", "swa", "ensemble", "early_teacher"):
            out = results / f"{name}-seed{seed}.json"
            if not out.is_file():
                config = {**base, **run_overrides(name, teachers), "run.seed": seed}
                todo.append((name, seed, config, str(out)))
    print(f"{len(todo)} runs to go, {jobs} at a time", flush=True)
    with ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("spawn")) as pool:
        futures = {pool.submit(one_run, *job): job[:2] for job in todo}
        for future in as_completed(futures):
            name, seed = futures[future]
            try:
                future.result()
            except Exception as exc:  # the others go on; running the command again retries this one
                print(
                    f"[{datetime.now():%H:%M:%S}] FAILED: {name} seed {seed}: {type(exc).__name__}: {exc}", flush=True
                )
                continue
            print(f"[{datetime.now():%H:%M:%S}] done: {name} seed {seed}", flush=True)


def load_records(workdir: Path) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted((workdir / "runs").glob("*.json"))]


def _pct(x: float) -> str:
    return "-" if math.isnan(x) else f"{100 * x:.1f}"


def _paired(a: list[float], b: list[float]) -> tuple[float, float, float]:
    """mean(a - b) over paired seeds with Student's t 95% interval (nan when fewer than 2 pairs)."""
    from afm_ray.stats import t_quantile

    diffs = [x - y for x, y in zip(a, b, strict=True)]
    mean = statistics.fmean(diffs)
    if len(diffs) < 2:
        return mean, math.nan, math.nan
    half = t_quantile(0.95, len(diffs) - 1) * statistics.stdev(diffs) / math.sqrt(len(diffs))
    return mean, mean - half, mean + half


def render(records: list[dict[str, Any]], workdir: Path, command: str, notes: str | None = None) -> str:
    from afm_ray.devices import cpu_model_name
    from afm_ray.stats import mean_interval

    by = {(r["run"], r["seed"]): r for r in records}
    seeds = sorted({r["seed"] for r in records})
    n = int(min(r["selected"]["eval/n_samples"] for r in records))
    base = records[0]["config"]
    wall = sum(r["wall_s"] for r in records)

    def values(run: str, which: str, metric: str) -> dict[int, float]:
        return {s: by[(run, s)][which][metric] for s in seeds if (run, s) in by and metric in by[(run, s)][which]}

    out = [
        "# Which weights are the student, and AKD's teacher techniques (embedded data, CPU)",
        "",
        f"Regenerate: `{command}` (resumable; about {wall / 3600:.1f} h of CPU in all, two runs at a time).",
        "",
        f"Machine: {cpu_model_name()}, {os.cpu_count()} cores, shared with other work; each run one thread, "
        f"two runs at a time. Written {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC.",
        "",
        f"Setup, the same for every run: AKD (lam 1/2, tau 1), student {base['student.arch']} width "
        f"{base['student.width']}, data {base['data.name']} (sklearn's 8x8 digits: {n} test images, the "
        "held-out validation split 256 training images), "
        f"{base['optim.epochs']} epochs, batch {base['optim.batch_size']}, SGD lr {base['optim.lr']} with the "
        f"step schedule (x0.1 at 50% and 75%), training attack PGD-{base['attack.steps']} at eps {base['attack.eps']}; "
        f"teachers {base['teacher.arch']} width {base['teacher.width']} trained {base['teacher.epochs']} epochs "
        "(PGD-AT; and TRADES for the ensemble), the same for all seeds. EMA decay "
        f"{base['student.ema_decay']} per step (warmed up, afm_ray/student_weights.py), SWA over the epochs after "
        f"{base['student.swa_start']:.0%} of the run. Seeds {', '.join(map(str, seeds))} (`run.seed`: initialisation, "
        "batch order, augmentation, attack starts).",
        "",
        f"Evaluation: clean, PGD-20 and AutoAttack (standard) at eps {base['eval.eps']} on all {n} test images. "
        "Intervals are 95%: for a mean over seeds, the seeds' t interval and the test images' Wilson interval in "
        "quadrature (afm_ray/stats.py); for a difference, the paired t interval over the seeds (the same images "
        "score both sides, so their noise largely cancels and is left out).",
        "",
        "## Accuracy",
        "",
        "| student | runs | " + " | ".join(f"{m} % [95%]" for m in METRICS) + " | selected epoch (per seed) |",
        "|---|---|" + "---:|" * len(METRICS) + "---|",
    ]
    for label, run, which in ROWS:
        cells = []
        for metric in METRICS:
            v = list(values(run, which, metric).values())
            mean, low, high = mean_interval(v, n) if v else (math.nan,) * 3
            cells.append(f"{_pct(mean)} [{_pct(low)}, {_pct(high)}]")
        epochs = [
            int(by[(run, s)][which].get("student/selected_epoch", by[(run, s)]["selected"]["epoch"]))
            if which == "selected"
            else int(base["optim.epochs"])
            for s in seeds
            if (run, s) in by
        ]
        runs = len([s for s in seeds if (run, s) in by])
        out.append(f"| {label} | {runs} | " + " | ".join(cells) + f" | {', '.join(map(str, epochs))} |")
    out += [
        "",
        "## Differences from the last epoch's weights as trained (paired by seed, in points)",
        "",
        "Resolved: the paired 95% interval excludes 0 (+ better, − worse); otherwise not resolved at this size.",
        "",
        "| student | " + " | ".join(f"Δ {m} [95%]" for m in METRICS) + " | resolved |",
        "|---|" + "---:|" * len(METRICS) + "---|",
    ]
    resolved: list[str] = []
    for label, run, which in ROWS[1:]:
        cells, verdicts = [], []
        for metric in METRICS:
            a, b = values(run, which, metric), values("none", "last", metric)
            common = sorted(set(a) & set(b))
            if not common:
                cells.append("-")
                continue
            d, low, high = _paired([a[s] for s in common], [b[s] for s in common])
            interval = "" if math.isnan(low) else f" [{100 * low:+.1f}, {100 * high:+.1f}]"
            cells.append(f"{100 * d:+.1f}{interval}")
            if not math.isnan(low) and (low > 0 or high < 0):
                verdicts.append(f"{metric} {'+' if low > 0 else '−'}")
        resolved += [f"{label}: {v}" for v in verdicts]
        out.append(f"| {label} | " + " | ".join(cells) + f" | {', '.join(verdicts) or 'none'} |")
    out += [
        "",
        "Resolved at this size: " + ("; ".join(resolved) if resolved else "no difference") + ". Everything else in "
        "the table is within the noise of 3 seeds on these test images.",
    ]
    out += [
        "",
        "## Robust overfitting: the validation curve of the weights as trained",
        "",
        "val/pgd10_acc on the 256 held-out training images (PGD-10), per seed of the `none` runs: its best epoch, "
        "its best value, and the mean of the last 5 epochs.",
        "",
        "| seed | best epoch | best val/pgd10_acc % | mean of the last 5 epochs % | last-5 minus best, points |",
        "|---:|---:|---:|---:|---:|",
    ]
    for s in seeds:
        if ("none", s) not in by:
            continue
        curve = by[("none", s)]["curve"]
        best = max(curve, key=lambda c: (c["val/pgd10_acc"], -c["epoch"]))
        tail = statistics.fmean(c["val/pgd10_acc"] for c in curve[-5:])
        out.append(
            f"| {s} | {int(best['epoch'])} | {_pct(best['val/pgd10_acc'])} | {_pct(tail)} | "
            f"{100 * (tail - best['val/pgd10_acc']):+.1f} |"
        )
    teachers = workdir / "teachers.json"
    if teachers.is_file():
        out += ["", "## Teachers", ""]
        for method, folder in json.loads(teachers.read_text()).items():
            index = json.loads((Path(folder) / "epochs" / "index.json").read_text())
            best = max(index, key=lambda r: (r["val/pgd10_acc"], -r["epoch"]))
            out.append(
                f"- {method}: {len(index)} epochs; val/pgd10_acc best {_pct(best['val/pgd10_acc'])}% at epoch "
                f"{best['epoch']}, last {_pct(index[-1]['val/pgd10_acc'])}% (256 held-out training images)."
            )
    if notes:
        out += ["", Path(notes).read_text().rstrip()]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True, help="where teachers, runs and records go (resumable)")
    parser.add_argument("--out", required=True, help="the markdown report to write")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time (one thread each)")
    parser.add_argument("--epochs", type=int, default=STUDY["optim.epochs"])
    parser.add_argument("--teacher-epochs", type=int, default=STUDY["teacher.epochs"])
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--notes", help="markdown appended verbatim: the reading of the numbers")
    args = parser.parse_args(argv)
    workdir = Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    base = {**STUDY, "optim.epochs": args.epochs, "teacher.epochs": args.teacher_epochs}
    if not args.report_only:
        run_all(workdir, [int(s) for s in args.seeds.split(",")], args.jobs, base)
    records = load_records(workdir)
    if not records:
        print("no finished run yet", file=sys.stderr)
        return 1
    command = "python benchmarks/study_recipes.py --workdir study_recipes --out " + args.out
    if args.epochs != STUDY["optim.epochs"]:
        command += f" --epochs {args.epochs}"
    if args.teacher_epochs != STUDY["teacher.epochs"]:
        command += f" --teacher-epochs {args.teacher_epochs}"
    if args.notes:
        command += f" --notes {args.notes}"
    Path(args.out).write_text(render(records, workdir, command, args.notes))
    print(f"wrote {args.out} ({len(records)} runs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
