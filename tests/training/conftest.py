"""Fixtures for the loader tests: two tiny preprocessed prefixes (text, and captioned real photos)."""

from pathlib import Path

import pytest
from loader_helpers import preprocess_to
from PIL import Image

from megatron.solo import image as im

# Small photos (1 to 16 patches): every caption pack holds images, and preprocessing stays fast.
PHOTO_SIZES = [(96, 64), (64, 96), (70, 50), (130, 40), (33, 33), (100, 100)]


@pytest.fixture(scope="session")
def data_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("loader-data")


@pytest.fixture(scope="session")
def text_prefix(data_root) -> str:
    """~10 packs of plain text, every word "alpha" or a number."""
    records = [{"text": " ".join(f"alpha {i * 100 + k}" for k in range(25))} for i in range(12)]
    return preprocess_to(data_root / "alpha", records)


@pytest.fixture(scope="session")
def caption_prefix(data_root, sample_photos) -> str:
    """Packs of captioned photos (several images per pack), every caption word "beta" or a number."""
    records = []
    for i in range(24):
        size = PHOTO_SIZES[i % len(PHOTO_SIZES)]
        path = data_root / f"photo{i}.jpg"
        im.load_image(sample_photos[i % len(sample_photos)]).resize(size, Image.Resampling.BICUBIC).save(path)
        records.append({"image": path.name, "caption": " ".join(f"beta {i * 10 + k}" for k in range(6))})
    return preprocess_to(data_root / "beta", records)
