"""The HaploVL miniature's teacher: a tiny CLIP vision tower trained on the demo's label images learns the
classes (its probe's loss falls, above-chance accuracy) and is saved as the trainer's stage 1 loads it."""

import pytest
import torch

from megatron.solo.demo.data import DemoDataConfig, write_demo_data
from megatron.solo.demo.teacher import TeacherConfig, read_label_folders, tile_pixels, train_teacher

pytestmark = pytest.mark.timeout(300)
SMALL = DemoDataConfig(
    per_class=4, heldout_per_class=1, captions=2, heldout_captions=1, text_documents=1, sft_chats=1, sft_heldout=1
)


@pytest.fixture(scope="module")
def labels(tmp_path_factory):
    root = tmp_path_factory.mktemp("teacher-data") / "raw"
    write_demo_data(root, SMALL, workers=1)
    return root / "labels"


def test_label_folders_and_tiles(labels):
    items, names = read_label_folders(labels)
    assert len(names) == 15 and len(items) == 60 and {c for _, c in items} == set(range(15))
    pixels = tile_pixels([p for p, _ in items[:3]], 56)
    assert pixels.shape == (3, 3, 56, 56) and pixels.dtype == torch.float32
    assert -2.0 < float(pixels.min()) and float(pixels.max()) < 2.5  # CLIP-normalised, not raw bytes


def test_teacher_learns_and_loads_as_the_stage1_teacher(labels, tmp_path):
    from megatron.solo.haplo.distill import load_vision_teacher

    got = train_teacher(labels, tmp_path / "teacher", TeacherConfig(steps=60, batch_size=16, lr=3e-3), log=None)
    assert got["last_loss"] < got["first_loss"] - 0.5, got
    assert got["train_accuracy"] > 3 / 15, got  # chance is 1/15
    teacher = load_vision_teacher(tmp_path / "teacher")
    assert teacher.image_size == 56 and teacher.hidden_size == TeacherConfig().hidden_size


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="TeacherConfig.image_size"):
        TeacherConfig(image_size=50)
    with pytest.raises(ValueError, match="TeacherConfig.steps"):
        TeacherConfig(steps=0)
