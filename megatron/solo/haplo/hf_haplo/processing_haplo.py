"""HaploProcessor: images + text (or chat messages) → the inputs ``HaploForCausalLM`` (its ``generate``) takes.

Self-contained (numpy, PIL, torch, transformers) so it ships inside an export and loads with
``AutoProcessor.from_pretrained(dir, trust_remote_code=True)`` where solo-megatron is not installed. It re-implements
what preprocessing with ``--image-layout haplo`` writes (``megatron.solo.data.encode`` with
``megatron.solo.haplo.anyres``): the Mistral ``[INST]`` text layout (Llama-3's headers with
``chat_format="llama3"``), each part tokenized on its own; an image
as the released anyres tiling (best-fit canvas, PIL bicubic resize, black centred padding, tiles row-major,
CLIP normalisation) taking ``H'·W' + H'`` positions (the unpadded patch grid and a newline per row), every one
the ``<vpatch>`` id (the model's ``image_token_index``). Tests check the ids and pixels equal preprocessing's.

Output: ``input_ids``/``attention_mask`` [b, s] (padded on the left by default), ``pixel_values``
[N tiles, 3, T, T] float32 (every image's tiles in order) and ``image_sizes`` [n images, 2] (height, width of the
originals). Placement and text rules are ``SoloProcessor``'s: each ``<image>`` takes the sample's next image;
a text without one gets its images right after BOS. Adjacent images (no text between) would merge into one
attention block in the model: keep text between images.
"""

from __future__ import annotations

import base64
import io
import math
import os
import re
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageOps
from transformers import BatchFeature, ProcessorMixin

from .modeling_haplo import select_best_resolution

IMAGE_PLACEHOLDER = "<image>"
IMAGE_TOKEN = "<vpatch>"
MODEL_INPUT_NAMES = ["input_ids", "attention_mask", "pixel_values", "image_sizes"]
_ORIENTATION_TAG = 0x0112
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

_RENDER_MACRO = (
    "{%- macro render(content) -%}"
    "{%- if content is string -%}{{ content }}"
    "{%- else -%}{%- for part in content -%}"
    '{%- if part.type == "image" -%}<image>{%- elif part.type == "text" -%}{{ part.text }}'
    '{%- else -%}{{ raise_exception("content parts must be of type image or text, got " ~ part.type) }}{%- endif -%}'
    "{%- if not loop.last %} {% endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- endmacro -%}"
)
# The Mistral-instruct v0.1 layout preprocessing's "mistral" template writes (SoloProcessor's), with the
# tokenizer's own BOS/EOS (Llama-3's <|begin_of_text|>/<|end_of_text|>, Mistral's <s>/</s>).
MISTRAL_CHAT_TEMPLATE = (
    _RENDER_MACRO + "{{- bos_token -}}"
    '{%- set ns = namespace(system="") -%}'
    "{%- for message in messages -%}"
    '{%- if message.role == "system" and not loop.last -%}'
    '{%- set ns.system = ns.system ~ render(message.content) ~ " " -%}'
    '{%- elif message.role in ("user", "system") -%}[INST] {{ ns.system }}{{ render(message.content) }} [/INST]'
    '{%- set ns.system = "" -%}'
    '{%- elif message.role == "assistant" -%}'
    "{%- if ns.system %}[INST] {{ ns.system }}[/INST]{% set ns.system = '' %}{% endif -%}"
    "{{ ' ' ~ render(message.content) }}{%- if not loop.last -%}{{ eos_token }}{%- endif -%}"
    '{%- else -%}{{ raise_exception("roles must be system, user or assistant, got " ~ message.role) }}'
    "{%- endif -%}"
    "{%- endfor -%}"
)
# Llama-3-Instruct's layout, preprocessing's "llama3" template: every turn as a header, its content trimmed,
# <|eot_id|>; the assistant header after a last turn that is not the assistant's (the generation prompt).
LLAMA3_CHAT_TEMPLATE = (
    _RENDER_MACRO + "{{- bos_token -}}"
    "{%- for message in messages -%}"
    '{%- if message.role not in ("system", "user", "assistant") -%}'
    '{{ raise_exception("roles must be system, user or assistant, got " ~ message.role) }}{%- endif -%}'
    "<|start_header_id|>{{ message.role }}<|end_header_id|>\n\n{{ render(message.content) | trim }}<|eot_id|>"
    "{%- endfor -%}"
    '{%- if messages and messages[-1].role != "assistant" %}<|start_header_id|>assistant<|end_header_id|>\n\n'
    "{% endif -%}"
)
CHAT_TEMPLATES = {"mistral": MISTRAL_CHAT_TEMPLATE, "llama3": LLAMA3_CHAT_TEMPLATE}
_LLAMA3_MARKERS = ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")


class HaploProcessor(ProcessorMixin):
    """Images and text → ``input_ids``, ``attention_mask``, ``pixel_values``, ``image_sizes`` (module docstring)."""

    tokenizer_class = "AutoTokenizer"

    def __init__(
        self,
        tokenizer=None,
        chat_template: str | None = None,
        tile_size: int = 336,
        patch_size: int = 14,
        image_grid_pinpoints: Sequence[Sequence[int]] = ((336, 336),),
        image_mean: Sequence[float] = CLIP_MEAN,
        image_std: Sequence[float] = CLIP_STD,
        max_pixels: int | None = 89_478_485,
        chat_format: str = "mistral",
        **kwargs,
    ):
        if chat_format not in CHAT_TEMPLATES:
            raise ValueError(f"chat_format must be one of {', '.join(CHAT_TEMPLATES)}, got {chat_format!r}")
        self.chat_format = chat_format
        if tile_size % patch_size:
            raise ValueError(f"tile_size {tile_size} is not a multiple of patch_size {patch_size}")
        self.tile_size, self.patch_size = int(tile_size), int(patch_size)
        self.image_grid_pinpoints = [[int(h), int(w)] for h, w in image_grid_pinpoints]
        self.image_mean = tuple(float(m) for m in image_mean)
        self.image_std = tuple(float(s) for s in image_std)
        self.max_pixels = max_pixels
        super().__init__(tokenizer, chat_template=chat_template or CHAT_TEMPLATES[chat_format], **kwargs)

    @property
    def model_input_names(self) -> list[str]:
        return list(MODEL_INPUT_NAMES)

    def __call__(self, images=None, text=None, *, padding_side: str = "left", return_tensors="pt", **kwargs):
        kwargs.pop("padding", None)
        if kwargs:
            raise TypeError(f"HaploProcessor got unexpected arguments: {', '.join(sorted(kwargs))}")
        if return_tensors not in (None, "pt"):
            raise ValueError(f"HaploProcessor returns torch tensors (return_tensors='pt'), got {return_tensors!r}")
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        texts = _as_texts(text, images)
        per_sample = _share_images(images, texts)
        ids, tiles, sizes = [], [], []
        for i, (sample_text, sample_images) in enumerate(zip(texts, per_sample)):
            sample_ids, sample_tiles, sample_sizes = self._encode(sample_text, sample_images, i)
            ids.append(sample_ids)
            tiles += sample_tiles
            sizes += sample_sizes
        return BatchFeature(self._pad(ids, tiles, sizes, padding_side), tensor_type=None)

    def _encode(self, text: str, images: list, sample: int):
        """One sample → (ids, [tiles, 3, T, T] arrays per image, (height, width) per image)."""
        tok = self.tokenizer
        pieces = _segments(tok, self.chat_format).split(text)
        n_slots = pieces.count(IMAGE_PLACEHOLDER)
        if n_slots and n_slots != len(images):
            raise ValueError(f"sample {sample}: its text has {n_slots} {IMAGE_PLACEHOLDER} but {len(images)} images")
        stripped = [p.strip() for p in pieces if p.strip()]
        first_text = next((p for p in stripped if p != IMAGE_PLACEHOLDER), None)
        if first_text != tok.bos_token:
            stripped.insert(0, tok.bos_token)
        if not n_slots and images:
            stripped[1:1] = [IMAGE_PLACEHOLDER] * len(images)
        ids: list[int] = []
        tiles, sizes = [], []
        pending = iter(images)
        image_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
        for piece in stripped:
            if piece == IMAGE_PLACEHOLDER:
                try:
                    pixels, n_tokens, size = self.image_pixels(next(pending))
                except (OSError, ValueError, SyntaxError) as e:
                    raise ValueError(f"sample {sample}: image {len(sizes)}: {e}") from e
                ids += [image_id] * n_tokens
                tiles.append(pixels)
                sizes.append(size)
            elif piece in (tok.bos_token, tok.eos_token) or (self.chat_format == "llama3" and piece in _LLAMA3_MARKERS):
                ids.append(tok.convert_tokens_to_ids(piece))
                if piece == "<|end_header_id|>":  # the template's "\n\n" after it, stripped with the next piece
                    ids += tok("\n\n", add_special_tokens=False)["input_ids"]
            else:
                ids += tok(piece, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        return ids, tiles, sizes

    def _pad(self, ids, tiles, sizes, side: str) -> dict:
        pad_id = self.tokenizer.pad_token_id
        if pad_id is None:
            pad_id = self.tokenizer.eos_token_id
        width = max(len(row) for row in ids)
        input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(ids), width), dtype=torch.long)
        for b, row in enumerate(ids):
            span = slice(width - len(row), width) if side == "left" else slice(0, len(row))
            input_ids[b, span] = torch.tensor(row, dtype=torch.long)
            mask[b, span] = 1
        out = {"input_ids": input_ids, "attention_mask": mask}
        if sizes:  # a text-only batch has no image keys (the model takes none)
            out["pixel_values"] = torch.from_numpy(np.concatenate(tiles))
            out["image_sizes"] = torch.tensor(sizes, dtype=torch.long)
        return out

    # -- images ----------------------------------------------------------------------------------

    def image_pixels(self, source) -> tuple[np.ndarray, int, tuple[int, int]]:
        """One image → (CLIP-normalised float32 tiles [n, 3, T, T], its sequence positions, (height, width))."""
        img = load_image(source, self.max_pixels)
        width, height = img.size
        t = self.tile_size
        target = select_best_resolution(height, width, self.image_grid_pinpoints)
        new_h, new_w = resized_size(height, width, target)
        resized = np.asarray(img.resize((new_w, new_h), Image.Resampling.BICUBIC))
        pad_y, pad_x = (target[0] - new_h) // 2, (target[1] - new_w) // 2
        canvas = np.pad(resized, ((pad_y, pad_y), (pad_x, pad_x), (0, 0)))  # may be 1 px short (the release's)
        tiles = []
        for y in range(0, target[0], t):
            for x in range(0, target[1], t):
                tile = Image.fromarray(canvas[y : y + t, x : x + t])
                tiles.append(np.asarray(tile.resize((t, t), Image.Resampling.BICUBIC)))
        pixels = np.stack(tiles).transpose(0, 3, 1, 2)  # [n, 3, T, T]
        out = np.empty(pixels.shape, dtype=np.float32)
        np.copyto(out, pixels, casting="unsafe")
        shape = (1, 3, 1, 1)  # the float32 ops, in the order, of preprocessing's normalisation
        np.divide(out, np.float32(255), out=out)
        np.subtract(out, np.asarray(self.image_mean, np.float32).reshape(shape), out=out)
        np.divide(out, np.asarray(self.image_std, np.float32).reshape(shape), out=out)
        return out, self.num_image_tokens(height, width), (height, width)

    def num_image_tokens(self, height: int, width: int) -> int:
        """``H'·W' + H'``: the unpadded patch grid of the best-fit canvas and a newline per row."""
        bh, bw = select_best_resolution(height, width, self.image_grid_pinpoints)
        side = self.tile_size // self.patch_size
        gh, gw = bh // self.tile_size * side, bw // self.tile_size * side
        rows, cols = gh, gw
        if width / height > gw / gh:
            rows = gh - 2 * ((gh - int(round(height * (gw / width), 7))) // 2)
        else:
            cols = gw - 2 * ((gw - int(round(width * (gh / height), 7))) // 2)
        return rows * cols + rows

    # -- chat ------------------------------------------------------------------------------------

    def apply_chat_template(self, conversation, chat_template: str | None = None, *, tokenize=False, images=None, **kw):
        """Messages (``{"role", "content"}``; content a string or ``{"type": "image"|"text"}`` parts) → the prompt
        text (``tokenize=False``) or ``self(images, text, **kw)`` (``tokenize=True``), as ``SoloProcessor``'s."""
        kw.pop("add_generation_prompt", None)
        kw.pop("return_dict", None)
        batched = bool(conversation) and isinstance(conversation[0], (list, tuple))
        conversations = list(conversation) if batched else [conversation]
        template = chat_template or self.chat_template
        texts = [
            self.tokenizer.apply_chat_template(list(c), chat_template=template, tokenize=False) for c in conversations
        ]
        if not tokenize:
            return texts if batched else texts[0]
        return self(images=_chat_images(conversations, images), text=texts, **kw)

    def batch_decode(self, sequences, skip_special_tokens: bool = True, **kwargs) -> list[str]:
        image_id = self.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        rows = [[int(t) for t in row if int(t) != image_id] for row in sequences]
        return self.tokenizer.batch_decode(rows, skip_special_tokens=skip_special_tokens, **kwargs)

    def decode(self, ids, skip_special_tokens: bool = True, **kwargs) -> str:
        return self.batch_decode([ids], skip_special_tokens=skip_special_tokens, **kwargs)[0]


# -- anyres (the released rules; megatron.solo.haplo.anyres re-implemented; the best fit is modeling_haplo's) --------


def resized_size(height: int, width: int, target) -> tuple[int, int]:
    th, tw = target
    if tw / width < th / height:
        return min(math.ceil(height * (tw / width)), th), tw
    return th, min(math.ceil(width * (th / height)), tw)


# -- inputs (SoloProcessor's rules) ------------------------------------------------------------------------


def _segments(tok, chat_format: str) -> re.Pattern:
    """The markers a text is split at: each piece between them is tokenized on its own (preprocessing's parts)."""
    turn = _LLAMA3_MARKERS if chat_format == "llama3" else ("[INST]", "[/INST]")
    markers = (IMAGE_PLACEHOLDER, tok.bos_token, tok.eos_token, *turn)  # Mistral: <s>, </s>
    return re.compile("(" + "|".join(re.escape(m) for m in dict.fromkeys(markers)) + ")")


def _is_image(x) -> bool:
    return isinstance(x, (Image.Image, str, os.PathLike, bytes, bytearray, memoryview)) or hasattr(x, "read")


def _as_texts(text, images) -> list[str]:
    if text is None:
        n = len(images) if isinstance(images, (list, tuple)) and images and not _is_image(images[0]) else 1
        return [""] * n
    if isinstance(text, str):
        return [text]
    if not text or not all(isinstance(t, str) for t in text):
        raise ValueError("text must be a string or a non-empty list of strings")
    return list(text)


def _share_images(images, texts: list[str]) -> list[list]:
    """Images per sample (see the class docstring for the rules)."""
    if images is None:
        return [[] for _ in texts]
    if _is_image(images):
        images = [images]
    images = list(images)
    if images and all(isinstance(x, (list, tuple)) for x in images):
        if len(images) != len(texts):
            raise ValueError(f"got image lists for {len(images)} samples but {len(texts)} texts")
        return [list(x) for x in images]
    if len(texts) == 1:
        return [images]
    slots = [t.count(IMAGE_PLACEHOLDER) for t in texts]
    if not any(slots) and len(images) == len(texts):
        return [[x] for x in images]
    if sum(slots) != len(images):
        raise ValueError(
            f"{len(images)} images for {sum(slots)} {IMAGE_PLACEHOLDER} placeholders in {len(texts)} texts; "
            "pass one list of images per sample instead"
        )
    out, start = [], 0
    for n in slots:
        out.append(images[start : start + n])
        start += n
    return out


def _chat_images(conversations, images) -> list[list]:
    """The image of every image part, per conversation; parts without one take ``images`` in order."""
    spare = iter([] if images is None else ([images] if _is_image(images) else list(images)))
    out = []
    for conversation in conversations:
        found = []
        for message in conversation:
            content = message.get("content")
            for part in content if isinstance(content, list) else []:
                if isinstance(part, dict) and part.get("type") == "image":
                    own = next((part[k] for k in ("image", "url", "path") if part.get(k) is not None), None)
                    if own is None:
                        own = next(spare, None)
                        if own is None:
                            raise ValueError("an image part has no image and images= has none left for it")
                    found.append(own)
        out.append(found)
    return out


# -- image front end (megatron.solo.image, re-implemented) -------------------------------------------


# -- image loading (megatron.solo.image's, re-implemented) ------------------------------------------


def load_image(source, max_pixels: int | None = None) -> Image.Image:
    """A path, ``data:`` URL, bytes, binary file or PIL image → 8-bit RGB with its EXIF orientation applied."""
    if isinstance(source, Image.Image):
        img = source
    else:
        if isinstance(source, str) and source[:5].lower() == "data:":
            source = base64.b64decode("".join(source.partition(",")[2].split()), validate=True)
        if isinstance(source, (bytes, bytearray, memoryview)):
            source = io.BytesIO(bytes(source))
        img = Image.open(source)
    if max_pixels is not None and img.width * img.height > max_pixels:
        raise ValueError(f"{img.width}x{img.height} image exceeds max_pixels={max_pixels}")
    img.load()
    if img.getexif().get(_ORIENTATION_TAG, 1) != 1:
        img = ImageOps.exif_transpose(img)
    return to_rgb(img)


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode → 8-bit RGB: transparency composited on white, 16-bit/float grey rescaled (not clipped)."""
    if img.mode == "RGB" and "transparency" not in img.info:
        return img
    if img.mode in ("P", "PA"):
        has_alpha = img.mode == "PA" or "transparency" in img.info or img.palette.mode == "RGBA"
        img = img.convert("RGBA" if has_alpha else "RGB")
    elif "transparency" in img.info and img.mode not in ("RGBA", "LA", "La", "RGBa"):
        keyed = img.copy()
        keyed.info.pop("transparency", None)
        differs = np.asarray(img).astype(np.int64) != np.asarray(img.info["transparency"], dtype=np.int64)
        opaque = differs.any(axis=-1) if differs.ndim == 3 else differs
        return _on_white(to_rgb(keyed), Image.fromarray(opaque.astype(np.uint8) * 255, "L"))
    if img.mode in ("La", "RGBa"):
        img = img.convert("LA" if img.mode == "La" else "RGBA")
    if img.mode in ("RGBA", "LA"):
        return _on_white(img.convert("RGB"), img.getchannel("A"))
    if img.mode.startswith("I") or img.mode == "F":
        values = np.nan_to_num(np.asarray(img).astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        peak = values.max(initial=0.0)
        if img.mode.startswith("I;16") or (img.mode == "I" and peak > 255):
            values = np.clip(values, 0, 65535) * (255 / 65535)
        elif img.mode == "F" and peak <= 1.0:
            values = values * 255
        return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), "L").convert("RGB")
    return img.convert("RGB")


def _on_white(rgb: Image.Image, alpha: Image.Image) -> Image.Image:
    background = Image.new("RGB", rgb.size, (255, 255, 255))
    background.paste(rgb, mask=alpha)
    return background


__all__ = ["HaploProcessor", "MISTRAL_CHAT_TEMPLATE"]
