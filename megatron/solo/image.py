"""Image front end: decode → target size → resize → normalise → 32×32 pixel patches, and back.

Faithful to the SOLO reference (reference spec §1):

* size rule: the long side is rounded *up* to a multiple of ``patch_size`` and capped at ``max_size``;
  the short side is scaled by the same factor, truncated, then rounded up to a multiple of
  ``patch_size`` (so small images are upscaled and the short side may stretch by < ``patch_size`` px);
* resize: PIL bilinear (antialiased when shrinking), exactly what torchvision's ``Resize`` does on a PIL image;
* normalise: ``(x / 255 - mean) / std`` in float32 with the ImageNet mean/std;
* patchify: row-major patch order, each patch flattened channel-first, ``vec[c*P*P + y*P + x]``.

Deliberate differences (docs/reference_differences.md):

* a sliver whose short side would round to 0 (5000×4) gets one patch row/column instead of crashing;
* EXIF orientation is applied; transparency is composited on white instead of dropped; 16-bit and
  float images are rescaled to 8 bit instead of clipped to white;
* decoding refuses images above ``max_pixels`` (a decompression-bomb limit) before decoding pixels.

Every failure to load raises :class:`ImageError`, which carries a short machine-readable ``reason``
(used by preprocessing to count skipped samples) and names the source.
"""

from __future__ import annotations

import base64
import binascii
import functools
import io
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

PATCH_SIZE = 32
MAX_SIZE = 1024
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_MAX_PIXELS = 89_478_485  # Pillow's own warning threshold (~0.25 GiB of RGB)
WHITE = (255, 255, 255)
ORIENTATION_TAG = 0x0112
_OBJECT_REPR = re.compile(r"<[^<>]* at 0x[0-9a-fA-F]+>")

ImageSource = str | os.PathLike | bytes | bytearray | memoryview | BinaryIO | Image.Image


class ImageError(ValueError):
    """An image that cannot be used. ``reason`` is one of :data:`ImageError.REASONS`."""

    REASONS = (
        "missing_file",
        "empty_file",
        "corrupt_image",
        "truncated_image",
        "decompression_bomb",
        "bad_data_url",
    )

    def __init__(self, reason: str, source: str, detail: str):
        assert reason in self.REASONS, reason
        self.reason = reason
        self.source = source
        self.detail = detail
        super().__init__(f"{source}: {reason.replace('_', ' ')}: {detail}")

    def __reduce__(self):  # crosses process boundaries (preprocessing workers) intact
        return type(self), (self.reason, self.source, self.detail)


@dataclass(frozen=True, kw_only=True)
class ImageConfig:
    """How images become patches. Defaults are SOLO's."""

    patch_size: int = PATCH_SIZE
    """Side of a square patch in pixels."""
    max_size: int = MAX_SIZE
    """Cap on the long side after resizing; a multiple of ``patch_size``."""
    mean: tuple[float, float, float] = IMAGENET_MEAN
    """Per-channel mean subtracted after scaling to [0, 1]."""
    std: tuple[float, float, float] = IMAGENET_STD
    """Per-channel standard deviation divided by after subtracting the mean."""
    max_pixels: int | None = DEFAULT_MAX_PIXELS
    """Refuse images with more pixels than this before decoding them (None: no limit)."""

    def __post_init__(self):
        if not (isinstance(self.patch_size, int) and self.patch_size >= 1):
            raise ValueError(f"ImageConfig.patch_size must be a positive int, got {self.patch_size!r}")
        if not (isinstance(self.max_size, int) and self.max_size >= self.patch_size):
            raise ValueError(f"ImageConfig.max_size must be an int >= patch_size, got {self.max_size!r}")
        if self.max_size % self.patch_size:
            raise ValueError(
                f"ImageConfig.max_size must be a multiple of patch_size={self.patch_size}, got {self.max_size}"
            )
        for name in ("mean", "std"):
            value = getattr(self, name)
            if len(value) != 3:
                raise ValueError(f"ImageConfig.{name} must have 3 values (R, G, B), got {value!r}")
        if any(s <= 0 for s in self.std):
            raise ValueError(f"ImageConfig.std must be positive, got {self.std!r}")
        if self.max_pixels is not None and self.max_pixels < 1:
            raise ValueError(f"ImageConfig.max_pixels must be positive or None, got {self.max_pixels!r}")

    @property
    def patch_dim(self) -> int:
        """Length of one flattened patch: 3·P·P (3072 for P=32)."""
        return 3 * self.patch_size * self.patch_size


DEFAULT_CONFIG = ImageConfig()


# ---------------------------------------------------------------------------------------------
# Geometry


def target_size(width: int, height: int, patch_size: int = PATCH_SIZE, max_size: int = MAX_SIZE) -> tuple[int, int]:
    """The reference size rule: original (width, height) → resized (width, height), both multiples of P.

    >>> target_size(1920, 1080)
    (1024, 576)
    """
    if width < 1 or height < 1:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    long_side, short_side = max(width, height), min(width, height)
    new_long = min(_round_up(long_side, patch_size), max_size)
    # Integer floor division equals the reference's int(float division) for every realistic size.
    new_short = _round_up(new_long * short_side // long_side, patch_size)
    new_short = max(new_short, patch_size)  # the reference produces 0 here and crashes (5000x4)
    return (new_long, new_short) if height <= width else (new_short, new_long)


def grid_size(width: int, height: int, patch_size: int = PATCH_SIZE, max_size: int = MAX_SIZE) -> tuple[int, int]:
    """(rows, cols) of the patch grid of an image of original size (width, height)."""
    w, h = target_size(width, height, patch_size, max_size)
    return h // patch_size, w // patch_size


def layout_length(n_rows: int, n_cols: int) -> int:
    """Tokens of ``<vision> row <vrow_sep> row … row </vision>``: patches + (rows - 1) separators + 2."""
    return n_rows * n_cols + (n_rows - 1) + 2


def num_image_tokens(width: int, height: int, patch_size: int = PATCH_SIZE, max_size: int = MAX_SIZE) -> int:
    """Number of tokens an image of original size (width, height) takes in the sequence (at most 1057)."""
    return layout_length(*grid_size(width, height, patch_size, max_size))


def _round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


# ---------------------------------------------------------------------------------------------
# Decoding


def load_image(source: ImageSource, *, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode ``source`` into an RGB ``PIL.Image`` with its EXIF orientation applied.

    ``source``: a path, a ``data:image/…;base64,`` URL, raw bytes, a binary file object or a PIL image.
    Raises :class:`ImageError` (naming the source and the reason) for anything that cannot be decoded.
    """
    name = describe_source(source)
    if isinstance(source, Image.Image):
        _check_pixels(source.size, max_pixels, name)
        img = source
    else:
        img = _open(source, name, max_pixels)
    try:
        _load_strictly(img)
        if img.getexif().get(ORIENTATION_TAG, 1) != 1:  # exif_transpose copies even when nothing changes
            img = ImageOps.exif_transpose(img)
    except Image.DecompressionBombError as e:
        raise ImageError("decompression_bomb", name, str(e)) from e
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise _decode_error(e, name) from e
    return to_rgb(img)


def _load_strictly(img: Image.Image) -> None:
    """Decode, refusing truncated data even where an imported library (lmms-eval's task module does) has set
    Pillow's process-wide ``ImageFile.LOAD_TRUNCATED_IMAGES``, which would pad a cut file with grey pixels."""
    lenient = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        img.load()
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = lenient


def describe_source(source: ImageSource) -> str:
    """A short human-readable name of an image source, for error messages."""
    if isinstance(source, (str, os.PathLike)):
        text = os.fspath(source)
        return text[:48] + "…" if text[:5].lower() == "data:" and len(text) > 48 else text
    if isinstance(source, (bytes, bytearray, memoryview)):
        return f"<{len(source)} bytes>"
    if isinstance(source, Image.Image):
        return f"<PIL {source.mode} {source.width}x{source.height}>"
    return getattr(source, "name", None) or f"<{type(source).__name__}>"


def _open(source, name: str, max_pixels: int | None) -> Image.Image:
    fp = _as_file(source, name)
    start = fp.tell()
    try:
        img = Image.open(fp)  # reads the header only: the pixel check below runs before any decoding
        if img.format == "PNG":
            _verify_png(fp, start)
    except Image.DecompressionBombError as e:
        raise ImageError("decompression_bomb", name, f"{e} (raise PIL.Image.MAX_IMAGE_PIXELS to allow it)") from e
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as e:
        raise _decode_error(e, name) from e
    _check_pixels(img.size, max_pixels, name)
    return img


def _verify_png(fp: BinaryIO, start: int) -> None:
    """Pillow decodes IDAT without checking its CRCs, so flipped bits decode to wrong pixels: check every
    chunk's CRC first (SyntaxError if one fails). Costs one CRC-32 pass over the file."""
    here = fp.tell()
    fp.seek(start)
    Image.open(fp).verify()
    fp.seek(here)


def _decode_error(e: Exception, name: str) -> ImageError:
    reason = "truncated_image" if "truncat" in str(e).lower() else "corrupt_image"
    text = _OBJECT_REPR.sub(name, str(e))  # Pillow names a file object by its repr, address included
    return ImageError(reason, name, f"{type(e).__name__}: {text}")


def _as_file(source, name: str) -> BinaryIO:
    if isinstance(source, str) and source[:5].lower() == "data:":
        return io.BytesIO(_decode_data_url(source, name))
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise ImageError("missing_file", name, "no such file")
        if path.stat().st_size == 0:
            raise ImageError("empty_file", name, "file is 0 bytes")
        return io.BytesIO(path.read_bytes())
    if isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) == 0:
            raise ImageError("empty_file", name, "no bytes")
        return io.BytesIO(bytes(source))
    return source


def _decode_data_url(url: str, name: str) -> bytes:
    """``data:<anything>,<base64>`` → bytes.

    Like the reference, the header (MIME type, ``;base64``) is not trusted and the payload is always
    base64; whitespace (line-wrapped base64, a trailing newline) is ignored. Unlike the reference, other
    non-alphabet characters are an error instead of being silently dropped.
    """
    _, sep, payload = url.partition(",")
    if not sep:
        raise ImageError("bad_data_url", name, "expected 'data:<mime>;base64,<payload>'")
    try:
        data = base64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError) as e:
        raise ImageError("bad_data_url", name, f"invalid base64: {e}") from e
    if not data:
        raise ImageError("empty_file", name, "empty data URL payload")
    return data


def _check_pixels(size: tuple[int, int], max_pixels: int | None, name: str) -> None:
    width, height = size
    if max_pixels is not None and width * height > max_pixels:
        raise ImageError(
            "decompression_bomb", name, f"{width}x{height} = {width * height} pixels exceeds max_pixels={max_pixels}"
        )


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode → 8-bit RGB. Transparency is composited on white; 16-bit/float data is rescaled."""
    if img.mode == "RGB" and "transparency" not in img.info:
        return img
    if img.mode in ("P", "PA"):  # palette transparency (tRNS entries, PA, RGBA palettes): Pillow resolves it
        has_alpha = img.mode == "PA" or "transparency" in img.info or img.palette.mode == "RGBA"
        img = img.convert("RGBA" if has_alpha else "RGB")
    elif "transparency" in img.info and img.mode not in ("RGBA", "LA", "La", "RGBa"):
        # A colour key (PNG tRNS) on a grey or RGB image of any bit depth.
        return _composite_on_white(to_rgb(_without_transparency(img)), _colour_key_alpha(img))
    if img.mode in ("La", "RGBa"):  # premultiplied alpha: un-premultiply first
        img = img.convert("LA" if img.mode == "La" else "RGBA")
    if img.mode in ("RGBA", "LA"):
        return _composite_on_white(img.convert("RGB"), img.getchannel("A"))
    if img.mode.startswith("I") or img.mode == "F":
        return Image.fromarray(_high_depth_to_uint8(img), "L").convert("RGB")
    return img.convert("RGB")  # 1, L, RGB, CMYK, YCbCr, LAB, HSV, RGBX


def _composite_on_white(rgb: Image.Image, alpha: Image.Image) -> Image.Image:
    background = Image.new("RGB", rgb.size, WHITE)
    background.paste(rgb, mask=alpha)
    return background


def _colour_key_alpha(img: Image.Image) -> Image.Image:
    """Alpha (0/255) of an image whose ``transparency`` is one key value (grey) or colour (RGB)."""
    differs = np.asarray(img).astype(np.int64) != np.asarray(img.info["transparency"], dtype=np.int64)
    opaque = differs.any(axis=-1) if differs.ndim == 3 else differs
    return Image.fromarray(opaque.astype(np.uint8) * 255, "L")


def _without_transparency(img: Image.Image) -> Image.Image:
    img = img.copy()
    img.info.pop("transparency", None)
    return img


def _high_depth_to_uint8(img: Image.Image) -> np.ndarray:
    """16/32-bit integer or float grey → uint8. Pillow's own convert clips everything above 255 to white.

    ``I;16*``: scaled by 255/65535. ``I``: taken as 8-bit if its values fit, else as 16-bit.
    ``F``: taken as [0, 1] if its values fit, else as [0, 255].
    """
    values = np.asarray(img).astype(np.float64)
    values = np.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0)
    peak = values.max(initial=0.0)
    if img.mode.startswith("I;16") or (img.mode == "I" and peak > 255):
        values = np.clip(values, 0, 65535) * (255 / 65535)
    elif img.mode == "F" and peak <= 1.0:
        values = values * 255
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# Resize, normalise, patchify


def resize_image(img: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Bilinear resize to (width, height), antialiased like torchvision's ``Resize`` on a PIL image."""
    if img.size == tuple(size):
        return img
    return img.resize(tuple(size), Image.Resampling.BILINEAR)


def load_and_resize(source: ImageSource, config: ImageConfig = DEFAULT_CONFIG) -> tuple[Image.Image, tuple[int, int]]:
    """Decode and resize by the size rule. Returns (resized RGB image, original (width, height))."""
    img = load_image(source, max_pixels=config.max_pixels)
    size = target_size(img.width, img.height, config.patch_size, config.max_size)
    return resize_image(img, size), img.size


def patchify_uint8(pixels: np.ndarray, patch_size: int = PATCH_SIZE, out: np.ndarray | None = None) -> np.ndarray:
    """[H, W, 3] uint8 → [n_rows·n_cols, 3·P·P] uint8: row-major patches, each flattened C×P×P.

    ``out``: a C-contiguous uint8 [n_rows·n_cols, 3·P·P] to write into (one copy of the pixels, no temporary).
    """
    grid = _patch_grid(pixels, patch_size)
    shape = (grid.shape[0] * grid.shape[1], 3 * patch_size * patch_size)
    if out is None:
        return np.ascontiguousarray(grid).reshape(shape)
    if out.shape != shape or out.dtype != np.uint8 or not out.flags.c_contiguous:
        raise ValueError(f"out must be C-contiguous uint8 {shape}, got {out.dtype} {out.shape}")
    np.copyto(out.reshape(grid.shape), grid)
    return out


def normalize_patches(patches: np.ndarray, config: ImageConfig = DEFAULT_CONFIG) -> np.ndarray:
    """[n, 3·P·P] uint8 → float32 ``(x/255 - mean)/std`` per channel."""
    plane = config.patch_size * config.patch_size
    if patches.dtype != np.uint8 or patches.ndim != 2 or patches.shape[1] != 3 * plane:
        raise ValueError(f"patches must be uint8 [n, {3 * plane}], got {patches.dtype} {patches.shape}")
    out = patches.reshape(-1, 3, plane).astype(np.float32)
    return _normalize_(out, config, channel_axis=1).reshape(patches.shape)


def normalize_patches_torch(patches, config: ImageConfig = DEFAULT_CONFIG):
    """torch uint8 [n, 3·P·P] on any device → float32 ``(x/255 - mean)/std``, where the input is.

    Bit-identical to :func:`normalize_patches` (the same float32 operations in the same order). The
    divisors are tensors on the input's device, never Python scalars: CUDA divides by a CPU scalar as a
    multiplication by its reciprocal, which can differ in the last bit.
    """
    import torch

    plane = config.patch_size * config.patch_size
    if patches.dtype != torch.uint8 or patches.ndim != 2 or patches.shape[1] != 3 * plane:
        raise ValueError(f"patches must be uint8 [n, {3 * plane}], got {patches.dtype} {tuple(patches.shape)}")
    scale, mean, std = _torch_constants(config, patches.device)
    x = patches.reshape(-1, 3, plane).to(torch.float32)
    return x.div_(scale).sub_(mean).div_(std).reshape(patches.shape)


@functools.lru_cache(maxsize=16)
def _torch_constants(config: ImageConfig, device):
    """(255, mean, std) as float32 tensors on ``device``, shaped to broadcast over [n, 3, P·P] (made once:
    building them costs a host → device copy)."""
    import torch

    def make(values):
        return torch.tensor(values, dtype=torch.float32).view(1, -1, 1).to(device)

    return make([255.0]), make(config.mean), make(config.std)


def image_to_patches(img: Image.Image, config: ImageConfig = DEFAULT_CONFIG) -> np.ndarray:
    """An RGB image already at its target size → normalised float32 patches [n, 3·P·P]."""
    grid = _patch_grid(np.asarray(to_rgb(img)), config.patch_size)
    # One cast-copy straight into patch order (astype on the strided view would keep its memory order).
    out = np.empty(grid.shape, dtype=np.float32)
    np.copyto(out, grid, casting="unsafe")
    return _normalize_(out, config, channel_axis=2).reshape(grid.shape[0] * grid.shape[1], -1)


def _patch_grid(pixels: np.ndarray, patch_size: int) -> np.ndarray:
    """[H, W, 3] → a [rows, cols, 3, P, P] view (no copy)."""
    if pixels.ndim != 3 or pixels.shape[2] != 3 or pixels.shape[0] % patch_size or pixels.shape[1] % patch_size:
        raise ValueError(f"pixels must be [H, W, 3] with H, W multiples of {patch_size}, got {pixels.shape}")
    rows, cols = pixels.shape[0] // patch_size, pixels.shape[1] // patch_size
    return pixels.reshape(rows, patch_size, cols, patch_size, 3).transpose(0, 2, 4, 1, 3)


def _normalize_(x: np.ndarray, config: ImageConfig, channel_axis: int) -> np.ndarray:
    """In place on float32 ``x``: the same float32 ops, in the same order, as ToTensor + Normalize."""
    shape = [1] * x.ndim
    shape[channel_axis] = 3
    np.divide(x, np.float32(255), out=x)
    np.subtract(x, np.asarray(config.mean, np.float32).reshape(shape), out=x)
    np.divide(x, np.asarray(config.std, np.float32).reshape(shape), out=x)
    return x


@dataclass(frozen=True)
class ProcessedImage:
    """One image ready for the model."""

    patches: np.ndarray
    """[n_rows·n_cols, 3·P·P] float32, normalised, row-major, each patch C×P×P."""
    n_rows: int
    n_cols: int
    original_size: tuple[int, int]
    """(width, height) after EXIF orientation, before resizing."""

    @property
    def num_tokens(self) -> int:
        return layout_length(self.n_rows, self.n_cols)


def process_image(source: ImageSource, config: ImageConfig = DEFAULT_CONFIG) -> ProcessedImage:
    """The whole front end: decode, orient, convert, resize, normalise, patchify."""
    resized, original_size = load_and_resize(source, config)
    patches = image_to_patches(resized, config)
    return ProcessedImage(
        patches=patches,
        n_rows=resized.height // config.patch_size,
        n_cols=resized.width // config.patch_size,
        original_size=original_size,
    )


def unpatchify(patches: np.ndarray, n_rows: int, n_cols: int, config: ImageConfig = DEFAULT_CONFIG) -> np.ndarray:
    """Inverse of patchify, for visualisation: [n, 3·P·P] (float32 normalised or uint8) → [H, W, 3] uint8."""
    p = config.patch_size
    if patches.shape != (n_rows * n_cols, 3 * p * p):
        raise ValueError(f"expected patches of shape {(n_rows * n_cols, 3 * p * p)}, got {patches.shape}")
    if patches.dtype != np.uint8:
        planes = patches.reshape(-1, 3, p * p).astype(np.float32)
        std = np.asarray(config.std, np.float32)[:, None]
        mean = np.asarray(config.mean, np.float32)[:, None]
        planes = np.clip(np.rint((planes * std + mean) * 255), 0, 255)
        patches = planes.astype(np.uint8).reshape(patches.shape)
    grid = patches.reshape(n_rows, n_cols, 3, p, p).transpose(0, 3, 1, 4, 2)
    return np.ascontiguousarray(grid).reshape(n_rows * p, n_cols * p, 3)


__all__ = [
    "DEFAULT_CONFIG",
    "DEFAULT_MAX_PIXELS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MAX_SIZE",
    "PATCH_SIZE",
    "ImageConfig",
    "ImageError",
    "ProcessedImage",
    "describe_source",
    "grid_size",
    "image_to_patches",
    "layout_length",
    "load_and_resize",
    "load_image",
    "normalize_patches",
    "normalize_patches_torch",
    "num_image_tokens",
    "patchify_uint8",
    "process_image",
    "resize_image",
    "target_size",
    "to_rgb",
    "unpatchify",
]
