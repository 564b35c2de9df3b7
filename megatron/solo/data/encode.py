"""Sample → Document: token ids, per-token loss targets, and the sample's images resized and encoded once.

Document layout (``chat_template="mistral"``, the default)::

    <s> [INST] user parts [/INST] assistant parts </s> [INST] … [/INST] last assistant parts </s>
    ^bos                          ^targets       ^target                  ^targets        ^--append-eod

* ``<s>`` (BOS) starts every document and is never a target: Mistral was trained with BOS at document
  start. Documents in a pack are separated by stored boundaries, not by tokens.
* Turn markers ``[INST]``/``[/INST]`` are plain text (no special ids), as in Mistral-instruct v0.1 and the
  released SOLO SFT model; a system turn's parts open the next user turn. Assistant turns other than
  the last end with ``</s>`` (a target); the last one's ``</s>`` is the ``--append-eod`` one.
* ``chat_template="plain"`` reproduces the reference's ``--do_pretrain``: parts concatenated in order, no
  markers, no per-turn ``</s>``. Single-assistant-turn samples (captions, labels, text) are the same in both.
* ``chat_template="llama3"`` is Llama-3-Instruct's format (needs a tokenizer with its special tokens)::

      <|begin_of_text|> <|start_header_id|> role <|end_header_id|> "\n\n" parts <|eot_id|> … (every turn)

  the header markers and ``<|eot_id|>`` by id (text never gives them), the role and ``"\n\n"`` as text
  parts, a system turn as its own turn; an assistant turn's parts and its ``<|eot_id|>`` are targets. After
  a last turn that is not the assistant's, the assistant header follows (a generation prompt). The
  ``--append-eod`` EOS is added unless the document already ends with it (an Instruct config's EOS is
  ``<|eot_id|>``). For text parts this is what transformers renders and tokenizes with Llama-3's chat
  template.
* ``target[i] = 1``: token i is to be predicted (text of assistant turns and their ``</s>``). Patch tokens
  and the vision specials are never targets. The final EOS is a target iff the token before it is.
* ``max_sample_length`` (SFT: the recipe's 4096) cuts a longer document at that many tokens, or before an
  image the cut would split; the cut document keeps no EOS (it did not end), records how many tokens it
  lost (``Document.truncated``: the driver counts and lists it), and is refused (``too_long``) when
  nothing to learn is left.
* Each text part is tokenized on its own (SentencePiece adds its word-boundary prefix to each), as the
  reference does; an image becomes ``tokenizer.image_layout_ids(rows, cols)`` and its pixels are stored
  after the size rule, encoded by :mod:`~megatron.solo.data.codec`.
* ``layout="haplo"`` (HaploVL): an image is the released anyres tiling (:mod:`megatron.solo.haplo.anyres`):
  the best-fit canvas (``tiles_h·T × tiles_w·T`` pixels, letterboxed) is stored as one image, and the
  image takes ``H'·W' + H'`` positions (the unpadded patch grid, a newline after each row, no begin/end
  tokens), every one carrying the ``<vpatch>`` id as a placeholder (the model replaces them all). The
  crop of the unpadding is the image's ``crop`` (top, left, in patches) and its tile side ``side``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from megatron.solo import image as _image
from megatron.solo.data import codec
from megatron.solo.data.errors import Origin, SampleError
from megatron.solo.data.samples import ImageRef, Sample, Turn
from megatron.solo.haplo import anyres
from megatron.solo.image import DEFAULT_CONFIG, ImageConfig, ImageError
from megatron.solo.tokenizer import LLAMA3_CHAT_TOKENS, check_chat_template

TEMPLATES = ("mistral", "plain", "llama3")
LAYOUTS = ("solo", "haplo")
INST_OPEN, INST_CLOSE = "[INST]", "[/INST]"
_EOS = object()  # marker for an end-of-turn </s> in a rendered sequence


@dataclass(frozen=True)
class _Special:
    """A base special token in a rendered sequence, encoded by id (Llama-3's chat markers)."""

    name: str


HEADER_OPEN, HEADER_CLOSE, END_OF_TURN = (_Special(n) for n in LLAMA3_CHAT_TOKENS)
check_template = check_chat_template  # ValueError if the template needs special tokens the tokenizer lacks (the
# tokenizer's check, so the HF export refuses the same combinations)


@dataclass(frozen=True, kw_only=True)
class EncodeConfig:
    """How samples become documents."""

    image: ImageConfig | None = None
    """Size rule, normalisation and decompression-bomb limit of the image front end (None: the layout's:
    SOLO's defaults, or ``anyres``'s 14-px patches and CLIP normalisation)."""
    layout: str = "solo"
    """How an image is laid out in the tokens: ``solo`` (rows of ``<vpatch>`` between ``<vision>`` tokens)
    or ``haplo`` (HaploVL's anyres tiles, a newline position per row)."""
    anyres: anyres.AnyresConfig = anyres.DEFAULT_ANYRES
    """HaploVL's tiling (``layout="haplo"`` only)."""
    image_format: str = codec.DEFAULT_FORMAT
    """How resized images are stored: jpeg (default), webp, png, webp-lossless or raw."""
    image_quality: int = codec.DEFAULT_QUALITY
    """Quality of the lossy formats (1-100)."""
    chat_template: str = "mistral"
    """``mistral`` ([INST] … [/INST] answer</s>), ``plain`` (the reference's concatenation) or ``llama3``
    (Llama-3-Instruct's headers and ``<|eot_id|>``)."""
    append_eod: bool = True
    """End each document with EOS (a target iff the token before it is)."""
    max_aspect_distortion: float | None = 4.0
    """Refuse images (reason ``sliver``) whose aspect ratio the size rule changes by more than this factor."""
    max_sample_length: int | None = None
    """Cut each document to at most this many tokens (None: no limit; the packer still fits ``seq_length``)."""

    def __post_init__(self):
        if self.layout not in LAYOUTS:
            raise ValueError(f"EncodeConfig.layout must be one of {', '.join(LAYOUTS)}, got {self.layout!r}")
        if self.image is None:
            object.__setattr__(self, "image", self.anyres.image_config if self.layout == "haplo" else DEFAULT_CONFIG)
        elif self.layout == "haplo" and self.image.patch_size != self.anyres.patch_size:
            raise ValueError(
                f"EncodeConfig.image: patch_size {self.image.patch_size} differs from the anyres tiling's "
                f"{self.anyres.patch_size}"
            )
        if self.image_format not in codec.CODECS:
            raise ValueError(
                f"EncodeConfig.image_format must be one of {', '.join(codec.CODECS)}, got {self.image_format!r}"
            )
        if not (isinstance(self.image_quality, int) and 1 <= self.image_quality <= 100):
            raise ValueError(f"EncodeConfig.image_quality must be an int in 1..100, got {self.image_quality!r}")
        if self.chat_template not in TEMPLATES:
            raise ValueError(
                f"EncodeConfig.chat_template must be one of {', '.join(TEMPLATES)}, got {self.chat_template!r}"
            )
        if self.max_aspect_distortion is not None and not self.max_aspect_distortion >= 1:
            raise ValueError(
                f"EncodeConfig.max_aspect_distortion must be >= 1 or None, got {self.max_aspect_distortion!r}"
            )
        if self.max_sample_length is not None and not (
            isinstance(self.max_sample_length, int) and self.max_sample_length >= 8
        ):
            raise ValueError(
                f"EncodeConfig.max_sample_length must be an int >= 8 or None, got {self.max_sample_length!r}"
            )


@dataclass(frozen=True)
class EncodedImage:
    """One image of a document: where its ``<vision>`` token is, its patch grid and its stored bytes.

    HaploVL layout (``crop`` set): ``position`` is the image's first token, ``n_rows × n_cols`` the patch grid
    of the whole stored canvas, ``crop`` = (top, left) the patches the unpadding removes from each end, and
    ``side`` the tile's side in patches (the position table is ``side²``).
    """

    position: int
    n_rows: int
    n_cols: int
    codec: int
    data: bytes
    crop: tuple[int, int] | None = None
    side: int = 0

    @property
    def grid(self) -> tuple[int, int]:
        """(rows, cols) of the patches that reach the sequence."""
        if self.crop is None:
            return self.n_rows, self.n_cols
        return self.n_rows - 2 * self.crop[0], self.n_cols - 2 * self.crop[1]

    @property
    def n_patches(self) -> int:
        rows, cols = self.grid
        return rows * cols

    @property
    def num_tokens(self) -> int:
        if self.crop is None:
            return _image.layout_length(self.n_rows, self.n_cols)
        rows, cols = self.grid
        return rows * (cols + 1)

    def shifted(self, offset: int) -> EncodedImage:
        return EncodedImage(
            self.position + offset, self.n_rows, self.n_cols, self.codec, self.data, self.crop, self.side
        )


@dataclass(frozen=True)
class Document:
    """A tokenized sample (or a chunk of one)."""

    tokens: np.ndarray
    """int32 [n] token ids."""
    targets: np.ndarray
    """bool [n]: token i is to be predicted."""
    images: tuple[EncodedImage, ...]
    origin: Origin
    continuation: bool = field(default=False)
    """A chunk after the first of a split text document (it starts mid-text, without BOS)."""
    truncated: int = field(default=0)
    """Tokens cut off the end by ``EncodeConfig.max_sample_length`` (0: whole)."""

    def __len__(self) -> int:
        return len(self.tokens)

    def cut_allowed(self, n: int) -> bool:
        """Whether [0, n) / [n, len) leaves every image whole on one side."""
        return all(not (im.position < n < im.position + im.num_tokens) for im in self.images)

    def cut_before(self, limit: int) -> int:
        """The largest cut ≤ ``limit`` that leaves every image whole: ``limit``, or the start of the image
        straddling it."""
        return next((im.position for im in self.images if im.position < limit < im.position + im.num_tokens), limit)

    def head(self, n: int) -> Document:
        """The first ``n`` tokens (an image may not straddle the cut)."""
        assert self.cut_allowed(n), n
        return Document(
            self.tokens[:n],
            self.targets[:n],
            tuple(im for im in self.images if im.position < n),
            self.origin,
            self.continuation,
        )

    def tail(self, n: int) -> Document:
        """Tokens from ``n`` on, as a continuation chunk."""
        assert self.cut_allowed(n), n
        images = tuple(im.shifted(-n) for im in self.images if im.position >= n)
        return Document(self.tokens[n:], self.targets[n:], images, self.origin, continuation=True)


def encode_sample(sample: Sample, tokenizer, config: EncodeConfig) -> Document:
    """Sample → Document; raises :class:`SampleError` (bad image, sliver, nothing to learn)."""
    tokens, targets, images = encode_turns(sample.turns, tokenizer, config, sample.origin)
    if config.append_eod and not (config.chat_template == "llama3" and tokens[-1] == tokenizer.eos_id):
        tokens = np.append(tokens, np.int32(tokenizer.eos_id))
        targets = np.append(targets, targets[-1] or _ends_with_answer(sample.turns, config.chat_template))
    if not targets.any():
        raise SampleError("no_targets", sample.origin, "no assistant text to learn (loss would be empty)")
    doc = Document(tokens, targets, images, sample.origin)
    if config.max_sample_length is not None and len(doc) > config.max_sample_length:
        doc = _truncate(doc, config.max_sample_length)
    return doc


def _ends_with_answer(turns: tuple[Turn, ...], template: str) -> bool:
    """Whether the final ``</s>`` closes a text answer under the mistral template: then it is learnt even
    after an empty answer (an ``sft`` row's ``""``), as every other answer's ``</s>`` is."""
    last = next((t for t in reversed(turns) if t.parts), None)
    return (
        template == "mistral"
        and last is not None
        and last.role == "assistant"
        and any(isinstance(p, str) for p in last.parts)
    )


def _truncate(doc: Document, limit: int) -> Document:
    """The first ``limit`` tokens (fewer if an image straddles the cut); ``too_long`` if nothing to learn is left."""
    cut = doc.cut_before(limit)
    head = doc.head(cut)
    if not head.targets[1:].any():  # the first token of a document is never predicted
        raise SampleError(
            "too_long",
            doc.origin,
            f"{len(doc)} tokens > --max-sample-length {limit}, and nothing to learn is left in the first {cut}",
        )
    return Document(head.tokens, head.targets, head.images, doc.origin, truncated=len(doc) - cut)


def encode_turns(
    turns: tuple[Turn, ...], tokenizer, config: EncodeConfig, origin: Origin
) -> tuple[np.ndarray, np.ndarray, tuple[EncodedImage, ...]]:
    """BOS and the rendered turns → (token ids int32 [n], targets bool [n], images), without the final
    EOS: a document (:func:`encode_sample`) or a generation prompt (``inference.build_prompt``)."""
    ids: list[list[int]] = [[tokenizer.bos_id]]
    flags: list[bool] = [False]
    images: list[EncodedImage] = []
    length = 1
    for part, target in render(turns, config.chat_template):
        if isinstance(part, ImageRef):
            encoded, part_ids = _encode_image(part, tokenizer, config, origin, position=length)
            images.append(encoded)
            target = False
        elif isinstance(part, _Special):
            part_ids = [tokenizer.token_to_id(part.name)]
        else:
            part_ids = [tokenizer.eos_id] if part is _EOS else tokenizer.encode(part)
        ids.append(part_ids)
        flags.append(target)
        length += len(part_ids)
    tokens = np.concatenate([np.asarray(part, dtype=np.int32) for part in ids])
    targets = np.repeat(np.array(flags, dtype=bool), [len(p) for p in ids])
    return tokens, targets, tuple(images)


def render(turns: tuple[Turn, ...], template: str) -> Iterator[tuple[object, bool]]:
    """Turns → (part, is_target) in token order; parts are text, ImageRef or the end-of-turn marker."""
    turns = tuple(t for t in turns if t.parts)
    if template == "llama3":
        yield from _render_llama3(turns)
        return
    if template == "plain":
        for turn in turns:
            for part in turn.parts:
                yield part, turn.role == "assistant"
        return
    system: list = []
    last = len(turns) - 1
    for i, turn in enumerate(turns):
        if turn.role == "system" and i < last:
            system.extend(turn.parts)
            continue
        if turn.role == "assistant" and not system:
            yield from ((p, True) for p in turn.parts)
            if i < last:
                yield _EOS, True
            continue
        # a user turn, or system parts with no user turn to open (then they stand as one)
        user_parts = system + (list(turn.parts) if turn.role != "assistant" else [])
        yield INST_OPEN, False
        yield from ((p, False) for p in user_parts)
        yield INST_CLOSE, False
        system = []
        if turn.role == "assistant":
            yield from ((p, True) for p in turn.parts)
            if i < last:
                yield _EOS, True


def _render_llama3(turns: tuple[Turn, ...]) -> Iterator[tuple[object, bool]]:
    def header(role: str):
        return ((HEADER_OPEN, False), (role, False), (HEADER_CLOSE, False), ("\n\n", False))

    for turn in turns:
        target = turn.role == "assistant"
        yield from header(turn.role)
        yield from ((p, target) for p in turn.parts)
        yield END_OF_TURN, target
    if turns and turns[-1].role != "assistant":
        yield from header("assistant")


def _encode_image(ref: ImageRef, tokenizer, config: EncodeConfig, origin: Origin, position: int):
    img = _load(ref, config.image, origin)
    if config.layout == "haplo":
        return _encode_haplo_image(img, tokenizer, config, position)
    width, height = img.size
    size = _image.target_size(width, height, config.image.patch_size, config.image.max_size)
    distortion = _distortion((width, height), size)
    if config.max_aspect_distortion is not None and distortion > config.max_aspect_distortion:
        raise SampleError(
            "sliver",
            origin,
            f"{width}x{height} image would become {size[0]}x{size[1]}: aspect ratio changed {distortion:.1f}x "
            f"(limit {config.max_aspect_distortion:g}x)",
        )
    resized = _image.resize_image(img, size)
    data = codec.encode_image(resized, config.image_format, config.image_quality)
    n_rows, n_cols = size[1] // config.image.patch_size, size[0] // config.image.patch_size
    encoded = EncodedImage(position, n_rows, n_cols, codec.CODECS[config.image_format], data)
    return encoded, tokenizer.image_layout_ids(n_rows, n_cols)


def _encode_haplo_image(img, tokenizer, config: EncodeConfig, position: int):
    """HaploVL: the anyres canvas stored whole, the unpadded grid's positions (+ a newline per row)."""
    tiling = config.anyres
    img = img.convert("RGB")
    grid = anyres.anyres_grid(img.size[1], img.size[0], tiling)
    tiles = anyres.image_tiles(img, tiling)  # [tiles_h·tiles_w, T, T, 3], row-major
    t = tiling.tile_size
    canvas = tiles.reshape(grid.tiles_h, grid.tiles_w, t, t, 3).transpose(0, 2, 1, 3, 4)
    canvas = canvas.reshape(grid.tiles_h * t, grid.tiles_w * t, 3)
    data = codec.encode_image(Image.fromarray(canvas), config.image_format, config.image_quality)
    side = tiling.positions_per_side
    encoded = EncodedImage(
        position,
        grid.tiles_h * side,
        grid.tiles_w * side,
        codec.CODECS[config.image_format],
        data,
        crop=(grid.top, grid.left),
        side=side,
    )
    return encoded, [tokenizer.vision_patch_id] * encoded.num_tokens


def _load(ref: ImageRef, config: ImageConfig, origin: Origin):
    try:
        return _image.load_image(ref.source, max_pixels=config.max_pixels)
    except ImageError as e:
        raise SampleError(e.reason, origin, str(e)) from e
    except MemoryError:
        raise
    except Exception as e:  # Pillow raises assorted types on hostile bytes (struct.error, IndexError, …)
        if isinstance(e, OSError) and e.errno is not None:  # the file system's (a disk error): the boundary decides
            raise
        name = _image.describe_source(ref.source)
        raise SampleError("corrupt_image", origin, f"{name}: {type(e).__name__}: {e}") from e


def _distortion(original: tuple[int, int], resized: tuple[int, int]) -> float:
    """Factor by which the aspect ratio changes: 1.0 for a uniform scale."""
    ratio = (original[0] / original[1]) / (resized[0] / resized[1])
    return max(ratio, 1 / ratio)


__all__ = [
    "LAYOUTS",
    "TEMPLATES",
    "Document",
    "EncodeConfig",
    "EncodedImage",
    "encode_sample",
    "encode_turns",
    "render",
]
