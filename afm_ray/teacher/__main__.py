"""`python -m afm_ray.teacher`: train (or reuse from the cache) the robust teacher a config needs."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from afm_ray.cli import add_config_file, command_parser, load_config, run_command
from afm_ray.config import from_flat, to_flat
from afm_ray.data import load_run_data
from afm_ray.devices import resolve_device
from afm_ray.evaluate.protocol import evaluate_model, format_results
from afm_ray.preflight import check_run
from afm_ray.teacher.members import load_teachers, resolve_members
from afm_ray.teacher.training import ensure_teacher


def teacher(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    check_run(cfg, reads=("teacher.checkpoint",), trains_teacher=cfg.teacher.trained_here)
    if cfg.teacher.trained_here:  # the cache entry: the folder of epoch checkpoints teacher.select picks from
        cfg = from_flat({**to_flat(cfg), "teacher.checkpoint": str(ensure_teacher(cfg, force=args.force).parent)})
    print(f"teacher checkpoint: {', '.join(resolve_members(cfg))} (teacher.select {cfg.teacher.select})")
    if not args.no_eval:
        data = load_run_data(cfg)  # an ensemble is scored at temperature 1 (its members' mean probabilities)
        print(
            format_results(evaluate_model(load_teachers(cfg, data, device=resolve_device(cfg.run.device)), cfg, data))
        )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = command_parser("teacher", "Train (or reuse from cache) the robust teacher a config needs.")
    add_config_file(parser)
    parser.add_argument("--force", action="store_true", help="retrain even if a cached teacher exists")
    parser.add_argument("--no-eval", action="store_true", help="skip the robustness evaluation")
    return run_command(teacher, parser, argv)


if __name__ == "__main__":
    sys.exit(main())
