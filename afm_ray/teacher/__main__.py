"""`python -m afm_ray.teacher`: train (or reuse from the cache) the robust teacher a config needs."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from afm_ray.cli import add_config_file, command_parser, load_config, run_command
from afm_ray.evaluate.protocol import evaluate_checkpoint, format_results
from afm_ray.names import TRAIN_TEACHER
from afm_ray.preflight import check_run
from afm_ray.teacher.training import ensure_teacher


def teacher(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    check_run(cfg, reads=("teacher.checkpoint",), trains_teacher=cfg.teacher.checkpoint in ("", TRAIN_TEACHER))
    path = ensure_teacher(cfg, force=args.force)
    print(f"teacher checkpoint: {path}")
    if not args.no_eval:
        print(format_results(evaluate_checkpoint(path, cfg)))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = command_parser("teacher", "Train (or reuse from cache) the robust teacher a config needs.")
    add_config_file(parser)
    parser.add_argument("--force", action="store_true", help="retrain even if a cached teacher exists")
    parser.add_argument("--no-eval", action="store_true", help="skip the robustness evaluation")
    return run_command(teacher, parser, argv)


if __name__ == "__main__":
    sys.exit(main())
