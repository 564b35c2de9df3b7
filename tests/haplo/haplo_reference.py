"""An independent float64 HaploVL forward from a state dict (a module, not a test; imported by name).

Written from the spec (§2.1–§2.2, §2.9), not from the model's code: plain tensor operations over megatron-core's
parameter layout (fused q/k/v rows per query group ``[q…, k, v]``, fc1 = ``[gate; up]``), RoPE as HF's
``rotate_half`` at the given positions, and the released ``attention_start_ids`` mask rule with packed
documents kept apart.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def start_ids(image_block_ids: torch.Tensor) -> torch.Tensor:
    """The released processor's ``attention_start_ids`` [b, s]: a token's own index, or its image block's first."""
    b, s = image_block_ids.shape
    out = torch.arange(s).expand(b, s).clone()
    for row in range(b):
        for i in range(1, s):
            block = int(image_block_ids[row, i])
            if block >= 0 and int(image_block_ids[row, i - 1]) == block:
                out[row, i] = out[row, i - 1]
    return out


def naive_allowed(cu_seqlens: torch.Tensor, image_block_ids: torch.Tensor) -> torch.Tensor:
    """bool [b, s, s] by loops: key j visible to query i iff same document and start[j] ≤ i (spec §2.9)."""
    b, s = image_block_ids.shape
    starts = start_ids(image_block_ids)
    cu = cu_seqlens.tolist()
    doc = torch.zeros(b * s, dtype=torch.long)
    for d in range(len(cu) - 1):
        doc[cu[d] : cu[d + 1]] = d
    doc = doc.view(b, s)
    allowed = torch.zeros(b, s, s, dtype=torch.bool)
    for row in range(b):
        for i in range(s):
            for j in range(s):
                allowed[row, i, j] = bool(doc[row, i] == doc[row, j] and starts[row, j] <= i)
    return allowed


def _rope(x: torch.Tensor, positions: torch.Tensor, base: float) -> torch.Tensor:
    """x [b, s, heads, d] rotated at positions [b, s] (HF rotate_half)."""
    d = x.shape[-1]
    inv = 1.0 / (base ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    angles = positions.double()[..., None] * inv  # [b, s, d/2]
    emb = torch.cat([angles, angles], -1)[:, :, None, :]
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return x * emb.cos() + torch.cat([-x2, x1], -1) * emb.sin()


def _attention(x, sd, prefix, heads, groups, d, allowed, positions, base, rope):
    b, s, _ = x.shape
    qkv = x @ sd[f"{prefix}linear_qkv.weight"].T
    if f"{prefix}linear_qkv.bias" in sd:
        qkv = qkv + sd[f"{prefix}linear_qkv.bias"]
    per = heads // groups
    qkv = qkv.view(b, s, groups, per + 2, d)
    q = qkv[:, :, :, :per].reshape(b, s, heads, d)
    k = qkv[:, :, :, per].repeat_interleave(per, dim=2)
    v = qkv[:, :, :, per + 1].repeat_interleave(per, dim=2)
    if rope:
        q, k = _rope(q, positions, base), _rope(k, positions, base)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / d**0.5
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    out = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v).reshape(b, s, heads * d)
    out = out @ sd[f"{prefix}linear_proj.weight"].T
    return out + sd[f"{prefix}linear_proj.bias"] if f"{prefix}linear_proj.bias" in sd else out


def _mlp(x, sd, prefix, act):
    h = x @ sd[f"{prefix}linear_fc1.weight"].T
    if f"{prefix}linear_fc1.bias" in sd:
        h = h + sd[f"{prefix}linear_fc1.bias"]
    gate, up = h.chunk(2, -1)
    out = act(gate) * up @ sd[f"{prefix}linear_fc2.weight"].T
    return out + sd[f"{prefix}linear_fc2.bias"] if f"{prefix}linear_fc2.bias" in sd else out


def _norm(x, sd, name, eps, layer_norm):
    if layer_norm:
        return F.layer_norm(x, x.shape[-1:], sd[f"{name}.weight"], sd[f"{name}.bias"], eps)
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * sd[f"{name}.weight"]


def _layers(x, sd, prefix, n, geometry, allowed, positions, layer_norm, act, eps):
    heads, groups, d, base, rope = geometry
    for i in range(n):
        p = f"{prefix}layers.{i}."
        x = x + _attention(
            _norm(x, sd, f"{p}input_layernorm", eps, layer_norm),
            sd,
            f"{p}self_attention.",
            heads,
            groups,
            d,
            allowed,
            positions,
            base,
            rope,
        )
        x = x + _mlp(_norm(x, sd, f"{p}pre_mlp_layernorm", eps, layer_norm), sd, f"{p}mlp.", act)
    return x


def pre_decoder_output(cfg, sd, batch) -> torch.Tensor:
    """float64 [b, s, pre]: the pre-decoder's output (``sd`` already float64)."""
    tokens, positions = batch.tokens, batch.position_ids
    b, s = tokens.shape
    x = sd["embedding.word_embeddings.weight"][tokens].reshape(b * s, -1).clone()
    image = batch.image_block_ids.reshape(-1) >= 0
    x[image] = sd["image_newline"]
    patches = batch.patches.double() @ sd["patch_embed.weight"].T + sd["pos_embed"][batch.patch_table_index]
    x[batch.patch_index] = patches
    x = F.layer_norm(x, x.shape[-1:], sd["pre_norm.weight"], sd["pre_norm.bias"], cfg.pre_norm_epsilon).view(b, s, -1)
    allowed = naive_allowed(batch.cu_seqlens, batch.image_block_ids)
    pre = cfg.pre_decoder
    quick_gelu = lambda t: t * torch.sigmoid(1.702 * t)  # noqa: E731
    x = _layers(
        x,
        sd,
        "pre_decoder.",
        pre.num_layers,
        (pre.num_attention_heads, pre.query_groups, pre.head_dim, pre.rotary_base, pre.rope),
        allowed,
        positions,
        True,
        quick_gelu,
        pre.norm_epsilon,
    )
    return x


def haplo_logits(cfg, state_dict, batch) -> torch.Tensor:
    """float64 logits [b, s, V] of a whole HaploModel (``cfg`` a HaploConfig) on a collated ``batch``."""
    sd = {k: v.double() for k, v in state_dict.items() if not k.endswith("_extra_state")}
    positions = batch.position_ids
    allowed = naive_allowed(batch.cu_seqlens, batch.image_block_ids)
    x = pre_decoder_output(cfg, sd, batch) @ sd["connector.weight"].T
    geometry = (cfg.num_attention_heads, cfg.num_query_groups, cfg.head_dim, cfg.rotary_base, True)
    x = _layers(x, sd, "decoder.", cfg.num_layers, geometry, allowed, positions, False, F.silu, cfg.norm_epsilon)
    x = _norm(x, sd, "decoder.final_layernorm", cfg.norm_epsilon, False)
    return x @ sd["output_layer.weight"].T
