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

A pack holding HaploVL images (``layout`` "haplo" in the header) has the magic b"HPK1" and a 32-byte image
entry, 8 × u32: position (its first token), n_rows, n_cols (the patch grid of the stored canvas: the
anyres tiles, ``n_rows·P × n_cols·P`` pixels), top, left (the patches the unpadding drops at each end),
side (a tile's side in patches), codec, nbytes. Its patches (row-major over the unpadded grid) land on
``position + r·(cols + 1) + c`` (a newline position ends each row), and patch ``(r, c)`` of the canvas
grid uses row ``(r mod side)·side + c mod side`` of the per-tile position table.

Both datasets set ``document_indices = [0, 1, …, n_packs]`` (each item its own Megatron "document");
the documents *inside* a pack are ``doc_offsets``. An image's stored pixels are its size-rule-resized
RGB image (``n_rows·P`` × ``n_cols·P``); patch p of it (row-major) lands on token
``position + 1 + (p // n_cols)·(n_cols + 1) + p % n_cols``.

``PREFIX.pack.json`` (the header)
    What the bytes mean, as one JSON object (UTF-8, sorted keys), written once by the writer (atomically
    and durably: :func:`megatron.solo.io.write_atomic`) and checked by every reader::

        format          "solo-packed"
        format_version  1 (the record layout above; also the record magic's digit)
        token_dtype     "uint16" or "int32"
        patch_size      P, the side of a patch in pixels (32); a patch is 3·P·P values
        max_size        cap on an image's long side (1024)
        mean, std       the per-channel normalisation the loader applies: ``(x/255 - mean)/std``
        image_codec     the --image-format the images were stored with (each image's own codec is in its
                        table entry); image_quality: its quality
        tokenizer       the tokenizer fingerprint (:meth:`SoloTokenizer.fingerprint`): sha256 of its encoder
                        model, vocab_size, bos_id, eos_id, vision_ids
        layout          "solo" or "haplo": how images sit in the tokens (absent in older headers: "solo")

    A prefix without one (written before it existed) is read with the defaults (P=32, ImageNet mean/std)
    that every such prefix was written with, and a warning; a header with another ``format`` or
    ``format_version`` is refused.

Completion: ``PREFIX.stats.json`` is renamed into place last, after the data files and the header.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch
from megatron.core.datasets.indexed_dataset import DType, IndexedDataset, IndexedDatasetBuilder

from megatron.solo import image as _image
from megatron.solo.data import codec
from megatron.solo.data.packing import Pack
from megatron.solo.image import DEFAULT_CONFIG, ImageConfig
from megatron.solo.io import write_atomic

FORMAT = "solo-packed"
FORMAT_VERSION = 1
MAGIC = b"SPK%d" % FORMAT_VERSION
RECORD_SUFFIX = ".pack"
HEADER_SUFFIX = ".pack.json"
# What two prefixes of one blend must agree on (the codec may differ: each image names its own).
BLEND_FIELDS = ("patch_size", "mean", "std", "tokenizer", "layout")
HAPLO_MAGIC = b"HPK%d" % FORMAT_VERSION
HEADER = np.dtype([("magic", "S4"), ("n_tokens", "<u4"), ("n_docs", "<u4"), ("n_images", "<u4")])
IMAGE_ENTRY = np.dtype([("position", "<u4"), ("n_rows", "<u4"), ("n_cols", "<u4"), ("codec", "<u4"), ("nbytes", "<u4")])
HAPLO_IMAGE_ENTRY = np.dtype(
    [(name, "<u4") for name in ("position", "n_rows", "n_cols", "top", "left", "side", "codec", "nbytes")]
)


def output_files(prefix: str) -> list[str]:
    """The four files of a prefix, in the order they are renamed into place."""
    return [prefix + ".bin", prefix + ".idx", prefix + RECORD_SUFFIX + ".bin", prefix + RECORD_SUFFIX + ".idx"]


def token_dtype(vocab_size: int) -> type:
    """The smallest dtype megatron-core stores these token ids in (uint16 for SOLO's 33029)."""
    return DType.optimal_dtype(vocab_size)


# ---------------------------------------------------------------------------------------------
# The header


def header_file(prefix: str) -> str:
    return prefix + HEADER_SUFFIX


def make_header(
    dtype: type,
    image_config: ImageConfig = DEFAULT_CONFIG,
    *,
    image_codec: str = codec.DEFAULT_FORMAT,
    image_quality: int = codec.DEFAULT_QUALITY,
    tokenizer: dict | None = None,
    layout: str = "solo",
) -> dict:
    """The header of a prefix (see the module docstring); ``tokenizer``: ``SoloTokenizer.fingerprint()``."""
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "token_dtype": np.dtype(dtype).name,
        "patch_size": image_config.patch_size,
        "max_size": image_config.max_size,
        "mean": list(image_config.mean),
        "std": list(image_config.std),
        "image_codec": image_codec,
        "image_quality": image_quality,
        "tokenizer": tokenizer,
        "layout": layout,
    }


def read_header(prefix: str) -> dict:
    """The header of ``prefix``, checked; a header-less (older) prefix gets the defaults and a warning."""
    path = header_file(prefix)
    if not os.path.isfile(path):
        warnings.warn(
            f"{prefix}: no {os.path.basename(path)} (made before prefixes recorded their settings): "
            f"read with the defaults, patch_size {DEFAULT_CONFIG.patch_size} and ImageNet mean/std, which "
            f"is what such prefixes were made with; rerun tools/preprocess_mm_data.py to record them",
            UserWarning,
            stacklevel=3,
        )
        return {**make_header(np.uint16), "token_dtype": None, "image_codec": None, "image_quality": None}
    try:
        with open(path, encoding="utf-8") as f:
            header = json.load(f)
    except ValueError as e:
        raise ValueError(f"{path}: not a JSON header: {e}") from e
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise ValueError(
            f"{path}: format is {header.get('format') if isinstance(header, dict) else header!r}, expected {FORMAT!r}"
        )
    if header.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{path}: format_version is {header.get('format_version')!r}, this reader reads "
            f"{FORMAT_VERSION}: preprocess the data again with this version"
        )
    header.setdefault("layout", "solo")  # written before HaploVL's layout existed
    missing = [k for k in make_header(np.uint16) if k not in header]
    if missing:
        raise ValueError(f"{path}: field {missing[0]!r} is missing")
    return header


def header_image_config(header: dict, where: str) -> ImageConfig:
    """The :class:`ImageConfig` (patch size, normalisation) the header records."""
    try:
        return ImageConfig(
            patch_size=header["patch_size"],
            max_size=header["max_size"],
            mean=tuple(header["mean"]),
            std=tuple(header["std"]),
        )
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: {e}") from e


def header_mismatch(a: dict, b: dict, fields=BLEND_FIELDS) -> str | None:
    """The first of ``fields`` on which headers ``a`` and ``b`` disagree (``tokenizer.vocab_size`` for a
    tokenizer's), or None. An unknown tokenizer (None: an old prefix) agrees with any."""
    for name in fields:
        x, y = a.get(name), b.get(name)
        if name == "tokenizer" and (x is None or y is None):
            continue
        if isinstance(x, dict) and isinstance(y, dict):
            for key in sorted(set(x) | set(y)):
                if x.get(key) != y.get(key):
                    return f"{name}.{key}"
        elif x != y:
            return name
    return None


def _field(header: dict, name: str):
    value = header
    for part in name.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def check_header(header: dict, expected: dict, where: str, expected_from: str, fields=BLEND_FIELDS) -> None:
    """ValueError naming ``where`` and the field if ``header`` disagrees with ``expected`` on ``fields``."""
    name = header_mismatch(header, expected, fields)
    if name is not None:
        raise ValueError(
            f"{where}: {name} is {_field(header, name)!r}, but {expected_from} has {_field(expected, name)!r}"
        )


# ---------------------------------------------------------------------------------------------
# Writing


def encode_pack(pack: Pack, dtype: type) -> tuple[np.ndarray, np.ndarray]:
    """Pack → (token ids [n] in ``dtype``, the uint8 record)."""
    docs = pack.documents
    tokens = np.concatenate([d.tokens for d in docs]).astype(dtype)
    targets = np.concatenate([d.targets for d in docs])
    offsets = np.cumsum([0] + [len(d) for d in docs])
    images = [im.shifted(int(start)) for d, start in zip(docs, offsets) for im in d.images]
    haplo = {im.crop is not None for im in images}
    if len(haplo) > 1:
        raise ValueError("a pack mixes SOLO and HaploVL images")
    if haplo == {True}:
        header = np.array([(HAPLO_MAGIC, len(tokens), len(docs), len(images))], dtype=HEADER)
        rows = [(im.position, im.n_rows, im.n_cols, *im.crop, im.side, im.codec, len(im.data)) for im in images]
        table = np.array(rows, HAPLO_IMAGE_ENTRY)
    else:
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
        record[at : at + len(part)] = np.frombuffer(part, dtype=np.uint8)
        at += len(part)
    return tokens, record


class _Builder(IndexedDatasetBuilder):
    """megatron-core's builder, one item (and Megatron document) per pack, that can reopen a partly
    written ``.bin`` at a checkpointed size to resume.

    megatron-core 0.16.1's builder has no append mode (its ``__init__`` always truncates the ``.bin``, and
    ``add_index`` would copy every byte written so far at each resume), so a resumed builder lets the
    library initialise itself on ``os.devnull`` and then takes over only the state a checkpoint holds: the
    open ``.bin`` and the item lengths (``document_indices`` follow: one document per item).
    """

    def __init__(self, bin_path: str, dtype: type, resume: dict | None = None):
        if resume is None:
            super().__init__(bin_path, dtype=dtype)
            return
        super().__init__(os.devnull, dtype=dtype)
        self.data_file.close()
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

    def __init__(self, prefix: str, dtype: type, resume: dict | None = None, header: dict | None = None):
        self.prefix = prefix
        self.dtype = dtype
        self.header = header if header is not None else make_header(dtype)
        if self.header["token_dtype"] != np.dtype(dtype).name:
            raise ValueError(
                f"{prefix}: header token_dtype {self.header['token_dtype']} for {np.dtype(dtype).name} ids"
            )
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
        """Write both ``.idx`` files (the ``.bin`` files are complete once every pack is written) and the header."""
        self._tokens.finalize(self.prefix + ".idx")
        self._records.finalize(self.prefix + RECORD_SUFFIX + ".idx")
        write_atomic(header_file(self.prefix), json.dumps(self.header, sort_keys=True, indent=1) + "\n")


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
    crop: tuple[int, int] | None = None
    """HaploVL layout: (top, left) patches dropped at each end by the unpadding (None: SOLO's layout)."""
    side: int = 0
    """HaploVL layout: a tile's side in patches."""

    @property
    def grid(self) -> tuple[int, int]:
        """(rows, cols) of the patches that reach the sequence."""
        if self.crop is None:
            return self.n_rows, self.n_cols
        return self.n_rows - 2 * self.crop[0], self.n_cols - 2 * self.crop[1]

    @property
    def num_tokens(self) -> int:
        if self.crop is None:
            return _image.layout_length(self.n_rows, self.n_cols)
        rows, cols = self.grid
        return rows * (cols + 1)

    @property
    def n_patches(self) -> int:
        rows, cols = self.grid
        return rows * cols

    def patch_positions(self) -> np.ndarray:
        """int64 [n_patches]: the token index of the ``<vpatch>`` each patch (row-major) lands on."""
        rows, cols = self.grid
        first = self.position + (1 if self.crop is None else 0)  # SOLO: after <vision>
        row_starts = np.arange(rows, dtype=np.int64)[:, None] * (cols + 1)
        return (first + row_starts + np.arange(cols, dtype=np.int64)).reshape(-1)

    def tile_rows(self) -> np.ndarray:
        """int64 [n_patches]: each sequence patch's row in :meth:`tile_patches_uint8` (HaploVL): tile-major,
        ``tile·side² + (r mod side)·side + c mod side`` over the canvas grid."""
        rows, cols = self.grid
        r = np.arange(rows, dtype=np.int64)[:, None] + self.crop[0]
        c = np.arange(cols, dtype=np.int64)[None, :] + self.crop[1]
        tile = (r // self.side) * (self.n_cols // self.side) + c // self.side
        return (tile * self.side * self.side + (r % self.side) * self.side + c % self.side).reshape(-1)

    def tile_patches_uint8(self, patch_size: int) -> np.ndarray:
        """uint8 [tiles·side², 3·P·P]: every patch of the stored canvas (the unpadding's too), tile after tile,
        each tile's patches row-major: what the stage-1 vision teacher sees, a tile at a time (HaploVL)."""
        pixels = codec.decode_image(self.data, self.codec, self.n_cols * patch_size, self.n_rows * patch_size)
        grid = _image.patchify_uint8(pixels, patch_size)  # [n_rows·n_cols, D], row-major over the canvas
        s, th, tw = self.side, self.n_rows // self.side, self.n_cols // self.side
        return grid.reshape(th, s, tw, s, -1).transpose(0, 2, 1, 3, 4).reshape(th * tw * s * s, -1)

    def table_index(self) -> np.ndarray:
        """int64 [n_patches]: each patch's row of the per-tile position table (HaploVL; -1 for SOLO): its
        :meth:`tile_rows` entry within its tile."""
        if self.crop is None:
            return np.full(self.n_patches, -1, dtype=np.int64)
        return self.tile_rows() % (self.side * self.side)

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

    @property
    def image_spans(self) -> np.ndarray | None:
        """int64 [n_images, 2]: ``[start, end)`` of each HaploVL image (its bidirectional block); None for
        SOLO's layout (causal everywhere)."""
        if not any(im.crop is not None for im in self.images):
            return None
        return np.array([(im.position, im.position + im.num_tokens) for im in self.images], dtype=np.int64)

    @property
    def patch_table_index(self) -> np.ndarray | None:
        """int64 [n_patches]: each patch's row of the per-tile position table (HaploVL); None for SOLO."""
        if not any(im.crop is not None for im in self.images):
            return None
        return np.concatenate([im.table_index() for im in self.images])

    def teacher_inputs(self) -> tuple[np.ndarray, np.ndarray]:
        """HaploVL stage 1: (uint8 [tiles·side², 3·P·P] every image's whole tiles, image after image; int64
        [n_patches] each sequence patch's row in them). ``tiles[rows]`` is :meth:`patches_uint8`, byte for
        byte: the loader takes the patches from there rather than decoding every image twice."""
        patch_size, parts, rows, offset = self.image_config.patch_size, [], [], 0
        for im in self.images:
            if im.crop is None:
                raise ValueError("teacher inputs: a SOLO image (no tiles)")
            parts.append(im.tile_patches_uint8(patch_size))
            rows.append(im.tile_rows() + offset)
            offset += len(parts[-1])
        if not parts:
            return np.zeros((0, self.image_config.patch_dim), np.uint8), np.zeros(0, np.int64)
        return np.concatenate(parts), np.concatenate(rows)

    def patches_uint8(self) -> np.ndarray:
        """uint8 [n_patches, 3·P·P]: every image decoded and patchified, pixels as stored (what the loader
        ships; the trainer normalises them on the device)."""
        return decode_patches(self.images, self.image_config.patch_size)

    def patches(self) -> np.ndarray:
        """float32 [n_patches, 3·P·P]: :meth:`patches_uint8` normalised (the front end's output)."""
        return _image.normalize_patches(self.patches_uint8(), self.image_config)


def decode_patches(images, patch_size: int) -> np.ndarray:
    """uint8 [Σ n_rows·n_cols, 3·P·P]: stored images (anything with n_rows, n_cols, codec, data: a
    :class:`PackedImage` or an ``encode.EncodedImage``) decoded and patchified, image by image, row-major."""
    out = np.empty((sum(im.n_patches for im in images), 3 * patch_size * patch_size), dtype=np.uint8)
    start = 0
    for im in images:
        pixels = codec.decode_image(im.data, im.codec, im.n_cols * patch_size, im.n_rows * patch_size)
        crop = getattr(im, "crop", None)
        if crop is not None:  # HaploVL: only the unpadded grid's patches reach the sequence
            (top, left), (rows, cols) = crop, im.grid
            p = patch_size
            pixels = np.ascontiguousarray(pixels[top * p : (top + rows) * p, left * p : (left + cols) * p])
        _image.patchify_uint8(pixels, patch_size, out=out[start : start + im.n_patches])
        start += im.n_patches
    return out


class PackedDataset:
    """Read-only access to a preprocessed prefix: ``len(ds)`` packs, ``ds[i]`` → :class:`PackView`."""

    def __init__(self, prefix: str):
        missing = [p for p in output_files(prefix) if not os.path.isfile(p)]
        if missing:
            raise FileNotFoundError(f"{prefix}: not a preprocessed prefix, missing {', '.join(missing)}")
        self.prefix = prefix
        self.header = read_header(prefix)
        """The prefix's header (module docstring); patch size and normalisation come from it."""
        self.image_config = header_image_config(self.header, header_file(prefix))
        self._tokens = IndexedDataset(prefix)
        self._records = IndexedDataset(prefix + RECORD_SUFFIX)
        if len(self._tokens) != len(self._records) or self._records.index.dtype != np.uint8:
            raise ValueError(f"{prefix}: {prefix}.bin and {prefix}{RECORD_SUFFIX}.bin do not belong together")
        stored = np.dtype(self._tokens.index.dtype).name
        if self.header["token_dtype"] not in (None, stored):
            raise ValueError(
                f"{header_file(prefix)}: token_dtype is {self.header['token_dtype']!r}, but {prefix}.idx holds {stored}"
            )

    def check_tokenizer(self, fingerprint: dict, name: str = "the tokenizer") -> None:
        """ValueError naming the prefix and field if the data was made with another tokenizer (unknown for
        a header-less prefix: not checked)."""
        check_header(self.header, {"tokenizer": fingerprint}, header_file(self.prefix), name, ("tokenizer",))

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
        # Copies, not views of the memory map: megatron-core unmaps its files when an IndexedDataset is collected,
        # and an array taken from a view (``ds[i].tokens``) must not read freed memory then. A pack is small
        # beside the decoding of its images.
        return view_pack_record(
            np.array(self._tokens[i]), np.array(self._records[i]), self.image_config, where=f"{self.prefix} pack {i}"
        )

    def __iter__(self):
        return (self[i] for i in range(len(self)))


def view_pack_record(
    tokens: np.ndarray,
    record: np.ndarray,
    image_config: ImageConfig = DEFAULT_CONFIG,
    where: str = "record",
) -> PackView:
    """Token ids + the uint8 record of one pack → :class:`PackView` (no image is decoded; the view's arrays
    are views of ``tokens`` and ``record``)."""
    buf = memoryview(record)
    header = np.frombuffer(buf, HEADER, count=1)[0]
    haplo = header["magic"] == HAPLO_MAGIC
    if header["magic"] not in (MAGIC, HAPLO_MAGIC) or header["n_tokens"] != len(tokens):
        raise ValueError(
            f"{where}: corrupt record (magic {header['magic']!r}, {header['n_tokens']} tokens for {len(tokens)} ids)"
        )
    n, n_docs, n_images = int(header["n_tokens"]), int(header["n_docs"]), int(header["n_images"])
    at = HEADER.itemsize
    offsets = np.frombuffer(buf, "<u4", count=n_docs + 1, offset=at).astype(np.int64)
    at += 4 * (n_docs + 1)
    table = np.frombuffer(buf, HAPLO_IMAGE_ENTRY if haplo else IMAGE_ENTRY, count=n_images, offset=at)
    at += table.nbytes
    nbits = (n + 7) // 8
    targets = np.unpackbits(np.frombuffer(buf, np.uint8, count=nbits, offset=at), count=n, bitorder="little")
    at += nbits
    images = []
    for entry in table:
        size = int(entry["nbytes"])
        images.append(
            PackedImage(
                int(entry["position"]),
                int(entry["n_rows"]),
                int(entry["n_cols"]),
                int(entry["codec"]),
                buf[at : at + size],
                (int(entry["top"]), int(entry["left"])) if haplo else None,
                int(entry["side"]) if haplo else 0,
            )
        )
        at += size
    return PackView(tokens, targets.view(bool), offsets, tuple(images), image_config)


__all__ = [
    "BLEND_FIELDS",
    "FORMAT_VERSION",
    "HEADER_SUFFIX",
    "MAGIC",
    "PackView",
    "PackWriter",
    "PackedDataset",
    "PackedImage",
    "check_header",
    "decode_patches",
    "encode_pack",
    "header_file",
    "header_mismatch",
    "make_header",
    "output_files",
    "read_header",
    "view_pack_record",
    "token_dtype",
]
