"""A sweep's terminal: its own lines only; what Ray, Tune, Optuna and MLflow print goes to a log file.

By default (`quiet`) the process's stdout and stderr file descriptors point at the log file while
the sweep runs (and so do `sys.stdout` and `sys.stderr`), so everything a library writes lands there:
Python loggers, warnings, `print`s,
Ray's C++ core and the raylet's messages relayed to the driver, and the processes a local Ray
starts (they inherit the descriptors). The sweep's own lines (`say`) go to a copy of the terminal
taken before the switch, and into the log too, so the log reads in order. A library's ERROR record
still reaches the terminal as one line naming the log, and once the sweep returns or raises the
descriptors are back: the `error: ...` line and any traceback print where they always did.
`--verbose` leaves the descriptors alone: every library prints as it would.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import IO, Any

from afm_ray.storage import is_uri

_terminal: IO[str] | None = None  # the real stdout while a quiet sweep runs; None: print as usual
_log: IO[str] | None = None

# Loggers with handlers of their own (so adding ours leaves Python's last-resort handler, which writes
# handler-less WARNINGs to stderr and so to the log, in place for everything else).
LIBRARY_LOGGERS = ("ray", "optuna", "mlflow")


def log_file_beside(folder: str, name: str) -> Path:
    """Where a command's library output goes: ``folder/name`` beside its results when ``folder`` is local,
    else a local temp file (a file at a URI cannot be appended to as it runs)."""
    if is_uri(folder):
        return Path(tempfile.gettempdir()) / f"afm-ray-{name}"
    return Path(folder) / name


def say(line: str = "") -> None:
    """Print one of the sweep's own lines (to the terminal, and into the log while quiet)."""
    if _terminal is None:
        print(line, flush=True)
        return
    _terminal.write(line + "\n")
    _terminal.flush()
    if _log is not None:
        _log.write(line + "\n")
        _log.flush()


class _ErrorsToTerminal(logging.Handler):
    """A library's ERROR record, as one line on the terminal: quiet hides chatter, never an error."""

    def __init__(self, log_path: Path) -> None:
        super().__init__(level=logging.ERROR)
        self.log_path = log_path
        self._last: logging.LogRecord | None = None  # a record propagating up reaches us twice

    def emit(self, record: logging.LogRecord) -> None:
        if record is self._last:
            return
        self._last = record
        try:
            first = " ".join(record.getMessage().split("\n", 1)[0].split())[:300]
        except Exception:  # a malformed record: say that there was one
            first = record.msg if isinstance(record.msg, str) else "an error"
        if _terminal is not None:
            _terminal.write(f"{record.name}: {first} (details in {self.log_path})\n")
            _terminal.flush()


class QuietConsole:
    """``with QuietConsole(log_path, verbose=False):`` runs a sweep with its libraries' output in
    ``log_path`` (appended to, so a resumed sweep keeps one log); see the module docstring."""

    def __init__(self, log_path: str | Path, *, verbose: bool = False) -> None:
        self.log_path = Path(log_path)
        self.verbose = verbose
        self._saved: tuple[int, int] | None = None
        self._streams: tuple[Any, Any] | None = None
        self._handler: _ErrorsToTerminal | None = None

    def __enter__(self) -> QuietConsole:
        global _terminal, _log
        if self.verbose:
            return self
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        sys.stdout.flush()
        sys.stderr.flush()
        _log = open(self.log_path, "a", buffering=1)  # noqa: SIM115 (closed in __exit__)
        self._saved = os.dup(1), os.dup(2)
        _terminal = os.fdopen(os.dup(self._saved[0]), "w", buffering=1)
        os.dup2(_log.fileno(), 1)
        os.dup2(_log.fileno(), 2)
        # Python's own streams too, where they are not fds 1 and 2 (a notebook, a test's capture)
        self._streams = sys.stdout, sys.stderr
        sys.stdout = sys.stderr = _log
        self._handler = _ErrorsToTerminal(self.log_path)  # Python warnings go to stderr: the log
        for name in LIBRARY_LOGGERS:
            logging.getLogger(name).addHandler(self._handler)
        return self

    def __exit__(self, *exc: Any) -> None:
        global _terminal, _log
        if self._saved is None:
            return
        sys.stdout.flush()
        sys.stderr.flush()
        if self._streams is not None:
            sys.stdout, sys.stderr = self._streams
            self._streams = None
        for name in LIBRARY_LOGGERS:
            logging.getLogger(name).removeHandler(self._handler)
        os.dup2(self._saved[0], 1)
        os.dup2(self._saved[1], 2)
        for fd in self._saved:
            os.close(fd)
        self._saved = None
        if _terminal is not None:
            _terminal.close()
        if _log is not None:
            _log.close()
        _terminal = _log = None
