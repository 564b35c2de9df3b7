"""The on-disk format of a preprocessed prefix, its writer and its reader.

A prefix ``PREFIX`` is two megatron-core indexed datasets (``IndexedDatasetBuilder`` / ``IndexedDataset``,
header ``MMIDIDX``), each with one item per pack, item i of both describing pack i:

``PREFIX.bin`` / ``PREFIX.idx``
    The token ids of the pack, unpadded (``n ≤ seq_length``), dtype ``uint16`` (``int32`` for
    vocabularies of 65,500 or more, megatron-core's ``DType.optimal_dtype``). A plain Megatron token
    dataset: ``IndexedDataset(PREFIX)[i]`` is pack i's ids.

``PREFIX.pack.bin`` / ``PREFIX.pack.idx``
    dtype ``uint8``; item i is the pack's *record*, little-endian::

        offset          size            field
        0               4               magic b"SPK1" (format version 1)
        4               4    u32        n_tokens (= len(PREFIX item i))
        8               4    u32        n_docs
        12              4    u32        n_images
        16              4·(n_docs+1)    u32 doc_offsets: start of each document, then n_tokens
        …               20·n_images     image table, per image 5 × u32: position (index of its <vision>
                                        token), n_rows, n_cols, codec (see codec.py), nbytes
        …               ⌈n_tokens/8⌉    targets, one bit per token (numpy packbits, little bit order)
        …               Σ nbytes        the images' stored bytes, in table order

Both datasets set ``document_indices = [0, 1, …, n_packs]`` (each item its own Megatron "document");
the documents *inside* a pack are ``doc_offsets``. An image's stored pixels are its size-rule-resized
RGB image (``n_rows·P`` × ``n_cols·P``); patch p of it (row-major) lands on token
``position + 1 + (p // n_cols)·(n_cols + 1) + p % n_cols``.

Completion: ``PREFIX.stats.json`` is renamed into place last, after all four files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import torch
from megatron.core.datasets.indexed_dataset import DType, IndexedDataset, IndexedDatasetBuilder

from megatron.solo import image as _image
from megatron.solo.data import codec
from megatron.solo.data.packing import Pack
from megatron.solo.image import DEFAULT_CONFIG, ImageConfig

MAGIC = b"SPK1"
RECORD_SUFFIX = ".pack"
HEADER = np.dtype([("magic", "S4"), ("n_tokens", "<u4"), ("n_docs", "<u4"), ("n_images", "<u4")])
IMAGE_ENTRY = np.dtype([("position", "<u4"), ("n_rows", "<u4"), ("n_cols", "<u4"), ("codec", "<u4"), ("nbytes", "<u4")])


def output_files(prefix: str) -> list[str]:
    """The four files of a prefix, in the order they are renamed into place."""
    return [prefix + ".bin", prefix + ".idx", prefix + RECORD_SUFFIX + ".bin", prefix + RECORD_SUFFIX + ".idx"]


def token_dtype(vocab_size: int) -> type:
    """The smallest dtype megatron-core stores these token ids in (uint16 for SOLO's 33029)."""
    return DType.optimal_dtype(vocab_size)


# ---------------------------------------------------------------------------------------------
# Writing


def encode_pack(pack: Pack, dtype: type) -> tuple[np.ndarray, np.ndarray]:
    """Pack → (token ids [n] in ``dtype``, the uint8 record)."""
    docs = pack.documents
    tokens = np.concatenate([d.tokens for d in docs]).astype(dtype)
    targets = np.concatenate([d.targets for d in docs])
    offsets = np.cumsum([0] + [len(d) for d in docs])
    images = [im.shifted(int(start)) for d, start in zip(docs, offsets) for im in d.images]
    header = np.array([(MAGIC, len(tokens), len(docs), len(images))], dtype=HEADER)
    table = np.array([(im.position, im.n_rows, im.n_cols, im.codec, len(im.data)) for im in images], IMAGE_ENTRY)
    parts = [
        header.tobytes(),
        offsets.astype("<u4").tobytes(),
        table.tobytes(),
        np.packbits(targets, bitorder="little").tobytes(),
        *(im.data for im in images),
    ]
    record = np.empty(sum(len(p) for p in parts), dtype=np.uint8)  # writable: torch.from_numpy wants that
    at = 0
    for part in parts:
        record[at:at + len(part)] = np.frombuffer(part, dtype=np.uint8)
        at += len(part)
    return tokens, record


class _Builder(IndexedDatasetBuilder):
    """megatron-core's builder, one item (and Megatron document) per pack, that can reopen a partly
    written ``.bin`` at a checkpointed size to resume (the stock one always truncates to 0)."""

    def __init__(self, bin_path: str, dtype: type, resume: dict | None = None):
        if resume is None:
            super().__init__(bin_path, dtype=dtype)
            return
        self._open = open
        self.dtype = dtype
        self.multimodal = False
        self.sequence_modes = None
        self.sequence_lengths = list(resume["sequence_lengths"])
        self.document_indices = list(range(len(self.sequence_lengths) + 1))
        self.data_file = open(bin_path, "r+b")
        self.data_file.truncate(resume["nbytes"])  # drops whatever was written after the checkpoint
        self.data_file.seek(0, os.SEEK_END)

    def add_pack_item(self, array: np.ndarray) -> None:
        self.add_item(torch.from_numpy(array))
        self.end_document()

    def checkpoint(self) -> dict:
        """Flush to disk and return what :meth:`__init__` needs to resume here."""
        self.data_file.flush()
        os.fsync(self.data_file.fileno())
        return {"nbytes": self.data_file.tell(), "sequence_lengths": list(self.sequence_lengths)}


class PackWriter:
    """Appends packs to ``prefix`` (the four files of :func:`output_files`); resumable from :meth:`checkpoint`."""

    def __init__(self, prefix: str, dtype: type, resume: dict | None = None):
        self.prefix = prefix
        self.dtype = dtype
        resume = resume or {}
        self._tokens = _Builder(prefix + ".bin", dtype, resume.get("tokens"))
        self._records = _Builder(prefix + RECORD_SUFFIX + ".bin", np.uint8, resume.get("records"))

    def __len__(self) -> int:
        return len(self._tokens.sequence_lengths)

    def write(self, pack: Pack) -> int:
        """Append one pack; returns its record's size in bytes."""
        tokens, record = encode_pack(pack, self.dtype)
        self._tokens.add_pack_item(tokens)
        self._records.add_pack_item(record)
        return len(record)

    def checkpoint(self) -> dict:
        return {"tokens": self._tokens.checkpoint(), "records": self._records.checkpoint()}

    def finalize(self) -> None:
        """Write both ``.idx`` files (the ``.bin`` files are complete once every pack is written)."""
        self._tokens.finalize(self.prefix + ".idx")
        self._records.finalize(self.prefix + RECORD_SUFFIX + ".idx")


# ---------------------------------------------------------------------------------------------
# Reading


@dataclass(frozen=True)
class PackedImage:
    """One image of a pack (its bytes are decoded only on request)."""

    position: int
    """Token index of its ``<vision>`` token in the pack."""
    n_rows: int
    n_cols: int
    codec: int
    data: memoryview
    _owner: object = field(default=None, repr=False, compare=False)
    """Keeps the memory map alive: megatron-core unmaps its files when the dataset object is collected."""

    @property
    def num_tokens(self) -> int:
        return _image.layout_length(self.n_rows, self.n_cols)

    @property
    def n_patches(self) -> int:
        return self.n_rows * self.n_cols

    def patch_positions(self) -> np.ndarray:
        """int64 [n_patches]: the token index of the ``<vpatch>`` each patch (row-major) lands on."""
        rows = np.arange(self.n_rows, dtype=np.int64)[:, None] * (self.n_cols + 1)
        return (self.position + 1 + rows + np.arange(self.n_cols, dtype=np.int64)).reshape(-1)

    def pixels(self, patch_size: int = _image.PATCH_SIZE) -> np.ndarray:
        """The stored (resized) image: uint8 [n_rows·P, n_cols·P, 3]."""
        return codec.decode_image(self.data, self.codec, self.n_cols * patch_size, self.n_rows * patch_size)


@dataclass(frozen=True)
class PackView:
    """Pack i of a :class:`PackedDataset`. Arrays are read-only views of the memory-mapped files."""

    tokens: np.ndarray
    """[n] token ids in the on-disk dtype (uint16), n ≤ seq_length (unpadded)."""
    targets: np.ndarray
    """bool [n]: token i is to be predicted (the loader's ``loss_mask[t] = targets[t+1]`` within a document)."""
    doc_offsets: np.ndarray
    """int64 [n_docs + 1]: start of each document, then n."""
    images: tuple[PackedImage, ...]
    image_config: ImageConfig = DEFAULT_CONFIG
    _owner: object = field(default=None, repr=False, compare=False)
    """Keeps the memory map alive while this view exists (see :class:`PackedImage`)."""

    @property
    def n_docs(self) -> int:
        return len(self.doc_offsets) - 1

    @property
    def n_patches(self) -> int:
        return sum(im.n_patches for im in self.images)

    @cached_property
    def patch_positions(self) -> np.ndarray:
        """int64 [n_patches]: token index of the ``<vpatch>`` of each patch, image by image (cheap)."""
        if not self.images:
            return np.zeros(0, dtype=np.int64)
        return np.concatenate([im.patch_positions() for im in self.images])

    def patches(self) -> np.ndarray:
        """float32 [n_patches, 3·P·P]: decode every image and patchify it (the front end's output)."""
        cfg = self.image_config
        out = np.empty((self.n_patches, cfg.patch_dim), dtype=np.float32)
        start = 0
        for im in self.images:
            out[start:start + im.n_patches] = _image.normalize_patches(
                _image.patchify_uint8(im.pixels(cfg.patch_size), cfg.patch_size), cfg
            )
            start += im.n_patches
        return out


class PackedDataset:
    """Read-only access to a preprocessed prefix: ``len(ds)`` packs, ``ds[i]`` → :class:`PackView`."""

    def __init__(self, prefix: str, image_config: ImageConfig = DEFAULT_CONFIG):
        missing = [p for p in output_files(prefix) if not os.path.isfile(p)]
        if missing:
            raise FileNotFoundError(f"{prefix}: not a preprocessed prefix, missing {', '.join(missing)}")
        self.prefix = prefix
        self.image_config = image_config
        self._tokens = IndexedDataset(prefix)
        self._records = IndexedDataset(prefix + RECORD_SUFFIX)
        if len(self._tokens) != len(self._records) or self._records.index.dtype != np.uint8:
            raise ValueError(f"{prefix}: {prefix}.bin and {prefix}{RECORD_SUFFIX}.bin do not belong together")

    def __len__(self) -> int:
        return len(self._tokens)

    @property
    def sequence_lengths(self) -> np.ndarray:
        """int32 [n_packs]: tokens per pack (a copy: it outlives the dataset)."""
        return np.array(self._tokens.sequence_lengths)

    def __getitem__(self, i: int) -> PackView:
        if not -len(self) <= i < len(self):
            raise IndexError(f"pack {i} out of range (0..{len(self) - 1})")
        i = int(i) % len(self)
        return parse_record(self._tokens[i], self._records[i], self.image_config, where=f"{self.prefix} pack {i}",
                            owner=self)

    def __iter__(self):
        return (self[i] for i in range(len(self)))


def parse_record(tokens: np.ndarray, record: np.ndarray, image_config: ImageConfig = DEFAULT_CONFIG,
                 where: str = "record", owner: object = None) -> PackView:
    """Token ids + the uint8 record of one pack → :class:`PackView` (no image is decoded).

    ``owner``: whatever must stay alive for ``tokens`` and ``record`` to stay valid (the dataset).
    """
    buf = memoryview(record)
    header = np.frombuffer(buf, HEADER, count=1)[0]
    if header["magic"] != MAGIC or header["n_tokens"] != len(tokens):
        raise ValueError(f"{where}: corrupt record (magic {header['magic']!r}, {header['n_tokens']} tokens "
                         f"for {len(tokens)} ids)")
    n, n_docs, n_images = int(header["n_tokens"]), int(header["n_docs"]), int(header["n_images"])
    at = HEADER.itemsize
    offsets = np.frombuffer(buf, "<u4", count=n_docs + 1, offset=at).astype(np.int64)
    at += 4 * (n_docs + 1)
    table = np.frombuffer(buf, IMAGE_ENTRY, count=n_images, offset=at)
    at += table.nbytes
    nbits = (n + 7) // 8
    targets = np.unpackbits(np.frombuffer(buf, np.uint8, count=nbits, offset=at), count=n, bitorder="little")
    at += nbits
    images = []
    for entry in table:
        size = int(entry["nbytes"])
        images.append(PackedImage(int(entry["position"]), int(entry["n_rows"]), int(entry["n_cols"]),
                                  int(entry["codec"]), buf[at:at + size], owner))
        at += size
    return PackView(tokens, targets.view(bool), offsets, tuple(images), image_config, owner)


__all__ = [
    "MAGIC",
    "PackView",
    "PackWriter",
    "PackedDataset",
    "PackedImage",
    "encode_pack",
    "output_files",
    "parse_record",
    "token_dtype",
]
