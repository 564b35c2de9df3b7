"""How a resized image is stored: encoded once at preprocessing, decoded to uint8 pixels at load.

The stored image is the image *after* the size rule (both sides multiples of the patch size), so decoding
it and running :func:`megatron.solo.image.image_to_patches` gives the model's patches with no resizing.

=================  ====  ==========================================================================
format             code  measured (benchmarks/bench_preprocess.py; bytes per patch, i.e. per <vpatch>)
=================  ====  ==========================================================================
``jpeg`` default   2     quality 92, 4:4:4 chroma (no subsampling: 32-px patches keep colour edges):
                         241 B on web-like photos (JPEG q90 sources, 256-2048 px), 338 B on nine skimage
                         photos at native size (each ≤ 401 B); PSNR 39-52 dB, max error ≤ 35 levels
``webp``           3     lossy WebP, same quality: 145 B, but the pipeline runs ~4× slower (encoding)
``png``            1     lossless, zlib level 1 (fast): 1159 B
``webp-lossless``  4     lossless, method 0: 843 B
``raw``            0     uint8 RGB, row-major H×W×3: 3072 B, no decoding at load
=================  ====  ==========================================================================

The reference stored 3072 fp16 values: 6144 B per patch. Quality 95 would cost ~450 B per patch on the
native-size photos (over the 400-byte budget) for ~3 dB more PSNR.

Lossless and raw round trips are bit-exact to the front end; lossy ones change pixels by a few levels.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

CODECS = {"raw": 0, "png": 1, "jpeg": 2, "webp": 3, "webp-lossless": 4}
CODEC_NAMES = {code: name for name, code in CODECS.items()}
LOSSLESS = ("raw", "png", "webp-lossless")
DEFAULT_FORMAT = "jpeg"
DEFAULT_QUALITY = 92


def encode_image(img: Image.Image, fmt: str = DEFAULT_FORMAT, quality: int = DEFAULT_QUALITY) -> bytes:
    """An RGB PIL image → the stored bytes. Deterministic: the same image gives the same bytes."""
    if img.mode != "RGB":
        raise ValueError(f"expected an RGB image, got mode {img.mode}")
    if fmt == "raw":
        return np.asarray(img).tobytes()
    buf = io.BytesIO()
    if fmt == "jpeg":
        img.save(buf, "JPEG", quality=quality, subsampling=0)
    elif fmt == "webp":
        img.save(buf, "WEBP", quality=quality, method=4)
    elif fmt == "png":
        img.save(buf, "PNG", compress_level=1)
    elif fmt == "webp-lossless":
        img.save(buf, "WEBP", lossless=True, quality=0, method=0)  # method 0: 10× faster, still < PNG
    else:
        raise ValueError(f"unknown image format {fmt!r}; expected one of {', '.join(CODECS)}")
    return buf.getvalue()


def decode_image(data: bytes | memoryview, codec: int, width: int, height: int) -> np.ndarray:
    """Stored bytes → uint8 [height, width, 3]; ValueError if they do not hold that image."""
    if codec == CODECS["raw"]:
        if len(data) != width * height * 3:
            raise ValueError(f"raw image of {len(data)} bytes is not {width}x{height}x3")
        return np.frombuffer(data, dtype=np.uint8).reshape(height, width, 3)
    if codec not in CODEC_NAMES:
        raise ValueError(f"unknown image codec {codec}")
    img = Image.open(io.BytesIO(data))
    if img.size != (width, height):
        raise ValueError(f"stored {CODEC_NAMES[codec]} image is {img.width}x{img.height}, expected {width}x{height}")
    return np.asarray(img.convert("RGB") if img.mode != "RGB" else img)


__all__ = ["CODECS", "CODEC_NAMES", "DEFAULT_FORMAT", "DEFAULT_QUALITY", "LOSSLESS", "decode_image", "encode_image"]
