"""`python -m afm_ray.train`: train one student (and, if needed, its robust teacher) and evaluate both."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence

from afm_ray.cli import add_config_file, command_parser, load_config, run_command
from afm_ray.config import from_flat, to_flat
from afm_ray.data import load_run_data
from afm_ray.devices import resolve_device
from afm_ray.evaluate.protocol import evaluate_model
from afm_ray.methods import build_method
from afm_ray.names import ACCURACY_METRICS, needs_teacher
from afm_ray.preflight import check_run
from afm_ray.student_weights import describe
from afm_ray.teacher.members import load_teachers, resolve_members
from afm_ray.teacher.training import ensure_teacher
from afm_ray.train.loop import method_hparams, train_fn_per_worker


def results_table(results: Mapping[str, Mapping[str, float]]) -> str:
    columns = [c for c in ACCURACY_METRICS if any(c in r for r in results.values())]
    lines = [f"{'model':<10}" + "".join(f"{c:>12}" for c in columns) + f"{'params':>12}"]
    for name, r in results.items():
        cells = "".join(f"{100 * r[c]:>11.2f}%" if c in r else f"{'-':>12}" for c in columns)
        lines.append(f"{name:<10}{cells}{int(r.get('params', 0)):>12,}")
    return "\n".join(lines)


def train(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    distils = needs_teacher(cfg.method.name)
    check_run(
        cfg,
        reads=("teacher.checkpoint", "run.resume_from") if distils else ("run.resume_from",),
        writes_output=True,
        trains_teacher=distils,
    )
    results = {}
    if distils:
        if cfg.teacher.trained_here:  # its cache entry is the folder of epochs teacher.select picks from
            cfg = from_flat({**to_flat(cfg), "teacher.checkpoint": str(ensure_teacher(cfg, log=print).parent)})
        members = resolve_members(cfg)
        kind = "an ensemble, the mean of their probabilities; " if len(members) > 1 else ""
        print(f"teacher: {', '.join(members)} ({kind}teacher.select {cfg.teacher.select})")
        data = load_run_data(cfg)
        tau = getattr(build_method(cfg.method.name, **method_hparams(cfg)), "tau", 1.0)
        teacher = load_teachers(cfg, data, device=resolve_device(cfg.run.device), tau=tau)
        results["teacher"] = evaluate_model(teacher, cfg, data, log=print)
    print(f"training student {cfg.student.arch} with {cfg.method.name} for {cfg.optim.epochs} epochs")
    results["student"] = train_fn_per_worker(to_flat(cfg))
    print()
    print(results_table(results))
    print(describe(results["student"], cfg.student.select, cfg.student.average, cfg.optim.epochs))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = command_parser("train", "Train one student (and, if needed, its robust teacher) and evaluate both.")
    add_config_file(parser)
    return run_command(train, parser, argv)


if __name__ == "__main__":
    sys.exit(main())
