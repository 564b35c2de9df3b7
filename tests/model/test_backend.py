"""One backend decision per model: what ``auto`` picks, the fp32 + TE error, where weights are created, and
checkpoint entries that do not depend on the backend."""

import pytest
import torch

from megatron.solo.config import get_preset
from megatron.solo.model import build_model, make_transformer_config, specs

CFG = get_preset("tiny")

# What Transformer Engine's spec names every tensor (megatron-core 0.16.1, get_gpt_layer_with_transformer_engine_spec
# with TENorm as the final norm): the norms live inside the fused layernorm-linear layers.
TE_TENSOR_KEYS = {
    "embedding.word_embeddings.weight",
    "decoder.layers.self_attention.linear_qkv.layer_norm_weight",
    "decoder.layers.self_attention.linear_qkv.weight",
    "decoder.layers.self_attention.linear_proj.weight",
    "decoder.layers.mlp.linear_fc1.layer_norm_weight",
    "decoder.layers.mlp.linear_fc1.weight",
    "decoder.layers.mlp.linear_fc2.weight",
    "decoder.final_layernorm.weight",
    "output_layer.weight",
    "patch_embedding.weight",
}


@pytest.fixture
def gpu_with_te(monkeypatch):
    """``auto`` as it decides on a CUDA machine with transformer-engine."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(specs, "transformer_engine_available", lambda: True)


def test_auto_picks_te_only_for_16_bit_runs_on_a_gpu_with_te(gpu_with_te):
    assert specs.resolve_backend("auto", torch.bfloat16) == "te"
    assert specs.resolve_backend("auto", torch.float32) == "local"  # TE's THD attention has no fp32 kernel


def test_te_with_fp32_is_a_config_error_naming_the_fix(gpu_with_te):
    with pytest.raises(ValueError, match=r"no torch.float32 kernel.*--bf16.*--transformer-impl local"):
        make_transformer_config(CFG, backend="te", params_dtype=torch.float32)


def test_te_with_fp32_fails_when_the_flags_are_parsed():
    from megatron.solo.training.arguments import ConfigError, TrainConfig

    with pytest.raises(ConfigError, match="^--transformer-impl: .*--bf16"):
        TrainConfig(model_preset="tiny", transformer_impl="transformer_engine")
    TrainConfig(model_preset="tiny", transformer_impl="transformer_engine", bf16=True)  # fine


def test_the_config_carries_the_backend_to_the_model(megatron_world):
    config = make_transformer_config(CFG.replace(sliding_window=8), backend="local")
    assert config.transformer_impl == "local" and config.window_size is None  # the window goes into our mask
    assert build_model(CFG, config).backend == "local"


def test_every_weight_is_created_where_megatron_core_creates_its_own(megatron_world, monkeypatch):
    """On a GPU (``use_cpu_initialization=False``) weights go to ``torch.cuda.current_device()``; stand in
    a meta "GPU" for it: the patch projection must follow megatron-core's layers there."""
    monkeypatch.setattr(torch.cuda, "current_device", lambda: torch.device("meta"))
    model = build_model(
        CFG, make_transformer_config(CFG, backend="local", cpu_initialization=False, perform_initialization=False)
    )
    elsewhere = [name for name, p in model.named_parameters() if not p.is_meta]
    assert not elsewhere, f"not on the current device: {elsewhere}"


def test_checkpoint_entries_are_the_backend_neutral_te_names(megatron_world):
    from megatron.solo.checkpointing import model_sharded_state_dict

    entries = model_sharded_state_dict(build_model(CFG, make_transformer_config(CFG, backend="local")))
    assert {entry.key for entry in entries.values()} == TE_TENSOR_KEYS
    assert not [key for key in entries if "_extra_state" in key]  # TE's FP8 metadata: not the same on both
