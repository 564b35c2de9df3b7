"""The pre-decoder block: config validation, inheritance from the LLM's config, names, and its forward against
a direct float64 computation of the layer (biased attention with megatron's fused QKV layout, gated MLP,
LayerNorm, optional RoPE, an arbitrary mask)."""

import math

import pytest
import torch
import torch.nn.functional as F

from megatron.solo.config import get_preset
from megatron.solo.haplo.pre_decoder import (
    PreDecoderConfig,
    build_pre_decoder,
    build_pre_decoder_rotary,
    make_pre_decoder_transformer_config,
)
from megatron.solo.model import make_transformer_config

TINY = PreDecoderConfig(num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=48)


def llm_config(**kw):
    return make_transformer_config(get_preset("tiny"), backend="local", **kw)


def test_defaults_are_clip_vit_large_with_rope():
    cfg = PreDecoderConfig()
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.ffn_hidden_size) == (24, 1024, 16, 4096)
    assert (cfg.head_dim, cfg.query_groups, cfg.normalization, cfg.norm_epsilon) == (64, 16, "LayerNorm", 1e-5)
    assert cfg.activation == "quick_gelu" and cfg.gated and cfg.add_bias and cfg.rope
    # 24 CLIP-L blocks (~302.3M) plus the gated MLP's extra "up" projection (4096×1024 + 4096 per layer).
    assert cfg.num_parameters() == 24 * (12 * 1024 * 1024 + 13 * 1024 + 4096 * 1024 + 4096)  # ≈0.40B (spec §2.11)


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"num_layers": 0}, "num_layers"),
        ({"hidden_size": 30}, "hidden_size"),
        ({"num_query_groups": 3}, "num_query_groups"),
        ({"activation": "relu"}, "activation"),
        ({"normalization": "BatchNorm"}, "normalization"),
        ({"norm_epsilon": 0.0}, "norm_epsilon"),
        ({"rotary_base": -1.0}, "rotary_base"),
        ({"kv_channels": 7}, "kv_channels"),
    ],
)
def test_bad_settings_name_the_field(changes, field):
    with pytest.raises(ValueError, match=rf"PreDecoderConfig\.{field}"):
        TINY.replace(**changes)


def test_dict_round_trip_and_unknown_fields():
    assert PreDecoderConfig.from_dict(TINY.to_dict()) == TINY
    with pytest.raises(ValueError, match="bogus"):
        PreDecoderConfig.from_dict({**TINY.to_dict(), "bogus": 1})


def test_tensor_parallel_must_split_heads_groups_and_ffn():
    TINY.validate_parallel(tensor_parallel=2)
    with pytest.raises(ValueError, match="num_query_groups"):
        TINY.validate_parallel(tensor_parallel=4)


def test_transformer_config_inherits_the_llms_settings_and_keeps_its_geometry():
    llm = llm_config(
        params_dtype=torch.bfloat16, recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1
    )
    tc = make_pre_decoder_transformer_config(TINY, llm)
    assert (tc.hidden_size, tc.num_layers, tc.ffn_hidden_size, tc.kv_channels) == (32, 2, 48, 8)
    assert tc.num_query_groups == 2 and tc.normalization == "LayerNorm" and tc.layernorm_epsilon == 1e-5
    assert tc.add_bias_linear and tc.add_qkv_bias and tc.gated_linear_unit
    assert tc.params_dtype == torch.bfloat16 and tc.bf16 and tc.transformer_impl == llm.transformer_impl
    assert tc.recompute_granularity == "full" and tc.pipeline_model_parallel_size == 1
    assert not tc.bias_activation_fusion  # no fused bias+quick_gelu GLU kernel in megatron-core


def test_block_names_and_no_final_norm(megatron_world):
    block = build_pre_decoder(make_pre_decoder_transformer_config(TINY, llm_config()))
    names = {k for k in block.state_dict() if not k.endswith("_extra_state")}
    expected = set()
    for i in range(TINY.num_layers):
        for part in (
            "input_layernorm",
            "self_attention.linear_qkv",
            "self_attention.linear_proj",
            "pre_mlp_layernorm",
            "mlp.linear_fc1",
            "mlp.linear_fc2",
        ):
            expected |= {f"layers.{i}.{part}.weight", f"layers.{i}.{part}.bias"}
    assert names == expected
    assert block.final_layernorm is None
    sd = block.state_dict()
    assert sd["layers.0.self_attention.linear_qkv.weight"].shape == (8 * (4 + 2 * 2), 32)
    assert sd["layers.0.mlp.linear_fc1.weight"].shape == (2 * 48, 32)


def _reference_layer(x, p, i, cfg, mask, cos_sin):
    """One pre-decoder layer in float64, written from the definition. x [s, b, h]; mask [b, s, s] True = blocked."""
    pre = f"layers.{i}."
    h, heads, groups, d = cfg.hidden_size, cfg.num_attention_heads, cfg.query_groups, cfg.head_dim

    def ln(t, name):
        return F.layer_norm(t, (h,), p[pre + name + ".weight"], p[pre + name + ".bias"], cfg.norm_epsilon)

    y = ln(x, "input_layernorm")
    qkv = y @ p[pre + "self_attention.linear_qkv.weight"].T + p[pre + "self_attention.linear_qkv.bias"]
    s, b = x.shape[:2]
    qkv = qkv.view(s, b, groups, heads // groups + 2, d)  # per KV group: its query heads, then k, then v
    q = qkv[:, :, :, : heads // groups].reshape(s, b, heads, d)
    k = qkv[:, :, :, -2].repeat_interleave(heads // groups, dim=2)
    v = qkv[:, :, :, -1].repeat_interleave(heads // groups, dim=2)
    if cos_sin is not None:
        cos, sin = cos_sin  # [s, 1, 1, d]

        def rot(t):
            t1, t2 = t.chunk(2, dim=-1)
            return t * cos + torch.cat([-t2, t1], dim=-1) * sin

        q, k = rot(q), rot(k)
    scores = torch.einsum("sbhd,tbhd->bhst", q, k) / math.sqrt(d)
    scores = scores.masked_fill(mask[:, None], float("-inf"))
    ctx = torch.einsum("bhst,tbhd->sbhd", scores.softmax(-1), v).reshape(s, b, heads * d)
    x = x + ctx @ p[pre + "self_attention.linear_proj.weight"].T + p[pre + "self_attention.linear_proj.bias"]
    y = ln(x, "pre_mlp_layernorm")
    gate, up = (y @ p[pre + "mlp.linear_fc1.weight"].T + p[pre + "mlp.linear_fc1.bias"]).chunk(2, dim=-1)
    act = gate * torch.sigmoid(1.702 * gate)  # quick_gelu
    return x + (act * up) @ p[pre + "mlp.linear_fc2.weight"].T + p[pre + "mlp.linear_fc2.bias"]


@pytest.mark.parametrize("rope", [False, True])
def test_forward_matches_a_direct_float64_computation(megatron_world, rope):
    cfg = TINY.replace(rope=rope, rotary_base=100.0)
    tc = make_pre_decoder_transformer_config(cfg, llm_config())
    torch.manual_seed(0)
    block = build_pre_decoder(tc).eval()
    with torch.no_grad():  # megatron-core's init is tiny (std 0.02, zero biases): make every term count
        for param in block.parameters():
            param.add_(torch.randn_like(param) * 0.1)
    s, b = 10, 2
    x = torch.randn(s, b, cfg.hidden_size)
    # An arbitrary mask: causal, except a bidirectional block at 3..6 in sample 0 (every row sees itself).
    mask = ~torch.tril(torch.ones(s, s, dtype=torch.bool)).expand(b, s, s).clone()
    mask[0, 3:7, 3:7] = False
    rotary = build_pre_decoder_rotary(cfg, tc)
    assert (rotary is None) == (not rope)
    emb = rotary(s) if rope else None  # [s, 1, 1, d]
    with torch.no_grad():
        out = block(x, mask[:, None], rotary_pos_emb=emb)
    params = {k: v.double() for k, v in block.state_dict().items() if not k.endswith("_extra_state")}
    cos_sin = (emb.double().cos(), emb.double().sin()) if rope else None
    ref = x.double()
    for i in range(cfg.num_layers):
        ref = _reference_layer(ref, params, i, cfg, mask, cos_sin)
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-4)
    # The mask is honoured: query 4 of sample 0 depends on key 6 (inside its bidirectional block), not on 8;
    # in sample 1 (causal) not on 6.
    xg = x.clone().requires_grad_(True)
    block(xg, mask[:, None], rotary_pos_emb=emb)[4].sum().backward()
    reach = xg.grad.abs().amax(-1)  # [s, b]
    assert reach[6, 0] > 1e-3 and reach[8, 0] == 0 and reach[6, 1] == 0 and reach[3, 1] > 1e-3


def test_checkpoint_keys_are_the_transformer_engine_names(megatron_world):
    """Backend-neutral checkpoints: the local spec's norms are saved under TE's fused names, layers stacked."""
    block = build_pre_decoder(make_pre_decoder_transformer_config(TINY, llm_config()))
    sharded = block.sharded_state_dict(prefix="pre_decoder.")
    keys = {v.key for k, v in sharded.items() if not k.endswith("_extra_state")}
    assert keys == {
        f"pre_decoder.layers.{name}"
        for name in (
            "self_attention.linear_qkv.layer_norm_weight",
            "self_attention.linear_qkv.layer_norm_bias",
            "self_attention.linear_qkv.weight",
            "self_attention.linear_qkv.bias",
            "self_attention.linear_proj.weight",
            "self_attention.linear_proj.bias",
            "mlp.linear_fc1.layer_norm_weight",
            "mlp.linear_fc1.layer_norm_bias",
            "mlp.linear_fc1.weight",
            "mlp.linear_fc1.bias",
            "mlp.linear_fc2.weight",
            "mlp.linear_fc2.bias",
        )
    }
    second = sharded["pre_decoder.layers.1.input_layernorm.bias"]
    assert second.global_shape == (TINY.num_layers, TINY.hidden_size) and second.global_offset == (1, 0)
