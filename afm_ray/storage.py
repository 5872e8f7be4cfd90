"""Files that may live on a local disk or behind a URI (s3://, gs://, file://, ...): one place
that speaks pyarrow's filesystems, so the rest of the code reads and writes paths alike."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any

from afm_ray.credentials import redact_text, redact_uri
from afm_ray.errors import StorageError, one_line


def is_uri(path: str | Path) -> bool:
    return "://" in str(path)


def file_size(path: str, filename_in_directory: str) -> int:
    """Size in bytes of the file at `path` (or of `filename_in_directory` when `path` is a folder),
    local or at a URI, reading only its metadata. Raises FileNotFoundError with a one-line reason."""
    if not is_uri(path):
        file = Path(path).expanduser()
        file = file / filename_in_directory if file.is_dir() else file
        if not file.is_file():
            raise FileNotFoundError(f"nothing at {str(path)!r}: expected {filename_in_directory} or a folder with it")
        return file.stat().st_size
    import pyarrow.fs as pafs

    try:
        fs, remote = filesystem(path)
        info = fs.get_file_info(remote)
        if info.type == pafs.FileType.Directory:
            info = fs.get_file_info(f"{remote.rstrip('/')}/{filename_in_directory}")
    except Exception as exc:  # no credentials, no such bucket, an unknown scheme
        reason = redact_text(str(exc).splitlines()[0]) if str(exc) else type(exc).__name__
        raise FileNotFoundError(f"cannot read {redact_uri(path)!r}: {reason}") from None
    if info.type != pafs.FileType.File:
        raise FileNotFoundError(
            f"nothing at {redact_uri(path)!r}: expected {filename_in_directory} or a folder with it"
        )
    return int(info.size)


def filesystem(uri: str) -> tuple[Any, str]:
    """(pyarrow FileSystem, path inside it) of a URI."""
    import pyarrow.fs as pafs

    return pafs.FileSystem.from_uri(uri)


def write_bytes(target: str, payload: bytes) -> None:
    """Write a file, creating its folder, locally or at a URI."""
    if is_uri(target):
        fs, path = filesystem(target)
        fs.create_dir(str(Path(path).parent), recursive=True)
        with fs.open_output_stream(path) as out:
            out.write(payload)
        return
    Path(target).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(f"{target}.tmp")
    tmp.write_bytes(payload)
    tmp.replace(target)  # atomic: a reader never sees half a file


def read_bytes(source: str) -> bytes:
    """A file's bytes, locally or at a URI (FileNotFoundError, or another OSError, when it cannot be read)."""
    if is_uri(source):
        fs, path = filesystem(source)
        with fs.open_input_stream(path) as stream:
            return stream.read()
    return Path(source).read_bytes()


def list_dirs(root: str) -> list[str]:
    """Names of the folders directly under `root` (none if it does not exist)."""
    if is_uri(root):
        import pyarrow.fs as pafs

        fs, path = filesystem(root)
        infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
        return [Path(i.path).name for i in infos if i.type == pafs.FileType.Directory]
    return [p.name for p in Path(root).glob("*") if p.is_dir()] if Path(root).is_dir() else []


def local_directory(uri_or_path: str, destination: str) -> str:
    """A local folder with the contents of `uri_or_path`: the path itself if it is local,
    else a copy made under `destination`."""
    if not is_uri(uri_or_path) and Path(uri_or_path).exists():
        return uri_or_path
    import pyarrow.fs as pafs

    fs, root = filesystem(uri_or_path)
    pafs.copy_files(root, destination, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    return destination


def local_file(uri: str, filename_in_directory: str) -> Path:
    """A local copy of the file at `uri` (or of `filename_in_directory` when `uri` is a folder),
    cached per URI, modification time and size, so a second call reads no bytes.

    Raises FileNotFoundError with a one-line reason when nothing is there.
    """
    import pyarrow.fs as pafs

    try:
        fs, remote = filesystem(uri)
        info = fs.get_file_info(remote)
    except Exception as exc:
        raise FileNotFoundError(
            f"nothing at {uri!r}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
        ) from None
    if info.type == pafs.FileType.Directory:
        remote = f"{remote.rstrip('/')}/{filename_in_directory}"
        info = fs.get_file_info(remote)
    if info.type != pafs.FileType.File:
        raise FileNotFoundError(f"nothing at {uri!r}: expected a folder holding {filename_in_directory} or the file")
    key = hashlib.sha256(f"{uri}:{info.mtime_ns}:{info.size}".encode()).hexdigest()[:16]
    local = Path(tempfile.gettempdir()) / "afm_ray_fetched" / key / Path(remote).name
    if not local.is_file():
        local.parent.mkdir(parents=True, exist_ok=True)
        tmp = local.with_suffix(".part")
        with fs.open_input_stream(remote) as src, open(tmp, "wb") as dst:
            dst.write(src.read())
        tmp.replace(local)
    return local


def probe_writable(root: str) -> None:
    """Write and delete a small probe object under `root`, locally or at a URI; raises OSError
    (or pyarrow's error) with the reason when that is not possible. A local `root` that does not
    exist yet is probed in its nearest existing parent, and nothing is left behind."""
    name = f".afm-ray-probe-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    if is_uri(root):
        fs, path = filesystem(root)
        fs.create_dir(path, recursive=True)
        with fs.open_output_stream(f"{path.rstrip('/')}/{name}") as out:
            out.write(b"probe")
        fs.delete_file(f"{path.rstrip('/')}/{name}")
        return
    folder = Path(root)
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    probe = folder / name
    probe.write_bytes(b"probe")
    probe.unlink()


def check_writable_file(path: str, label: str) -> None:
    """`path` can be written as a file: it is no directory and its folder takes writes (probed
    without leaving anything). A StorageError names `label` (the option that gave the path)."""
    if Path(path).is_dir():
        raise StorageError(f"{label} {path}: is a directory; expected a file name")
    try:
        probe_writable(str(Path(path).parent))
    except OSError as exc:
        raise StorageError(f"{label} {path}: its folder cannot be written ({one_line(exc)})") from None


def remove_tree(path: str) -> None:
    """Delete a folder and everything in it, locally or at a URI; nothing there is no error."""
    if is_uri(path):
        import pyarrow.fs as pafs

        fs, inner = filesystem(path)
        if fs.get_file_info(inner).type != pafs.FileType.NotFound:
            fs.delete_dir(inner)
        return
    shutil.rmtree(path, ignore_errors=True)
