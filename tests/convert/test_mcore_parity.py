"""HF Mistral ↔ megatron-core GPTModel: the converted weights give the same logits (CPU, fp32, one process)."""

import pytest
import torch
import torch.nn.functional as F

from tiny_models import TINY, random_mistral
from megatron.solo.convert.name_table import MEGATRON_PATCH, model_config_from_hf, hf_to_megatron, megatron_to_hf

PADDED = 384  # 300 real rows + 84 padding rows, like Megatron's multiple-of-128 padding
SEQ = 12


def build_gpt(arch, padded_vocab_size: int, rope_theta: float):
    """A megatron-core GPTModel shaped like ``arch``: local spec, RMSNorm, SwiGLU, GQA, RoPE, untied, no bias."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig

    cfg = TransformerConfig(
        num_layers=arch.num_layers, hidden_size=arch.hidden_size, ffn_hidden_size=arch.ffn_hidden_size,
        num_attention_heads=arch.num_attention_heads, num_query_groups=arch.num_query_groups,
        kv_channels=arch.head_dim, normalization="RMSNorm", layernorm_epsilon=TINY["rms_norm_eps"],
        gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False,
        hidden_dropout=0.0, attention_dropout=0.0, use_cpu_initialization=True, params_dtype=torch.float32,
        bias_dropout_fusion=False, bias_activation_fusion=False, masked_softmax_fusion=False,
        apply_rope_fusion=False, gradient_accumulation_fusion=False, persist_layer_norm=False,
    )
    return GPTModel(
        cfg, get_gpt_layer_local_spec(normalization="RMSNorm"), vocab_size=padded_vocab_size,
        max_sequence_length=TINY["max_position_embeddings"], position_embedding_type="rope",
        rotary_base=rope_theta, share_embeddings_and_output_weights=False,
    ).eval()


def load_megatron(gpt, m_sd):
    """Load everything but the patch projection (GPTModel has none); only ``_extra_state`` may stay unset."""
    result = gpt.load_state_dict({k: v for k, v in m_sd.items() if k != MEGATRON_PATCH}, strict=False)
    assert not result.unexpected_keys
    assert all(k.endswith("._extra_state") for k in result.missing_keys), result.missing_keys


def gpt_logits(gpt, ids, decoder_input=None):
    b, s = ids.shape
    pos = torch.arange(s).expand(b, s)
    causal = ~torch.tril(torch.ones(s, s, dtype=torch.bool))[None, None]  # [1,1,s,s], True = masked out
    with torch.no_grad():
        return gpt(ids, pos, causal, decoder_input=decoder_input)  # [b, s, padded vocab]


def rope_permute(w: torch.Tensor, heads: int) -> torch.Tensor:
    """The interleaved ↔ half-split RoPE row permutation that Meta-Llama → HF conversions apply."""
    rows, h = w.shape
    return w.view(heads, rows // heads // 2, 2, h).transpose(1, 2).reshape(rows, h)


@pytest.mark.parametrize("rope_theta", [1e4, 1e6])
def test_hf_mistral_and_megatron_give_the_same_logits(megatron_world, rope_theta):
    hf = random_mistral(rope_parameters={"rope_type": "default", "rope_theta": rope_theta})
    arch = model_config_from_hf(hf.config)
    gpt = build_gpt(arch, PADDED, rope_theta)
    load_megatron(gpt, hf_to_megatron(hf.state_dict(), arch, padded_vocab_size=PADDED))
    ids = torch.randint(0, TINY["vocab_size"], (2, SEQ), generator=torch.Generator().manual_seed(3))

    with torch.no_grad():
        want = hf(ids).logits
    got = gpt_logits(gpt, ids)

    delta = (got[..., : TINY["vocab_size"]] - want).abs().max().item()
    print(f"rope_theta={rope_theta:g}: max|Δlogits| HF vs megatron-core = {delta:.3g}")
    assert delta <= 1e-5
    assert torch.count_nonzero(got[..., TINY["vocab_size"]:]) == 0  # padding rows of the output layer are zero


def test_a_rope_permutation_of_q_and_k_would_break_parity(megatron_world):
    """The control: permuting q/k rows (as Llama's Meta → HF conversion does) changes the logits a lot, so
    the parity above really shows that HF's rows are already in megatron-core's RoPE layout."""
    hf = random_mistral()
    arch = model_config_from_hf(hf.config)
    sd = dict(hf.state_dict())
    for i in range(arch.num_layers):
        for proj, heads in (("q_proj", arch.num_attention_heads), ("k_proj", arch.num_query_groups)):
            name = f"model.layers.{i}.self_attn.{proj}.weight"
            sd[name] = rope_permute(sd[name], heads)
    gpt = build_gpt(arch, PADDED, 1e4)
    load_megatron(gpt, hf_to_megatron(sd, arch, padded_vocab_size=PADDED))
    ids = torch.randint(0, TINY["vocab_size"], (1, SEQ), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = hf(ids).logits
    assert (gpt_logits(gpt, ids)[..., : TINY["vocab_size"]] - want).abs().max() > 1e-2


def test_solo_hf_model_matches_megatron_with_patches_through_decoder_input(megatron_world):
    """Images too: Megatron's decoder_input = word embedding + patch_embedding(patch) at patch positions
    equals SoloForCausalLM (HF) on weights that went HF → Megatron → HF."""
    from megatron.solo.convert.hf_solo import SoloConfig

    hf = random_mistral(SoloConfig, vision_patch_size=4)  # patch_dim 48
    arch = model_config_from_hf(hf.config)
    m_sd = hf_to_megatron(hf.state_dict(), arch, padded_vocab_size=PADDED)
    hf.load_state_dict(megatron_to_hf(m_sd, arch, vocab_size=arch.vocab_size))
    gpt = build_gpt(arch, PADDED, 1e4)
    load_megatron(gpt, m_sd)

    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(0, TINY["vocab_size"], (2, SEQ), generator=gen)
    indices = torch.full((2, SEQ), -1)
    indices[0, 1:4], indices[1, 5:9] = torch.arange(3), torch.arange(3, 7)
    patches = torch.randn(7, arch.patch_dim, generator=gen)

    with torch.no_grad():
        want = hf(ids, vision_patch_indices=indices, vision_patches=patches).logits
        emb = gpt.embedding(input_ids=ids, position_ids=None)  # [s, b, h]
        projected = F.linear(patches, m_sd[MEGATRON_PATCH])  # [N, h]
        is_patch = (indices >= 0).t()[..., None]
        emb = emb + torch.where(is_patch, projected[indices.clamp(min=0)].transpose(0, 1), 0.0)
    got = gpt_logits(gpt, ids, decoder_input=emb)

    delta = (got[..., : TINY["vocab_size"]] - want).abs().max().item()
    print(f"image+text: max|Δlogits| SoloForCausalLM vs megatron-core = {delta:.3g}")
    assert delta <= 1e-5
