"""Every command's `main`, and the one exit path they share.

    python -m afm_ray.train | teacher | evaluate | sweep | pareto | export   (each module's __main__ calls here)

A command parses its arguments, validates everything it can before it starts work, and runs.
An expected failure (afm_ray.errors.UserError, a bad argument included) prints one line on
stderr, `error: ...`, and exits with status 2; `--debug` shows the traceback instead. Ctrl-C or
SIGTERM prints `interrupted` and exits with 130. Anything else is a bug and keeps its
traceback. A new command builds its parser with `_parser` and runs its body through `_run`.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import NoReturn

from afm_ray.checkpoints import load_training_state, stored_config
from afm_ray.config import ExperimentConfig, apply_overrides, from_flat, load_yaml, parse_overrides, to_flat
from afm_ray.credentials import redact_text, redacted_output, uri_from
from afm_ray.endpoints import check_ray_address
from afm_ray.errors import ConfigError, UserError, one_line
from afm_ray.evaluate import evaluate_checkpoint, format_results
from afm_ray.methods import build_method
from afm_ray.names import ACCURACY_METRICS, TRAIN_TEACHER, default_tracking_uri
from afm_ray.preflight import check_run
from afm_ray.search_space import DEFAULT_SPACE, embedded_default, load_search_space, shipped_spaces
from afm_ray.signals import install_sigterm_as_sigint, restore_sigterm
from afm_ray.sweep.plan import (
    check_optuna_storage,
    check_sweep_name,
    newest_sweep,
    preflight_checks,
    storage_root,
)
from afm_ray.teacher import ensure_teacher
from afm_ray.train import method_hparams, train_fn_per_worker

#: The environment variable --optuna-storage defaults to (as MLflow's MLFLOW_TRACKING_URI for --tracking-uri).
OPTUNA_STORAGE_ENV = "AFM_RAY_OPTUNA_STORAGE"


def load_config(path: str | Path | None = None, overrides: Iterable[str] = ()) -> ExperimentConfig:
    """A YAML config with --set overrides; with no file, the embedded default (the fixed keys of
    the shipped default space, so a single run and the default sweep agree)."""
    values = load_yaml(path) if path else embedded_default()
    source = f"config file {str(path)!r}" if path else "the embedded default (search_spaces/default.yaml: fixed)"
    return apply_overrides(values, parse_overrides(overrides), source=source)


class OneLineParser(argparse.ArgumentParser):
    """argparse with the one-line error of every other failure (argparse prints its usage first)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {' '.join(message.split())} (see {self.prog} --help)\n")


def _parser(prog: str, description: str) -> argparse.ArgumentParser:
    parser = OneLineParser(prog=f"python -m afm_ray.{prog}", description=description)
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    return parser


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML file with config sections (default: the embedded default)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one dotted key, e.g. --set attack.eps=0.1 (repeatable)",
    )


def _run(body: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """The one exit path: a UserError is one line and status 2, an interrupt (Ctrl-C or SIGTERM)
    one line and 130; --debug shows their tracebacks. Any other exception is a bug: traceback."""
    previous = install_sigterm_as_sigint()
    try:
        with redacted_output():  # the backstop: no line a command prints carries a credential
            return body(args)
    except UserError as exc:
        if getattr(args, "debug", False):
            raise
        print(f"error: {redact_text(one_line(exc))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if getattr(args, "debug", False):
            raise
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        restore_sigterm(previous)


# --------------------------------------------------------------------------------------------
# python -m afm_ray.train


def results_table(results: Mapping[str, Mapping[str, float]]) -> str:
    columns = [c for c in ACCURACY_METRICS if any(c in r for r in results.values())]
    lines = [f"{'model':<10}" + "".join(f"{c:>12}" for c in columns) + f"{'params':>12}"]
    for name, r in results.items():
        cells = "".join(f"{100 * r[c]:>11.2f}%" if c in r else f"{'-':>12}" for c in columns)
        lines.append(f"{name:<10}{cells}{int(r.get('params', 0)):>12,}")
    return "\n".join(lines)


def _train(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    needs_teacher = build_method(cfg.method.name, **method_hparams(cfg)).needs_teacher
    check_run(
        cfg,
        reads=("teacher.checkpoint", "run.resume_from") if needs_teacher else ("run.resume_from",),
        writes_output=True,
        trains_teacher=needs_teacher,
    )
    results = {}
    if needs_teacher:
        teacher_path = ensure_teacher(cfg, log=print)
        cfg = from_flat({**to_flat(cfg), "teacher.checkpoint": str(teacher_path)})
        results["teacher"] = evaluate_checkpoint(teacher_path, cfg, log=print)
    print(f"training student {cfg.student.arch} with {cfg.method.name} for {cfg.optim.epochs} epochs")
    results["student"] = train_fn_per_worker(to_flat(cfg))
    print()
    print(results_table(results))
    return 0


def train_main(argv: Sequence[str] | None = None) -> int:
    parser = _parser("train", "Train one student (and, if needed, its robust teacher) and evaluate both.")
    _add_config_args(parser)
    return _run(_train, parser.parse_args(argv))


# --------------------------------------------------------------------------------------------
# python -m afm_ray.teacher


def _teacher(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    check_run(cfg, reads=("teacher.checkpoint",), trains_teacher=cfg.teacher.checkpoint in ("", TRAIN_TEACHER))
    path = ensure_teacher(cfg, force=args.force)
    print(f"teacher checkpoint: {path}")
    if not args.no_eval:
        print(format_results(evaluate_checkpoint(path, cfg)))
    return 0


def teacher_main(argv: Sequence[str] | None = None) -> int:
    parser = _parser("teacher", "Train (or reuse from cache) the robust teacher a config needs.")
    _add_config_args(parser)
    parser.add_argument("--force", action="store_true", help="retrain even if a cached teacher exists")
    parser.add_argument("--no-eval", action="store_true", help="skip the robustness evaluation")
    return _run(_teacher, parser.parse_args(argv))


# --------------------------------------------------------------------------------------------
# python -m afm_ray.evaluate


def _evaluate(args: argparse.Namespace) -> int:
    state = load_training_state(args.checkpoint)
    stored = stored_config(state, args.checkpoint)  # the data and model the checkpoint was trained for
    cfg = apply_overrides(
        to_flat(stored), parse_overrides(args.overrides), source=f"checkpoint {args.checkpoint}: stored config"
    )
    if args.samples is not None and args.samples < 0:
        raise ConfigError(f"--samples: got {args.samples}, expected >= 0 (0 = whole test split)")
    for flag, key, value in (("--eps", "eval.eps", args.eps), ("--attacks", "eval.attacks", args.attacks)):
        if value is not None:
            try:
                cfg = from_flat({**to_flat(cfg), key: value})
            except ConfigError as exc:
                raise ConfigError(f"{flag}: {exc}") from None
    if args.samples is not None:
        cfg = from_flat({**to_flat(cfg), "eval.samples": args.samples})
    check_run(from_flat({**to_flat(stored), "run.device": cfg.run.device}), reads=())
    print(format_results(evaluate_checkpoint(args.checkpoint, cfg)))
    return 0


def evaluate_main(argv: Sequence[str] | None = None) -> int:
    parser = _parser("evaluate", "Evaluate a checkpoint with the fixed protocol (clean, PGD-20, CW, AutoAttack).")
    parser.add_argument("--checkpoint", required=True, help="checkpoint directory or checkpoint.pt")
    parser.add_argument(
        "--attacks", default=None, help="comma-separated: clean,pgd20,pgd10,cw,aa (default: eval.attacks)"
    )
    parser.add_argument("--samples", type=int, default=None, help="test images (fixed subset); 0 = whole test split")
    parser.add_argument("--eps", default=None, help="budget, e.g. 8/255 (default: the checkpoint's eval.eps)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    return _run(_evaluate, parser.parse_args(argv))


# --------------------------------------------------------------------------------------------
# python -m afm_ray.sweep


def _sweep(args: argparse.Namespace) -> int:
    space = load_search_space(args.space or DEFAULT_SPACE, overrides=parse_overrides(args.overrides))
    if args.num_samples is not None:
        if args.num_samples < 1:
            raise ConfigError(f"--num-samples: got {args.num_samples}, expected >= 1")
        space = dataclasses.replace(space, num_samples=args.num_samples)
    if args.dry_run:  # the resolved plan only: no Ray, no storage, no tracking server
        from afm_ray.sweep.dry_run import describe_plan, format_plan

        print(format_plan(describe_plan(space), args.format))
        return 0
    root = storage_root(args.storage)
    # A URI may carry a password: from a file or the environment it stays off the command line.
    optuna_url = (
        uri_from("--optuna-storage", args.optuna_storage, args.optuna_storage_file, os.environ, OPTUNA_STORAGE_ENV)
        or f"sqlite:///{Path('optuna.db').resolve()}"
    )
    experiment = args.experiment or space.experiment
    tracking_uri = (
        uri_from("--tracking-uri", args.tracking_uri, args.tracking_uri_file, os.environ, "MLFLOW_TRACKING_URI")
        or default_tracking_uri()
    )
    # Before Ray starts, a teacher trains or any node is requested: the cluster answers, the stores
    # take writes, the workers' data is there, the teacher exists (or is to be trained, at a cost
    # shown), the tracking server answers. None of these checks creates anything.
    check_ray_address(args.address)
    check_optuna_storage(optuna_url, tracking_uri)
    for _, check in preflight_checks(space, root, tracking_uri, experiment=experiment):
        print(f"preflight: {check()}", flush=True)
    name = args.name
    if args.resume and not name:
        name = newest_sweep(root, space.name)
        if name is None:
            raise ConfigError(f"--resume: no sweep of space {space.name!r} under {root}; pass --name")
    name = name or f"{space.name}-{datetime.now():%Y%m%d-%H%M%S}"
    check_sweep_name(root, name, args.resume)

    from afm_ray.sweep.run import run_sweep  # Ray is imported only once the plan is valid

    return run_sweep(
        space,
        name=name,
        experiment=experiment,
        tracking_uri=tracking_uri,
        storage_root=root,
        optuna_url=optuna_url,
        resume=args.resume,
        address=args.address,
    )


def sweep_parser() -> argparse.ArgumentParser:
    """`python -m afm_ray.sweep`'s arguments (also read by tests that check a manifest's entrypoint)."""
    parser = _parser("sweep", "Search space -> Optuna (via Ray Tune) -> Ray Train -> MLflow.")
    parser.add_argument(
        "--space",
        help=f"search space: a YAML file, or the name of a shipped one ({', '.join(shipped_spaces())}; "
        "default: the embedded default)",
    )
    parser.add_argument("--experiment", help="MLflow experiment (default: the space's `experiment`)")
    parser.add_argument(
        "--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or sqlite:///<cwd>/mlflow.db)"
    )
    parser.add_argument("--tracking-uri-file", metavar="PATH", help="read --tracking-uri from this file's first line")
    parser.add_argument(
        "--storage",
        help="where Ray keeps trial results and checkpoints: a path or s3://, gs:// URI (default: ./ray_results)",
    )
    parser.add_argument(
        "--optuna-storage",
        help=f"Optuna study storage, any SQLAlchemy URL (default: ${OPTUNA_STORAGE_ENV} or sqlite:///<cwd>/optuna.db)",
    )
    parser.add_argument(
        "--optuna-storage-file", metavar="PATH", help="read --optuna-storage from this file's first line"
    )
    parser.add_argument(
        "--name", help="sweep name (default: <space name>-<timestamp>; with --resume: the newest sweep of the space)"
    )
    parser.add_argument("--num-samples", type=int, help="number of trials (default: the space's num_samples)")
    parser.add_argument(
        "--resume", action="store_true", help="continue an interrupted sweep (same --storage and --name)"
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="pin a config key in every trial, e.g. --set optim.epochs=2 (repeatable)",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="print the resolved plan (sampler, scheduler, resources, evaluation, estimated cost) and exit; "
        "starts nothing and writes nothing",
    )
    parser.add_argument("--format", choices=("text", "json"), default="text", help="--dry-run output format")
    parser.add_argument(
        "--address",
        default=os.environ.get("RAY_ADDRESS"),
        help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray)",
    )
    return parser


def sweep_main(argv: Sequence[str] | None = None) -> int:
    return _run(_sweep, sweep_parser().parse_args(argv))


# --------------------------------------------------------------------------------------------
# python -m afm_ray.pareto


def pareto_main(argv: Sequence[str] | None = None) -> int:
    from afm_ray import pareto  # MLflow, pandas and matplotlib: only for this command

    parser = pareto.build_parser(OneLineParser)
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    return _run(pareto.run, parser.parse_args(argv))


# --------------------------------------------------------------------------------------------
# python -m afm_ray.export


def _export(args: argparse.Namespace) -> int:
    from afm_ray.export import export_student, format_report  # onnx and MLflow: only for this command
    from afm_ray.runs import client_for
    from afm_ray.student_model import fetch_student

    for flag, value in (("--batch", args.batch), ("--threads", args.threads)):
        if value < 1:
            raise ConfigError(f"{flag}: got {value}, expected >= 1")
    if not args.tolerance > 0:
        raise ConfigError(f"--tolerance: got {args.tolerance}, expected > 0")
    try:
        client = client_for(args.tracking_uri)
    except FileNotFoundError as exc:
        raise ConfigError(str(exc)) from None
    model, spec = fetch_student(client, args.model)
    report = export_student(
        model, spec, args.format, args.out, batch=args.batch, threads=args.threads, tolerance=args.tolerance
    )
    print(format_report(report, args.out))
    return 0


def export_main(argv: Sequence[str] | None = None) -> int:
    from afm_ray.export import build_parser

    parser = build_parser()
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    return _run(_export, parser.parse_args(argv))
