"""`python -m afm_ray.final`: the final stage. Chosen configurations trained for the full schedule with
K seeds on the cluster, each student scored by clean accuracy and standard AutoAttack on the whole test
split (resumable), recorded in MLflow and tabled next to the published number.

    python -m afm_ray.final --experiment NAME [--trial ID ...] [--sweep RUN_ID]   # the front, or named trials
    python -m afm_ray.final --recipe rslad_cifar10_resnet18 [--recipe ...]        # a shipped recipe (or a file)
        [--seeds 3] [--samples 0] [--set optim.epochs=300 ...] [--storage PATH] [--out final_stage.csv|.md]
        [--max-concurrent N] [--address ADDR] [--tracking-uri URI] [--dry-run] [--list-recipes]

Everything is validated, the plan and its estimated cost printed and the preflight run before Ray is
imported; --dry-run stops there. The same command run again continues: finished jobs are reused,
an interrupted AutoAttack skips the attacks it finished (afm_ray.final.runner).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from afm_ray.cli import add_address, add_overrides, add_tracking_uri, command_parser, run_command
from afm_ray.config import parse_overrides
from afm_ray.endpoints import check_ray_address
from afm_ray.errors import ConfigError, TrackingError, one_line
from afm_ray.final.plan import Configuration, check_samples, check_seeds, format_plan, from_recipes, from_trials
from afm_ray.final.recipes import describe, load_recipe, shipped_recipes
from afm_ray.final.table import check_out, format_table, summarise, write_table
from afm_ray.names import default_tracking_uri
from afm_ray.preflight import sweep_checks
from afm_ray.storage import check_writable_file
from afm_ray.sweep.plan import storage_root

DEFAULT_EXPERIMENT = "afm-ray-final"  # where a recipe's runs go unless --experiment says otherwise


def parser() -> argparse.ArgumentParser:
    p = command_parser("final", "Train chosen configurations for the full schedule with K seeds; AutoAttack; table.")
    p.add_argument(
        "--experiment",
        help=f"MLflow experiment: the sweep's (its front, or --trial), or where --recipe runs go "
        f"(default {DEFAULT_EXPERIMENT})",
    )
    p.add_argument("--trial", action="append", default=[], metavar="ID",
                   help="a trial to take instead of the front: run id, unique prefix, run name or Tune trial id "
                   "(repeatable)")  # fmt: skip
    p.add_argument("--sweep", metavar="RUN_ID", help="the front of this sweep only (its parent run id)")
    helps = f"a shipped recipe ({', '.join(shipped_recipes())}) or a recipe YAML file (repeatable)"
    p.add_argument("--recipe", action="append", default=[], metavar="NAME", help=helps)
    p.add_argument("--list-recipes", action="store_true", help="describe the shipped recipes and exit")
    p.add_argument("--seeds", type=int, default=3, help="training seeds per configuration (default 3)")
    p.add_argument("--samples", type=int, default=0, help="test images to score on (default 0: the whole test split)")
    add_overrides(p, help="change a key of every configuration, e.g. --set optim.epochs=300")
    p.add_argument("--storage", help="where Train runs and AutoAttack states live (default: the sweep's; "
                   "for recipes ./ray_results)")  # fmt: skip
    p.add_argument("--out", default="final_stage.csv", help="the table file, .csv or .md (default final_stage.csv)")
    p.add_argument(
        "--max-concurrent", type=int, default=0, help="jobs at once (default 0: as many as the cluster fits)"
    )
    helps = "print the plan, its cost and the preflight, then exit; starts nothing, writes nothing"
    p.add_argument("--dry-run", action="store_true", help=helps)
    p.add_argument(
        "--verbose", action="store_true", help="show Ray and MLflow output here (default: in final/final.log beside "
        "the Train runs)")  # fmt: skip
    add_tracking_uri(p)
    add_address(p)
    return p


def final(args: argparse.Namespace) -> int:
    if args.list_recipes:
        print("\n\n".join(describe(load_recipe(name)) for name in shipped_recipes()))
        return 0
    check_seeds(args.seeds)
    check_samples(args.samples)
    if args.max_concurrent < 0:
        raise ConfigError(f"--max-concurrent {args.max_concurrent}: expected >= 0 (0 = as many as the cluster fits)")
    if bool(args.recipe) == bool(args.trial or args.sweep or (args.experiment and not args.recipe)):
        raise ConfigError(
            "give either --recipe NAME (a shipped recipe or file) or --experiment NAME (its front, or --trial ID)"
        )
    check_out(args.out)
    if not args.dry_run:
        check_writable_file(args.out, "--out")
    overrides = parse_overrides(args.overrides)
    tracking_uri = args.tracking_uri or default_tracking_uri()
    experiment = args.experiment or DEFAULT_EXPERIMENT
    if args.recipe:
        recipes = [load_recipe(name) for name in args.recipe]
        configs = from_recipes(recipes, overrides, storage_root(args.storage))
    else:
        from afm_ray.tracking.mlflow_runs import client_for

        storage = storage_root(args.storage) if args.storage else None
        configs = from_trials(client_for(tracking_uri), experiment, args.trial, overrides, storage, sweep=args.sweep)
    print(format_plan(configs, args.seeds, args.samples), flush=True)
    check_ray_address(args.address)
    seen = set()
    for config in configs:  # the sweep's checks, for each configuration (each line once)
        for _, check in sweep_checks(config.space, f"{config.storage}/final", tracking_uri, experiment=experiment):
            line = check()
            if line not in seen:
                seen.add(line)
                print(f"preflight: {line}", flush=True)
    if args.dry_run:
        return 0
    return run(args, configs, experiment, tracking_uri)


def run(args: argparse.Namespace, configs: list[Configuration], experiment: str, tracking_uri: str) -> int:
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from afm_ray.final.runner import FinalJob, existing_results, experiment_for, run_final_stage

    client = MlflowClient(tracking_uri)
    try:
        exp_id = experiment_for(client, experiment)
        jobs = [FinalJob(c, s) for c in configs for s in c.seeds(args.seeds)]
        results, todo = existing_results(client, exp_id, jobs, args.samples)
        print(f"final stage: {len(results)} of {len(jobs)} job(s) already done, {len(todo)} to run", flush=True)
        if todo:
            try:
                results |= run_final_stage(
                    todo,
                    client=client,
                    experiment_id=exp_id,
                    samples=args.samples,
                    address=args.address,
                    max_concurrent=args.max_concurrent,
                    verbose=args.verbose,
                )
            except KeyboardInterrupt:
                print("interrupted: run the same command again to continue the final stage", file=sys.stderr)
                return 130
    except MlflowException as err:
        raise TrackingError(f"MLflow at {tracking_uri}: {one_line(err)}") from None
    frame = summarise([_row(c, args.seeds) for c in configs], results)
    print(format_table(frame))
    print(f"table: {write_table(frame, Path(args.out))}")
    return 0


def _row(config: Configuration, seeds: int) -> dict:
    cfg = config.cfg
    published = config.published()
    return {
        "key": config.key,
        "label": config.label,
        "method": cfg.method.name,
        "student": cfg.student.arch,
        "teacher": cfg.teacher.arch,
        "epochs": cfg.optim.epochs,
        "seeds": config.seeds(seeds),
        "published_aa": published[1].aa_acc if published else None,
        "published_clean": published[1].clean_acc if published else None,
        "published_source": published[0].name if published else "",
    }


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(final, parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
