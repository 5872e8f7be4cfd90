"""`python -m afm_ray.export`: a logged student as ONNX, TorchScript or safetensors, verified against PyTorch.

python -m afm_ray.export (--model models:/NAME@pareto-1 | --trial TRIAL_ID) --format onnx|torchscript|safetensors
    --out DIR
    [--tracking-uri URI] [--batch 64] [--tolerance 1e-4] [--threads 1]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from afm_ray.cli import add_tracking_uri, command_parser, run_command
from afm_ray.errors import ConfigError
from afm_ray.export.formats import FORMATS, TOLERANCE, export_student, format_report
from afm_ray.names import TRIAL_ID_TAG
from afm_ray.tracking.mlflow_runs import client_for, resolve_trial
from afm_ray.tracking.student_model import fetch_student


def export(args: argparse.Namespace) -> int:
    for flag, value in (("--batch", args.batch), ("--threads", args.threads)):
        if value < 1:
            raise ConfigError(f"{flag}: got {value}, expected >= 1")
    if not args.tolerance > 0:
        raise ConfigError(f"--tolerance: got {args.tolerance}, expected > 0")
    client = client_for(args.tracking_uri)
    uri = args.model or f"runs:/{resolve_trial(client, args.trial).info.run_id}"
    model, spec = fetch_student(client, uri)
    spec["trial"] = client.get_run(spec["run_id"]).data.tags.get(TRIAL_ID_TAG, "")
    report = export_student(
        model, spec, args.format, args.out, batch=args.batch, threads=args.threads, tolerance=args.tolerance
    )
    print(format_report(report, args.out))
    return 0


def parser() -> argparse.ArgumentParser:
    p = command_parser("export", "Export a logged student to ONNX, TorchScript or safetensors.")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--model", help="models:/NAME@ALIAS, models:/NAME/VERSION or runs:/RUN_ID")
    which.add_argument("--trial", help="the student of this trial: its id as the sweep printed it, or its run name")
    p.add_argument("--format", required=True, choices=sorted(FORMATS), help="what to write")
    p.add_argument("--out", required=True, help="output folder")
    add_tracking_uri(p)
    p.add_argument("--batch", type=int, default=64, help="images in the verification batch (default 64)")
    p.add_argument("--tolerance", type=float, default=TOLERANCE, help=f"max |logit difference| (default {TOLERANCE:g})")
    p.add_argument("--threads", type=int, default=1, help="CPU threads for the latency measurement (default 1)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(export, parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
