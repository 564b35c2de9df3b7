"""Input formats → :class:`Sample`: a conversation of turns, each a sequence of text and image references.

Reading is split in two so that the expensive part runs in worker processes:

* :func:`iter_records` (parent, cheap, ordered): files → :class:`RawRecord` (a JSONL line as bytes, a parsed
  JSON-array item, the members of one WebDataset key, an ImageNet image path), never parsing JSON lines;
* :func:`parse_record` (worker): RawRecord → :class:`Sample`, raising :class:`SampleError` for bad samples.

Formats (``FORMATS``), every kind mapped to turns so that one rule decides the loss targets (assistant turns):

=============  ================================================================  =========================
format         input                                                             sample
=============  ================================================================  =========================
``chat``       JSONL/JSON: a list of turns, ``{"conversations"|"messages": […]}``  the turns as given
               or one turn; turn = ``{"role", "content"}``, content a string or
               parts ``{"type": "text", "text"}`` / ``{"type": "image_url",
               "image_url": {"url"}}`` (file path or base64 data URL)
``llava``      JSON/JSONL: ``{"image": path | [paths], "conversations":             human → user, gpt → assistant;
               [{"from", "value"}]}``, ``<image>`` tags mark where images go      images at their tags
``caption``    JSONL/JSON: ``{"image" | "image_path", "caption" | "text"}``       assistant: [image, caption]
``webdataset`` tar shards (img2dataset): ``key.jpg|jpeg|png|webp`` + ``key.txt``  assistant: [image, caption]
               or ``key.json`` (``caption``/``text``)
``imagenet``   a root of class folders ``root/<wnid>/*.JPEG`` + a class-names    assistant: [image, name]
               file (``wnid name`` lines or JSON)
``text``       JSONL/JSON with a ``text`` field                                  assistant: [text]
=============  ================================================================  =========================

JSON inputs may be ``.gz`` or ``.zst`` compressed; tar shards may be gzip/bz2/xz compressed. Relative image
paths are resolved against ``image_root`` (default: the directory of the input file); http(s) URLs are
refused (``remote_url``): preprocessing never downloads. Text is stripped of surrounding whitespace except
in ``text`` documents, which are kept verbatim. Blank lines are not samples.
"""

from __future__ import annotations

import glob
import gzip
import io
import json
import os
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Iterable, Iterator, NamedTuple

from megatron.solo.data.errors import Origin, SampleError

FORMATS = ("chat", "llava", "caption", "webdataset", "imagenet", "text")
ROLES = ("system", "user", "assistant")
LLAVA_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
IMAGE_TAG = "<image>"
WDS_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
IMAGENET_EXTS = (".jpeg", ".jpg", ".png", ".webp")
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")
PEEK_BYTES = 1 << 20


# ---------------------------------------------------------------------------------------------
# Samples


@dataclass(frozen=True)
class ImageRef:
    """An image to load: a file path, a ``data:`` URL, or the encoded bytes themselves."""

    source: str | bytes


@dataclass(frozen=True)
class Turn:
    role: str
    """``system``, ``user`` or ``assistant`` (the loss falls on assistant turns)."""
    parts: tuple[str | ImageRef, ...]


@dataclass(frozen=True)
class Sample:
    turns: tuple[Turn, ...]
    origin: Origin


class RawRecord(NamedTuple):
    """One not-yet-parsed sample, as cheap to cut out of its file as possible."""

    origin: Origin
    payload: Any
    """bytes (a JSONL line), a parsed JSON item, {ext: bytes} (a WebDataset key) or (path, class name)."""


# ---------------------------------------------------------------------------------------------
# Finding inputs and their format


def resolve_inputs(patterns: Iterable[str]) -> list[str]:
    """Files, directories and globs (``**`` allowed) → paths, in argument order, globs sorted, no repeats."""
    paths: list[str] = []
    for pattern in patterns:
        if glob.has_magic(pattern):
            matches = sorted(glob.glob(pattern, recursive=True))
            if not matches:
                raise FileNotFoundError(f"--input {pattern!r}: no file matches")
        elif os.path.exists(pattern):
            matches = [pattern]
        else:
            raise FileNotFoundError(f"--input {pattern!r}: no such file or directory")
        paths.extend(m for m in matches if m not in paths)
    return paths


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
    except (OSError, ValueError, EOFError, zlib.error) as e:
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
        head = f.read(PEEK_BYTES)
    text = head.decode("utf-8", errors="replace").lstrip()
    if _is_json_array(path):
        if not text.startswith("["):
            raise ValueError("a .json input must hold a JSON array of records")
        text = text[1:].lstrip()
    else:
        text = next((line for line in text.splitlines() if line.strip()), "")
    try:
        return json.JSONDecoder().raw_decode(text)[0]
    except json.JSONDecodeError:
        if _is_json_array(path):  # a first item larger than the peek: parse the whole file
            items = _load_json_array(path)
            return items[0] if items else None
        raise


# ---------------------------------------------------------------------------------------------
# Reading records


def open_binary(path: str) -> BinaryIO:
    """A binary reader that decompresses ``.gz`` and ``.zst`` transparently."""
    lower = path.lower()
    if lower.endswith(".gz"):
        return gzip.open(path, "rb")
    if lower.endswith(".zst"):
        import zstandard

        raw = open(path, "rb")
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw, closefd=True))
    return open(path, "rb")


def iter_records(
    paths: list[str],
    fmt: str,
    *,
    start: tuple[int, int] = (0, 0),
    class_names: dict[str, str] | None = None,
) -> Iterator[tuple[tuple[int, int], RawRecord | SampleError]]:
    """((file index, record index in file), record) in input order, from position ``start`` on.

    A file that cannot be read on (a corrupt compressed stream, a damaged tar) yields one
    ``unreadable_input`` error where reading stopped, then the next file is read.
    """
    first_file, skip = start
    for i in range(first_file, len(paths)):
        records = _file_records(paths[i], fmt, class_names, skip if i == first_file else 0)
        for k, record in records:
            yield (i, k), record


def _file_records(path: str, fmt: str, class_names, skip: int) -> Iterator[tuple[int, RawRecord | SampleError]]:
    if fmt == "imagenet":
        if class_names is None:
            raise ValueError("the imagenet format needs a class-names file (--class-names)")
        return _imagenet_records(path, class_names, skip)
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
    except (OSError, EOFError, ValueError, zlib.error) as e:  # gzip/zstd damage surfaces as these
        if k >= skip:
            yield k, SampleError("unreadable_input", Origin(path, line=line_no + 1), f"{type(e).__name__}: {e}")


def _json_array_records(path: str, skip: int) -> Iterator[tuple[int, RawRecord | SampleError]]:
    try:
        items = _load_json_array(path)
    except SampleError as e:
        if skip == 0:
            yield 0, e
        return
    for k in range(skip, len(items)):
        yield k, RawRecord(Origin(path, key=f"item {k}"), items[k])


def _load_json_array(path: str) -> list:
    origin = Origin(path)
    try:
        with open_binary(path) as f:
            data = f.read()
    except (OSError, EOFError, ValueError, zlib.error) as e:
        raise SampleError("unreadable_input", origin, f"{type(e).__name__}: {e}") from e
    try:
        obj = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise SampleError("non_utf8", origin, str(e)) from e
    except json.JSONDecodeError as e:
        raise SampleError("malformed_json", origin, str(e)) from e
    return obj if isinstance(obj, list) else [obj]


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
    except (OSError, EOFError, tarfile.TarError, zlib.error) as e:
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


def _imagenet_records(root: str, class_names: dict[str, str], skip: int) -> Iterator[tuple[int, RawRecord]]:
    k = 0
    for wnid in sorted(e.name for e in os.scandir(root) if e.is_dir()):
        folder = os.path.join(root, wnid)
        files = sorted(e.name for e in os.scandir(folder) if e.is_file() and e.name.lower().endswith(IMAGENET_EXTS))
        for name in files:
            if k >= skip:
                payload = (os.path.join(folder, name), class_names.get(wnid))
                yield k, RawRecord(Origin(root, key=f"{wnid}/{name}"), payload)
            k += 1


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


# ---------------------------------------------------------------------------------------------
# Parsing (in workers)


def parse_record(record: RawRecord, fmt: str, image_root: str | None = None) -> Sample:
    """RawRecord → Sample; raises :class:`SampleError` naming the record and the reason."""
    origin, payload = record
    root = image_root if image_root is not None else os.path.dirname(origin.file)
    ctx = _Ctx(origin, root)
    if fmt == "webdataset":
        turns = _webdataset_turns(payload, ctx)
    elif fmt == "imagenet":
        turns = _imagenet_turns(payload, ctx)
    else:
        obj = _json_payload(payload, origin)
        turns = {"chat": _chat_turns, "llava": _llava_turns, "caption": _caption_turns, "text": _text_turns}[fmt](
            obj, ctx
        )
    if not any(p for t in turns for p in t.parts):
        raise SampleError("empty_text", origin, "the sample has neither text nor images")
    return Sample(tuple(turns), origin)


@dataclass(frozen=True)
class _Ctx:
    origin: Origin
    image_root: str

    def error(self, reason: str, detail: str) -> SampleError:
        return SampleError(reason, self.origin, detail)

    def image(self, value: Any) -> ImageRef:
        if not isinstance(value, str) or not value:
            raise self.error("bad_field", f"an image reference must be a non-empty string, got {_short(value)}")
        if value[:5].lower() == "data:":
            return ImageRef(value)
        if value.lower().startswith(("http://", "https://")):
            raise self.error("remote_url", f"{value[:80]}: preprocessing never downloads; fetch images first")
        value = value.removeprefix("file://")
        return ImageRef(os.path.join(self.image_root, value))

    def field(self, obj: dict, *names: str) -> Any:
        for name in names:
            if name in obj:
                return obj[name]
        raise self.error("missing_field", f"no {' or '.join(repr(n) for n in names)} field")

    def string(self, value: Any, what: str) -> str:
        if not isinstance(value, str):
            raise self.error("bad_field", f"{what} must be a string, got {_short(value)}")
        return value


def _short(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:60]}{'…' if len(text) > 60 else ''}"


def _json_payload(payload: Any, origin: Origin) -> Any:
    if not isinstance(payload, bytes):
        return payload  # an item of a JSON array, parsed with its file
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SampleError("non_utf8", origin, str(e)) from e
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise SampleError("malformed_json", origin, str(e)) from e


def _clean_parts(parts: Iterable[str | ImageRef]) -> tuple[str | ImageRef, ...]:
    out = []
    for p in parts:
        if isinstance(p, str):
            p = p.strip()
            if not p:
                continue
        out.append(p)
    return tuple(out)


def _chat_turns(obj: Any, ctx: _Ctx) -> list[Turn]:
    turns = obj
    if isinstance(obj, dict):
        turns = [obj] if "role" in obj else ctx.field(obj, "messages", "conversations")
    if not isinstance(turns, list) or not turns:
        raise ctx.error("bad_field", f"expected a non-empty list of turns, got {_short(turns)}")
    return [_chat_turn(t, ctx) for t in turns]


def _chat_turn(turn: Any, ctx: _Ctx) -> Turn:
    if not isinstance(turn, dict):
        raise ctx.error("bad_field", f"a turn must be an object, got {_short(turn)}")
    role = ctx.field(turn, "role")
    if role not in ROLES:
        raise ctx.error("unknown_role", f"role {role!r} is not one of {', '.join(ROLES)}")
    content = ctx.field(turn, "content")
    if isinstance(content, str):
        return Turn(role, _clean_parts([content]))
    if not isinstance(content, list):
        raise ctx.error("bad_field", f"content must be a string or a list of parts, got {_short(content)}")
    return Turn(role, _clean_parts(_chat_part(p, ctx) for p in content))


def _chat_part(part: Any, ctx: _Ctx) -> str | ImageRef:
    kind = part.get("type") if isinstance(part, dict) else None
    if kind == "text":
        return ctx.string(ctx.field(part, "text"), "a text part's 'text'")
    if kind == "image_url":
        url = ctx.field(part, "image_url")
        return ctx.image(ctx.field(url, "url") if isinstance(url, dict) else url)
    raise ctx.error("bad_field", f"a content part must be {{'type': 'text' | 'image_url', …}}, got {_short(part)}")


def _llava_turns(obj: Any, ctx: _Ctx) -> list[Turn]:
    if not isinstance(obj, dict):
        raise ctx.error("bad_field", f"a LLaVA record must be an object, got {_short(obj)}")
    conversations = ctx.field(obj, "conversations")
    if not isinstance(conversations, list) or not conversations:
        raise ctx.error("bad_field", f"'conversations' must be a non-empty list, got {_short(conversations)}")
    images = obj.get("image")
    images = [] if images is None else images if isinstance(images, list) else [images]
    refs = [ctx.image(v) for v in images]
    turns, n_tags = [], 0
    for entry in conversations:
        if not isinstance(entry, dict):
            raise ctx.error("bad_field", f"a conversation entry must be an object, got {_short(entry)}")
        speaker = ctx.field(entry, "from")
        if speaker not in LLAVA_ROLES:
            raise ctx.error("unknown_role", f"'from': {speaker!r} is not one of {', '.join(LLAVA_ROLES)}")
        pieces = ctx.string(ctx.field(entry, "value"), "'value'").split(IMAGE_TAG)
        parts: list[str | ImageRef] = [pieces[0]]
        for piece in pieces[1:]:
            parts += [refs[n_tags] if n_tags < len(refs) else None, piece]
            n_tags += 1
        turns.append([LLAVA_ROLES[speaker], parts])
    if n_tags and n_tags != len(refs):
        raise ctx.error("image_tag_mismatch", f"{n_tags} {IMAGE_TAG} tag(s) but {len(refs)} image(s)")
    if refs and not n_tags:  # no tag: images go first in the first user turn, as LLaVA's "<image>\n" does
        first = next((t for t in turns if t[0] == "user"), turns[0])
        first[1][:0] = refs
    return [Turn(role, _clean_parts(parts)) for role, parts in turns]


def _caption_turns(obj: Any, ctx: _Ctx) -> list[Turn]:
    if not isinstance(obj, dict):
        raise ctx.error("bad_field", f"a caption record must be an object, got {_short(obj)}")
    image = ctx.image(ctx.field(obj, "image", "image_path"))
    return [_captioned(image, ctx.string(ctx.field(obj, "caption", "text"), "the caption"), ctx)]


def _captioned(image: ImageRef, caption: str, ctx: _Ctx) -> Turn:
    if not caption.strip():
        raise ctx.error("empty_text", "the caption is empty")
    return Turn("assistant", (image, caption.strip()))


def _text_turns(obj: Any, ctx: _Ctx) -> list[Turn]:
    if not isinstance(obj, dict):
        raise ctx.error("bad_field", f"a text record must be an object, got {_short(obj)}")
    text = ctx.string(ctx.field(obj, "text"), "'text'")
    if not text.strip():
        raise ctx.error("empty_text", "'text' is empty")
    return [Turn("assistant", (text,))]  # verbatim: whitespace is part of a document


def _webdataset_turns(group: dict[str, bytes], ctx: _Ctx) -> list[Turn]:
    ext = next((e for e in WDS_IMAGE_EXTS if e in group), None)
    if ext is None:
        raise ctx.error("missing_field", f"no image member ({'/'.join(WDS_IMAGE_EXTS)}) among {sorted(group)}")
    if "txt" in group:
        try:
            caption = group["txt"].decode("utf-8")
        except UnicodeDecodeError as e:
            raise ctx.error("non_utf8", f"{ctx.origin.key}.txt: {e}") from e
    elif "json" in group:
        meta = _json_payload(group["json"], ctx.origin)
        if not isinstance(meta, dict):
            raise ctx.error("bad_field", f"{ctx.origin.key}.json must hold an object, got {_short(meta)}")
        caption = ctx.string(ctx.field(meta, "caption", "text"), "the caption")
    else:
        raise ctx.error("missing_field", f"no caption member (txt or json) among {sorted(group)}")
    return [_captioned(ImageRef(group[ext]), caption, ctx)]


def _imagenet_turns(payload: tuple[str, str | None], ctx: _Ctx) -> list[Turn]:
    path, name = payload
    if name is None:
        wnid = (ctx.origin.key or "").split("/")[0]
        raise ctx.error("unknown_class", f"class folder {wnid!r} is not in the class-names file")
    label = name.replace("_", " ").replace("-", " ")  # as the reference did
    return [_captioned(ImageRef(path), label, ctx)]


__all__ = [
    "FORMATS",
    "ImageRef",
    "RawRecord",
    "Sample",
    "Turn",
    "classify",
    "detect_format",
    "iter_records",
    "load_class_names",
    "open_binary",
    "parse_record",
    "resolve_inputs",
]
