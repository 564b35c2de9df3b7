"""SoloProcessor: images + text (or chat messages) → the inputs ``SoloForCausalLM`` takes, batched for ``generate``.

Self-contained (imports only numpy, PIL, torch and transformers) so it ships inside an exported checkpoint and
loads with ``AutoProcessor.from_pretrained(dir, trust_remote_code=True)`` where solo-megatron is not installed.
The image front end below re-implements ``megatron.solo.image`` (size rule, PIL bilinear resize, ImageNet
normalisation, C×P×P patches in row-major order) and the text layout re-implements preprocessing's
``encode_turns``; tests check both give identical ids and patches.
"""

from __future__ import annotations

import base64
import io
import os
import re
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageOps
from transformers import BatchFeature, ProcessorMixin

IMAGE_PLACEHOLDER = "<image>"
VISION_START, VISION_PATCH, VISION_ROW_SEP, VISION_FRAME_SEP, VISION_END = (
    "<vision>",
    "<vpatch>",
    "<vrow_sep>",
    "<vframe_sep>",
    "</vision>",
)
VISION_TOKENS = (VISION_START, VISION_PATCH, VISION_ROW_SEP, VISION_FRAME_SEP, VISION_END)
IMAGE_END_TOKENS = (VISION_END, VISION_START)
MODEL_INPUT_NAMES = ["input_ids", "attention_mask", "vision_patches", "vision_patch_indices"]
_ORIENTATION_TAG = 0x0112

# The Mistral-instruct v0.1 layout preprocessing's "mistral" template writes: system parts open the next user
# turn, every assistant turn but the last ends with EOS (</s>; the tokenizer's own, e.g. a tokenizer.json base's
# <|end_of_text|>), and an image part becomes the <image> placeholder.
MISTRAL_CHAT_TEMPLATE = (
    "{%- macro render(content) -%}"
    "{%- if content is string -%}{{ content }}"
    "{%- else -%}{%- for part in content -%}"
    '{%- if part.type == "image" -%}<image>{%- elif part.type == "text" -%}{{ part.text }}'
    '{%- else -%}{{ raise_exception("content parts must be of type image or text, got " ~ part.type) }}{%- endif -%}'
    "{%- if not loop.last %} {% endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- endmacro -%}"
    "{{- bos_token -}}"
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


class SoloProcessor(ProcessorMixin):
    """Images and text → ``input_ids``, ``attention_mask``, ``vision_patches``, ``vision_patch_indices``.

    ``processor(images=None, text=None, *, image_end_token=None, padding_side="left", return_tensors="pt")``

    * ``text``: a string or a list of strings (one per sample). ``images``: None, one image, a flat list, or a
      list of lists (one list per sample). An image is a PIL image, a path, bytes, a binary file object or a
      ``data:…;base64,`` URL.
    * Placement: each ``<image>`` in a text is replaced by the next of that sample's images, in order. A sample
      whose text has no ``<image>`` gets its images right after BOS, before its text (the pretraining layout:
      ``processor(images=photo, text="A photo of")`` continues a caption). A flat list is shared out over the
      samples' placeholders in order, or one image per sample when no text has a placeholder.
    * Text: BOS first, unless ``<s>`` comes before any text (``"<image><s>[INST] q [/INST]"`` is the released
      SOLO-7B demo's layout, image before BOS); the text is cut at ``<image>``, ``<s>``, ``</s>``,
      ``[INST]`` and ``[/INST]``, each piece is stripped and tokenized on its own (``<s>``/``</s>`` are BOS/EOS:
      the tokenizer's own names, e.g. ``<|begin_of_text|>`` for a tokenizer.json base), exactly as preprocessing
      tokenizes a sample's parts. Literal vision-token text (``"<vision>"``) stays text.
    * An image becomes ``<vision>`` rows of ``<vpatch>`` separated by ``<vrow_sep>``, then ``</vision>`` — or
      ``<vision>`` again with ``image_end_token="<vision>"`` (the released SOLO-7B SFT model's quirk; a field of
      ``processor_config.json``, overridable per call).

    Output, a ``BatchFeature`` of torch tensors, padded on the left (``padding_side``) with the pad id:
    ``input_ids``/``attention_mask`` [b, s] int64; ``vision_patches`` [N, 3·P·P] float32, the normalised patches of
    every image of the batch in order; ``vision_patch_indices`` [b, s] int64, the row of ``vision_patches`` each
    ``<vpatch>`` shows, -1 elsewhere (text, padding). ``batch_decode``/``decode`` drop vision ids.
    """

    tokenizer_class = "AutoTokenizer"

    def __init__(
        self,
        tokenizer=None,
        chat_template: str | None = None,
        image_end_token: str = VISION_END,
        patch_size: int = 32,
        max_size: int = 1024,
        image_mean: Sequence[float] = (0.485, 0.456, 0.406),
        image_std: Sequence[float] = (0.229, 0.224, 0.225),
        max_pixels: int | None = 89_478_485,
        **kwargs,
    ):
        _check_end_token(image_end_token)
        if not (isinstance(patch_size, int) and patch_size >= 1 and isinstance(max_size, int)):
            raise ValueError(f"patch_size and max_size must be positive ints, got {patch_size!r}, {max_size!r}")
        if max_size < patch_size or max_size % patch_size:
            raise ValueError(f"max_size must be a multiple of patch_size={patch_size}, got {max_size}")
        self.image_end_token = image_end_token
        self.patch_size = patch_size
        self.max_size = max_size
        self.image_mean = tuple(float(m) for m in image_mean)
        self.image_std = tuple(float(s) for s in image_std)
        self.max_pixels = max_pixels
        super().__init__(tokenizer, chat_template=chat_template or MISTRAL_CHAT_TEMPLATE, **kwargs)

    @property
    def model_input_names(self) -> list[str]:
        return list(MODEL_INPUT_NAMES)

    @property
    def vision_token_ids(self) -> list[int]:
        return self.tokenizer.convert_tokens_to_ids(list(VISION_TOKENS))

    # -- call -------------------------------------------------------------------------------------

    def __call__(
        self,
        images=None,
        text: str | Sequence[str] | None = None,
        *,
        image_end_token: str | None = None,
        padding_side: str = "left",
        return_tensors: str | None = "pt",
        padding: bool | str = True,
        **kwargs,
    ) -> BatchFeature:
        if kwargs:
            raise TypeError(f"SoloProcessor got unexpected arguments: {', '.join(sorted(kwargs))}")
        if return_tensors not in (None, "pt"):
            raise ValueError(f"SoloProcessor returns torch tensors (return_tensors='pt'), got {return_tensors!r}")
        if padding not in (True, "longest"):
            raise ValueError(f"SoloProcessor pads to the longest sample (padding=True), got padding={padding!r}")
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        end_token = self.image_end_token if image_end_token is None else _check_end_token(image_end_token)
        texts = _as_texts(text, images)
        per_sample = _share_images(images, texts)
        ids, indices, patches = [], [], []
        for i, (sample_text, sample_images) in enumerate(zip(texts, per_sample)):
            sample_ids, sample_indices, sample_patches = self._encode(sample_text, sample_images, end_token, i)
            offset = sum(len(p) for p in patches)
            ids.append(sample_ids)
            indices.append(np.where(sample_indices >= 0, sample_indices + offset, -1))
            patches.extend(sample_patches)
        return BatchFeature(self._pad(ids, indices, patches, padding_side), tensor_type=None)

    def _encode(self, text: str, images: list, end_token: str, sample: int):
        """One sample → (ids, int64 patch index per id (-1 for text), list of [n, 3·P·P] float32 arrays)."""
        tok = self.tokenizer
        pieces = _segments(tok).split(text)
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
        is_patch: list[np.ndarray] = []  # bool per id, piece by piece: the images' patch positions
        patches: list[np.ndarray] = []
        pending = iter(images)
        patch_id = self.tokenizer.convert_tokens_to_ids(VISION_PATCH)
        for piece in stripped:
            if piece == IMAGE_PLACEHOLDER:
                try:
                    image_patches, n_rows, n_cols = self.image_patches(next(pending))
                except (OSError, ValueError, SyntaxError) as e:
                    raise ValueError(f"sample {sample}: image {len(patches)}: {e}") from e
                layout = self._layout_ids(n_rows, n_cols, end_token)
                ids += layout
                is_patch.append(np.asarray(layout) == patch_id)
                patches.append(image_patches)
            elif piece in (tok.bos_token, tok.eos_token):
                ids.append(tok.convert_tokens_to_ids(piece))
                is_patch.append(np.zeros(1, bool))
            else:
                piece_ids = tok(piece, add_special_tokens=False, split_special_tokens=True)["input_ids"]
                ids += piece_ids
                is_patch.append(np.zeros(len(piece_ids), bool))
        mask = np.concatenate(is_patch) if is_patch else np.zeros(0, bool)
        return ids, np.where(mask, np.cumsum(mask) - 1, -1).astype(np.int64), patches  # patches numbered in order

    def _layout_ids(self, n_rows: int, n_cols: int, end_token: str) -> list[int]:
        start, patch, sep, end = self.tokenizer.convert_tokens_to_ids(
            [VISION_START, VISION_PATCH, VISION_ROW_SEP, end_token]
        )
        row = [patch] * n_cols
        return [start] + row + ([sep] + row) * (n_rows - 1) + [end]

    def _pad(self, ids, indices, patches, side: str) -> dict:
        pad_id = self.tokenizer.pad_token_id
        if pad_id is None:
            pad_id = self.tokenizer.eos_token_id
        width = max(len(row) for row in ids)
        input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(ids), width), dtype=torch.long)
        patch_index = torch.full((len(ids), width), -1, dtype=torch.long)
        for b, (row, row_index) in enumerate(zip(ids, indices)):
            span = slice(width - len(row), width) if side == "left" else slice(0, len(row))
            input_ids[b, span] = torch.tensor(row, dtype=torch.long)
            mask[b, span] = 1
            patch_index[b, span] = torch.from_numpy(row_index)
        dim = 3 * self.patch_size**2
        vision = torch.from_numpy(np.concatenate(patches)) if patches else torch.zeros((0, dim), dtype=torch.float32)
        return {
            "input_ids": input_ids,
            "attention_mask": mask,
            "vision_patches": vision,
            "vision_patch_indices": patch_index,
        }

    # -- images ----------------------------------------------------------------------------------

    def image_patches(self, source) -> tuple[np.ndarray, int, int]:
        """One image → (normalised float32 patches [rows·cols, 3·P·P], rows, cols), as preprocessing makes them."""
        img = load_image(source, self.max_pixels)
        size = target_size(img.width, img.height, self.patch_size, self.max_size)
        if img.size != size:
            img = img.resize(size, Image.Resampling.BILINEAR)
        p = self.patch_size
        pixels = np.asarray(img)
        rows, cols = pixels.shape[0] // p, pixels.shape[1] // p
        grid = pixels.reshape(rows, p, cols, p, 3).transpose(0, 2, 4, 1, 3)  # [rows, cols, 3, P, P]
        out = np.empty(grid.shape, dtype=np.float32)
        np.copyto(out, grid, casting="unsafe")
        shape = (1, 1, 3, 1, 1)  # the float32 ops, in the order, of ToTensor + Normalize
        np.divide(out, np.float32(255), out=out)
        np.subtract(out, np.asarray(self.image_mean, np.float32).reshape(shape), out=out)
        np.divide(out, np.asarray(self.image_std, np.float32).reshape(shape), out=out)
        return out.reshape(rows * cols, 3 * p * p), rows, cols

    # -- chat ------------------------------------------------------------------------------------

    def apply_chat_template(
        self,
        conversation,
        chat_template: str | None = None,
        *,
        tokenize: bool = False,
        images=None,
        **kwargs,
    ):
        """Messages (``{"role", "content"}``; content a string or ``{"type": "image"|"text"}`` parts) → the prompt.

        ``tokenize=False``: the rendered text (a list for a batch of conversations), ``<image>`` where an image
        part was. ``tokenize=True``: ``self(images, text, **kwargs)``, a BatchFeature; the images are the parts'
        own (``"image"``, ``"url"`` or ``"path"`` key), or, for parts without one, ``images`` in order.
        The Mistral template needs no generation prompt: the rendered prompt ends with ``[/INST]``.
        """
        kwargs.pop("add_generation_prompt", None)
        kwargs.pop("return_dict", None)
        batched = bool(conversation) and isinstance(conversation[0], (list, tuple))
        conversations = list(conversation) if batched else [conversation]
        template = chat_template or self.chat_template
        texts = [
            self.tokenizer.apply_chat_template(list(c), chat_template=template, tokenize=False) for c in conversations
        ]
        if not tokenize:
            return texts if batched else texts[0]
        return self(images=_chat_images(conversations, images), text=texts, **kwargs)

    # -- decoding --------------------------------------------------------------------------------

    def batch_decode(self, sequences, skip_special_tokens: bool = True, **kwargs) -> list[str]:
        """Ids → text, vision ids dropped (and other special ids unless ``skip_special_tokens=False``)."""
        drop = torch.tensor(self.vision_token_ids, dtype=torch.long)
        rows = [torch.as_tensor(row, dtype=torch.long).cpu() for row in sequences]
        rows = [row[~torch.isin(row, drop)].tolist() for row in rows]
        return self.tokenizer.batch_decode(rows, skip_special_tokens=skip_special_tokens, **kwargs)

    def decode(self, ids, skip_special_tokens: bool = True, **kwargs) -> str:
        return self.batch_decode([ids], skip_special_tokens=skip_special_tokens, **kwargs)[0]


# -- inputs ------------------------------------------------------------------------------------------


def _check_end_token(token: str) -> str:
    if token not in IMAGE_END_TOKENS:
        raise ValueError(f"image_end_token must be {VISION_END!r} or {VISION_START!r} (SOLO-7B's quirk), got {token!r}")
    return token


def _segments(tok) -> re.Pattern:
    """The markers a text is cut at: <image>, BOS and EOS (Mistral: <s>, </s>), [INST] and [/INST]."""
    markers = (IMAGE_PLACEHOLDER, tok.bos_token, tok.eos_token, "[INST]", "[/INST]")
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


def target_size(width: int, height: int, patch_size: int = 32, max_size: int = 1024) -> tuple[int, int]:
    """SOLO's size rule: long side rounded up to a multiple of P (at most ``max_size``), short side scaled by the
    same factor, truncated, rounded up to a multiple of P (at least P). Returns (width, height)."""
    long_side, short_side = max(width, height), min(width, height)
    new_long = min(-(-long_side // patch_size) * patch_size, max_size)
    new_short = max(-(-(new_long * short_side // long_side) // patch_size) * patch_size, patch_size)
    return (new_long, new_short) if height <= width else (new_short, new_long)


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


__all__ = ["MISTRAL_CHAT_TEMPLATE", "SoloProcessor"]
