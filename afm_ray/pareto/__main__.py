"""`python -m afm_ray.pareto`: the Pareto-optimal students of a sweep, read from MLflow.

    python -m afm_ray.pareto --experiment NAME [--tracking-uri URI]
        [--objectives aa_acc:max clean_acc:max params:min ...] [--filter "params.method = 'rslad'"]
        [--sweep RUN_ID] [--plot FRONT.png] [--out TABLE.parquet|.csv] [--register MODEL_NAME]
        [--confirm [--samples N] [--seeds K]]

It prints the ranked table (afm_ray.pareto.ranking, afm_ray.pareto.report), plots it, confirms the
front on more images and seeds (afm_ray.pareto.confirm) and registers it (afm_ray.pareto.registry).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
from mlflow.exceptions import MlflowException

from afm_ray import names
from afm_ray.cli import add_address, add_tracking_uri, command_parser, run_command
from afm_ray.errors import ConfigError, TrackingError, one_line
from afm_ray.names import Objective
from afm_ray.pareto.ranking import rank_trials
from afm_ray.pareto.registry import register_front
from afm_ray.pareto.report import check_out_suffix, format_table, headline, plot_front, summary, write_table
from afm_ray.stats import MIN_CONFIRM_IMAGES
from afm_ray.storage import check_writable_file
from afm_ray.tracking.mlflow_runs import client_for, column, load_trials, sweep_objectives, trial_names

#: Robustness first: it orders the table and picks pareto-1 (names.DEFAULT_OBJECTIVES is the search's).
CLI_OBJECTIVES = ("aa_acc:max", "clean_acc:max")


def parser() -> argparse.ArgumentParser:
    p = command_parser("pareto", "Pareto-optimal students of an afm-ray sweep, read from MLflow.")
    p.add_argument("--experiment", required=True, help="MLflow experiment name (or id)")
    add_tracking_uri(p)
    default, final = " ".join(CLI_OBJECTIVES), ", ".join(names.OBJECTIVE_METRICS)
    helps = f"metrics to optimise (default: the sweep's own, robustness first; else {default}); final metrics: {final}"
    p.add_argument("--objectives", nargs="+", default=None, metavar="NAME:max|min", help=helps)
    helps = "MLflow search filter ANDed with the trial selection, e.g. \"params.`method.name` = 'advfunmatch'\""
    p.add_argument("--filter", dest="filter_string", metavar="FILTER", help=helps + " (params.method works too)")
    p.add_argument("--sweep", metavar="RUN_ID", help="only trials of this sweep (parent run id, id prefix or run name)")
    helps = "show this trial's row and place: its trial id as the sweep printed it, its MLflow run name or run id"
    p.add_argument("--trial", metavar="TRIAL_ID", help=helps)
    p.add_argument("--plot", metavar="FILE.png", help="write a plot of all trials with the front highlighted")
    p.add_argument("--out", metavar="FILE.parquet|.csv", help="write the whole table with a pareto column")
    aliases = "register each Pareto-optimal student with aliases pareto-1, pareto-2, ... (with --confirm: confirmed)"
    p.add_argument("--register", metavar="MODEL_NAME", help=aliases)
    p.add_argument("--front-only", action="store_true", help="print only the Pareto front")
    helps = "re-evaluate the front and the trials within noise of it on more test images (and --seeds), on Ray"
    p.add_argument("--confirm", action="store_true", help=helps + "; the front is recomputed on the confirmed means")
    helps = "--confirm: test images per evaluation (default: as many as the sweep scored; 0: the whole test split)"
    p.add_argument("--samples", type=int, default=None, help=helps + f"; at least {MIN_CONFIRM_IMAGES}")
    p.add_argument("--seeds", type=int, default=0, help="--confirm: retrain each candidate this many times, new seeds")
    p.add_argument(
        "--verbose",
        action="store_true",
        help="--confirm: show Ray and MLflow output here (default: in confirm.log beside the sweep's results)",
    )
    add_address(p)
    return p


def choose_objectives(given: Sequence[str] | None, trials: pd.DataFrame, tracking_uri: str) -> tuple[Objective, ...]:
    """``given``, else the objectives the trials' sweep recorded, else `CLI_OBJECTIVES`. The sweep's are
    reordered robustness first (aa, cw, pgd20, clean, then the rest): the order ranks the front only."""
    if given:
        return Objective.parse_all(given)
    recorded = sweep_objectives(client_for(tracking_uri), trials)
    if not recorded:
        return Objective.parse_all(CLI_OBJECTIVES)
    first = ("aa_acc", "cw_acc", "pgd20_acc", "clean_acc")
    return Objective.parse_all(
        sorted(recorded, key=lambda o: first.index(o.metric) if o.metric in first else len(first))
    )


def pareto(args: argparse.Namespace) -> int:
    """0 with a front, 1 when no trial is eligible, 130 when a confirmation is interrupted (Ctrl-C);
    errors are UserErrors (one line, exit 2)."""
    if args.objectives:  # a bad objective fails before MLflow is read
        try:
            Objective.parse_all(args.objectives)
        except ConfigError as exc:
            raise ConfigError(f"--objectives: {exc}") from None
    if args.out:  # output files are checked before MLflow is read
        check_out_suffix(Path(args.out))
        check_writable_file(args.out, "--out")
    if args.plot:
        from matplotlib.figure import Figure

        if Path(args.plot).suffix.lower().lstrip(".") not in (formats := Figure().canvas.get_supported_filetypes()):
            raise ConfigError(f"--plot {args.plot!r}: expected a file name ending in one of .{', .'.join(formats)}")
        check_writable_file(args.plot, "--plot")
    if not args.confirm and (args.samples is not None or args.seeds):
        raise ConfigError("--samples and --seeds belong to --confirm")
    uri = args.tracking_uri or names.default_tracking_uri()
    try:
        trials = load_trials(args.experiment, tracking_uri=uri, filter_string=args.filter_string, sweep=args.sweep)
        objectives = choose_objectives(args.objectives, trials, uri)
        if not args.objectives:
            print(f"objectives: {' '.join(map(str, objectives))}")
        ranked = rank_trials(trials, objectives)
        if args.trial:
            print(format_trial(ranked, objectives, args.trial))
            return 0
        print(format_table(ranked, objectives, front_only=args.front_only))
        print(summary(ranked, objectives))
        if args.out and not args.confirm:
            print(f"table: {write_table(ranked, objectives, args.out)}")
        if args.plot and not args.confirm:
            print(f"plot: {plot_front(ranked, objectives, args.plot, title=f'{args.experiment}: {headline(ranked)}')}")
        tags = {}
        if args.confirm and ranked["pareto"].any():
            from afm_ray.pareto.confirm import confirm_candidates, format_comparison  # Ray and training: only here

            try:
                confirmed = confirm_candidates(
                    ranked,
                    tracking_uri=uri,
                    samples=args.samples,
                    seeds=args.seeds,
                    address=args.address,
                    verbose=args.verbose,
                )
            except KeyboardInterrupt:  # what finished is logged; the same command continues from there
                print("interrupted: run the same command again to continue the confirmation", file=sys.stderr)
                return 130
            print(format_comparison(ranked, confirmed, objectives))
            ranked = rank_trials(confirmed, objectives)
            print("\nconfirmed front:")
            print(format_table(ranked, objectives, front_only=args.front_only))
            print(summary(ranked, objectives))
            if args.out:
                print(f"table: {write_table(ranked, objectives, args.out)}")
            if args.plot:
                title = f"{args.experiment}, confirmed: {headline(ranked)}"
                print(f"plot: {plot_front(ranked, objectives, args.plot, title=title)}")
            tags = {"afm_ray.confirmed": f"samples={confirmed.attrs['samples']} seeds={args.seeds}"}
        if args.register:
            versions = register_front(ranked, objectives, args.register, tracking_uri=uri, extra_tags=tags)
            trials_ = trial_names(ranked[ranked["pareto"]].sort_values("rank"))
            for rank, (mv, trial) in enumerate(zip(versions, trials_, strict=True), start=1):
                alias = f"{args.register}@{names.PARETO_ALIAS_PREFIX}{rank}"
                print(f"registered models:/{alias} -> version {mv.version} (trial {trial}, run {mv.run_id})")
    except MlflowException as err:  # the store refused or failed a request
        raise TrackingError(f"MLflow at {uri}: {one_line(err)}") from None
    if not ranked["pareto"].any():
        print("afm_ray.pareto: no trial is eligible for the front (reasons in the table)", file=sys.stderr)
        return 1
    return 0


def format_trial(ranked: pd.DataFrame, objectives: Sequence[Objective], ref: str) -> str:
    """``--trial REF``: the row of the trial REF names (trial id, run name, or run id / 8+ character prefix)
    in the ranked table, and its place; a TrackingError lists the trials there are."""
    labels = trial_names(ranked)
    names_ = column(ranked, "run_name").fillna("")
    hit = (labels == ref) | (names_ == ref) | ((len(ref) >= 8) & ranked["run_id"].str.startswith(ref))
    if int(hit.sum()) != 1:
        known = ", ".join(labels.head(12)) + (", ..." if len(labels) > 12 else "")
        state = "names several trials" if hit.sum() else "names no trial here"
        raise TrackingError(f"--trial {ref!r} {state}; the trials: {known}")
    row = ranked[hit].iloc[0]
    if row["pareto"]:
        place = f"on the Pareto front, rank {int(row['rank'])}"
    elif pd.notna(row["excluded"]):
        place = f"excluded from the front: {row['excluded']}"
    else:
        noise = " (dominated only within noise)" if row["within_noise"] else ""
        place = f"dominated: non-dominated layer {int(row['front'])}{noise}"
    table = format_table(ranked[hit], objectives)
    return f"{table}\ntrial {labels[hit].iloc[0]} (run {row['run_id']}): {place}"


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(pareto, parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
