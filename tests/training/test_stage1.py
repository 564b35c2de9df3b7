"""HaploVL stage 1's teacher checks, in-process: what every pipeline stage can refuse before building anything."""

import json

import pytest

from megatron.solo.families import get_preset
from megatron.solo.training.arguments import ConfigError, TrainConfig
from megatron.solo.training.stage1 import Stage1Teacher


def _teacher(root, **overrides) -> str:
    """A teacher directory holding only a CLIP vision config.json (haplo-tiny's 56-px tiles, 2 layers)."""
    from transformers import CLIPVisionConfig

    fields = dict(image_size=56, patch_size=14, hidden_size=24, intermediate_size=48, num_hidden_layers=2)
    CLIPVisionConfig(num_attention_heads=4, **{**fields, **overrides}).save_pretrained(root)
    return str(root)


def _check(teacher: str, layer: int = -1) -> None:
    flags = TrainConfig(model_preset="haplo-tiny", distill_teacher=teacher, distill_teacher_layer=layer)
    Stage1Teacher.check(flags, get_preset("haplo-tiny"))


def test_a_matching_teacher_passes_for_every_layer(tmp_path):
    teacher = _teacher(tmp_path)
    for layer in (-3, -1, 0, 2):
        _check(teacher, layer)


def test_a_teacher_of_another_image_size_is_refused(tmp_path):
    with pytest.raises(
        ConfigError, match="^--distill-teacher: the teacher sees 224-px images, the model's tiles are 56"
    ):
        _check(_teacher(tmp_path, image_size=224))


@pytest.mark.parametrize("layer", [3, -4])
def test_a_layer_outside_the_teacher_is_refused(tmp_path, layer):
    with pytest.raises(ConfigError, match=f"^--distill-teacher-layer: {layer} is outside the teacher's 2 layers"):
        _check(_teacher(tmp_path), layer)


def test_a_directory_without_config_json_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="^--distill-teacher: .* has no config.json"):
        _check(str(tmp_path))
    with pytest.raises(ConfigError, match="^--distill-teacher: .* is not a directory"):
        _check(str(tmp_path / "missing"))


def test_a_full_clip_checkpoint_is_read_through_its_vision_config(tmp_path):
    from transformers import CLIPConfig

    vision = dict(image_size=224, patch_size=14, hidden_size=24, intermediate_size=48, num_hidden_layers=2)
    CLIPConfig(vision_config=vision).save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "clip"
    with pytest.raises(ConfigError, match="the teacher sees 224-px images"):
        _check(str(tmp_path))


def test_a_solo_model_is_refused(tmp_path):
    flags = TrainConfig(model_preset="tiny", distill_teacher=_teacher(tmp_path))
    with pytest.raises(ConfigError, match="^--distill-teacher: HaploVL's stage 1"):
        Stage1Teacher.check(flags, get_preset("tiny"))


def test_the_dry_run_checks_the_teacher_and_warns_when_it_is_not_here(tmp_path):
    import io

    from megatron.solo.training.dry_run import dry_run

    def run(teacher: str) -> str:
        out, err = io.StringIO(), io.StringIO()
        assert dry_run(TrainConfig(model_preset="haplo-tiny", distill_teacher=teacher), out, err) == 0
        return err.getvalue()

    assert run(_teacher(tmp_path / "good")) == ""
    assert f"warning: --distill-teacher {tmp_path / 'missing'}: not found here" in run(str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="^--distill-teacher: the teacher sees 224-px images"):
        run(_teacher(tmp_path / "big", image_size=224))
    with pytest.raises(ConfigError, match="^--distill-teacher: HaploVL's stage 1"):
        dry_run(
            TrainConfig(model_preset="tiny", distill_teacher=str(tmp_path / "missing")), io.StringIO(), io.StringIO()
        )
