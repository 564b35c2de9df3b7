"""Durable file replacement: the one atomic writer of the package.

:func:`write_atomic` writes a temporary file with a unique name in the target's directory, flushes and
fsyncs it, renames it over the target (``os.replace``: atomic on POSIX) and fsyncs the directory, so that
after a crash the path holds either the old bytes or the new ones, never a mix, and the rename itself
survives a power loss.
"""

from __future__ import annotations

import os
import tempfile

_UMASK = os.umask(0o022)  # reading the umask means setting it: once, at import, before any thread runs
os.umask(_UMASK)


def write_atomic(path: str | os.PathLike, data: bytes | str) -> None:
    """Replace ``path`` with ``data`` (str is written as UTF-8), atomically and durably."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    if isinstance(data, str):
        data = data.encode("utf-8")
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; a plain open() would have honoured the umask
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_dir(directory)


def fsync_file(path: str | os.PathLike) -> None:
    """Flush an existing file's data to disk."""
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def fsync_dir(path: str | os.PathLike) -> None:
    """Make the renames and creations inside directory ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


__all__ = ["fsync_dir", "fsync_file", "write_atomic"]
