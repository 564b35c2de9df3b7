"""Input files → :class:`RawRecord`: finding the inputs, detecting their format, cutting them into records.

This runs in the driver, in input order, and is cheap on purpose: a JSONL line stays bytes, a WebDataset
key stays its members' bytes, an ImageNet image stays a path. Parsing and everything expensive happens in
the workers (:mod:`~megatron.solo.data.samples`). Every reader can start mid-file (``start`` of
:func:`iter_records`) without parsing what it skips: that is how ``--resume`` continues.

Inputs: JSON Lines (``.jsonl``, or anything not ``.json``) and JSON arrays (``.json``), both optionally
``.gz``/``.zst`` compressed; tar shards (``.tar``, ``.tar.gz``, ``.tgz``, ``.tar.bz2``, ``.tar.xz``) for
``webdataset``; directories of class folders for ``imagenet``, read in a seeded random order (``shuffle_seed``)
because packs are cut in input order: class by class, every pack would hold one class. Blank lines are not records. A file that
cannot be read on (a corrupt compressed stream, a truncated tar) yields one ``unreadable_input`` error
where reading stopped. See :mod:`~megatron.solo.data.samples` for the record shapes of each format.
"""

from __future__ import annotations

import codecs
import glob
import gzip
import io
import json
import os
import tarfile
import zlib
from pathlib import Path
from typing import Any, BinaryIO, Iterable, Iterator, NamedTuple

import numpy as np
import zstandard

from megatron.solo.data.errors import Origin, SampleError

FORMATS = ("chat", "llava", "caption", "webdataset", "imagenet", "text")
IMAGENET_EXTS = (".jpeg", ".jpg", ".png", ".webp")
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")
PEEK_BYTES = 1 << 20
# What a damaged file raises while being read: gzip (OSError, EOFError), zlib, zstd, tarfile (OSError).
READ_ERRORS = (OSError, EOFError, zlib.error, zstandard.ZstdError)


class RawRecord(NamedTuple):
    """One not-yet-parsed sample, as cheap to cut out of its file as possible."""

    origin: Origin
    payload: Any
    """bytes (a JSONL line), a parsed JSON item, {ext: bytes} (a WebDataset key) or (path, class name)."""


# ---------------------------------------------------------------------------------------------
# Finding inputs and their format


def resolve_inputs(patterns: Iterable[str]) -> list[str]:
    """Files, directories and globs (``**`` allowed) → paths, in argument order, globs sorted, no repeats."""
    paths: dict[str, None] = {}  # ordered, no repeats
    for pattern in patterns:
        if glob.has_magic(pattern):
            matches = sorted(glob.glob(pattern, recursive=True))
            if not matches:
                raise FileNotFoundError(f"--input {pattern!r}: no file matches")
        elif os.path.exists(pattern):
            matches = [pattern]
        else:
            raise FileNotFoundError(f"--input {pattern!r}: no such file or directory")
        paths.update(dict.fromkeys(matches))
    return list(paths)


def detect_format(paths: list[str]) -> str:
    """The one format all ``paths`` share; ValueError naming the file where it is ambiguous or differs."""
    found: dict[str, str] = {}
    for path in paths:
        fmt = _detect_one(path)
        if fmt is None:
            raise ValueError(f"{path}: cannot tell its input format from its first record: pass --input-format")
        found.setdefault(fmt, path)
    if len(found) > 1:
        raise ValueError(f"inputs have different formats ({found}): pass --input-format and one format per run")
    return next(iter(found))


def _detect_one(path: str) -> str | None:
    if os.path.isdir(path):
        return "imagenet"
    if path.lower().endswith(TAR_SUFFIXES):
        return "webdataset"
    try:
        first = _peek_first_item(path)
    except (*READ_ERRORS, ValueError, RecursionError) as e:
        raise ValueError(f"{path}: cannot read its first record to detect the format: {e}") from e
    return classify(first)


def classify(obj: Any) -> str | None:
    """The format a parsed JSON record belongs to, or None when its shape is ambiguous."""
    if isinstance(obj, list):
        return "chat"
    if not isinstance(obj, dict):
        return None
    if "messages" in obj or ("role" in obj and "content" in obj):
        return "chat"
    conversations = obj.get("conversations")
    if isinstance(conversations, list) and conversations and isinstance(conversations[0], dict):
        return "llava" if "from" in conversations[0] else "chat" if "role" in conversations[0] else None
    has_image = "image" in obj or "image_path" in obj
    if has_image and ("caption" in obj or "text" in obj):
        return "caption"
    if not has_image and isinstance(obj.get("text"), str):
        return "text"
    return None


def _peek_first_item(path: str) -> Any:
    with open_binary(path) as f:
        if _is_json_array(path):
            return next(_json_items(f), None)
        line = next((line for line in f if line.strip()), b"")  # whole, however long (data URLs)
    return json.loads(line)


# ---------------------------------------------------------------------------------------------
# Reading records


def open_binary(path: str) -> BinaryIO:
    """A binary reader that decompresses ``.gz`` and ``.zst`` transparently."""
    lower = path.lower()
    if lower.endswith(".gz"):
        return gzip.open(path, "rb")
    if lower.endswith(".zst"):
        raw = open(path, "rb")
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw, closefd=True))
    return open(path, "rb")


def iter_records(
    paths: list[str],
    fmt: str,
    *,
    start: tuple[int, int] = (0, 0),
    class_names: dict[str, str] | None = None,
    shuffle_seed: int | None = 0,
) -> Iterator[tuple[tuple[int, int], RawRecord | SampleError]]:
    """((file index, record index in file), record) in input order, from position ``start`` on.

    ``shuffle_seed``: the seed of an ImageNet root's image order (None: sorted, class by class).

    A file that cannot be read on (a corrupt compressed stream, a damaged tar) yields one
    ``unreadable_input`` error where reading stopped, then the next file is read.
    """
    first_file, skip = start
    for i in range(first_file, len(paths)):
        records = _file_records(paths[i], fmt, class_names, skip if i == first_file else 0, shuffle_seed)
        for k, record in records:
            yield (i, k), record


def _file_records(path: str, fmt: str, class_names, skip: int,
                  shuffle_seed: int | None = None) -> Iterator[tuple[int, RawRecord | SampleError]]:
    if fmt == "imagenet":
        if class_names is None:
            raise ValueError("the imagenet format needs a class-names file (--class-names)")
        return _imagenet_records(path, class_names, skip, shuffle_seed)
    if fmt == "webdataset":
        return _tar_records(path, skip)
    if _is_json_array(path):
        return _json_array_records(path, skip)
    return _jsonl_records(path, skip)


def _is_json_array(path: str) -> bool:
    lower = path.lower()
    for suffix in (".gz", ".zst"):
        lower = lower.removesuffix(suffix)
    return lower.endswith(".json")


def _jsonl_records(path: str, skip: int) -> Iterator[tuple[int, RawRecord | SampleError]]:
    k = 0
    line_no = 0
    try:
        with open_binary(path) as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                if k >= skip:
                    yield k, RawRecord(Origin(path, line=line_no), line)
                k += 1
    except READ_ERRORS as e:
        if k >= skip:
            yield k, SampleError("unreadable_input", Origin(path, line=line_no + 1), f"{type(e).__name__}: {e}")


def _json_array_records(path: str, skip: int) -> Iterator[tuple[int, RawRecord | SampleError]]:
    k = 0
    try:
        with open_binary(path) as f:
            for item in _json_items(f):
                if k >= skip:
                    yield k, RawRecord(Origin(path, key=f"item {k}"), item)
                k += 1
        return
    except UnicodeDecodeError as e:
        reason, detail = "non_utf8", str(e)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, over-long integers, absurd nesting
        reason, detail = "malformed_json", f"{type(e).__name__}: {e}"
    except READ_ERRORS as e:
        reason, detail = "unreadable_input", f"{type(e).__name__}: {e}"
    if k >= skip:  # the array cannot be read past this item
        yield k, SampleError(reason, Origin(path, key=f"item {k}"), detail)


def _json_items(f: BinaryIO, chunk: int = PEEK_BYTES) -> Iterator[Any]:
    """The items of a JSON array (or the one top-level value), parsed incrementally: memory ~ one item,
    not the whole file (LLaVA's 665K-sample JSON is a gigabyte)."""
    decoder = json.JSONDecoder()
    utf8 = codecs.getincrementaldecoder("utf-8")()
    buf, pos, eof = "", 0, False

    def more() -> None:
        nonlocal buf, pos, eof
        data = f.read(chunk)
        eof = not data
        buf, pos = buf[pos:] + utf8.decode(data, final=eof), 0

    def peek() -> str:  # the next non-space character, "" at the end
        nonlocal pos
        while True:
            while pos < len(buf) and buf[pos] in " \t\r\n":
                pos += 1
            if pos < len(buf) or eof:
                return buf[pos] if pos < len(buf) else ""
            more()

    def value() -> Any:
        nonlocal pos
        peek()  # raw_decode does not skip leading white space
        while True:
            try:
                obj, end = decoder.raw_decode(buf, pos)
                if eof or (end < len(buf) and buf[end] in " \t\r\n,]"):  # else a number may go on ("3.2" "5e1")
                    pos = end
                    return obj
            except json.JSONDecodeError:
                if eof:
                    raise
            more()

    if peek() != "[":
        yield value()
    else:
        pos += 1
        if peek() != "]":
            while True:
                yield value()
                if peek() != ",":
                    break
                pos += 1
        if peek() != "]":
            raise json.JSONDecodeError("expected ',' or ']'", buf, pos)
        pos += 1
    if peek():
        raise json.JSONDecodeError("extra data after the top-level value", buf, pos)


def _tar_records(path: str, skip: int) -> Iterator[tuple[int, RawRecord | SampleError]]:
    """Members grouped by key (the name up to the first dot of its base name), as WebDataset does."""
    k = 0
    key, group = None, {}
    try:
        with tarfile.open(path) as tar:
            for member in tar:
                if not member.isfile():
                    continue
                member_key, ext = _split_key(member.name)
                if member_key != key:
                    if key is not None:
                        if k >= skip:
                            yield k, RawRecord(Origin(path, key=key), group)
                        k += 1
                    key, group = member_key, {}
                if k >= skip:  # skipped keys are never read
                    group[ext] = tar.extractfile(member).read()
            _check_end_of_archive(tar)
            if key is not None and k >= skip:
                yield k, RawRecord(Origin(path, key=key), group)
    except (*READ_ERRORS, tarfile.TarError) as e:
        if k >= skip:
            yield k, SampleError("unreadable_input", Origin(path, key=key), f"{type(e).__name__}: {e}")


def _check_end_of_archive(tar: tarfile.TarFile) -> None:
    """tarfile stops silently at a truncated header; a complete archive ends with a zero block."""
    tar.fileobj.seek(tar.offset)
    end = tar.fileobj.read(tarfile.BLOCKSIZE)
    if len(end) < tarfile.BLOCKSIZE or end.count(0) != tarfile.BLOCKSIZE:
        raise tarfile.ReadError(f"no end-of-archive block after byte {tar.offset}: the archive is truncated")


def _split_key(name: str) -> tuple[str, str]:
    directory, base = os.path.split(name)
    stem, _, ext = base.partition(".")
    return os.path.join(directory, stem), ext.lower()


def _imagenet_records(root: str, class_names: dict[str, str], skip: int,
                      shuffle_seed: int | None = None) -> Iterator[tuple[int, RawRecord]]:
    """Every image under ``root/<wnid>/``: sorted (folders, then files), or in the seeded permutation of
    that sorted list. Names are held as bytes, one array per folder (ImageNet-21K: ~13M names, ~0.4 GB)."""
    wnids = sorted(e.name for e in os.scandir(root) if e.is_dir())
    folders = [np.array(sorted(os.fsencode(e.name) for e in os.scandir(os.path.join(root, wnid))
                               if e.is_file() and e.name.lower().endswith(IMAGENET_EXTS)), dtype=bytes)
               for wnid in wnids]
    ends = np.cumsum([len(f) for f in folders])
    total = int(ends[-1]) if len(ends) else 0
    order = np.arange(total) if shuffle_seed is None else np.random.default_rng(shuffle_seed).permutation(total)
    for k in range(skip, total):
        index = int(order[k])
        folder = int(np.searchsorted(ends, index, side="right"))
        name = os.fsdecode(folders[folder][index - (int(ends[folder - 1]) if folder else 0)])
        wnid = wnids[folder]
        payload = (os.path.join(root, wnid, name), class_names.get(wnid))
        yield k, RawRecord(Origin(root, key=f"{wnid}/{name}"), payload)


def load_class_names(path: str) -> dict[str, str]:
    """wnid → class name from ``wnid name…`` lines (``LOC_synset_mapping.txt``, ``words.txt``) or JSON
    (``{wnid: name}`` or Keras' ``{"0": [wnid, name]}``)."""
    text = Path(path).read_text(encoding="utf-8")
    if path.lower().endswith(".json"):
        obj = json.loads(text)
        if not isinstance(obj, dict):
            raise ValueError(f"{path}: expected a JSON object wnid → name")
        pairs = (tuple(v) if isinstance(v, list) else (k, v) for k, v in obj.items())
        return {str(wnid): str(name) for wnid, name in pairs}
    names = {}
    for line_no, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        wnid, _, name = line.strip().partition(" ") if "\t" not in line else line.strip().partition("\t")
        if not name.strip():
            raise ValueError(f"{path}:{line_no}: expected 'wnid name', got {line!r}")
        names[wnid] = name.strip()
    return names


__all__ = [
    "FORMATS",
    "RawRecord",
    "classify",
    "detect_format",
    "iter_records",
    "load_class_names",
    "open_binary",
    "resolve_inputs",
]
