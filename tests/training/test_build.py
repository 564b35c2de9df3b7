"""Model set-up pieces of the trainer, in-process."""

from megatron.solo.config import get_preset
from megatron.solo.model import build_model, make_transformer_config
from megatron.solo.training.build import freeze_language_model


def test_freezing_the_language_model_leaves_only_the_patch_projection_trainable(megatron_world):
    cfg = get_preset("tiny")
    model = build_model(cfg, make_transformer_config(cfg))
    freeze_language_model(model)
    trainable = sorted(name for name, p in model.named_parameters() if p.requires_grad)
    assert trainable == ["patch_embedding.weight"]
    assert sum(1 for _ in model.parameters()) > 10  # the decoder is there, frozen
