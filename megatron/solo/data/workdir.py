"""The work directory ``OUT.partial/`` of a preprocessing run: lock, checkpoint, atomic installation.

Everything is built here; :meth:`WorkDir.install` renames the finished files into place (``OUT.stats.json``
last: its presence means the output is complete) and removes the directory. A killed run leaves it, with
its last checkpoint, for ``--resume``. An exclusive ``flock`` keeps a second run off the same prefix.
"""

from __future__ import annotations

import fcntl
import json
import os
import pickle
import shutil

from megatron.solo.data.packed_format import header_file, output_files
from megatron.solo.io import fsync_dir, fsync_file, write_atomic  # write_atomic: re-exported

WORK_SUFFIX = ".partial"
CHECKPOINT = "checkpoint.pkl"
LOCK = "lock"


class WorkDir:
    def __init__(self, prefix: str):
        self.prefix = prefix
        self.path = prefix + WORK_SUFFIX
        self.data_prefix = os.path.join(self.path, "data")
        self._lock = None

    def __enter__(self) -> WorkDir:
        return self

    def __exit__(self, *exc) -> None:
        if self._lock is not None:
            self._lock.close()

    def file(self, name: str) -> str:
        return os.path.join(self.path, name)

    def exists(self) -> bool:
        return os.path.isdir(self.path)

    def claim(self, resume: bool) -> bool:
        """Create (or, with ``resume``, reopen) and lock the directory; True if it held a run already."""
        existed = self.exists()
        if existed and not resume:
            raise RuntimeError(
                f"{self.path} holds an interrupted run: pass --resume to continue it, or delete it to start over"
            )
        os.makedirs(self.path, exist_ok=True)
        self._lock = open(self.file(LOCK), "a")
        try:
            fcntl.flock(self._lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RuntimeError(f"another preprocessing run is writing {self.prefix} (lock {self.file(LOCK)})") from None
        return existed

    def load(self):
        """The last checkpoint, or None (a run killed before its first one)."""
        if not os.path.exists(self.file(CHECKPOINT)):
            return None
        with open(self.file(CHECKPOINT), "rb") as f:
            return pickle.load(f)

    def save(self, state) -> None:
        write_atomic(self.file(CHECKPOINT), pickle.dumps(state, protocol=pickle.HIGHEST_PROTOCOL))

    def reset(self) -> None:
        """Remove everything but the lock: start over."""
        for name in os.listdir(self.path):
            if name != LOCK:
                os.unlink(self.file(name))

    def open_errors(self, size: int) -> TextAppender:
        """``errors.jsonl`` truncated to ``size`` bytes (its size at the checkpoint), open for appending."""
        f = open(self.file("errors.jsonl"), "a+b" if size else "wb")
        f.truncate(size)
        f.seek(size)
        return TextAppender(f)

    def install(self) -> dict:
        """Rename the finished files into place, the stats last; remove the directory; return the stats."""
        data = output_files(self.data_prefix) + [header_file(self.data_prefix)]
        moves = [(src, self.prefix + src[len(self.data_prefix) :]) for src in data]
        moves += [(self.file(name), self.prefix + "." + name) for name in ("errors.jsonl", "stats.json")]
        for src, dst in moves:
            if os.path.exists(src):  # absent: already moved by a run killed while installing
                fsync_file(src)  # the data must be on disk before its name says it is complete
                os.replace(src, dst)
        fsync_dir(os.path.dirname(os.path.abspath(self.prefix)))
        stats = read_stats(self.prefix)
        self.discard()
        return stats

    def discard(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def read_stats(prefix: str) -> dict | None:
    """``PREFIX.stats.json``, or None when there is none (or it is unreadable)."""
    try:
        with open(prefix + ".stats.json") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


class TextAppender:
    """A binary file written with str (UTF-8), so that its size is a byte offset to truncate back to."""

    def __init__(self, f):
        self._f = f

    def write(self, text: str) -> None:
        self._f.write(text.encode("utf-8"))

    def __getattr__(self, name):
        return getattr(self._f, name)


__all__ = ["CHECKPOINT", "WORK_SUFFIX", "TextAppender", "WorkDir", "read_stats", "write_atomic"]
