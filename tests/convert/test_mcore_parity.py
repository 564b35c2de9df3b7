"""HF Mistral / SoloForCausalLM ↔ our megatron-core SoloModel: the converted weights give the same logits
(CPU, fp32, one process)."""

import pytest
import torch
from tiny_models import TINY, random_mistral

from megatron.solo.convert.name_table import hf_to_megatron, megatron_to_hf, model_config_from_hf

PADDED = 384  # 300 real rows + 84 padding rows, like Megatron's multiple-of-128 padding
SEQ = 12


def build_gpt(arch, padded_vocab_size: int, rope_theta: float):
    """Our megatron-core model (``SoloModel``: GPTModel, local spec) shaped like ``arch``, fp32."""
    from megatron.solo.model import build_model, make_transformer_config

    arch = arch.replace(rotary_base=rope_theta)
    return build_model(arch, make_transformer_config(arch), padded_vocab_size=padded_vocab_size).eval()


def load_megatron(gpt, m_sd):
    """Load every tensor, the patch projection included; only ``_extra_state`` may stay unset."""
    from megatron.solo.checkpointing import load_model_state

    load_model_state(gpt, m_sd)


def gpt_logits(gpt, ids, patch_index=None, patches=None):
    """Each row one document: positions 0..s-1, cu_seqlens at row boundaries. patch_index: flat row·s+col."""
    b, s = ids.shape
    pos = torch.arange(s).expand(b, s)
    cu = torch.arange(0, (b + 1) * s, s, dtype=torch.int32)
    with torch.no_grad():
        return gpt(ids, pos, cu, s, patches, patch_index)  # [b, s, padded vocab]


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
    assert torch.count_nonzero(got[..., TINY["vocab_size"] :]) == 0  # padding rows of the output layer are zero


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


def test_solo_hf_model_matches_megatron_solo_model_on_image_and_text(megatron_world):
    """Images too: our Megatron SoloModel (vpatch embedding + projected patch) equals SoloForCausalLM (HF)
    on weights that went HF → Megatron → HF."""
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
    flat = indices.reshape(-1)
    patch_index = torch.nonzero(flat >= 0).squeeze(1)  # row·s + col of each patch, in patch order
    got = gpt_logits(gpt, ids, patch_index=patch_index, patches=patches[flat[patch_index]])

    delta = (got[..., : TINY["vocab_size"]] - want).abs().max().item()
    print(f"image+text: max|Δlogits| SoloForCausalLM vs megatron-core = {delta:.3g}")
    assert delta <= 1e-5


def test_sliding_window_matches_hf_mistral(megatron_world):
    """A window shorter than the sequence: our mask (q - k < W) is HF Mistral's rule, not off by one."""
    hf = random_mistral(sliding_window=4)
    arch = model_config_from_hf(hf.config)
    assert arch.sliding_window == 4
    gpt = build_gpt(arch, PADDED, 1e4)
    load_megatron(gpt, hf_to_megatron(hf.state_dict(), arch, padded_vocab_size=PADDED))
    ids = torch.randint(0, TINY["vocab_size"], (2, SEQ), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        want = hf(ids).logits
        unwindowed = build_gpt(arch.replace(sliding_window=None), PADDED, 1e4)
    load_megatron(unwindowed, hf_to_megatron(hf.state_dict(), arch, padded_vocab_size=PADDED))
    assert (gpt_logits(gpt, ids)[..., : TINY["vocab_size"]] - want).abs().max() <= 1e-5
    assert (gpt_logits(unwindowed, ids)[..., : TINY["vocab_size"]] - want).abs().max() > 1e-3  # control
