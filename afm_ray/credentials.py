"""Credentials in store addresses: never printed, never stored in clear, never needed on a command line.

- `redact_uri` / `redact_text`: a URI's password, lone token, secret query values and fragment, and
  the values of `password=...`-like keywords (libpq connection strings), replaced by ***. They fail
  closed: a password holding a raw `/`, `#`, `?` or `:` (SQLAlchemy takes everything between the
  first ':' and the '@' as the password), a malformed host, a query key that names a key, secret,
  token, password or signature: when unsure, more is redacted, never less.
- `redacted_output`: the backstop of every command: each line written to stdout or stderr (the
  error line included) and an uncaught exception's traceback pass through `redact_text`.
- `uri_from`: a store URI given on the command line, in a file (`--optuna-storage-file`), or in
  an environment variable (`AFM_RAY_OPTUNA_STORAGE`, MLflow's `MLFLOW_TRACKING_URI`), so no
  credential needs to be in `ray job submit`'s entrypoint. PostgreSQL's own `PGPASSWORD` and
  `PGPASSFILE` (~/.pgpass) keep it out of the URI altogether.
- `remember` / `recall`: objects Ray Tune pickles into the sweep's folder (the Optuna storage, the
  MLflow callback) keep a redacted URI there; unpickled in the process that remembered the full
  one (the sweep's driver, also on --resume), they get it back.

Standard library only: imported before Ray, MLflow or torch.
"""

from __future__ import annotations

import contextlib
import re
import sys
import traceback
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import unquote

from afm_ray.errors import ConfigError, one_line

REDACTED = "***"

# Names whose values are credentials: password, sslpassword, access_key, X-Amz-Signature, sig, token, ...
_SECRET_WORDS = r"token|secret|pass|pwd|key|sig|credential|auth|cookie|jwt|bearer"
_SECRET_NAME = re.compile(_SECRET_WORDS, re.I)
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
# `name=value` (libpq: `password='a b'`), and `"name": "value"` (a dict or JSON printed whole).
_QUOTED = r"'(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\""
_KEYWORD = re.compile(
    rf"(?<![\w.-])(?P<key>[\w.-]*(?:{_SECRET_WORDS})[\w.-]*)(?P<eq>\s*=\s*)(?P<value>{_QUOTED}|\S+)"
    rf"|(?P<q>['\"])(?P<qkey>[\w.-]*(?:{_SECRET_WORDS})[\w.-]*)(?P=q)(?P<colon>\s*:\s*)(?P<qvalue>{_QUOTED})",
    re.I,
)
# A password may hold spaces or quotes: `scheme://user:` then anything up to the '@' on that line,
# unless what follows the ':' is a port (digits, then the path or the end).
_USERINFO_WITH_SPACES = re.compile(
    r"(?P<user>[A-Za-z][A-Za-z0-9+.-]*://[^\s:/@'\"\[]*:)(?!\d{1,5}(?:[/?#\s'\"),;.]|$))(?:(?!://)[^@\n])*?@"
)
# `user:password@host` outside a URI (a scheme mistyped, `postgresql//u:p@h`): the password goes too.
# Not after ':/' (MLflow's models:/name@alias, runs:/id/path).
_BARE_USERINFO = re.compile(r"(?P<user>[\w.+-]*):(?!/)[^\s@'\"]+@(?=[\w\[])")
# Names that say what kind a setting is, not a credential: RAY_AUTH_MODE=token, token_type=bearer.
_KIND_NAME = re.compile(r"[._-](?:mode|type|method|enabled|required|file|path|dir|size|length|version)$", re.I)
_TRAILING = "'\"),;:.]}>"  # punctuation around a URI in a sentence, not part of it


def redact_uri(uri: str) -> str:
    """`uri` with its credentials replaced by ***, for printing and for MLflow params: the password
    (or a lone token) before the last '@', the values of query parameters that name a key, secret,
    token, password or signature, and any fragment. Text that is no URI gets `password=...`-like
    keyword values redacted (a libpq connection string); anything else comes back unchanged."""
    text = str(uri)
    if _SCHEME.match(text) and not any(c.isspace() for c in text):
        return _redact_one_uri(text)
    return redact_text(text)


def _redact_one_uri(uri: str) -> str:
    scheme_end = _SCHEME.match(uri).end()  # type: ignore[union-attr]
    head, rest = uri[:scheme_end], uri[scheme_end:]
    userinfo = ""
    if not rest.startswith("/") and "@" in rest:  # sqlite:////abs has no authority: nothing before the '@'
        # The last '@': a raw '@', '/', '#' or '?' in a password cannot then leak its tail.
        credentials, rest = rest.rsplit("@", 1)
        user, sep, _ = credentials.partition(":")
        keep_user = sep and user and not any(c in user for c in "/?#[]")
        userinfo = f"{user}:{REDACTED}@" if keep_user else f"{REDACTED}@"
    host_end = min((i for i in (rest.find(c) for c in "/?#") if i >= 0), default=len(rest))
    host, rest = rest[:host_end], rest[host_end:]
    rest, hash_sign, fragment = rest.partition("#")
    path, question, query = rest.partition("?")
    if query:
        query = _redact_query(query)
    return f"{head}{userinfo}{host}{path}{question}{query}{hash_sign}{REDACTED if fragment else ''}"


def _redact_query(query: str) -> str:
    parts = re.split(r"([&;])", query)
    for i in range(0, len(parts), 2):
        key, eq, _ = parts[i].partition("=")
        if eq and _SECRET_NAME.search(unquote(key)):
            parts[i] = f"{key}={REDACTED}"
    return "".join(parts)


def redact_text(text: str) -> str:
    """`text` (an error message, a log line) with every URI in it passed through `redact_uri` and
    every `password=...`-like keyword value redacted."""
    text = _USERINFO_WITH_SPACES.sub(lambda m: f"{m.group('user')}{REDACTED}@", str(text))
    out, pos = [], 0
    while match := _SCHEME.search(text, pos):
        out.append(_redact_plain(text[pos : match.start()]))
        end = match.end()
        while end < len(text) and not text[end].isspace():
            end += 1
        core = text[match.start() : end].rstrip(_TRAILING)
        out.append(_redact_one_uri(core) if len(core) > match.end() - match.start() else core)
        out.append(text[match.start() + len(core) : end])
        pos = end
    out.append(_redact_plain(text[pos:]))
    return "".join(out)


def _redact_plain(text: str) -> str:
    """Text with no URI in it: keyword values and `user:password@` redacted."""
    text = _BARE_USERINFO.sub(lambda m: f"{m.group('user')}:{REDACTED}@", text)

    def replace(m: re.Match) -> str:
        if m.group("key") and (_KIND_NAME.search(m.group("key")) or m.group("key").lower() == "key"):
            # a bare `key=` is how messages name any setting ("expected key=value"), not a credential
            return f"{m.group('key')}{m.group('eq')}{redact_text(m.group('value'))}"  # a URI in it is still one
        if m.group("key"):
            return f"{m.group('key')}{m.group('eq')}{REDACTED}"
        q = m.group("q")
        return f"{q}{m.group('qkey')}{q}{m.group('colon')}{q}{REDACTED}{q}"

    return _KEYWORD.sub(replace, text)


# ------------------------------------------------------------------------------ the backstop


class RedactingStream:
    """A text stream whose every write passes through `redact_text` (one write is one `print`)."""

    def __init__(self, stream: TextIO):
        self._stream = stream

    def write(self, text: str) -> int:
        self._stream.write(redact_text(text))
        return len(text)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def _redacting_excepthook(kind: type[BaseException], value: BaseException, tb: Any) -> None:
    sys.stderr.write(redact_text("".join(traceback.format_exception(kind, value, tb))))


@contextlib.contextmanager
def redacted_output() -> Iterator[None]:
    """stdout and stderr redacted while the block runs; a traceback the interpreter prints after it
    (a bug, or --debug) is redacted too."""
    sys.excepthook = _redacting_excepthook
    out, err = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = RedactingStream(out), RedactingStream(err)
    try:
        yield
    finally:
        sys.stdout, sys.stderr = out, err


# ------------------------------------------------------------------------------ where a URI comes from


def uri_from(flag: str, given: str | None, file: str | None, env: Mapping[str, str], env_name: str) -> str | None:
    """The URI of option `flag`: given on the command line, else read from `file` (its first
    non-empty line), else $`env_name`; None when none is set. A ConfigError names the file when
    it cannot be read, and refuses both a URI and a file."""
    if given and file:
        raise ConfigError(
            f"{flag} and {flag}-file: give one of them (the file keeps the credential off the command line)"
        )
    if file:
        try:
            lines = [line.strip() for line in Path(file).expanduser().read_text().splitlines()]
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{flag}-file {file}: cannot be read ({redact_text(one_line(exc))})") from None
        uri = next((line for line in lines if line and not line.startswith("#")), "")
        if not uri:
            raise ConfigError(f"{flag}-file {file}: is empty; expected the URI on its first line")
        return uri
    return given or env.get(env_name) or None


_FULL: dict[str, str] = {}


def remember(uri: str) -> None:
    """Let an object pickled with `redact_uri(uri)` in place of `uri` get `uri` back in this process."""
    _FULL[redact_uri(uri)] = uri


def recall(redacted: str) -> str:
    """The full URI remembered for `redacted`, or `redacted` itself."""
    return _FULL.get(redacted, redacted)
