"""HaploModel's megatron names ↔ the released HF layout: round trips, bias policy, and parity — the megatron-core
pre-decoder and LLM blocks loaded from converted weights compute what hf_haplo's layers compute."""

import pytest
import torch
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.transformer.transformer_block import TransformerBlock

from megatron.solo.config import get_preset
from megatron.solo.haplo.hf_haplo import HaploConfig, HaploForCausalLM
from megatron.solo.haplo.hf_haplo.modeling_haplo import attention_allowed, rotary_cos_sin
from megatron.solo.haplo.pre_decoder import (
    PreDecoderConfig,
    build_pre_decoder,
    build_pre_decoder_rotary,
    make_pre_decoder_transformer_config,
)
from megatron.solo.haplo.release_layout import (
    LayoutError,
    configs_from_release,
    megatron_to_release,
    release_config,
    release_to_megatron,
)
from megatron.solo.model import make_transformer_config
from megatron.solo.model.specs import decoder_block_spec

PRE = PreDecoderConfig(num_layers=2, hidden_size=16, num_attention_heads=2, ffn_hidden_size=32, rotary_base=500.0)
LLM = get_preset("tiny").replace(
    vocab_size=50, hidden_size=24, ffn_hidden_size=40, num_attention_heads=4, num_query_groups=2
)
IMAGE = dict(vocab_size=50, image_token_index=49, patch_size=14, default_image_size=28, image_grid_pinpoints=[[28, 28]])


def hf_model(zero_llm_biases: bool) -> HaploForCausalLM:
    torch.manual_seed(0)
    model = HaploForCausalLM(HaploConfig(**release_config(PRE, LLM, **IMAGE))).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(torch.randn_like(p) * 0.1)
            llm_layer = name.startswith("model.layers.") and int(name.split(".")[2]) >= PRE.num_layers
            if zero_llm_biases and llm_layer and name.endswith("proj.bias"):
                p.zero_()
    return model


def test_round_trip_with_llm_biases():
    sd = hf_model(zero_llm_biases=False).state_dict()
    ours = release_to_megatron(sd, pre=PRE, llm=LLM, llm_bias="all", padded_vocab_size=64)
    assert ours["embedding.word_embeddings.weight"].shape == (64, 16) and ours["patch_embed.weight"].shape == (16, 588)
    assert ours["decoder.layers.1.self_attention.linear_qkv.bias"].shape == ((4 + 2 * 2) * 6,)
    assert ours["decoder.layers.1.mlp.linear_fc1.bias"].shape == (2 * 40,)
    back = megatron_to_release(ours, pre=PRE, llm=LLM, vocab_size=50)
    assert back.keys() == sd.keys()
    assert all(torch.equal(back[k], sd[k]) for k in sd)


def test_an_llm_without_biases_refuses_non_zero_ones_and_exports_zeros():
    with pytest.raises(LayoutError, match="non-zero"):
        release_to_megatron(hf_model(zero_llm_biases=False).state_dict(), pre=PRE, llm=LLM)
    sd = hf_model(zero_llm_biases=True).state_dict()
    ours = release_to_megatron(sd, pre=PRE, llm=LLM)
    assert not any(k.startswith("decoder.") and k.endswith(".bias") for k in ours)
    assert "pre_decoder.layers.0.self_attention.linear_qkv.bias" in ours  # the pre-decoder keeps its own
    back = megatron_to_release(
        {**ours, "distill_heads.text_head.weight": torch.zeros(1)}, pre=PRE, llm=LLM, vocab_size=50
    )
    assert all(torch.equal(back[k], sd[k]) for k in sd)  # zeros come back as zeros; stage-1 heads left out
    with pytest.raises(LayoutError, match="unexpected"):
        megatron_to_release({**ours, "bogus.weight": torch.zeros(1)}, pre=PRE, llm=LLM, vocab_size=50)
    with pytest.raises(LayoutError, match="unexpected keys"):
        release_to_megatron({**sd, "model.vision_tower.weight": torch.zeros(1)}, pre=PRE, llm=LLM)


def test_megatron_blocks_on_converted_weights_compute_the_hf_layers(megatron_world):
    hf = hf_model(zero_llm_biases=True)
    ours = release_to_megatron(hf.state_dict(), pre=PRE, llm=LLM)
    llm_tc = make_transformer_config(LLM, backend="local")
    pre_tc = make_pre_decoder_transformer_config(PRE, llm_tc)
    pre_block = build_pre_decoder(pre_tc).eval()
    pre_block.load_state_dict(
        {k[len("pre_decoder.") :]: v for k, v in ours.items() if k.startswith("pre_decoder.")}, strict=False
    )
    llm_block = TransformerBlock(llm_tc, decoder_block_spec(llm_tc, "local")).eval()
    llm_weights = {k[len("decoder.") :]: v for k, v in ours.items() if k.startswith("decoder.")}
    missing = llm_block.load_state_dict(llm_weights, strict=False).missing_keys
    assert not [k for k in missing if not k.endswith("_extra_state")]

    s, b = 9, 2
    x = torch.randn(b, s, PRE.hidden_size)
    starts = torch.tensor([[0, 1, 2, 2, 2, 2, 6, 7, 8], [0, 1, 2, 3, 4, 4, 4, 7, 8]])  # an image block in each row
    allowed = attention_allowed(starts, torch.ones(b, s, dtype=torch.long))
    positions = torch.arange(s).expand(b, s)
    with torch.no_grad():
        want = x
        pre_rope = rotary_cos_sin(positions, PRE.head_dim, PRE.rotary_base, x.dtype)
        for layer in hf.model.layers[: PRE.num_layers]:
            want = layer(want, allowed, pre_rope)
        got = pre_block(x.transpose(0, 1), ~allowed[:, None], rotary_pos_emb=build_pre_decoder_rotary(PRE, pre_tc)(s))
        torch.testing.assert_close(got.transpose(0, 1), want, rtol=1e-5, atol=1e-5)

        h = torch.randn(b, s, LLM.hidden_size)
        want = h
        llm_rope = rotary_cos_sin(positions, LLM.head_dim, LLM.rotary_base, h.dtype)
        for layer in hf.model.layers[PRE.num_layers :]:
            want = layer(want, allowed, llm_rope)
        want = hf.model.norm(want)
        rope = RotaryEmbedding(
            kv_channels=LLM.head_dim, rotary_percent=1.0, rotary_base=LLM.rotary_base, use_cpu_initialization=True
        )
        got = llm_block(h.transpose(0, 1), ~allowed[:, None], rotary_pos_emb=rope(s))
        torch.testing.assert_close(got.transpose(0, 1), want, rtol=1e-5, atol=1e-5)

    # the stem: our C×P×P patch rows through patch_embed equal the release's conv on the tile
    tile = torch.randn(1, 3, 28, 28)
    patches = tile.reshape(1, 3, 2, 14, 2, 14).permute(0, 2, 4, 1, 3, 5).reshape(4, 588)
    torch.testing.assert_close(
        patches @ ours["patch_embed.weight"].t() + ours["pos_embed"],
        (hf.model.patch_embed(tile) + hf.model.pre_pos_embed)[0],
        rtol=1e-5,
        atol=1e-5,
    )


def test_only_gated_pre_decoders_have_a_released_form():
    with pytest.raises(LayoutError, match="gated"):
        release_config(PRE.replace(gated=False), LLM)


def test_configs_round_trip_through_the_released_config_json():
    hf_dict = HaploConfig(**release_config(PRE, LLM, **IMAGE)).to_dict()
    pre, llm, image = configs_from_release(hf_dict)
    assert pre == PRE.replace(kv_channels=PRE.head_dim, num_query_groups=PRE.query_groups)
    assert {k: llm[k] for k in ("num_layers", "hidden_size", "ffn_hidden_size", "num_query_groups", "vocab_size")} == {
        "num_layers": LLM.num_layers,
        "hidden_size": 24,
        "ffn_hidden_size": 40,
        "num_query_groups": 2,
        "vocab_size": 50,
    }
    assert llm["rotary_base"] == LLM.rotary_base and llm["norm_epsilon"] == LLM.norm_epsilon
    assert image["image_token_index"] == 49 and image["default_image_size"] == 28


def test_a_release_style_config_json():
    """The release's own JSON: LLM fields in base_config, the pre-decoder sharing the LLM's RoPE table."""
    released = {
        "base_config": {
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "vocab_size": 100,
            "rope_theta": 1e6,
        },
        "pre_config": {
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 3,
            "num_attention_heads": 2,
            "hidden_act": "quick_gelu",
            "norm_mode": "layernorm",
            "rms_norm_eps": 1e-5,
        },
    }
    pre, llm, _ = configs_from_release(released)
    assert (pre.num_layers, pre.head_dim, pre.normalization, pre.activation, pre.rotary_base) == (
        3,
        16,
        "LayerNorm",
        "quick_gelu",
        1e6,
    )
    assert (llm["num_layers"], llm["kv_channels"], llm["rotary_base"]) == (2, 16, 1e6)
    released["pre_config"]["num_attention_heads"] = 4  # head dim 8 ≠ the LLM's 16: a shared table cannot fit
    with pytest.raises(LayoutError, match="head dim"):
        configs_from_release(released)
