"""Input files → :class:`RawRecord`: finding the inputs, detecting their format, cutting them into records.

This runs in the driver, in input order, and is cheap on purpose: a JSONL line stays bytes, a WebDataset
key stays its members' bytes, an ImageNet image stays a path. Parsing and everything expensive happens in
the workers (:mod:`~megatron.solo.data.samples`). Every reader can start mid-file (``start`` of
:func:`iter_records`) without parsing what it skips: that is how ``--resume`` continues.

Inputs: JSON Lines (``.jsonl``, or anything not ``.json``) and JSON arrays (``.json``), both optionally
``.gz``/``.zst`` compressed; tar shards (``.tar``, ``.tar.gz``, ``.tgz``, ``.tar.bz2``, ``.tar.xz``) for
``webdataset``; directories of class folders for ``imagenet``, read in a seeded random order (``shuffle_seed``)
because packs are cut in input order: class by class, every pack would hold one class. Blank lines are not
records; a UTF-8 byte order mark is ignored. See :mod:`~megatron.solo.data.samples` for the record shapes.

Nothing vanishes silently: a malformed item of a JSON array is one ``malformed_json`` error and reading
resynchronises at the next item; a file that cannot be read on (a truncated compressed stream or tar)
yields one ``unreadable_input`` error where reading stopped, naming what was lost; a compressed input is
first read to its end so that its checksums are verified, and if one fails (or its stream is corrupt)
every sample of it is skipped as ``corrupt_input``. A disk error (EIO, …) is not a record's: it stops
the run (:class:`~megatron.solo.data.errors.InputError`). ImageNet symlinks that leave the root or loop
are skipped with their reason, never followed.
"""

from __future__ import annotations

import bz2
import codecs
import errno
import functools
import glob
import gzip
import io
import json
import lzma
import os
import re
import tarfile
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple

import numpy as np
import zstandard

from megatron.solo.data.errors import InputError, Origin, SampleError, record_failure

FORMATS = ("chat", "llava", "sft", "caption", "webdataset", "imagenet", "text")
IMAGENET_EXTS = (".jpeg", ".jpg", ".png", ".webp")
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")
COMPRESSED_SUFFIXES = (".gz", ".tgz", ".zst", ".bz2", ".xz")
PEEK_BYTES = 1 << 20
# What a damaged file raises while being read: gzip/bz2 (OSError, EOFError), zlib, zstd, xz, tarfile (OSError).
READ_ERRORS = (OSError, EOFError, zlib.error, zstandard.ZstdError, lzma.LZMAError)


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
    if isinstance(conversations, list) and any(isinstance(turn, str) for turn in conversations):
        return "sft"  # plain-string turns: only SOLO's SFT layout has them (dict-only rows: pass --input-format sft)
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
            first = next(_json_items(f), None)
            if isinstance(first, BrokenItem):
                raise ValueError(first.detail)
            return first
        line = next((line for line in f if line.strip()), b"")  # whole, however long (data URLs)
    return json.loads(line)  # bytes: a byte order mark is recognised


# ---------------------------------------------------------------------------------------------
# Reading records


def open_binary(path: str) -> BinaryIO:
    """A binary reader that decompresses ``.gz``/``.tgz``, ``.zst``, ``.bz2`` and ``.xz`` transparently."""
    lower = path.lower()
    if lower.endswith((".gz", ".tgz")):
        return gzip.open(path, "rb")
    if lower.endswith(".zst"):
        return io.BufferedReader(_ZstdReader(open(path, "rb")), buffer_size=PEEK_BYTES)
    if lower.endswith(".bz2"):
        return bz2.open(path, "rb")
    if lower.endswith(".xz"):
        return lzma.open(path, "rb")
    return open(path, "rb")


class _ZstdReader(io.RawIOBase):
    """The frames of a ``.zst`` file, one after another, checksums verified. zstandard's own stream reader
    ends quietly where a truncated file does; this raises EOFError there."""

    def __init__(self, raw: BinaryIO):
        self._raw = raw
        self._dctx = zstandard.ZstdDecompressor()
        self._frame = self._dctx.decompressobj()
        self._in_frame = False
        self._out, self._pos = b"", 0

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        while self._pos == len(self._out):
            if self._frame.eof:  # the next frame, if any, starts in what this one did not use
                data, self._frame, self._in_frame = self._frame.unused_data, self._dctx.decompressobj(), False
            else:
                data = self._raw.read(1 << 17)
                if not data:
                    if self._in_frame:
                        raise EOFError("the zstd stream ends inside a frame: the file is truncated")
                    return 0
            if data:
                self._in_frame = True
                self._out, self._pos = self._frame.decompress(data), 0
        n = min(len(b), len(self._out) - self._pos)
        b[:n] = self._out[self._pos : self._pos + n]
        self._pos += n
        return n

    def close(self) -> None:
        self._raw.close()
        super().close()


def iter_records(
    paths: list[str],
    fmt: str,
    *,
    start: tuple[int, int] = (0, 0),
    class_names: dict[str, str] | None = None,
    shuffle_seed: int | None = 0,
    allow_outside_root: bool = False,
) -> Iterator[tuple[tuple[int, int], RawRecord | SampleError]]:
    """((file index, record index in file), record) in input order, from position ``start`` on.

    ``shuffle_seed``: the seed of an ImageNet root's image order (None: sorted, class by class).
    ``allow_outside_root``: follow ImageNet symlinks that leave the root.

    A file that cannot be read on (a corrupt compressed stream, a damaged tar) yields one
    ``unreadable_input`` error where reading stopped, then the next file is read; every sample of a
    compressed file whose checksum fails is a ``corrupt_input`` error.
    """
    first_file, skip = start
    for i in range(first_file, len(paths)):
        skip_here = skip if i == first_file else 0
        records = _file_records(paths[i], fmt, class_names, skip_here, shuffle_seed, allow_outside_root)
        failure = _integrity_failure(paths[i])
        for k, record in records:
            if failure is not None and isinstance(record, RawRecord):
                record = SampleError("corrupt_input", record.origin, failure)
            yield (i, k), record


def _file_records(
    path: str, fmt: str, class_names, skip: int, shuffle_seed: int | None = None, allow_outside_root: bool = False
) -> Iterator[tuple[int, RawRecord | SampleError]]:
    if fmt == "imagenet":
        if class_names is None:
            raise ValueError("the imagenet format needs a class-names file (--class-names)")
        return _imagenet_records(path, class_names, skip, shuffle_seed, allow_outside_root)
    if fmt == "webdataset":
        return _tar_records(path, skip)
    if _is_json_array(path):
        return _json_array_records(path, skip)
    return _jsonl_records(path, skip)


def _integrity_failure(path: str) -> str | None:
    """Why a compressed input cannot be trusted (a checksum that fails, a corrupt stream), or None.

    Reading stops at the last record (a tar's end block), before the checksum at the end of the stream:
    so the whole stream is read once first. A truncated stream is not a failure here: its records up to
    the cut are sound, and reading them reports the cut.
    """
    if not path.lower().endswith(COMPRESSED_SUFFIXES) or os.path.isdir(path):
        return None
    try:
        with open_binary(path) as f:
            while f.read(PEEK_BYTES):
                pass
    except EOFError:
        return None
    except READ_ERRORS as e:
        _raise_if_disk_error(e, path)
        return f"{path}: {type(e).__name__}: {e}: none of its samples is used"
    return None


def _raise_if_disk_error(e: BaseException, path: str) -> None:
    """An OSError with an errno is the storage failing, not the file's content: stop, naming the input."""
    if isinstance(e, OSError) and e.errno is not None:
        raise InputError(f"{path}: {e}") from e


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
        _raise_if_disk_error(e, path)
        if k >= skip:
            yield k, SampleError("unreadable_input", Origin(path, line=line_no + 1), f"{type(e).__name__}: {e}")


def _json_array_records(path: str, skip: int) -> Iterator[tuple[int, RawRecord | SampleError]]:
    k = 0
    try:
        with open_binary(path) as f:
            for item in _json_items(f):
                if k >= skip:
                    origin = Origin(path, key=f"item {k}")
                    broken = isinstance(item, BrokenItem)
                    yield k, SampleError("malformed_json", origin, item.detail) if broken else RawRecord(origin, item)
                k += 1
        return
    except (ValueError, RecursionError) as e:  # JSONDecodeError, over-long integers, absurd nesting
        reason, detail = "malformed_json", f"{type(e).__name__}: {e}"
    except READ_ERRORS as e:
        _raise_if_disk_error(e, path)
        reason, detail = "unreadable_input", f"{type(e).__name__}: {e}"
    if k >= skip:  # the array cannot be read past this item
        yield k, SampleError(reason, Origin(path, key=f"item {k}"), detail)


@dataclass(frozen=True)
class BrokenItem:
    """An item of a JSON array that is not valid JSON: it was stepped over, reading goes on after it."""

    detail: str


# One token of the bracket-and-string structure of JSON: a string (maybe cut by the buffer's end), a bracket
# or a comma. Enough to find where a malformed item ends without parsing it.
_STRUCTURE = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*(")?|[][{},]')
_OBJECTS_BOUNDARY = re.compile(r"}\s*(?=,\s*{)")
_SPACE = re.compile(r"[ \t\r\n]*")


def _item_end(buf: str, pos: int) -> int | None:
    """Where the array item starting at ``pos`` ends (its ',' or the array's ']', at depth 0 outside
    strings), or None if ``buf`` ends first. Extra closing braces count as junk inside the item."""
    depth = 0
    for m in _STRUCTURE.finditer(buf, pos):
        c = m.group()
        if c[0] == '"':
            if m.group(1) is None:
                return None  # a string that does not end before the buffer does
        elif c in "[{":
            depth += 1
        elif c in "]}" and depth:
            depth -= 1
        elif c in ",]" and not depth:
            return m.start()
    return None


def _json_items(f: BinaryIO, chunk: int = PEEK_BYTES) -> Iterator[Any]:
    """The items of a JSON array (or the one top-level value), parsed incrementally: memory ~ one item,
    not the whole file (LLaVA's 665K-sample JSON is a gigabyte).

    A malformed item is yielded as a :class:`BrokenItem` and reading resynchronises after it: at its end by
    brackets and strings, or, when its quotes do not pair up, at the next ``}, {`` (the items in between
    become that one broken item). Bytes that are not UTF-8 are kept as lone surrogates, for the item's
    parser to reject, so that they cost one item, not the rest of the file.

    The library does the parsing (each item is ``json.JSONDecoder.raw_decode``); only the array framing
    and the resynchronisation are ours: the stdlib parses whole documents only, and streaming parsers
    (ijson, not a dependency) stop at the first syntax error, where we must step over one broken item.
    """
    decoder = json.JSONDecoder()
    utf8 = codecs.getincrementaldecoder("utf-8-sig")(errors="surrogateescape")
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

    def item() -> Any:  # the next array item, or a BrokenItem; pos stays at its start until it is decided
        nonlocal pos
        peek()
        while True:
            end = None
            try:
                obj, end = decoder.raw_decode(buf, pos)
            except json.JSONDecodeError as e:
                error = f"{e.msg} at character {e.pos - pos} of the item"
            except RecursionError:
                error = "nested too deeply"
            if end is not None:
                after = _SPACE.match(buf, end).end()
                if after == len(buf) and not eof:  # a number may go on, or the ',' is in the next chunk
                    more()
                    continue
                if after == len(buf) or buf[after] in ",]":
                    pos = end
                    return obj
                error = f"{buf[after : after + 20]!r} after the item"
            stop = _item_end(buf, pos)
            if stop is None and not eof:
                more()
                continue
            start, lost = pos, "to the next item"
            if stop is None:  # quotes that do not pair up: the next object boundary, else the end of the file
                boundary = _OBJECTS_BOUNDARY.search(buf, pos + 1)
                stop = boundary.end() if boundary else len(buf)
                lost = "to the next '}, {'" if boundary else "to the end of the file"
            pos = stop
            return BrokenItem(f"{error}; {stop - start} characters skipped {lost}")

    if peek() != "[":
        yield value()
    else:
        pos += 1
        last = None
        if peek() != "]":
            while True:
                last = item()
                yield last
                if peek() != ",":
                    break
                pos += 1
        if peek() == "":  # truncated: say so, unless the last item already did
            if not isinstance(last, BrokenItem):
                yield BrokenItem("the file ends before the array's closing ']': it is truncated")
            return
        if peek() != "]":
            raise json.JSONDecodeError("expected ',' or ']'", buf, pos)
        pos += 1
    if peek():
        raise json.JSONDecodeError("extra data after the top-level value", buf, pos)


def _tar_records(path: str, skip: int) -> Iterator[tuple[int, RawRecord | SampleError]]:
    """Members grouped by key (the name up to the first dot of its base name), as WebDataset does.

    A damaged or truncated archive ends in one ``unreadable_input`` error that names what was lost: the key
    whose member is cut (with that member), or, when the cut falls between members, the last whole member
    (its key is yielded first, whole)."""
    k = 0
    key, group = None, {}
    reading, last = None, None  # the member whose data is being read; the last one read whole
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
                reading = member.name
                data = _member_data(tar, member, keep=k >= skip)  # skipped keys are not read, only checked
                if data is not None:
                    group[ext] = data
                reading, last = None, member.name
            _check_end_of_archive(tar)
            if key is not None and k >= skip:
                yield k, RawRecord(Origin(path, key=key), group)
            return
    except (*READ_ERRORS, tarfile.TarError) as e:
        _raise_if_disk_error(e, path)
        error = f"{type(e).__name__}: {e}"
    if reading is not None:  # cut inside a member: its key is lost, with the members before it in the archive
        members = ", ".join(sorted(f"{os.path.basename(key)}.{ext}" for ext in group)) or "none"
        if k >= skip:
            lost = f"member {reading} is cut, so key {key} is lost (its members read whole: {members})"
            yield k, SampleError("unreadable_input", Origin(path, key=key), f"{error}: {lost}; anything after is lost")
        return
    if key is not None:  # cut between members: the last key may be whole
        if k >= skip:
            yield k, RawRecord(Origin(path, key=key), group)
        k += 1
    if k >= skip:
        where = f"after member {last}" if last is not None else "before its first member"
        yield (
            k,
            SampleError(
                "unreadable_input",
                Origin(path, key=key),
                f"{error}: the archive is cut {where}; any member after it is lost",
            ),
        )


def _member_data(tar: tarfile.TarFile, member: tarfile.TarInfo, keep: bool) -> bytes | None:
    """The member's bytes, or (``keep`` false: a key skipped on resume) None once its last byte is seen to
    exist: a cut archive then fails at the same member either way."""
    if keep:
        return tar.extractfile(member).read()
    if member.size:
        tar.fileobj.seek(member.offset_data + member.size - 1)
        if not tar.fileobj.read(1):
            raise tarfile.ReadError("unexpected end of data")
    return None


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


def _imagenet_records(
    root: str, class_names: dict[str, str], skip: int, shuffle_seed: int | None = None, allow_outside_root: bool = False
) -> Iterator[tuple[int, RawRecord | SampleError]]:
    """Every image under ``root/<wnid>/``: sorted (folders, then files), or in the seeded permutation of
    that sorted list. Names are held as bytes, one array per folder (ImageNet-21K: ~13M names, ~0.4 GB).

    Entries that cannot be used (a symlink that leaves the root, loops or dangles; an unreadable folder)
    come first, as errors, in sorted order; they are never followed."""
    real_root = real_path(root)
    problems: list[SampleError] = []

    def usable(path: str, key: str, is_link: bool) -> bool:
        problem = _link_problem(path, real_root, allow_outside_root) if is_link else None
        if problem is not None:
            problems.append(SampleError(problem[0], Origin(root, key=key), problem[1]))
        return problem is None

    wnids = [
        e.name for e in _entries(root, root, "", problems) if usable(e.path, e.name, e.is_symlink()) and e.is_dir()
    ]
    folders = []
    for wnid in wnids:
        entries = _entries(os.path.join(root, wnid), root, wnid, problems)
        names = [
            os.fsencode(e.name)
            for e in entries
            if e.name.lower().endswith(IMAGENET_EXTS)
            and usable(e.path, f"{wnid}/{e.name}", e.is_symlink())
            and e.is_file()
        ]
        folders.append(np.array(sorted(names), dtype=bytes))
    problems.sort(key=lambda p: os.fsencode(p.origin.key))
    ends = np.cumsum([len(f) for f in folders])
    total = int(ends[-1]) if len(ends) else 0
    order = np.arange(total) if shuffle_seed is None else np.random.default_rng(shuffle_seed).permutation(total)
    for k in range(skip, len(problems)):
        yield k, problems[k]
    for k in range(max(skip - len(problems), 0), total):
        index = int(order[k])
        folder = int(np.searchsorted(ends, index, side="right"))
        name = os.fsdecode(folders[folder][index - (int(ends[folder - 1]) if folder else 0)])
        wnid = wnids[folder]
        payload = (os.path.join(root, wnid, name), class_names.get(wnid))
        yield len(problems) + k, RawRecord(Origin(root, key=f"{wnid}/{name}"), payload)


def _entries(folder: str, root: str, key: str, problems: list[SampleError]) -> list[os.DirEntry]:
    """The entries of an ImageNet folder, sorted by name; an unreadable folder is a problem (named by ``key``)."""
    try:
        with os.scandir(folder) as it:
            return sorted(it, key=lambda e: os.fsencode(e.name))
    except OSError as e:
        if not key:  # the root itself: an input that cannot be read
            raise InputError(f"{folder}: {e}") from e
        problems.append(record_failure(e, Origin(root, key=key)))  # a disk error raises InputError
        return []


def _link_problem(path: str, real_root: str, allow_outside_root: bool) -> tuple[str, str] | None:
    """(reason, detail) if the symlink ``path`` loops, dangles or (unless allowed) leaves ``real_root``."""
    try:
        target = os.path.realpath(path, strict=True)
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "symlink_loop", f"a symlink whose links form a loop ({os.readlink(path)!r})"
        if e.errno in (errno.ENOENT, errno.ENOTDIR):
            return "missing_file", f"a symlink to {os.readlink(path)!r}, which does not exist"
        raise InputError(f"{path}: {e}") from e
    if not allow_outside_root and not is_within(target, real_root):
        return "outside_root", f"a symlink to {target}, outside the root {real_root} (--allow-outside-root follows it)"
    return None


@functools.lru_cache(maxsize=64)
def real_path(path: str) -> str:
    """``os.path.realpath``, cached: the roots every image path is checked against."""
    return os.path.realpath(path)


def is_within(path: str, root: str) -> bool:
    """Whether the resolved ``path`` is ``root`` or under it (both absolute, symlinks resolved)."""
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


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
    "BrokenItem",
    "classify",
    "detect_format",
    "is_within",
    "iter_records",
    "load_class_names",
    "open_binary",
    "real_path",
    "resolve_inputs",
]
