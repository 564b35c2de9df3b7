"""Why a sample was skipped, and where it came from.

Every sample that does not make it into the output is described by a :class:`SampleError` with a
machine-readable ``reason`` (counted in ``PREFIX.stats.json``, listed in ``PREFIX.errors.jsonl``) and an
:class:`Origin` naming the input file and the line, key or item of the sample.
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron.solo.image import ImageError

REASONS = ImageError.REASONS + (
    "malformed_json",  # a line / file that is not valid JSON
    "non_utf8",  # bytes that are not UTF-8 where text is expected
    "missing_field",  # a required field (caption, conversations, text, image) is absent
    "bad_field",  # a field of the wrong type or shape (content neither text nor parts, unknown part type, …)
    "unknown_role",  # a turn role other than system/user/assistant (or LLaVA's human/gpt)
    "empty_text",  # no text left after stripping whitespace (empty caption, empty document)
    "no_targets",  # nothing to learn: e.g. a conversation without an assistant turn
    "sliver",  # an image whose aspect ratio the size rule would distort by more than the allowed factor
    "remote_url",  # an http(s) image URL: preprocessing never downloads
    "image_tag_mismatch",  # LLaVA: the number of <image> tags differs from the number of images
    "unknown_class",  # ImageNet: a class folder missing from the class-names file
    "unreadable_input",  # an input file (or its compressed stream / tar archive) that cannot be read on
    "too_long",  # a document that cannot fit in seq_length even truncated after an image
)


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
        where = {"line": self.line} if self.line is not None else {"key": self.key} if self.key is not None else {}
        return {"file": self.file, **where}


class SampleError(ValueError):
    """A sample that cannot be used. ``reason`` is one of :data:`REASONS`."""

    def __init__(self, reason: str, origin: Origin, detail: str):
        assert reason in REASONS, reason
        self.reason = reason
        self.origin = origin
        self.detail = detail
        super().__init__(f"{origin}: {reason.replace('_', ' ')}: {detail}")

    def __reduce__(self):  # crosses process boundaries (worker → parent) intact
        return type(self), (self.reason, self.origin, self.detail)

    def to_json(self) -> dict:
        """One line of ``PREFIX.errors.jsonl``."""
        return {**self.origin.to_json(), "reason": self.reason, "detail": self.detail}


__all__ = ["REASONS", "Origin", "SampleError"]
