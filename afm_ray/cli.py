"""What every command shares: the one exit path, a parser whose errors are one line, and the
arguments several commands take.

Each command is the `__main__.py` of the package named after it (`python -m afm_ray.train`,
`.teacher`, `.evaluate`, `.sweep`, `.pareto`, `.export`); it builds its parser with
`command_parser` and runs its body through `run_command`. Nothing in the library imports a
command or this module.

A command validates everything it can before it starts work. An expected failure
(afm_ray.errors.UserError, a bad argument included) prints one line on stderr, `error: ...`,
and exits with status 2; `--debug` shows the traceback instead. Ctrl-C or SIGTERM prints
`interrupted` and exits with 130. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import NoReturn

from afm_ray.config import ExperimentConfig, apply_overrides, load_yaml, parse_overrides
from afm_ray.credentials import redact_text, redacted_output
from afm_ray.errors import UserError, one_line
from afm_ray.search.space import embedded_default
from afm_ray.signals import install_sigterm_as_sigint, restore_sigterm


class OneLineParser(argparse.ArgumentParser):
    """argparse with the one-line error of every other failure (argparse prints its usage first)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {' '.join(message.split())} (see {self.prog} --help)\n")


def command_parser(command: str, description: str) -> OneLineParser:
    """The parser of `python -m afm_ray.<command>`, with --debug."""
    parser = OneLineParser(prog=f"python -m afm_ray.{command}", description=description)
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    return parser


def add_overrides(
    parser: argparse.ArgumentParser, help: str = "override one dotted key, e.g. --set attack.eps=0.1"
) -> None:
    """--set KEY=VALUE, repeatable; parsed by afm_ray.config.parse_overrides."""
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=f"{help} (repeatable)"
    )


def add_config_file(parser: argparse.ArgumentParser) -> None:
    """--config FILE and --set: a single run's configuration (see `load_config`)."""
    parser.add_argument("--config", help="YAML file with config sections (default: the embedded default)")
    add_overrides(parser)


def add_tracking_uri(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db)"
    )


def add_address(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--address",
        default=os.environ.get("RAY_ADDRESS"),
        help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray)",
    )


def load_config(path: str | Path | None = None, overrides: Iterable[str] = ()) -> ExperimentConfig:
    """A YAML config with --set overrides; with no file, the embedded default (the fixed keys of
    the shipped default space, so a single run and the default sweep agree)."""
    values = load_yaml(path) if path else embedded_default()
    source = f"config file {str(path)!r}" if path else "the embedded default (search_spaces/default.yaml: fixed)"
    return apply_overrides(values, parse_overrides(overrides), source=source)


def run_command(
    body: Callable[[argparse.Namespace], int], parser: argparse.ArgumentParser, argv: Sequence[str] | None
) -> int:
    """Parse ``argv`` and run ``body`` through the one exit path: a UserError is one line and
    status 2, an interrupt (Ctrl-C or SIGTERM) one line and 130; --debug shows their tracebacks.
    Any other exception is a bug: traceback."""
    args = parser.parse_args(argv)
    previous = install_sigterm_as_sigint()
    try:
        with redacted_output():  # the backstop: no line a command prints carries a credential
            return body(args)
    except UserError as exc:
        if args.debug:
            raise
        print(f"error: {redact_text(one_line(exc))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if args.debug:
            raise
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        restore_sigterm(previous)
