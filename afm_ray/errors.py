"""The failures a user can fix. Each carries a one-line message that names the bad value and
what would be right; the command line prints it and exits with status 2 (afm_ray.cli)."""

from __future__ import annotations


class UserError(Exception):
    """An expected failure: bad input, a missing file, an unreachable service."""


class ConfigError(UserError, ValueError):
    """A bad configuration value; the message is one line naming the key and what is valid."""


class DataError(UserError):
    """The dataset a config names is missing or malformed."""


class StorageError(UserError):
    """A storage location (--storage, a checkpoint URI) cannot be read or written."""


class ArtifactError(UserError):
    """A stored model (a logged student, an export) is missing, malformed, or not what was logged."""
