"""`python -m afm_ray.sweep`: search space -> Optuna (via Ray Tune) -> Ray Train -> MLflow.

The space and the plan are validated, and every preflight check runs, before Ray is imported;
then afm_ray.sweep.driver.run_sweep runs the sweep.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

from afm_ray.cli import add_address, add_overrides, add_tracking_uri, command_parser, run_command
from afm_ray.config import parse_overrides
from afm_ray.credentials import redact_uri, uri_from
from afm_ray.endpoints import check_ray_address
from afm_ray.errors import ConfigError, UserError, one_line
from afm_ray.names import OPTUNA_STORAGE_ENV, default_tracking_uri
from afm_ray.preflight import check_cluster_resources, check_local_resources, check_optuna_storage, sweep_checks
from afm_ray.search.space import DEFAULT_SPACE, SearchSpace, load_search_space, shipped_spaces
from afm_ray.search.specs import RESOURCE_KEYS, override_resources
from afm_ray.sweep.plan import SweepPlan, check_sweep_name, newest_sweep, storage_root


def sweep(args: argparse.Namespace) -> int:
    space = load_search_space(args.space or DEFAULT_SPACE, overrides=parse_overrides(args.overrides))
    if args.num_samples is not None:
        if args.num_samples < 1:
            raise ConfigError(f"--num-samples: got {args.num_samples}, expected >= 1")
        space = dataclasses.replace(space, num_samples=args.num_samples)
    if args.max_concurrent_trials is not None:
        if args.max_concurrent_trials < 1:
            raise ConfigError(f"--max-concurrent-trials: got {args.max_concurrent_trials}, expected an integer >= 1")
        space = dataclasses.replace(space, max_concurrent_trials=args.max_concurrent_trials)
    flags = {key: getattr(args, key) for key in RESOURCE_KEYS if getattr(args, key) is not None}
    if flags:
        space = dataclasses.replace(space, resources=override_resources(space.resources, flags))
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
    name = args.name
    if args.resume and not name:
        name = newest_sweep(root, space.name)
        if name is None:
            raise ConfigError(f"--resume: no sweep of space {space.name!r} under {root}; pass --name")
    name = name or f"{space.name}-{datetime.now():%Y%m%d-%H%M%S}"
    # Before Ray starts, a teacher trains or any node is requested: the cluster answers, the stores
    # take writes, the workers' data is there, the teacher exists (or is to be trained, at a cost
    # shown), the tracking server answers, a local Ray fits a trial. None of these creates anything.
    checks = [
        ("ray", lambda: _ray_address(args.address)),
        ("optuna", lambda: _optuna(optuna_url, tracking_uri)),
        *sweep_checks(space, root, tracking_uri, experiment=experiment),
        ("name", lambda: _sweep_name(root, name, args.resume)),  # lists the storage root: after its check
        ("resources", lambda: _resources(args.address, space)),
    ]
    if args.dry_run:  # every check, each reported, then the plan; nothing started or written
        from afm_ray.sweep.dry_run import describe_plan, format_plan

        preflight = run_all(checks, skip_after_failure={"ray": "resources", "storage": "name"})
        capacity = None
        if args.address and preflight[0]["status"] == "ok":  # the trials at once it will use there
            from afm_ray.sweep.capacity import read_capacity

            capacity = read_capacity(args.address)
        report = describe_plan(space, capacity)
        report["preflight"] = preflight
        print(format_plan(report, args.format))
        failed = [c["check"] for c in report["preflight"] if c["status"] == "failed"]
        if failed:
            raise ConfigError(
                f"--dry-run: {len(failed)} of {len(checks)} preflight checks failed ({', '.join(failed)}); "
                "the sweep would not start"
            )
        return 0
    for check_name, check in checks:
        if check_name == "resources" and args.address:
            continue  # an autoscaling cluster grows to fit; the dry run reports what it has now
        line = check()
        if check_name not in ("ray", "name", "optuna"):  # those say nothing new when they pass
            print(f"preflight: {line}", flush=True)

    from afm_ray.sweep.driver import run_sweep  # Ray is imported only once the plan is valid

    plan = SweepPlan(
        space=space,
        name=name,
        experiment=experiment,
        tracking_uri=tracking_uri,
        storage_root=root,
        optuna_url=optuna_url,
        resume=args.resume,
        address=args.address,
        verbose=args.verbose,
    )
    return run_sweep(plan)


def _ray_address(address: str | None) -> str:
    check_ray_address(address)
    return f"ray: {address} answers" if address else "ray: a local Ray will start (no --address, no $RAY_ADDRESS)"


def _resources(address: str | None, space: SearchSpace) -> str:
    return check_cluster_resources(address, space) if address else check_local_resources(space)


def _sweep_name(root: str, name: str, resume: bool) -> str:
    check_sweep_name(root, name, resume)
    return f"name: {name} ({'resumed' if resume else 'new'})"


def _optuna(url: str, tracking_uri: str) -> str:
    check_optuna_storage(url, tracking_uri)
    return f"optuna: {redact_uri(url)} usable"


def run_all(checks: list, skip_after_failure: dict[str, str]) -> list[dict[str, str]]:
    """Every check, in order, each as {check, status (ok | failed | not run), line}: a dry run reports
    them all. A check named in ``skip_after_failure``'s values is not run when its key failed."""
    out, failed = [], set()
    for check_name, check in checks:
        blocked = [k for k, v in skip_after_failure.items() if v == check_name and k in failed]
        if blocked:
            out.append({"check": check_name, "status": "not run", "line": f"needs the {blocked[0]} check to pass"})
            continue
        try:
            out.append({"check": check_name, "status": "ok", "line": check()})
        except UserError as exc:
            failed.add(check_name)
            out.append({"check": check_name, "status": "failed", "line": one_line(exc)})
    return out


def parser() -> argparse.ArgumentParser:
    """`python -m afm_ray.sweep`'s arguments (also read by tests that check a manifest's entrypoint)."""
    p = command_parser("sweep", "Search space -> Optuna (via Ray Tune) -> Ray Train -> MLflow.")
    p.add_argument(
        "--space",
        help=f"search space: a YAML file, or the name of a shipped one ({', '.join(shipped_spaces())}; "
        "default: the embedded default)",
    )
    p.add_argument("--experiment", help="MLflow experiment (default: the space's `experiment`)")
    add_tracking_uri(p)
    p.add_argument("--tracking-uri-file", metavar="PATH", help="read --tracking-uri from this file's first line")
    p.add_argument(
        "--storage",
        help="where Ray keeps trial results and checkpoints: a path or s3://, gs:// URI (default: ./ray_results)",
    )
    p.add_argument(
        "--optuna-storage",
        help=f"Optuna study storage, any SQLAlchemy URL (default: ${OPTUNA_STORAGE_ENV} or sqlite:///<cwd>/optuna.db)",
    )
    p.add_argument("--optuna-storage-file", metavar="PATH", help="read --optuna-storage from this file's first line")
    p.add_argument(
        "--name", help="sweep name (default: <space name>-<timestamp>; with --resume: the newest sweep of the space)"
    )
    p.add_argument("--num-samples", type=int, help="number of trials (default: the space's num_samples)")
    p.add_argument(
        "--max-concurrent-trials",
        type=int,
        help="run at most N trials at once (default: the space's max_concurrent_trials; 0 there: as many as the "
        "cluster holds at its largest size); never more than the cluster holds",
    )
    p.add_argument("--num-workers", type=int, help="Train workers per trial (default: the space's resources)")
    p.add_argument("--cpus-per-worker", type=float, help="CPUs per Train worker (default: the space's resources)")
    p.add_argument("--gpus-per-worker", type=float, help="GPUs per Train worker (default: the space's resources)")
    p.add_argument(
        "--memory-per-worker", type=float, help="GiB of Ray memory per Train worker (default: the space's resources)"
    )
    p.add_argument("--resume", action="store_true", help="continue an interrupted sweep (same --storage and --name)")
    add_overrides(p, help="pin a config key in every trial, e.g. --set optim.epochs=2")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="will this start? run every preflight check (data, teacher, storage, tracking, Optuna, resources; the "
        "cluster's with --address) and print each with the resolved plan and its estimated cost; exits non-zero "
        "when a check fails; starts nothing and writes nothing",
    )
    p.add_argument(
        "--verbose",
        action="store_true",
        help="show Ray, Tune, Optuna and MLflow output here (default: in sweep.log in the sweep's folder)",
    )
    p.add_argument("--format", choices=("text", "json"), default="text", help="--dry-run output format")
    add_address(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(sweep, parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
