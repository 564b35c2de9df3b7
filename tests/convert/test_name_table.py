"""The declarative HF ↔ Megatron name table: exact round trips, layouts, vocabulary and patch policies, errors."""

import math

import pytest
import torch
from tiny_models import TINY, random_mistral

from megatron.solo.config import ModelConfig
from megatron.solo.convert.name_table import (
    HF_PATCH,
    MEGATRON_PATCH,
    ConversionError,
    hf_shapes,
    hf_to_megatron,
    megatron_shapes,
    megatron_to_hf,
    model_config_from_hf,
)

PADDED = 384


@pytest.fixture(scope="module")
def mistral():
    return random_mistral()


@pytest.fixture(scope="module")
def arch(mistral):
    return model_config_from_hf(mistral.config)


def test_model_config_from_mistral_config(arch):
    assert arch == ModelConfig(
        num_layers=2,
        hidden_size=64,
        ffn_hidden_size=96,
        num_attention_heads=4,
        num_query_groups=2,
        kv_channels=16,
        vocab_size=300,
        max_sequence_length=128,
        rotary_base=1e4,
        norm_epsilon=1e-5,
        sliding_window=arch.sliding_window,
    )
    assert arch.patch_dim == 3072 and arch.head_dim == 16


def test_model_config_from_solo_config_takes_the_patch_size():
    from megatron.solo.convert.hf_solo import SoloConfig

    cfg = SoloConfig(**{**TINY, "vocab_size": 33029}, vision_patch_size=16)
    assert model_config_from_hf(cfg).patch_dim == 768
    assert model_config_from_hf(SoloConfig()).patch_dim == 3072
    assert model_config_from_hf(cfg, vocab_size=40000).vocab_size == 40000


def test_model_config_refuses_tied_embeddings():
    from transformers import MistralConfig

    with pytest.raises(ConversionError, match="tied"):
        model_config_from_hf(MistralConfig(**{**TINY, "tie_word_embeddings": True}))


def test_hf_megatron_hf_round_trip_is_bit_exact(mistral, arch):
    hf_sd = mistral.state_dict()
    m_sd = hf_to_megatron(hf_sd, arch, padded_vocab_size=PADDED)
    assert {k: tuple(v.shape) for k, v in m_sd.items()} == megatron_shapes(arch, PADDED)

    back = megatron_to_hf(m_sd, arch, vocab_size=arch.vocab_size)

    assert set(back) == set(hf_sd) | {HF_PATCH}
    for name, tensor in hf_sd.items():
        assert back[name].dtype == tensor.dtype and torch.equal(back[name], tensor), name
    assert torch.equal(back[HF_PATCH], m_sd[MEGATRON_PATCH])
    assert {k: tuple(v.shape) for k, v in back.items()} == hf_shapes(arch)


def test_megatron_hf_megatron_round_trip_is_bit_exact(mistral, arch):
    m_sd = hf_to_megatron(mistral.state_dict(), arch, padded_vocab_size=PADDED)
    m_sd["output_layer.weight"][arch.vocab_size :] = 7.0  # trained padding rows are dropped, then zero again
    again = hf_to_megatron(megatron_to_hf(m_sd, arch, vocab_size=arch.vocab_size), arch, padded_vocab_size=PADDED)
    for name, tensor in m_sd.items():
        if name == "output_layer.weight":
            tensor = torch.cat([tensor[: arch.vocab_size], torch.zeros(PADDED - arch.vocab_size, arch.hidden_size)])
        assert torch.equal(again[name], tensor), name


def test_qkv_is_grouped_per_kv_head(arch):
    """megatron-core's GQA layout, spelled out row by row: group g = [its q heads…, k_g, v_g]."""
    d, h, g = arch.head_dim, arch.hidden_size, arch.num_query_groups
    per_group = arch.num_attention_heads // g
    heads = lambda n, tag: torch.cat([torch.full((d, h), tag + j, dtype=torch.float32) for j in range(n)])  # noqa: E731
    hf_sd = dict(random_mistral().state_dict())
    hf_sd["model.layers.1.self_attn.q_proj.weight"] = heads(arch.num_attention_heads, 100)
    hf_sd["model.layers.1.self_attn.k_proj.weight"] = heads(g, 200)
    hf_sd["model.layers.1.self_attn.v_proj.weight"] = heads(g, 300)

    qkv = hf_to_megatron(hf_sd, arch, padded_vocab_size=PADDED)["decoder.layers.1.self_attention.linear_qkv.weight"]

    want = []
    for group in range(g):
        want += [100 + group * per_group + j for j in range(per_group)] + [200 + group, 300 + group]
    assert qkv[::d, 0].tolist() == want


def test_fc1_is_gate_then_up(mistral, arch):
    hf_sd = mistral.state_dict()
    fc1 = hf_to_megatron(hf_sd, arch, padded_vocab_size=PADDED)["decoder.layers.0.mlp.linear_fc1.weight"]
    assert torch.equal(fc1[: arch.ffn_hidden_size], hf_sd["model.layers.0.mlp.gate_proj.weight"])
    assert torch.equal(fc1[arch.ffn_hidden_size :], hf_sd["model.layers.0.mlp.up_proj.weight"])


def test_new_tokens_get_the_mean_row_and_padding_is_zero(mistral):
    """Plain Mistral (300 rows here) → a 340-token vocabulary padded to 384."""
    hf_sd = mistral.state_dict()
    arch = model_config_from_hf(mistral.config, vocab_size=340)
    m_sd = hf_to_megatron(hf_sd, arch, padded_vocab_size=PADDED)
    for m_name, hf_name in (
        ("embedding.word_embeddings.weight", "model.embed_tokens.weight"),
        ("output_layer.weight", "lm_head.weight"),
    ):
        old, new = hf_sd[hf_name], m_sd[m_name]
        assert torch.equal(new[:300], old)
        mean = old.double().mean(0).float()
        assert torch.equal(new[300:340], mean.expand(40, -1))
        assert torch.count_nonzero(new[340:]) == 0

    back = megatron_to_hf(m_sd, arch, vocab_size=340)
    assert back["model.embed_tokens.weight"].shape == (340, arch.hidden_size)
    assert torch.equal(back["lm_head.weight"][:300], hf_sd["lm_head.weight"])


def test_patch_projection_is_initialised_at_token_embedding_scale(mistral, arch):
    hf_sd = mistral.state_dict()
    w = hf_to_megatron(hf_sd, arch, padded_vocab_size=PADDED)[MEGATRON_PATCH]
    assert w.shape == (arch.hidden_size, arch.patch_dim)
    token_rms = hf_sd["model.embed_tokens.weight"].pow(2).mean().sqrt()
    assert w.std().item() == pytest.approx(token_rms.item() / math.sqrt(arch.patch_dim), rel=0.02)
    # What the std is for: a unit-variance patch lands at the RMS of a token embedding.
    patches = torch.randn(2000, arch.patch_dim, generator=torch.Generator().manual_seed(9))
    assert (patches @ w.t()).pow(2).mean().sqrt().item() == pytest.approx(token_rms.item(), rel=0.05)


def test_patch_initialisation_is_deterministic_and_seedable(mistral, arch):
    def convert(**kw):
        return hf_to_megatron(mistral.state_dict(), arch, padded_vocab_size=PADDED, **kw)[MEGATRON_PATCH]

    assert torch.equal(convert(), convert())
    seeded = convert(generator=torch.Generator().manual_seed(1))
    assert torch.equal(seeded, convert(generator=torch.Generator().manual_seed(1)))
    assert not torch.equal(seeded, convert())


def test_patch_projection_is_copied_when_present(mistral, arch):
    hf_sd = dict(mistral.state_dict())
    hf_sd[HF_PATCH] = torch.randn(arch.hidden_size, arch.patch_dim)
    assert torch.equal(hf_to_megatron(hf_sd, arch, padded_vocab_size=PADDED)[MEGATRON_PATCH], hf_sd[HF_PATCH])


def test_bf16_stays_bf16(mistral, arch):
    hf_sd = {k: v.bfloat16() for k, v in mistral.state_dict().items()}
    m_sd = hf_to_megatron(hf_sd, arch, padded_vocab_size=PADDED)
    assert {v.dtype for v in m_sd.values()} == {torch.bfloat16}
    back = megatron_to_hf(m_sd, arch, vocab_size=arch.vocab_size)
    assert all(torch.equal(back[k], v) for k, v in hf_sd.items())


# --- errors name the key and the shape ---------------------------------------------------------------


def test_missing_hf_key_is_named(mistral, arch):
    hf_sd = {k: v for k, v in mistral.state_dict().items() if k != "model.layers.1.self_attn.k_proj.weight"}
    with pytest.raises(ConversionError, match=r"missing 1 key\(s\): model\.layers\.1\.self_attn\.k_proj\.weight"):
        hf_to_megatron(hf_sd, arch, padded_vocab_size=PADDED)


def test_unexpected_hf_key_is_named_but_rotary_buffers_are_ignored(mistral, arch):
    hf_sd = dict(mistral.state_dict())
    hf_sd["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    hf_sd["model.rotary_emb.inv_freq"] = torch.ones(8)
    hf_to_megatron(hf_sd, arch, padded_vocab_size=PADDED)  # harmless buffers
    hf_sd["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(64)
    with pytest.raises(ConversionError, match=r"unexpected 1 key\(s\): model\.layers\.0\.self_attn\.q_proj\.bias"):
        hf_to_megatron(hf_sd, arch, padded_vocab_size=PADDED)


def test_a_checkpoint_with_more_layers_is_refused(arch):
    deeper = random_mistral(num_hidden_layers=3).state_dict()
    with pytest.raises(ConversionError, match=r"unexpected .*model\.layers\.2\."):
        hf_to_megatron(deeper, arch, padded_vocab_size=PADDED)


def test_wrong_shape_is_named(mistral, arch):
    hf_sd = dict(mistral.state_dict())
    hf_sd["model.layers.0.mlp.up_proj.weight"] = torch.zeros(95, 64)
    message = r"'model\.layers\.0\.mlp\.up_proj\.weight' has shape \[95, 64\], expected \[F=96, H=64\]"
    with pytest.raises(ConversionError, match=message):
        hf_to_megatron(hf_sd, arch, padded_vocab_size=PADDED)


def test_wrong_patch_shape_is_named(mistral, arch):
    hf_sd = dict(mistral.state_dict())
    hf_sd[HF_PATCH] = torch.zeros(64, 768)
    message = r"embed_vision_patch\.weight' has shape \[64, 768\], expected \[H=64, P=3072\]"
    with pytest.raises(ConversionError, match=message):
        hf_to_megatron(hf_sd, arch, padded_vocab_size=PADDED)


def test_more_rows_than_the_vocabulary_are_refused_not_truncated(mistral):
    arch = model_config_from_hf(mistral.config, vocab_size=299)
    with pytest.raises(ConversionError, match="300 rows, more than the vocabulary \\(299\\)"):
        hf_to_megatron(mistral.state_dict(), arch, padded_vocab_size=PADDED)


def test_padded_vocab_smaller_than_vocab_is_refused(mistral, arch):
    with pytest.raises(ConversionError, match="padded_vocab_size 256"):
        hf_to_megatron(mistral.state_dict(), arch, padded_vocab_size=256)


def test_megatron_side_errors(mistral, arch):
    m_sd = hf_to_megatron(mistral.state_dict(), arch, padded_vocab_size=PADDED)
    m_sd["decoder.layers.0.mlp.linear_fc1._extra_state"] = None  # megatron-core writes these: ignored
    megatron_to_hf(m_sd, arch, vocab_size=300)
    with pytest.raises(ConversionError, match="vocab_size 385"):
        megatron_to_hf(m_sd, arch, vocab_size=385)
    with pytest.raises(ConversionError, match=f"missing 1 key\\(s\\): {MEGATRON_PATCH}"):
        megatron_to_hf({k: v for k, v in m_sd.items() if k != MEGATRON_PATCH}, arch, vocab_size=300)
    bad = dict(m_sd, **{"output_layer.weight": torch.zeros(256, 64)})
    message = r"'output_layer\.weight' has shape \[256, 64\], expected \[V=384, H=64\]"
    with pytest.raises(ConversionError, match=message):
        megatron_to_hf(bad, arch, vocab_size=300)


def test_table_rules_are_validated_at_construction():
    from megatron.solo.convert.name_table import Rule

    with pytest.raises(ValueError, match="Rule.hf_shapes"):
        Rule("x.weight", ("H",), ("a.weight", "b.weight"), (("H",),))
    with pytest.raises(ValueError, match="unknown symbols \\['D'\\]"):
        Rule("x.weight", ("H", "D"), ("a.weight",), (("H", "D"),))
    with pytest.raises(ValueError, match="Rule.hf"):
        Rule("layers.{i}.x.weight", ("H",), ("a.weight",), (("H",),))
