"""Tiny random HF models for the conversion tests (a helper module, not a test; imported by name)."""

import torch

TINY = dict(  # 2 layers, hidden 64, 4 heads / 2 KV groups: GQA with 2 query heads per group
    num_hidden_layers=2,
    hidden_size=64,
    intermediate_size=96,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=300,
    rms_norm_eps=1e-5,
    max_position_embeddings=128,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    tie_word_embeddings=False,
)


def random_mistral(config_cls=None, seed: int = 0, **overrides):
    """A tiny ``MistralForCausalLM`` (or ``config_cls``'s model) with non-trivial random weights, fp32, eager.

    HF initialises RMSNorm weights to exactly 1; random norms make a wrong mapping of them visible.
    """
    from transformers import MistralConfig, MistralForCausalLM

    from megatron.solo.convert.hf_solo import SoloConfig, SoloForCausalLM

    config_cls = config_cls or MistralConfig
    cfg = config_cls(**{**TINY, **overrides}, attn_implementation="eager")
    model_cls = SoloForCausalLM if isinstance(cfg, SoloConfig) else MistralForCausalLM
    torch.manual_seed(seed)
    model = model_cls(cfg).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))
    return model
