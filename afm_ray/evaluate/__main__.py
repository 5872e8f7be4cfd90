"""`python -m afm_ray.evaluate`: evaluate a checkpoint with the fixed protocol (clean, PGD-20, CW, AutoAttack).

The dataset, architecture and budget come from the config stored in the checkpoint (overridable
with --set), so a model is always attacked on the test split it was never trained on.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from afm_ray.checkpoints import load_training_state, stored_config
from afm_ray.cli import add_overrides, command_parser, run_command
from afm_ray.config import apply_overrides, from_flat, parse_overrides, to_flat
from afm_ray.errors import ConfigError
from afm_ray.evaluate.protocol import evaluate_checkpoint, format_results
from afm_ray.preflight import check_run


def evaluate(args: argparse.Namespace) -> int:
    state = load_training_state(args.checkpoint)
    stored = stored_config(state, args.checkpoint)  # the data and model the checkpoint was trained for
    cfg = apply_overrides(
        to_flat(stored), parse_overrides(args.overrides), source=f"checkpoint {args.checkpoint}: stored config"
    )
    if args.samples is not None and args.samples < 0:
        raise ConfigError(f"--samples: got {args.samples}, expected >= 0 (0 = whole test split)")
    for flag, key, value in (
        ("--eps", "eval.eps", args.eps),
        ("--attacks", "eval.attacks", args.attacks),
        ("--samples", "eval.samples", args.samples),
    ):
        if value is not None:
            try:
                cfg = from_flat({**to_flat(cfg), key: value})
            except ConfigError as exc:
                raise ConfigError(f"{flag}: {exc}") from None
    check_run(from_flat({**to_flat(stored), "run.device": cfg.run.device}), reads=())
    print(format_results(evaluate_checkpoint(args.checkpoint, cfg)))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = command_parser(
        "evaluate", "Evaluate a checkpoint with the fixed protocol (clean, PGD-20, CW, AutoAttack)."
    )
    parser.add_argument("--checkpoint", required=True, help="checkpoint directory or checkpoint.pt")
    parser.add_argument(
        "--attacks", default=None, help="comma-separated: clean,pgd20,pgd10,cw,aa (default: eval.attacks)"
    )
    parser.add_argument("--samples", type=int, default=None, help="test images (fixed subset); 0 = whole test split")
    parser.add_argument("--eps", default=None, help="budget, e.g. 8/255 (default: the checkpoint's eval.eps)")
    add_overrides(parser)
    return run_command(evaluate, parser, argv)


if __name__ == "__main__":
    sys.exit(main())
