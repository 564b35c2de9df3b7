"""Images/s of the full front end (load + resize + patchify) vs the decode+resize floor, side by side.

    python benchmarks/bench_image.py [--repeats 5] [--quality 90]

The images are real photos (scikit-image's samples) re-encoded as JPEG at a mix of web-like sizes. Every
pipeline runs on the same bytes, interleaved round by round, single-threaded (one preprocessing worker).
Printed: median images/s per pipeline and the ratio to the floor. "reference-style" is the reference's
float path (ToTensor, Normalize, unfold/permute in torch) on the same resized images, for context.
"""

from __future__ import annotations

import argparse
import io
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from megatron.solo import image as im

SIZES = [(640, 480), (500, 375), (1024, 768), (1920, 1080), (300, 2000), (800, 800), (2048, 1536), (1280, 720)]


def make_jpegs(quality: int) -> list[bytes]:
    import skimage.data

    root = Path(skimage.data.__file__).parent
    photos = [Image.open(root / n).convert("RGB") for n in ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg")]
    out = []
    for size in SIZES:
        for photo in photos:
            buf = io.BytesIO()
            photo.resize(size, Image.Resampling.BICUBIC).save(buf, "JPEG", quality=quality)
            out.append(buf.getvalue())
    return out


def floor(data: bytes) -> Image.Image:
    """What any pipeline must do: decode to RGB and resize to the target size (no copy when already RGB)."""
    img = Image.open(io.BytesIO(data))
    img = img if img.mode == "RGB" else img.convert("RGB")
    return img.resize(im.target_size(*img.size), Image.Resampling.BILINEAR)


def ours(data: bytes) -> np.ndarray:
    return im.process_image(data).patches


MEAN = torch.tensor(im.IMAGENET_MEAN).view(3, 1, 1)
STD = torch.tensor(im.IMAGENET_STD).view(3, 1, 1)


def reference_style(data: bytes) -> torch.Tensor:
    """torchvision ToTensor (which copies the array) + Normalize, then unfold/permute as the reference."""
    x = torch.from_numpy(np.array(floor(data))).permute(2, 0, 1).float().div(255).sub(MEAN).div(STD)
    c, h, w = x.shape
    return x.unfold(1, 32, 32).unfold(2, 32, 32).permute(1, 2, 0, 3, 4).reshape((h // 32) * (w // 32), -1)


def time_pass(fn, images) -> float:
    start = time.perf_counter()
    for data in images:
        fn(data)
    return len(images) / (time.perf_counter() - start)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quality", type=int, default=90)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    images = make_jpegs(args.quality)
    tokens = [im.num_image_tokens(*Image.open(io.BytesIO(b)).size) for b in images]
    np.testing.assert_array_equal(ours(images[0]), reference_style(images[0]).numpy())  # same output
    pipelines = {
        "decode+resize floor": floor,
        "ours: load+resize+patchify": ours,
        "reference-style torch": reference_style,
    }
    rates = {name: [] for name in pipelines}
    for fn in pipelines.values():
        fn(images[0])  # warm-up
    for _ in range(args.repeats):
        for name, fn in pipelines.items():
            rates[name].append(time_pass(fn, images))

    print(
        f"{len(images)} JPEG photos (q{args.quality}), sizes {sorted(set(SIZES))}, "
        f"mean {np.mean(tokens):.0f} image tokens; {args.repeats} interleaved rounds, 1 thread"
    )
    base = statistics.median(rates["decode+resize floor"])
    for name, values in rates.items():
        med = statistics.median(values)
        print(f"  {name:28s} {med:7.1f} images/s   ratio to floor {med / base:5.3f}")
    ours_rate = statistics.median(rates["ours: load+resize+patchify"])
    print(f"front-end overhead over the floor: {100 * (base / ours_rate - 1):.1f}% of the time per image")


if __name__ == "__main__":
    main()
