"""``HaploModel``'s weights (megatron-core names, full unsharded tensors) ↔ the released HaploVL HF layout.

The HF side is ``megatron.solo.haplo.hf_haplo``'s (the release's names, spec §2.1–2.3); the megatron side is
``haplo/model.py``'s. One table, pure functions on state dicts, every key accounted for:

==================================================  ==========================================================
megatron (``HaploModel``)                           released layout (``HaploForCausalLM``)
==================================================  ==========================================================
``embedding.word_embeddings.weight`` [V', pre]      ``model.embed_tokens.weight`` [V, pre] (V' = TP-padded)
``patch_embed.weight`` [pre, 3·P·P]                 ``model.patch_embed.proj.weight`` [pre, 3, P, P]
``pos_embed`` [T², pre]                             ``model.pre_pos_embed`` [1, T², pre]
``image_newline``, ``pre_norm.{weight,bias}``        ``model.image_newline``, ``model.pre_norm.*``
``pre_decoder.layers.{i}.*``                        ``model.layers.{i}.*`` (i < N, the pre-decoder)
``connector.weight``                                ``model.pre_connector.weight``
``decoder.layers.{j}.*``                            ``model.layers.{N + j}.*`` (the LLM)
``decoder.final_layernorm.weight``                  ``model.norm.weight``
``output_layer.weight`` [V', H]                     ``lm_head.weight`` [V, H]
==================================================  ==========================================================

Per layer: ``input_layernorm`` ↔ ``input_layernorm``; ``pre_mlp_layernorm`` ↔ ``post_attention_layernorm``;
``self_attention.linear_qkv`` ↔ ``self_attn.{q,k,v}_proj`` (megatron's per-KV-group ``[q_g…, k_g, v_g]`` rows;
no RoPE permutation: both apply ``rotate_half`` RoPE to the rows as they are); ``linear_proj`` ↔ ``o_proj``;
``mlp.linear_fc1`` = ``[gate; up]``; ``linear_fc2`` ↔ ``down_proj``. The release has biases on all of these in
every layer: an LLM without them exports zero biases, and importing non-zero LLM biases into one without them
is refused (``llm_bias`` says which the megatron side has). Stage-1 tensors (``distill_heads.*``,
``llm_embedding.weight``) are not part of the release and are left out of an export.

Configurations: :func:`release_config` gives hf_haplo's ``HaploConfig`` arguments for a pre-decoder and an LLM;
:func:`configs_from_release` reads a released ``config.json`` back (the release's own nesting too).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Literal

import torch
from torch import Tensor

from megatron.solo.haplo.pre_decoder import PreDecoderConfig

LlmBias = Literal["none", "qkv", "all"]
_STAGE1 = re.compile(r"^(distill_heads\.|llm_embedding\.)")
_EXTRA = re.compile(r"(^|\.)_extra_state$")


class LayoutError(ValueError):
    """A state dict that does not fit the table: a missing/unexpected key, a wrong shape, a lost bias."""


class _Geometry:
    """What one layer stack needs for the QKV/MLP transforms."""

    def __init__(self, hidden: int, heads: int, groups: int, head_dim: int, ffn: int, layernorm: bool):
        self.hidden, self.heads, self.groups, self.head_dim, self.ffn = hidden, heads, groups, head_dim, ffn
        self.layernorm = layernorm

    @property
    def q_rows(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_rows(self) -> int:
        return self.groups * self.head_dim


def _pre_geometry(pre: PreDecoderConfig) -> _Geometry:
    if not pre.gated:
        raise LayoutError("the released layout has gated MLPs only (PreDecoderConfig.gated=False cannot be exported)")
    return _Geometry(
        pre.hidden_size, pre.num_attention_heads, pre.query_groups, pre.head_dim, pre.ffn_hidden_size,
        pre.normalization == "LayerNorm",
    )  # fmt: skip


def _llm_geometry(llm) -> _Geometry:
    return _Geometry(
        llm.hidden_size, llm.num_attention_heads, llm.num_query_groups, llm.head_dim, llm.ffn_hidden_size, False
    )


def _split_qkv(t: Tensor, g: _Geometry) -> tuple[Tensor, Tensor, Tensor]:
    per_group = t.reshape(g.groups, -1, *t.shape[1:])
    q, k, v = per_group.split([g.q_rows // g.groups, g.head_dim, g.head_dim], dim=1)
    return q.reshape(-1, *t.shape[1:]), k.reshape(-1, *t.shape[1:]), v.reshape(-1, *t.shape[1:])


def _fuse_qkv(q: Tensor, k: Tensor, v: Tensor, g: _Geometry) -> Tensor:
    rest = q.shape[1:]
    parts = [q.reshape(g.groups, -1, *rest), k.reshape(g.groups, -1, *rest), v.reshape(g.groups, -1, *rest)]
    return torch.cat(parts, dim=1).reshape(-1, *rest)


def _layer_to_release(src: Mapping[str, Tensor], m: str, r: str, g: _Geometry) -> dict[str, Tensor]:
    """One layer: megatron prefix ``m`` → release prefix ``r``; absent biases become zeros."""

    def get(name: str, shape: tuple[int, ...] | None = None) -> Tensor:
        if name in src:
            return src[name]
        if shape is None:
            raise LayoutError(f"missing {name!r}")
        like = src[m + "self_attention.linear_qkv.weight"]
        return torch.zeros(shape, dtype=like.dtype)

    out: dict[str, Tensor] = {}
    for ours, theirs in (("input_layernorm", "input_layernorm"), ("pre_mlp_layernorm", "post_attention_layernorm")):
        out[f"{r}{theirs}.weight"] = get(f"{m}{ours}.weight")
        if g.layernorm:
            out[f"{r}{theirs}.bias"] = get(f"{m}{ours}.bias")
    qkv_rows = g.q_rows + 2 * g.kv_rows
    q, k, v = _split_qkv(get(m + "self_attention.linear_qkv.weight"), g)
    qb, kb, vb = _split_qkv(get(m + "self_attention.linear_qkv.bias", (qkv_rows,)), g)
    for name, w, b in (("q", q, qb), ("k", k, kb), ("v", v, vb)):
        out[f"{r}self_attn.{name}_proj.weight"], out[f"{r}self_attn.{name}_proj.bias"] = w, b
    out[r + "self_attn.o_proj.weight"] = get(m + "self_attention.linear_proj.weight")
    out[r + "self_attn.o_proj.bias"] = get(m + "self_attention.linear_proj.bias", (g.hidden,))
    gate, up = get(m + "mlp.linear_fc1.weight").chunk(2)
    gate_b, up_b = get(m + "mlp.linear_fc1.bias", (2 * g.ffn,)).chunk(2)
    out[r + "mlp.gate_proj.weight"], out[r + "mlp.gate_proj.bias"] = gate, gate_b
    out[r + "mlp.up_proj.weight"], out[r + "mlp.up_proj.bias"] = up, up_b
    out[r + "mlp.down_proj.weight"] = get(m + "mlp.linear_fc2.weight")
    out[r + "mlp.down_proj.bias"] = get(m + "mlp.linear_fc2.bias", (g.hidden,))
    return out


def _layer_to_megatron(src: Mapping[str, Tensor], r: str, m: str, g: _Geometry, bias: LlmBias) -> dict[str, Tensor]:
    """One layer: release prefix ``r`` → megatron prefix ``m``, keeping the biases ``bias`` says it has."""

    def get(name: str) -> Tensor:
        if name not in src:
            raise LayoutError(f"missing {name!r}")
        return src[name]

    def dropped(name: str) -> None:
        if name in src and src[name].abs().max() > 0:
            raise LayoutError(f"{name!r} is non-zero but the target LLM has no such bias (llm_bias={bias!r})")

    out: dict[str, Tensor] = {}
    for ours, theirs in (("input_layernorm", "input_layernorm"), ("pre_mlp_layernorm", "post_attention_layernorm")):
        out[f"{m}{ours}.weight"] = get(f"{r}{theirs}.weight")
        if g.layernorm:
            out[f"{m}{ours}.bias"] = get(f"{r}{theirs}.bias")
    a, p = r + "self_attn.", r + "mlp."
    out[m + "self_attention.linear_qkv.weight"] = _fuse_qkv(*(get(f"{a}{n}_proj.weight") for n in "qkv"), g)
    out[m + "self_attention.linear_proj.weight"] = get(a + "o_proj.weight")
    out[m + "mlp.linear_fc1.weight"] = torch.cat([get(p + "gate_proj.weight"), get(p + "up_proj.weight")])
    out[m + "mlp.linear_fc2.weight"] = get(p + "down_proj.weight")
    if bias in ("qkv", "all"):
        out[m + "self_attention.linear_qkv.bias"] = _fuse_qkv(*(get(f"{a}{n}_proj.bias") for n in "qkv"), g)
    else:
        for n in "qkv":
            dropped(f"{a}{n}_proj.bias")
    if bias == "all":
        out[m + "self_attention.linear_proj.bias"] = get(a + "o_proj.bias")
        out[m + "mlp.linear_fc1.bias"] = torch.cat([get(p + "gate_proj.bias"), get(p + "up_proj.bias")])
        out[m + "mlp.linear_fc2.bias"] = get(p + "down_proj.bias")
    else:
        for name in (a + "o_proj.bias", p + "gate_proj.bias", p + "up_proj.bias", p + "down_proj.bias"):
            dropped(name)
    return out


def megatron_to_release(
    state_dict: Mapping[str, Tensor], *, pre: PreDecoderConfig, llm, vocab_size: int
) -> dict[str, Tensor]:
    """A full (TP=1, unsharded) ``HaploModel`` state dict → the released layout.

    ``llm``: the LLM's geometry (``num_layers``, ``hidden_size``, ``ffn_hidden_size``, ``num_attention_heads``,
    ``num_query_groups``, ``head_dim``: a ``ModelConfig``/``HaploConfig``); ``vocab_size``: the real vocabulary
    (the TP padding rows are dropped).
    """
    src = {k: v for k, v in state_dict.items() if not _EXTRA.search(k) and not _STAGE1.match(k)}
    pg, lg, n = _pre_geometry(pre), _llm_geometry(llm), pre.num_layers
    out = {
        "model.embed_tokens.weight": src["embedding.word_embeddings.weight"][:vocab_size],
        "lm_head.weight": src["output_layer.weight"][:vocab_size],
        "model.patch_embed.proj.weight": src["patch_embed.weight"].reshape(pre.hidden_size, 3, *_patch_side(src, pre)),
        "model.pre_pos_embed": src["pos_embed"][None],
        "model.image_newline": src["image_newline"],
        "model.pre_norm.weight": src["pre_norm.weight"],
        "model.pre_norm.bias": src["pre_norm.bias"],
        "model.pre_connector.weight": src["connector.weight"],
        "model.norm.weight": src["decoder.final_layernorm.weight"],
    }
    for i in range(n):
        out.update(_layer_to_release(src, f"pre_decoder.layers.{i}.", f"model.layers.{i}.", pg))
    for j in range(llm.num_layers):
        out.update(_layer_to_release(src, f"decoder.layers.{j}.", f"model.layers.{n + j}.", lg))
    _check_all_used(src, pre.num_layers, llm.num_layers)
    return out


def release_to_megatron(
    state_dict: Mapping[str, Tensor],
    *,
    pre: PreDecoderConfig,
    llm,
    llm_bias: LlmBias = "none",
    padded_vocab_size: int | None = None,
) -> dict[str, Tensor]:
    """A released-layout state dict → ``HaploModel``'s names (TP=1). ``padded_vocab_size``: pad the embedding
    and output rows with zeros up to it (megatron's TP padding). The pre-decoder keeps its biases and norms
    as ``pre`` says; the LLM keeps the biases ``llm_bias`` names (dropping others only when they are zero)."""
    known = re.compile(
        r"^(model\.(embed_tokens|patch_embed\.proj|pre_norm|pre_connector|norm)\.(weight|bias)|model\.pre_pos_embed"
        r"|model\.image_newline|lm_head\.weight|model\.layers\.\d+\..+|model\.rotary_emb\..+)$"
    )
    unknown = sorted(k for k in state_dict if not known.match(k))
    if unknown:
        raise LayoutError(f"unexpected keys in the released layout: {unknown[:5]}")
    src = dict(state_dict)
    n, lg = pre.num_layers, _llm_geometry(llm)
    layers = {int(k.split(".")[2]) for k in src if k.startswith("model.layers.")}
    if layers != set(range(n + llm.num_layers)):
        raise LayoutError(
            f"the checkpoint has layers {sorted(layers)[:3]}…{len(layers)}, expected {n} + {llm.num_layers}"
        )

    def rows(t: Tensor) -> Tensor:
        if padded_vocab_size is None or padded_vocab_size == t.shape[0]:
            return t
        if padded_vocab_size < t.shape[0]:
            raise LayoutError(f"padded_vocab_size {padded_vocab_size} is below the checkpoint's {t.shape[0]} rows")
        return torch.cat([t, t.new_zeros(padded_vocab_size - t.shape[0], *t.shape[1:])])

    pre_bias: LlmBias = "all" if pre.add_bias else "none"
    out = {
        "embedding.word_embeddings.weight": rows(src["model.embed_tokens.weight"]),
        "output_layer.weight": rows(src["lm_head.weight"]),
        "patch_embed.weight": src["model.patch_embed.proj.weight"].reshape(pre.hidden_size, -1),
        "pos_embed": src["model.pre_pos_embed"][0],
        "image_newline": src["model.image_newline"],
        "pre_norm.weight": src["model.pre_norm.weight"],
        "pre_norm.bias": src["model.pre_norm.bias"],
        "connector.weight": src["model.pre_connector.weight"],
        "decoder.final_layernorm.weight": src["model.norm.weight"],
    }
    for i in range(n):
        out.update(
            _layer_to_megatron(src, f"model.layers.{i}.", f"pre_decoder.layers.{i}.", _pre_geometry(pre), pre_bias)
        )
    for j in range(llm.num_layers):
        out.update(_layer_to_megatron(src, f"model.layers.{n + j}.", f"decoder.layers.{j}.", lg, llm_bias))
    return out


def _patch_side(src: Mapping[str, Tensor], pre: PreDecoderConfig) -> tuple[int, int]:
    dim = src["patch_embed.weight"].shape[1]
    side = round((dim // 3) ** 0.5)
    if 3 * side * side != dim:
        raise LayoutError(f"patch_embed.weight has {dim} columns, not 3·P·P")
    return side, side


def _check_all_used(src: Mapping[str, Tensor], pre_layers: int, llm_layers: int) -> None:
    layer = re.compile(r"^(pre_decoder|decoder)\.layers\.(\d+)\.")
    stem = {
        "embedding.word_embeddings.weight", "output_layer.weight", "patch_embed.weight", "pos_embed",
        "image_newline", "pre_norm.weight", "pre_norm.bias", "connector.weight", "decoder.final_layernorm.weight",
    }  # fmt: skip
    for key in src:
        match = layer.match(key)
        if match:
            limit = pre_layers if match.group(1) == "pre_decoder" else llm_layers
            if int(match.group(2)) >= limit:
                raise LayoutError(f"{key!r}: more layers than the configuration's {limit}")
        elif key not in stem:
            raise LayoutError(f"unexpected key {key!r}")


def release_config(pre: PreDecoderConfig, llm, **image) -> dict:
    """``HaploConfig`` (hf_haplo) keyword arguments for this architecture; ``image``: the image settings
    (``image_token_index``, ``patch_size``, ``default_image_size``, ``image_grid_pinpoints``,
    ``image_aspect_ratio``, ``pre_norm_eps``, ``vocab_size``, …) passed through."""
    _pre_geometry(pre)
    return dict(
        hidden_size=llm.hidden_size,
        intermediate_size=llm.ffn_hidden_size,
        num_hidden_layers=llm.num_layers,
        num_attention_heads=llm.num_attention_heads,
        num_key_value_heads=llm.num_query_groups,
        head_dim=llm.head_dim,
        hidden_act="silu",
        rms_norm_eps=llm.norm_epsilon,
        norm_mode="rmsnorm",
        rope_theta=llm.rotary_base,
        pre_config=dict(
            hidden_size=pre.hidden_size,
            intermediate_size=pre.ffn_hidden_size,
            num_hidden_layers=pre.num_layers,
            num_attention_heads=pre.num_attention_heads,
            num_key_value_heads=pre.query_groups,
            head_dim=pre.head_dim,
            hidden_act=pre.activation,
            rms_norm_eps=pre.norm_epsilon,
            norm_mode="layernorm" if pre.normalization == "LayerNorm" else "rmsnorm",
            rope_theta=pre.rotary_base,
            attention_rope=True,
            rope=pre.rope,
        ),
        **image,
    )


_ACTIVATIONS = {"quick_gelu", "gelu", "silu"}


def configs_from_release(config: Mapping) -> tuple[PreDecoderConfig, dict, dict]:
    """A released-layout ``config.json`` (as a dict) → (the pre-decoder's ``PreDecoderConfig``, the LLM's
    ``ModelConfig`` fields, the image fields). Reads the release's own JSON (LLM fields at the top level or in
    ``base_config``; the pre-decoder's in ``pre_config``) and hf_haplo's."""
    top = {**(config.get("base_config") or {}), **config}
    pre = dict(config.get("pre_config") or {})

    def field(d: Mapping, name: str, default=None):
        value = d.get(name, default)
        if value is None and default is None:
            raise LayoutError(f"config.json: {name!r} is missing")
        return value

    heads = field(pre, "num_attention_heads")
    head_dim = pre.get("head_dim") or field(pre, "hidden_size") // heads
    llm_heads = field(top, "num_attention_heads")
    llm_head_dim = top.get("head_dim") or field(top, "hidden_size") // llm_heads
    if pre.get("hidden_act", "silu") not in _ACTIVATIONS:
        raise LayoutError(
            f"config.json: pre_config.hidden_act {pre.get('hidden_act')!r} is not one of {sorted(_ACTIVATIONS)}"
        )
    rope, theta = pre.get("rope", True), float(pre.get("rope_theta", 10000.0))
    if rope and not pre.get("attention_rope", False):  # the release's shared table: the LLM's
        if head_dim != llm_head_dim:
            raise LayoutError("config.json: the pre-decoder shares the LLM's RoPE table but has another head dim")
        theta = float(top.get("rope_theta", 10000.0))
    pre_cfg = PreDecoderConfig(
        num_layers=field(pre, "num_hidden_layers"),
        hidden_size=field(pre, "hidden_size"),
        num_attention_heads=heads,
        num_query_groups=pre.get("num_key_value_heads") or heads,
        kv_channels=head_dim,
        ffn_hidden_size=field(pre, "intermediate_size"),
        activation=pre.get("hidden_act", "silu"),
        normalization="LayerNorm" if pre.get("norm_mode", "rmsnorm") == "layernorm" else "RMSNorm",
        norm_epsilon=float(pre.get("rms_norm_eps", 1e-6)),
        rope=bool(rope),
        rotary_base=theta,
    )
    if top.get("hidden_act", "silu") != "silu" or top.get("norm_mode", "rmsnorm") != "rmsnorm":
        raise LayoutError(
            "config.json: the LLM must be a SwiGLU / RMSNorm decoder (hidden_act silu, norm_mode rmsnorm)"
        )
    llm = dict(
        num_layers=field(top, "num_hidden_layers"),
        hidden_size=field(top, "hidden_size"),
        ffn_hidden_size=field(top, "intermediate_size"),
        num_attention_heads=llm_heads,
        num_query_groups=top.get("num_key_value_heads") or llm_heads,
        kv_channels=llm_head_dim,
        vocab_size=field(top, "vocab_size"),
        max_sequence_length=top.get("max_position_embeddings", 32768),
        rotary_base=float(top.get("rope_theta", 10000.0)),
        norm_epsilon=float(top.get("rms_norm_eps", 1e-6)),
    )
    image = {
        name: top[name]
        for name in (
            "image_token_index",
            "patch_size",
            "default_image_size",
            "image_grid_pinpoints",
            "image_aspect_ratio",
        )
        if name in top
    }
    return pre_cfg, llm, image
