"""A seed-replicated study of the paper-grade student choices on the embedded data (digits), on the CPU:

    python benchmarks/study_recipes.py --workdir study_recipes --out docs/study_recipes_cpu.md

Which weights are the student (last vs best_pgd, as trained vs EMA vs SWA), one teacher vs an ensemble
of two, and the last vs an early-stopped teacher, for AKD (the method whose paper names the teacher
techniques), 3 training seeds each, every student scored on every test image (clean, PGD-20,
AutoAttack; `--attacks` narrows it). Resumable: each finished run is a JSON file under --workdir; running
the command again skips them and rewrites the report. ``--report-only`` rewrites the report from what is there.

Runs per seed (3; 9 in all), each `train_fn_per_worker` in a plain process, two at a time:

- `trained` (the PGD-AT teacher): one training run tracks student.select best_pgd with student.average
  none, ema and swa side by side (_Trio) and writes the records `none`, `ema` and `swa`. Averaging and
  selection do not touch training, so separate runs of a seed would train the same weights (checked: a
  separate `ema` run and the shared run's `ema` record agree to the last digit); their differences are
  paired. The study scores each record's best_pgd student and the last epoch's weights (as trained, or
  averaged): 6 students from 1 run.
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
# The training runs of a seed and the records each writes (see the module docstring).
ARMS = {"trained": ("none", "ema", "swa"), "ensemble": ("ensemble",), "early_teacher": ("early_teacher",)}
ATTACK_NAMES = {"clean_acc": "clean", "pgd20_acc": "PGD-20", "aa_acc": "AutoAttack (standard)"}
METRICS = ("clean_acc", "pgd20_acc", "aa_acc")  # those of eval.attacks are reported
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


class _Trio:
    """student.average none, ema and swa, each selected by best_pgd, tracked side by side in one training run.

    Averaging and selection never touch training (the loop reseeds every epoch from run.seed, and the EMA,
    SWA and validation only read the weights), so the separate none/ema/swa runs of a seed train the same
    weights; one run per seed with three trackers measures the same thing at a third of the cost. Each
    tracker's weights are validated from the same RNG state the loop validates with, so every tracker sees
    the validation noise it would see in a run of its own. The loop drives the `none` tracker (its
    checkpoint, its final summary); this object validates the other two.
    """

    def __init__(self, model: Any, *, val: tuple[Any, Any], eps: float, norm: str, batch_size: int, **kw: Any) -> None:
        from afm_ray.student_weights import StudentWeights

        kw = {k: v for k, v in kw.items() if k not in ("select", "average")}
        self.trackers = {a: StudentWeights(model, select="best_pgd", average=a, **kw) for a in ("none", "ema", "swa")}
        self.primary = self.trackers["none"]
        self.val, self.eps, self.norm, self.batch_size = val, eps, norm, batch_size
        self.curves: dict[str, list[dict[str, float]]] = {"ema": [], "swa": []}

    def __getattr__(self, name: str) -> Any:  # student(), metrics(), state_dict(), model, ...: the none tracker's
        return getattr(self.trackers["none"], name)

    def after_step(self) -> None:
        for tracker in self.trackers.values():
            tracker.after_step()

    def end_epoch(self, epoch: int) -> Any:
        import torch

        from afm_ray import attacks

        rng = torch.get_rng_state()
        for average in ("ema", "swa"):
            torch.set_rng_state(rng)
            model = self.trackers[average].end_epoch(epoch)
            scores = {
                key: attacks.robust_predictions(
                    model, *self.val, attack=name, eps=self.eps, norm=self.norm, batch_size=self.batch_size
                )
                .float()
                .mean()
                .item()
                for name, key in (("clean", "val/clean_acc"), ("pgd10", "val/pgd10_acc"))
            }
            self.trackers[average].observe(epoch, scores["val/pgd10_acc"])
            self.curves[average].append({"epoch": float(epoch), **scores})
        torch.set_rng_state(rng)
        return self.primary.end_epoch(epoch)

    def observe(self, epoch: int, val_pgd10_acc: float) -> None:
        self.primary.observe(epoch, val_pgd10_acc)


def one_run(name: str, seed: int, config: dict[str, Any], out: str) -> list[str]:
    """Train one student (a worker process), score its selected and last-epoch weights, write the JSON record(s).

    name `trained` (the PGD-AT teacher, one run per seed) writes the records `none`, `ema` and `swa`
    (see _Trio); any other name writes its own record."""
    import torch

    torch.set_num_threads(1)
    from afm_ray.checkpoints import load_training_state
    from afm_ray.config import from_flat
    from afm_ray.data import load_run_data, split_validation, to_unit
    from afm_ray.evaluate.protocol import evaluate_model
    from afm_ray.models import build_model, model_kwargs
    from afm_ray.names import SELECTED_EPOCH_METRIC
    from afm_ray.train import loop
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
    cfg = from_flat(config)
    data = load_run_data(cfg)
    trio: list[_Trio] = []
    original = loop.StudentWeights
    if name == "trained":
        _, _, x_val, y_val = split_validation(data, cfg.eval.val_samples, cfg.data.seed)
        device = torch.device("cpu")

        def make(model: Any, **kw: Any) -> _Trio:
            trio.append(
                _Trio(
                    model,
                    val=(to_unit(x_val, device), y_val.to(device)),
                    eps=cfg.eval_eps,
                    norm=cfg.attack.norm,
                    batch_size=cfg.eval.batch_size,
                    **kw,
                )
            )
            return trio[0]

        loop.StudentWeights = make  # type: ignore[assignment,misc]
    try:
        # The run's own final evaluation is clean only; every student is scored below the one way (the same
        # images, the attacks seeded alike), so two students of a run differ by their weights, not by noise.
        final = train_fn_per_worker({**config, "eval.attacks": "clean"}, reporter)
    finally:
        loop.StudentWeights = original  # type: ignore[misc]
    wall = time.time() - started

    def score(module_or_weights: Any) -> dict[str, float]:
        model = build_model(cfg.student.arch, **model_kwargs(cfg.student, data))
        weights = module_or_weights if isinstance(module_or_weights, dict) else module_or_weights.state_dict()
        model.load_state_dict(weights)
        scores = evaluate_model(model, cfg, data, log=lambda line: None)
        return {k: float(v) for k, v in scores.items() if isinstance(v, (int, float))}

    def record(run: str, selected: Any, selected_epoch: int, last: Any, curve: list[dict[str, float]]) -> str:
        rec: dict[str, Any] = {"run": run, "seed": seed, "config": config, "training_run": f"{name}-seed{seed}"}
        rec["selected"] = {**score(selected), SELECTED_EPOCH_METRIC: float(selected_epoch), "epoch": cfg.optim.epochs}
        # the last epoch selected: the same weights, scored once
        rec["last"] = rec["selected"] if selected_epoch == cfg.optim.epochs else score(last)
        rec["curve"] = curve
        rec["wall_s"] = wall  # the training run's; the records of one shared run carry the same
        path = Path(out).with_name(f"{run}-seed{seed}.json")
        path.write_text(json.dumps(rec, indent=1))
        return str(path)

    written = []
    if name == "trained":
        trackers = trio[0].trackers
        for average, tracker in trackers.items():
            last = tracker.averaged if tracker.averaged is not None and tracker.n_averaged > 0 else tracker.model
            written.append(
                record(
                    average,
                    tracker.student(),
                    tracker.selected_epoch,
                    last,
                    curve if average == "none" else trio[0].curves[average],
                )
            )
    else:
        state = load_training_state(reporter.latest_checkpoint)
        written.append(record(name, state["model"], int(final[SELECTED_EPOCH_METRIC]), state["model"], curve))
    import shutil

    shutil.rmtree(run_dir, ignore_errors=True)
    return written


def run_all(workdir: Path, seeds: list[int], jobs: int, base: dict[str, Any], arms: tuple[str, ...]) -> None:
    with ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("spawn")) as pool:
        futures = {m: pool.submit(train_teacher, str(workdir), base, m) for m in TEACHER_METHODS}
        teachers = {m: f.result() for m, f in futures.items()}
    print(f"[{datetime.now():%H:%M:%S}] teachers: {teachers}", flush=True)
    (workdir / "teachers.json").write_text(json.dumps(teachers, indent=1))
    results = workdir / "runs"
    results.mkdir(parents=True, exist_ok=True)
    todo = []
    # Every seed's shared run first (six of the eight rows), then the teacher arms: an interrupted study
    # leaves whole rows missing rather than seeds missing from every row.
    for name, records in ARMS.items():
        if name not in arms:
            continue
        for seed in seeds:
            if not all((results / f"{r}-seed{seed}.json").is_file() for r in records):
                config = {**base, **run_overrides(records[0], teachers), "run.seed": seed}
                todo.append((name, seed, config, str(results / f"{name}-seed{seed}.json")))
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


def portable_records(records: list[dict[str, Any]], workdir: Path) -> dict[str, Any]:
    """The records and the teachers' validation summary, with this machine's teacher folders named by method."""
    teachers = json.loads((workdir / "teachers.json").read_text()) if (workdir / "teachers.json").is_file() else {}
    text = json.dumps(records)
    for method, folder in teachers.items():
        text = text.replace(folder, f"teachers/{method}")
    summary = {}
    for method, folder in teachers.items():
        index = json.loads((Path(folder) / "epochs" / "index.json").read_text())
        best = max(index, key=lambda r: (r["val/pgd10_acc"], -r["epoch"]))
        summary[method] = {"epochs": len(index), "best_epoch": best["epoch"], "val_curve": index}
    return {"teachers": summary, "records": json.loads(text)}


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
    metrics = tuple(m for m in METRICS if all(m in r["selected"] for r in records))
    seeds = sorted({r["seed"] for r in records})
    n = int(min(r["selected"]["eval/n_samples"] for r in records))
    base = records[0]["config"]
    wall = sum({r.get("training_run", f"{r['run']}-seed{r['seed']}"): r["wall_s"] for r in records}.values())

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
        "Runs: per seed one training run with the PGD-AT teacher gives the `last`, `best_pgd`, EMA and SWA rows "
        "(averaging and selection never touch training, so separate runs would train the same weights; each "
        "average is validated per epoch from the same RNG state as a run of its own), one run with the teacher "
        "ensemble and one with the early-stopped teacher.",
        "",
        f"Evaluation: {', '.join(ATTACK_NAMES[m] for m in metrics)} at eps {base['eval.eps']} on all {n} test images"
        f"{'' if 'aa_acc' in metrics else ' (no AutoAttack in this run: see below)'}. "
        "Intervals are 95%: for a mean over seeds, the seeds' t interval and the test images' Wilson interval in "
        "quadrature (afm_ray/stats.py); for a difference, the paired t interval over the seeds (the same images "
        "score both sides, so their noise largely cancels and is left out).",
        "",
        "## Accuracy",
        "",
        "| student | runs | " + " | ".join(f"{m} % [95%]" for m in metrics) + " | selected epoch (per seed) |",
        "|---|---|" + "---:|" * len(metrics) + "---|",
    ]
    for label, run, which in ROWS:
        cells = []
        for metric in metrics:
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
        "| student | " + " | ".join(f"Δ {m} [95%]" for m in metrics) + " | resolved |",
        "|---|" + "---:|" * len(metrics) + "---|",
    ]
    resolved: list[str] = []
    for label, run, which in ROWS[1:]:
        cells, verdicts = [], []
        for metric in metrics:
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
    parser.add_argument("--attacks", default=STUDY["eval.attacks"], help="eval.attacks of every student")
    parser.add_argument("--arms", default=",".join(ARMS), help=f"which training runs of each seed: {', '.join(ARMS)}")
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--notes", help="markdown appended verbatim: the reading of the numbers")
    parser.add_argument("--json", help="also write every record (and the teachers' validation curves) here")
    args = parser.parse_args(argv)
    workdir = Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    base = {**STUDY, "optim.epochs": args.epochs, "teacher.epochs": args.teacher_epochs, "eval.attacks": args.attacks}
    if not args.report_only:
        arms = tuple(a.strip() for a in args.arms.split(",") if a.strip())
        unknown = [a for a in arms if a not in ARMS]
        if unknown:
            parser.error(f"--arms: unknown {', '.join(unknown)}; expected some of {', '.join(ARMS)}")
        run_all(workdir, [int(s) for s in args.seeds.split(",")], args.jobs, base, arms)
    records = load_records(workdir)
    if not records:
        print("no finished run yet", file=sys.stderr)
        return 1
    command = "python benchmarks/study_recipes.py --workdir study_recipes --out " + args.out
    if args.epochs != STUDY["optim.epochs"]:
        command += f" --epochs {args.epochs}"
    if args.teacher_epochs != STUDY["teacher.epochs"]:
        command += f" --teacher-epochs {args.teacher_epochs}"
    if args.attacks != STUDY["eval.attacks"]:
        command += f" --attacks {args.attacks}"
    if args.arms != ",".join(ARMS):
        command += f" --arms {args.arms}"
    if args.notes:
        command += f" --notes {args.notes}"
    Path(args.out).write_text(render(records, workdir, command, args.notes))
    if args.json:
        Path(args.json).write_text(json.dumps({"command": command, **portable_records(records, workdir)}, indent=1))
    print(f"wrote {args.out} ({len(records)} runs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
