"""Why a sample was skipped, and where it came from.

Every sample that does not make it into the output is described by a :class:`SampleError` with a
machine-readable ``reason`` (counted in ``PREFIX.stats.json``, listed in ``PREFIX.errors.jsonl``) and an
:class:`Origin` naming the input file and the line, key or item of the sample.
"""

from __future__ import annotations

import errno
import re
import traceback
from dataclasses import dataclass

from megatron.solo.image import ImageError

REASONS = ImageError.REASONS + (
    "malformed_json",  # a line / file / array item that is not valid JSON
    "non_utf8",  # text that is not valid UTF-8: undecodable bytes, lone surrogates ("\ud800"), undecodable names
    "missing_field",  # a required field (caption, conversations, text, image) is absent
    "bad_field",  # a field of the wrong type or shape, at any depth (a list where a string belongs, …)
    "unknown_role",  # a turn role other than system/user/assistant (or LLaVA's human/gpt)
    "empty_text",  # no text left after stripping whitespace (empty caption, empty document)
    "no_targets",  # nothing to learn: e.g. a conversation without an assistant turn
    "sliver",  # an image whose aspect ratio the size rule would distort by more than the allowed factor
    "remote_url",  # an http(s) image URL: preprocessing never downloads
    "outside_root",  # an image path (or a symlink on the way) that resolves outside the image root
    "symlink_loop",  # an image path or ImageNet entry whose symlinks form a loop
    "unreadable_file",  # an image file that exists but cannot be opened (permission denied, …)
    "image_tag_mismatch",  # LLaVA: the number of <image> tags differs from the number of images
    "unknown_class",  # ImageNet: a class folder missing from the class-names file
    "unreadable_input",  # an input file (or its compressed stream / tar archive) that cannot be read on
    "corrupt_input",  # a sample of a compressed input whose checksum (or stream) fails: none of it is trusted
    "too_long",  # a document with nothing to learn left once cut to seq_length / --max-sample-length
    "bad_record",  # any other failure while processing one record (the detail names the exception)
)
# Not a skip: a sample kept but cut to --max-sample-length; listed in PREFIX.errors.jsonl under this reason
# and counted in the stats (truncated_samples), never in "skipped".
TRUNCATED = "truncated"
# An OSError with one of these numbers is the record's (a bad path); any other (EIO, ENOSPC, …) is the disk's.
_RECORD_ERRNOS = {
    errno.ENOENT: "missing_file",
    errno.ENOTDIR: "missing_file",
    errno.ENAMETOOLONG: "missing_file",
    errno.EISDIR: "missing_file",
    errno.ELOOP: "symlink_loop",
    errno.EACCES: "unreadable_file",
    errno.EPERM: "unreadable_file",
}
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


@dataclass(frozen=True)
class Origin:
    """Where a sample comes from: the input file plus a 1-based ``line`` (JSONL), or a ``key``
    (tar key, image path under an ImageNet root, ``item N`` of a JSON array)."""

    file: str
    line: int | None = None
    key: str | None = None

    def __str__(self) -> str:
        if self.line is not None:
            return f"{self.file}:{self.line}"
        return f"{self.file}[{self.key}]" if self.key is not None else self.file

    def to_json(self) -> dict:
        if self.line is not None:
            return {"file": printable(self.file), "line": self.line}
        return {"file": printable(self.file), **({} if self.key is None else {"key": printable(self.key)})}


class SampleError(ValueError):
    """A sample that cannot be used. ``reason`` is one of :data:`REASONS`."""

    def __init__(self, reason: str, origin: Origin, detail: str):
        assert reason in REASONS, reason
        self.reason = reason
        self.origin = origin
        self.detail = _ADDRESS.sub("", detail)  # "<_io.BytesIO object at 0x7f…>": errors.jsonl must be reproducible
        super().__init__(f"{origin}: {reason.replace('_', ' ')}: {self.detail}")

    def __reduce__(self):  # crosses process boundaries (worker → parent) intact
        return type(self), (self.reason, self.origin, self.detail)

    def to_json(self) -> dict:
        """One line of ``PREFIX.errors.jsonl``."""
        return {**self.origin.to_json(), "reason": self.reason, "detail": printable(self.detail)}


class InputError(RuntimeError):
    """A failure that is not a record's (a disk error): it stops the run, naming the input."""


def printable(text: str) -> str:
    """``text`` with what UTF-8 cannot hold (lone surrogates, undecodable file names) as ``\\udcff``."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def record_failure(e: Exception, origin: Origin) -> SampleError:
    """The skip an exception raised while processing one record stands for: the one boundary between a
    record's failure and the run's. Raises :class:`InputError` for a disk error, which is not the record's."""
    if isinstance(e, SampleError):
        return e
    if isinstance(e, ImageError):
        return SampleError(e.reason, origin, str(e))
    detail = f"{type(e).__name__}: {e}"
    if isinstance(e, OSError) and e.errno is not None:
        if e.errno not in _RECORD_ERRNOS:
            raise InputError(f"{printable(str(origin))}: {printable(detail)}") from e
        return SampleError(_RECORD_ERRNOS[e.errno], origin, detail)
    if isinstance(e, UnicodeError):
        return SampleError("non_utf8", origin, detail)
    if isinstance(e, (TypeError, AttributeError, KeyError, IndexError, RecursionError)):
        return SampleError("bad_field", origin, f"{detail} ({_where(e)})")
    return SampleError("bad_record", origin, f"{detail} ({_where(e)})")


def _where(e: BaseException) -> str:
    """The innermost frame of ``e`` (file:line, no directories): where the record broke the code."""
    frames = traceback.extract_tb(e.__traceback__)
    return f"{frames[-1].filename.rsplit('/', 1)[-1]}:{frames[-1].lineno}" if frames else "?"


__all__ = ["REASONS", "TRUNCATED", "InputError", "Origin", "SampleError", "printable", "record_failure"]
