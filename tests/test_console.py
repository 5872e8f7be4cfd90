"""afm_ray.sweep.console: a quiet sweep's terminal holds its own lines; whatever a library writes, by any
route, lands in the log; an ERROR a library logs still reaches the terminal; --verbose changes nothing."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import warnings

from afm_ray.sweep.console import QuietConsole, say


def _noisy_libraries() -> None:
    print("Configuration for experiment (a library's print)")
    os.write(2, b"[raylet] a C-level write to stderr\n")
    logging.getLogger("mlflow.store").warning("INFO-ish chatter of a library logger")
    # what Python's default warnings.showwarning does (pytest records warnings instead, so done by hand)
    sys.stderr.write(warnings.formatwarning("group is experimental", UserWarning, "optuna/_experimental.py", 32))
    subprocess.run([sys.executable, "-c", "print('a child process started by Ray')"], check=True)
    logging.getLogger("ray.tune.execution").error("Trial task failed for trial 917f2149\nTraceback ...")


def test_quiet_console_sends_the_libraries_to_the_log(tmp_path, capfd):
    log = tmp_path / "sweep" / "sweep.log"
    # as MLflow and Ray configure themselves at import: a handler on the process's stderr (fd 2)
    handler = logging.StreamHandler(open(2, "w", closefd=False))  # noqa: SIM115
    for name in ("mlflow", "ray"):
        logging.getLogger(name).addHandler(handler)
    try:
        with QuietConsole(log):
            say("[12:00:00] trial 917f2149: started")
            _noisy_libraries()
    finally:
        for name in ("mlflow", "ray"):
            logging.getLogger(name).removeHandler(handler)
    say("after: printed as usual")
    out, err = capfd.readouterr()
    assert out.splitlines() == [
        "[12:00:00] trial 917f2149: started",
        f"ray.tune.execution: Trial task failed for trial 917f2149 (details in {log})",
        "after: printed as usual",
    ]
    assert err == ""
    text = log.read_text()
    for line in (
        "[12:00:00] trial 917f2149: started",
        "Configuration for experiment",
        "a C-level write to stderr",
        "INFO-ish chatter",
        "UserWarning: group is experimental",
        "a child process started by Ray",
        "Traceback ...",
    ):
        assert line in text, line


def test_verbose_leaves_everything_where_it_was(tmp_path, capfd):
    log = tmp_path / "sweep.log"
    with QuietConsole(log, verbose=True):
        say("own line")
        print("library line")
    out, _ = capfd.readouterr()
    assert out.splitlines() == ["own line", "library line"] and not log.exists()
