"""The failures a user can fix. Each carries a one-line message that names the bad value and
what would be right; the command line prints it and exits with status 2 (afm_ray.cli).

Each kind is raised where the failure is found (config.py, data.py, checkpoints.py, ...), never
by translating messages later. Kinds that replaced a built-in exception keep it as a second
base (a missing dataset is still a FileNotFoundError), so callers that catch those keep working.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from typing import Any


class UserError(Exception):
    """An expected failure: bad input, a missing file, an unreachable service."""


class ConfigError(UserError, ValueError):
    """A bad configuration value, YAML file or command-line argument; the message is one line
    naming the key (or file) and what is valid."""


class DataError(UserError, ValueError):
    """The dataset a config names is malformed (wrong layout, values, or a pickle that is not
    a plain CIFAR batch)."""


class DataNotFoundError(DataError, FileNotFoundError):
    """The dataset a config names is not where `data.root` says."""


class CheckpointError(UserError, ValueError):
    """A checkpoint file is not a loadable afm-ray checkpoint or does not fit the model/data."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """No checkpoint at the given path or URI."""


class StorageError(UserError):
    """A storage location (--storage, a cache or output folder, a checkpoint URI) cannot be read
    or written."""


class ArtifactError(UserError):
    """A stored model (a logged student, an export) is missing, malformed, or not what was logged."""


class TrackingError(UserError, ValueError):
    """The MLflow tracking store cannot be reached or does not hold what was asked for."""


class ClusterError(UserError):
    """The Ray cluster named by --address (or $RAY_ADDRESS) cannot be reached."""


def one_line(exc: BaseException) -> str:
    """The message of `exc` as one line; its type name when the message is empty (an empty
    file read by torch raises an EOFError whose message is '')."""
    text = " ".join(str(getattr(exc, "message", None) or exc).split())
    return text or type(exc).__name__


def unknown_value(label: str, value: Any, known: Iterable[Any]) -> ConfigError:
    """`label 'valu': did you mean 'value'?` when one known value is close, else the list of valid ones."""
    known = [str(k) for k in known]
    close = difflib.get_close_matches(str(value), known, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else f"; valid: {', '.join(known)}"
    return ConfigError(f"{label} {value!r}{hint}")
