"""Documents → Packs of at most ``seq_length`` tokens, with document boundaries kept.

Policy (deterministic: a function of the document order only):

* **Fit.** A document with images longer than ``seq_length`` is truncated at ``seq_length``, or before the
  image the cut would split, so images stay whole (counted in ``truncated_documents``/``truncated_tokens``);
  if nothing learnable is left it is refused (``too_long``). It keeps no EOS: it did not end.
* **Split.** A text-only document longer than ``seq_length`` is cut into chunks of exactly ``seq_length``
  tokens (each one full pack) plus a remainder; chunks after the first start without BOS (``continuation``)
  and are their own documents for attention and positions.
* **Best fit over a bounded buffer.** Up to ``buffer_size`` packs stay open. A document goes into the open
  pack it fills best (least room left after it; the oldest on ties). If none has room, a new pack is
  opened, first closing the fullest open pack when the buffer is full. Full packs close at once. At the
  end (:meth:`Packer.flush`) the documents still open are re-packed first-fit decreasing.
  ``buffer_size=1`` is the reference's sequential greedy packer (without its overflow), which wastes on
  average half a document per pack.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from megatron.solo.data.encode import Document
from megatron.solo.data.errors import SampleError

DEFAULT_SEQ_LENGTH = 32768
DEFAULT_BUFFER_SIZE = 16


@dataclass(frozen=True, kw_only=True)
class PackConfig:
    seq_length: int = DEFAULT_SEQ_LENGTH
    """Most tokens in one pack (packs are stored unpadded; the loader pads)."""
    buffer_size: int = DEFAULT_BUFFER_SIZE
    """Open packs best-fit chooses among (memory and checkpoint size grow with it)."""

    def __post_init__(self):
        if not (isinstance(self.seq_length, int) and self.seq_length >= 8):
            raise ValueError(f"PackConfig.seq_length must be an int >= 8, got {self.seq_length!r}")
        if not (isinstance(self.buffer_size, int) and self.buffer_size >= 1):
            raise ValueError(f"PackConfig.buffer_size must be an int >= 1, got {self.buffer_size!r}")


@dataclass(frozen=True)
class Pack:
    documents: tuple[Document, ...]

    @property
    def length(self) -> int:
        return sum(len(d) for d in self.documents)


@dataclass
class _OpenPack:
    serial: int
    room: int
    documents: list[Document] = field(default_factory=list)


class Packer:
    """Streams documents into packs; picklable (its state is part of a preprocessing checkpoint)."""

    def __init__(self, config: PackConfig = PackConfig()):
        self.config = config
        self._open: list[_OpenPack] = []  # in opening order
        self._serial = 0
        self.truncated_documents = 0
        self.truncated_tokens = 0
        self.split_documents = 0
        self.continuation_chunks = 0

    def add(self, doc: Document) -> list[Pack]:
        """Place one document; returns the packs it completed. Raises ``too_long`` before changing state."""
        doc = self._fit(doc)
        seq = self.config.seq_length
        closed = []
        if len(doc) > seq:
            self.split_documents += 1
            while len(doc) > seq:
                closed.append(Pack((doc.head(seq),)))
                doc = doc.tail(seq)
                self.continuation_chunks += 1
        closed += self._place(doc)
        return closed

    def flush(self) -> list[Pack]:
        """Close every open pack. Their documents are re-packed first-fit decreasing, so that the end of the
        input leaves at most one pack under half full instead of up to ``buffer_size``; within each pack
        they keep their order in the buffer."""
        docs = [d for p in self._open for d in p.documents]
        self._open = []
        rooms: list[int] = []
        members: list[list[int]] = []
        for i in sorted(range(len(docs)), key=lambda i: -len(docs[i])):  # stable: deterministic
            k = next((k for k, room in enumerate(rooms) if room >= len(docs[i])), len(rooms))
            if k == len(rooms):
                rooms.append(self.config.seq_length)
                members.append([])
            rooms[k] -= len(docs[i])
            members[k].append(i)
        return [Pack(tuple(docs[i] for i in sorted(m))) for m in members]

    @property
    def open_packs(self) -> int:
        return len(self._open)

    def _fit(self, doc: Document) -> Document:
        seq = self.config.seq_length
        if len(doc) <= seq or not doc.images:
            return doc
        cut = doc.cut_before(seq)
        head = doc.head(cut)
        if not head.targets[1:].any():  # the first token of a document is never predicted
            raise SampleError(
                "too_long",
                doc.origin,
                f"{len(doc)} tokens > seq_length {seq}, and nothing to learn is left before the image at token {cut}",
            )
        self.truncated_documents += 1
        self.truncated_tokens += len(doc) - cut
        return head

    def _place(self, doc: Document) -> list[Pack]:
        n = len(doc)
        best = None
        for p in self._open:  # first of the smallest rooms that fit: the oldest on ties
            if p.room >= n and (best is None or p.room < best.room):
                best = p
        closed = []
        if best is None:
            if len(self._open) >= self.config.buffer_size:
                fullest = min(self._open, key=lambda p: p.room)
                self._open.remove(fullest)
                closed.append(Pack(tuple(fullest.documents)))
            best = _OpenPack(self._serial, self.config.seq_length)
            self._serial += 1
            self._open.append(best)
        best.documents.append(doc)
        best.room -= n
        if best.room == 0:
            self._open.remove(best)
            closed.append(Pack(tuple(best.documents)))
        return closed


__all__ = ["DEFAULT_BUFFER_SIZE", "DEFAULT_SEQ_LENGTH", "Pack", "PackConfig", "Packer"]
