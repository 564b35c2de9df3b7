"""Shared fixtures. Tests make or ship their own data; nothing is downloaded."""

import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile("default", deadline=None, max_examples=200)
settings.register_profile(
    "ci", deadline=None, max_examples=200, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile("ci" if os.environ.get("CI") else "default")


@pytest.fixture(scope="session")
def tokenizer():
    """The real Mistral-7B-v0.1 tokenizer (from mistral-common) with SOLO's ids."""
    from megatron.solo.tokenizer import SoloTokenizer

    return SoloTokenizer()


@pytest.fixture(scope="session")
def sample_photos() -> list[Path]:
    """Real photographs shipped inside scikit-image's wheel."""
    import skimage.data

    root = Path(skimage.data.__file__).parent
    names = [
        "astronaut.png",
        "chelsea.png",
        "coffee.png",
        "camera.png",
        "rocket.jpg",
        "logo.png",
        "horse.png",
        "hubble_deep_field.jpg",
        "motorcycle_left.png",
    ]
    photos = [root / n for n in names if (root / n).is_file()]
    assert len(photos) >= 3, f"expected scikit-image sample photos in {root}"
    return photos


def pytest_configure(config):
    """The test session is an entry point: it installs the CPU backend (where CUDA is absent) once, first."""
    from megatron.solo.backend import install_cpu_backend_if_needed

    install_cpu_backend_if_needed()


@pytest.fixture(scope="session")
def megatron_world():
    """A single-process gloo world with TP=PP=1."""
    from megatron.solo.parallel import initialize_model_parallel

    initialize_model_parallel(1, 1, seed=1234)
    yield
