"""SIGTERM takes the path of Ctrl-C.

`kill`, a scheduler's preemption, `docker stop` and `ray job stop` send SIGTERM, whose default
kills the process on the spot: a sweep would leave its MLflow parent run RUNNING and Ray Tune
no chance to save its state. Here SIGTERM calls whatever handles SIGINT at that moment: Python's
KeyboardInterrupt in a plain run, Ray Tune's "stop, save the experiment, return" during
`Tuner.fit`. `ray.init` installs its own SIGTERM handler (exit at once), so a sweep installs
this one again after it.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any


def sigterm_as_sigint(signum: int, frame: FrameType | None) -> None:
    """A SIGTERM handler that does what SIGINT would do now."""
    handler = signal.getsignal(signal.SIGINT)
    if callable(handler):
        handler(signal.SIGINT, frame)
    else:  # SIG_IGN (a background job of a non-interactive shell) or SIG_DFL: still stop
        raise KeyboardInterrupt


def install_sigterm_as_sigint() -> Any:
    """Install `sigterm_as_sigint`; returns the previous handler (None off the main thread,
    where Python cannot install signal handlers)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, sigterm_as_sigint)


def restore_sigterm(previous: Any) -> None:
    """Put back what `install_sigterm_as_sigint` replaced."""
    if previous is not None and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, previous)
