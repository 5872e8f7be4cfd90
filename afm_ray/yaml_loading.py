"""Strict YAML for config files, search spaces and `--set` values.

PyYAML's `safe_load` builds no Python objects beyond plain data, but it accepts what a user
almost never means: a key given twice (the last silently wins), an empty file, a binary or
non-UTF-8 file (a traceback from the decoder), a directory or a device in place of a file, and
an alias "bomb" (nested anchors that expand to billions of nodes when the value is walked).
Everything here fails with a one-line `ConfigError` that names the file and the line.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from yaml.constructor import ConstructorError

from afm_ray.errors import ConfigError

#: A config or search space is a few KB; anything larger is not one (or is a mistake, like /dev/zero).
MAX_BYTES = 1 << 20
#: Nodes after expanding every alias: the shipped spaces have under 200.
MAX_NODES = 100_000


class StrictSafeLoader(yaml.SafeLoader):
    """`yaml.SafeLoader` that refuses a mapping key given twice (YAML 1.2 forbids it; PyYAML
    keeps the last). Keys brought in by a merge (`<<: *base`) may be overridden, as YAML intends."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        first_line: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                seen = key in first_line
            except TypeError:  # an unhashable key; the base class reports it
                break
            if seen:
                raise ConstructorError(
                    None,
                    None,
                    f"key {key!r} is given twice (first on line {first_line[key]}); give each key once",
                    key_node.start_mark,
                )
            first_line[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def read_text_file(path: str | Path, what: str) -> str:
    """The text of a small UTF-8 file, or a ConfigError saying why `path` is not one: missing,
    a directory, a broken symlink or a symlink loop, unreadable, a device, too large, binary."""
    label = f"{what} {str(path)!r}"
    p = Path(path)
    try:
        info = p.stat()
    except OSError as exc:
        raise ConfigError(f"{label} {_stat_problem(p, exc)}") from None
    if stat.S_ISDIR(info.st_mode):
        raise ConfigError(f"{label} is a directory; expected a YAML file")
    if not stat.S_ISREG(info.st_mode):
        raise ConfigError(f"{label} is not a regular file (a device, pipe or socket); expected a YAML file")
    if info.st_size > MAX_BYTES:
        raise ConfigError(f"{label} is {info.st_size:,} bytes; a {what} is YAML text of at most {MAX_BYTES:,} bytes")
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{label} cannot be read ({exc.strerror or type(exc).__name__})") from None
    if b"\x00" in data:
        raise ConfigError(f"{label} is a binary file, not YAML text")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{label} is not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start}); expected a YAML file"
        ) from None


def _stat_problem(p: Path, exc: OSError) -> str:
    if exc.errno == errno.ELOOP:
        return "is a symlink loop"
    if exc.errno == errno.ENOENT and p.is_symlink():
        return f"is a broken symlink (to {os.readlink(p)!r}, which does not exist)"
    if exc.errno == errno.ENOTDIR:
        return "does not exist (a part of the path is a file, not a folder)"
    if exc.errno == errno.EACCES:
        return "cannot be read (permission denied)"
    if exc.errno == errno.ENOENT:
        return "does not exist"
    return f"cannot be read ({exc.strerror or type(exc).__name__})"


def parse_yaml(text: str, label: str) -> Any:
    """Parse `text` with `StrictSafeLoader`; a ConfigError names `label` and the line."""
    try:
        value = yaml.load(text, Loader=StrictSafeLoader)  # noqa: S506 -- a SafeLoader subclass
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = " ".join(str(exc.problem or exc.context or "").split())
        raise ConfigError(f"{label}: not valid YAML{where}: {problem}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{label}: not valid YAML: {' '.join(str(exc).split())}") from None
    except RecursionError:
        raise ConfigError(f"{label}: not valid YAML: nested too deeply") from None
    _check_size(value, label)
    return value


def _check_size(value: Any, label: str) -> None:
    """Refuse a value whose aliases expand past MAX_NODES (a "billion laughs") or refer to
    themselves; counted per distinct object, so the count itself stays cheap."""
    sizes: dict[int, int] = {}
    in_progress: set[int] = set()

    def size(obj: Any) -> int:
        if not isinstance(obj, (dict, list)):
            return 1
        key = id(obj)
        if key in sizes:
            return sizes[key]
        if key in in_progress:
            raise ConfigError(f"{label}: an alias refers to the node that contains it; YAML here must be a tree")
        in_progress.add(key)
        items = [*obj.keys(), *obj.values()] if isinstance(obj, dict) else obj
        total = 1
        for item in items:
            total += size(item)
            if total > MAX_NODES:
                raise ConfigError(
                    f"{label}: its anchors and aliases expand to more than {MAX_NODES:,} values; "
                    "a config needs far fewer (is it a YAML bomb?)"
                )
        in_progress.discard(key)
        sizes[key] = total
        return total

    try:
        size(value)
    except RecursionError:
        raise ConfigError(f"{label}: not valid YAML: nested too deeply") from None


def load_yaml_mapping(path: str | Path, what: str) -> tuple[dict[str, Any], str]:
    """(mapping, text) of a YAML file whose top level must be a non-empty mapping."""
    text = read_text_file(path, what)
    value = parse_yaml(text, str(path))
    if value is None:
        raise ConfigError(f"{what} {str(path)!r} is empty; expected a YAML mapping")
    if not isinstance(value, Mapping):
        raise ConfigError(f"{what} {str(path)!r}: expected a YAML mapping at the top, got a {type(value).__name__}")
    if not value:
        raise ConfigError(f"{what} {str(path)!r} is an empty mapping; expected at least one key")
    return dict(value), text
