"""Fixtures for the preprocessing tests: small real photos, writers for each input format, a runner."""

import io
from pathlib import Path

import pytest
from PIL import Image

from megatron.solo import image as im

# Small and varied on purpose (1 to 35 patches): whole pipelines stay fast, every grid shape differs.
PHOTO_SIZES = [(96, 64), (64, 96), (70, 50), (130, 40), (33, 33), (200, 150)]


@pytest.fixture(scope="session")
def small_photos(sample_photos, tmp_path_factory) -> list[Path]:
    """JPEGs made from real photos at small, varied sizes."""
    root = tmp_path_factory.mktemp("photos")
    paths = []
    for i, size in enumerate(PHOTO_SIZES):
        img = im.load_image(sample_photos[i % len(sample_photos)]).resize(size, Image.Resampling.BICUBIC)
        path = root / f"photo{i}.jpg"
        img.save(path, quality=90)
        paths.append(path)
    return paths


@pytest.fixture
def front_end(tokenizer):
    """path → (token ids of the image, float32 patches), straight from the front end."""

    def run(path):
        processed = im.process_image(path)
        return tokenizer.image_token_ids(*processed.original_size), processed.patches

    return run


@pytest.fixture
def run_preprocess(tmp_path):
    """Preprocess in this process (workers=0 unless given) into tmp_path/name; returns (prefix, stats)."""
    from megatron.solo.data.encode import EncodeConfig
    from megatron.solo.data.packing import PackConfig
    from megatron.solo.data.pipeline import PreprocessConfig, preprocess

    def run(inputs, name="out", *, seq_length=4096, image_format="png", workers=0, stream=None, encode=None, **kw):
        prefix = str(tmp_path / name)
        config = PreprocessConfig(
            inputs=tuple(str(i) for i in inputs),
            output_prefix=prefix,
            encode=encode or EncodeConfig(image_format=image_format),
            pack=kw.pop("pack", None) or PackConfig(seq_length=seq_length),
            workers=workers,
            progress=False,
            **kw,
        )
        return prefix, preprocess(config, stream=stream or io.StringIO())

    return run
