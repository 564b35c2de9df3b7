"""RawRecord → :class:`Sample`: a conversation of turns, each a sequence of text and image references.

Runs in the workers (:mod:`~megatron.solo.data.sources` cuts the records out of the files). Every bad
record raises :class:`~megatron.solo.data.errors.SampleError` naming it and the reason.

Formats (``sources.FORMATS``), every kind mapped to turns so that one rule decides the loss targets
(assistant turns):

=============  ================================================================  =========================
format         input                                                             sample
=============  ================================================================  =========================
``chat``       JSONL/JSON: a list of turns, ``{"conversations"|"messages": […]}``  the turns as given
               or one turn; turn = ``{"role", "content"}``, content a string or
               parts ``{"type": "text", "text"}`` / ``{"type": "image_url",
               "image_url": {"url"}}`` (file path or base64 data URL)
``llava``      JSON/JSONL: ``{"image": path | [paths], "conversations":             human → user, gpt → assistant;
               [{"from", "value"}]}``, ``<image>`` tags mark where images go      images at their tags
``sft``        SOLO's released SFT layout (reference spec §8.3): JSONL/JSON        user, assistant, user, …;
               ``{"image": path (optional), "conversations": [{"from",           the image first in the
               "value"} | "text", …]}``; roles by parity (even = user, odd =     first user turn
               assistant, ``from`` is not read), ``<image>`` tags removed from
               the first user turn, empty answers kept (their ``</s>`` is learnt),
               a last unanswered question dropped
``caption``    JSONL/JSON: ``{"image" | "image_path", "caption" | "text"}``       assistant: [image, caption]
``webdataset`` tar shards (img2dataset): ``key.jpg|jpeg|png|webp`` + ``key.txt``  assistant: [image, caption]
               or ``key.json`` (``caption``/``text``)
``imagenet``   a root of class folders ``root/<wnid>/*.JPEG`` + a class-names    assistant: [image, name]
               file (``wnid name`` lines or JSON)
``text``       JSONL/JSON with a ``text`` field                                  assistant: [text]
=============  ================================================================  =========================

Relative image paths are resolved against ``image_root`` (default: the directory of the input file), and
every path (relative, absolute or ``file://``) must resolve, symlinks included, inside it: else the sample
is skipped as ``outside_root`` (``allow_outside_root`` lifts this). http(s) URLs are refused (``remote_url``):
preprocessing never downloads. Text is stripped of surrounding whitespace except in ``text`` documents,
which are kept verbatim. Text that UTF-8 cannot hold (a lone surrogate such as ``"\ud800"``, anywhere in
the record) is ``non_utf8``; a leading byte order mark is ignored.
"""

from __future__ import annotations

import errno
import json
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from megatron.solo.data.errors import Origin, SampleError
from megatron.solo.data.sources import RawRecord, is_within, real_path

ROLES = ("system", "user", "assistant")
LLAVA_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
IMAGE_TAG = "<image>"
WDS_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")  # how a lone surrogate gets into a JSON line


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


# ---------------------------------------------------------------------------------------------
# Parsing (in workers)


def parse_record(
    record: RawRecord, fmt: str, image_root: str | None = None, allow_outside_root: bool = False
) -> Sample:
    """RawRecord → Sample; raises :class:`SampleError` naming the record and the reason.

    ``image_root``: where image paths point and must stay (default: the input file's directory)."""
    origin, payload = record
    root = image_root if image_root is not None else os.path.dirname(origin.file) or "."
    ctx = _Ctx(origin, root, allow_outside_root)
    if fmt == "webdataset":
        turns = _webdataset_turns(payload, ctx)
    elif fmt == "imagenet":
        turns = _imagenet_turns(payload, ctx)
    else:
        obj = _json_payload(payload, origin)
        turns = {
            "chat": _chat_turns,
            "llava": _llava_turns,
            "sft": _sft_turns,
            "caption": _caption_turns,
            "text": _text_turns,
        }[fmt](obj, ctx)
    if not any(p for t in turns for p in t.parts):
        raise SampleError("empty_text", origin, "the sample has neither text nor images")
    return Sample(tuple(turns), origin)


@dataclass(frozen=True)
class _Ctx:
    origin: Origin
    image_root: str
    allow_outside_root: bool = False

    def error(self, reason: str, detail: str) -> SampleError:
        return SampleError(reason, self.origin, detail)

    def image(self, value: Any) -> ImageRef:
        if not isinstance(value, str) or not value:
            raise self.error("bad_field", f"an image reference must be a non-empty string, got {_short(value)}")
        if value[:5].lower() == "data:":
            return ImageRef(value)
        if value.lower().startswith(("http://", "https://")):
            raise self.error("remote_url", f"{value[:80]}: preprocessing never downloads; fetch images first")
        if value[:7].lower() == "file://":  # a path like any other: it obeys the root too
            value = value[7:]
        if "\0" in value:
            raise self.error("bad_field", f"an image path must not hold a NUL byte: {value[:80]!r}")
        path = os.path.join(self.image_root, value)
        if not self.allow_outside_root:
            self._check_inside(path, value)
        return ImageRef(path)

    def _check_inside(self, path: str, value: str) -> None:
        """``outside_root`` unless ``path`` resolves (symlinks included) inside the image root."""
        try:
            real = os.path.realpath(path, strict=True)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise self.error("symlink_loop", f"{value[:200]}: its symlinks form a loop") from e
            real = os.path.realpath(path)  # missing: loading names it, if it is inside
        root = real_path(self.image_root)
        if not is_within(real, root):
            raise self.error(
                "outside_root",
                f"{value[:200]} resolves to {real[:200]}, outside the image root {root} "
                "(--allow-outside-root reads it)",
            )

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
    if not isinstance(payload, bytes):  # an item of a JSON array, parsed with its file (bad bytes as surrogates)
        _check_unicode(payload, origin)
        return payload
    try:
        text = payload.decode("utf-8-sig")  # Windows tools start a file with a byte order mark
    except UnicodeDecodeError as e:
        raise SampleError("non_utf8", origin, str(e)) from e
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, over-long integers, absurd nesting
        raise SampleError("malformed_json", origin, f"{type(e).__name__}: {e}") from e
    if _SURROGATE_ESCAPE.search(payload):
        _check_unicode(obj, origin)
    return obj


def _check_unicode(obj: Any, origin: Origin, where: str = "") -> None:
    """``non_utf8`` naming the first string (key or value, at any depth) that UTF-8 cannot hold."""
    if isinstance(obj, str):
        try:
            obj.encode("utf-8")
        except UnicodeEncodeError as e:
            raise SampleError(
                "non_utf8",
                origin,
                f"{where or 'the record'}: {e.reason} at character {e.start}: "
                f"{obj[max(e.start - 20, 0) : e.start + 20]!r}",
            ) from None
    elif isinstance(obj, dict):
        for key, value in obj.items():
            _check_unicode(key, origin, f"{where} key")
            _check_unicode(value, origin, f"{where}.{key}")
    elif isinstance(obj, list):
        for i, value in enumerate(obj):
            _check_unicode(value, origin, f"{where}[{i}]")


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
    role = ctx.string(ctx.field(turn, "role"), "'role'")
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
        speaker = ctx.string(ctx.field(entry, "from"), "'from'")
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


def _sft_turns(obj: Any, ctx: _Ctx) -> list[Turn]:
    """SOLO's SFT rows, read as its collator does: roles by parity, one image before the first question.

    Empty texts stay as ``""`` parts (not dropped as elsewhere): an empty answer still ends in a learnt
    ``</s>``, as in the recipe. A last question without an answer teaches nothing and is dropped."""
    if not isinstance(obj, dict):
        raise ctx.error("bad_field", f"an SFT record must be an object, got {_short(obj)}")
    conversations = ctx.field(obj, "conversations")
    if not isinstance(conversations, list) or not conversations:
        raise ctx.error("bad_field", f"'conversations' must be a non-empty list, got {_short(conversations)}")
    texts = [_sft_text(entry, i, ctx) for i, entry in enumerate(conversations)]
    if len(texts) < 2:
        raise ctx.error("no_targets", "one turn (a question) and no answer")
    texts = texts[: len(texts) // 2 * 2]
    image = obj.get("image")
    first: list[str | ImageRef] = [] if image is None else [ctx.image(image)]
    turns = []
    for i, text in enumerate(texts):
        if i == 0:
            text = text.replace(IMAGE_TAG + "\n", "").replace("\n" + IMAGE_TAG, "").replace(IMAGE_TAG, "")
        parts = (*first, text.strip()) if i == 0 else (text.strip(),)
        turns.append(Turn("user" if i % 2 == 0 else "assistant", parts))
    return turns


def _sft_text(entry: Any, index: int, ctx: _Ctx) -> str:
    """A turn of an SFT row: a plain string or ``{"from", "value"}`` (only ``value`` is read)."""
    if isinstance(entry, str):
        return entry
    if not isinstance(entry, dict):
        raise ctx.error("bad_field", f"conversations[{index}] must be a string or an object, got {_short(entry)}")
    if "value" not in entry:
        raise ctx.error("missing_field", f"conversations[{index}] has no 'value' field")
    return ctx.string(entry["value"], f"conversations[{index}]['value']")


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
            caption = group["txt"].decode("utf-8-sig")
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


__all__ = ["ImageRef", "Sample", "Turn", "parse_record"]
