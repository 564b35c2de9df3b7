"""CLIP-ViT → HaploVL's stem and pre-decoder, exactly (spec §2.3, §2.6).

Where the architectures coincide (RoPE off, bidirectional attention over one 336 tile, no CLS token) the
converted stem + pre-decoder computes what CLIP's vision tower computes on the tile's patch tokens:

=========================================================  ===================================================
HF ``CLIPVisionModel``                                      HaploVL (``haplo/model.py``'s names)
=========================================================  ===================================================
``embeddings.patch_embedding.weight`` [C, 3, P, P]          ``patch_embed.weight`` [C, 3·P·P] (C×P×P patches)
``embeddings.position_embedding.weight`` [1 + T², C]        ``pos_embed`` [T², C]: rows 1.. (the CLS row dropped)
``embeddings.class_embedding``                              dropped (no CLS token)
``pre_layrnorm.{weight,bias}``                              ``pre_norm.{weight,bias}``
``encoder.layers.{i}.layer_norm1``                          ``pre_decoder.layers.{i}.input_layernorm``
``encoder.layers.{i}.self_attn.{q,k,v}_proj``               ``pre_decoder.layers.{i}.self_attention.linear_qkv``
                                                            (per head ``[q_h; k_h; v_h]``, megatron-core's
                                                            per-KV-group layout with one head per group)
``encoder.layers.{i}.self_attn.out_proj``                   ``….self_attention.linear_proj``
``encoder.layers.{i}.layer_norm2``                          ``pre_decoder.layers.{i}.pre_mlp_layernorm``
``encoder.layers.{i}.mlp.fc1`` / ``fc2``                    ``….mlp.linear_fc1`` = ``[fc1; up]`` with up weight 0,
                                                            bias 1 (``quick_gelu(fc1 x)·1``); ``linear_fc2`` = fc2
``post_layernorm``                                          dropped (it only normalises CLS)
=========================================================  ===================================================

Layer correspondence: pre-decoder layer ``i`` (0-based) *is* CLIP's ``encoder.layers[i]``, so the output of
the pre-decoder's first ``k`` layers is CLIP's ``hidden_states[k]`` (``hidden_states[0]`` being the
``pre_layrnorm`` output, ``pre_norm``'s here). With fewer pre-decoder layers than CLIP has, the first ones are
taken. A full ``CLIPModel`` checkpoint (``vision_model.`` prefix, plus a text tower) works too: only its
vision tower is read.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from torch import Tensor

from megatron.solo.haplo.pre_decoder import ACTIVATIONS, PreDecoderConfig

PRE = "pre_decoder."
_LAYER = re.compile(r"^encoder\.layers\.(\d+)\.(.+)$")
_PER_LAYER = {
    "layer_norm1.weight",
    "layer_norm1.bias",
    "layer_norm2.weight",
    "layer_norm2.bias",
    "mlp.fc1.weight",
    "mlp.fc1.bias",
    "mlp.fc2.weight",
    "mlp.fc2.bias",
    *(f"self_attn.{p}_proj.{t}" for p in ("q", "k", "v", "out") for t in ("weight", "bias")),
}
_STEM = {
    "embeddings.patch_embedding.weight",
    "embeddings.position_embedding.weight",
    "embeddings.class_embedding",
    "pre_layrnorm.weight",
    "pre_layrnorm.bias",
    "post_layernorm.weight",
    "post_layernorm.bias",
}
_HARMLESS = re.compile(r"^embeddings\.position_ids$")


class ClipConversionError(ValueError):
    """A CLIP state dict that does not fit the expected vision tower: missing or unknown keys, wrong shapes."""


def pre_decoder_config_from_clip(clip_config, *, num_layers: int | None = None, **changes) -> PreDecoderConfig:
    """The pre-decoder geometry of a ``CLIPVisionConfig`` (or a ``CLIPConfig``'s ``vision_config``).

    ``num_layers``: how many of CLIP's layers to take (default all). ``changes``: other settings, e.g.
    ``rope=False`` for CLIP's exact computation (the default keeps the released model's RoPE).
    """
    cfg = getattr(clip_config, "vision_config", clip_config)
    if cfg.hidden_act not in ACTIVATIONS:
        raise ClipConversionError(f"CLIP hidden_act {cfg.hidden_act!r} has no pre-decoder counterpart")
    layers = cfg.num_hidden_layers if num_layers is None else num_layers
    if not 0 < layers <= cfg.num_hidden_layers:
        raise ClipConversionError(f"num_layers: {layers} is outside 1..{cfg.num_hidden_layers} (CLIP's layers)")
    return PreDecoderConfig(
        num_layers=layers,
        hidden_size=cfg.hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        ffn_hidden_size=cfg.intermediate_size,
        activation=cfg.hidden_act,
        normalization="LayerNorm",
        norm_epsilon=cfg.layer_norm_eps,
        add_bias=True,
        gated=True,
        **changes,
    )


def _vision_tower(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The vision tower's entries without the ``vision_model.`` prefix of a full ``CLIPModel`` checkpoint."""
    if any(k.startswith("vision_model.") for k in state_dict):
        return {k[len("vision_model.") :]: v for k, v in state_dict.items() if k.startswith("vision_model.")}
    return dict(state_dict)


def _fuse_qkv(q: Tensor, k: Tensor, v: Tensor, heads: int) -> Tensor:
    """q, k, v [heads·d, ...] → [heads·3d, ...]: per head (= per KV group) its q rows, then k, then v."""
    rest = q.shape[1:]
    return torch.cat([t.reshape(heads, -1, *rest) for t in (q, k, v)], dim=1).reshape(-1, *rest)


def clip_to_haplo(
    state_dict: Mapping[str, Tensor], config: PreDecoderConfig, *, tile_positions: int
) -> dict[str, Tensor]:
    """HF CLIP vision weights → ``{patch_embed.weight, pos_embed, pre_norm.*, pre_decoder.layers.{i}.*}``.

    ``config`` must be CLIP's geometry (:func:`pre_decoder_config_from_clip`) with gated biased layers and
    LayerNorm; ``tile_positions`` is the per-tile position table's length (576 for 336/14), which must be
    CLIP's patch count. Every CLIP key is accounted for (an unknown or missing one is an error).
    """
    sd = _vision_tower(state_dict)
    if not (config.gated and config.add_bias and config.normalization == "LayerNorm"):
        raise ClipConversionError("the pre-decoder must be gated, biased and LayerNorm to hold CLIP's layers exactly")
    layers: dict[int, dict[str, Tensor]] = {}
    for key, value in sd.items():
        match = _LAYER.match(key)
        if match and match.group(2) in _PER_LAYER:
            layers.setdefault(int(match.group(1)), {})[match.group(2)] = value
        elif key not in _STEM and not _HARMLESS.match(key):
            raise ClipConversionError(f"unexpected CLIP key {key!r}")
    missing = sorted(k for k in _STEM if k not in sd)
    if missing:
        raise ClipConversionError(f"CLIP state dict lacks {missing}")
    if len(layers) < config.num_layers:
        raise ClipConversionError(f"CLIP has {len(layers)} layers, the pre-decoder needs {config.num_layers}")

    h = config.hidden_size
    patch = sd["embeddings.patch_embedding.weight"]
    positions = sd["embeddings.position_embedding.weight"]
    if patch.shape[0] != h or positions.shape != (tile_positions + 1, h):
        raise ClipConversionError(
            f"CLIP stem shapes {tuple(patch.shape)}, {tuple(positions.shape)} do not fit hidden {h} with "
            f"{tile_positions} positions per tile (+1 CLS)"
        )
    out = {
        "patch_embed.weight": patch.reshape(h, -1).clone(),  # [C, 3, P, P] → C×P×P rows, as our patches
        "pos_embed": positions[1:].clone(),
        "pre_norm.weight": sd["pre_layrnorm.weight"].clone(),
        "pre_norm.bias": sd["pre_layrnorm.bias"].clone(),
    }
    for i in range(config.num_layers):
        out.update(_layer(layers[i], i, config))
    return out


def _layer(w: dict[str, Tensor], i: int, config: PreDecoderConfig) -> dict[str, Tensor]:
    missing = sorted(_PER_LAYER - set(w))
    if missing:
        raise ClipConversionError(f"CLIP layer {i} lacks {missing}")
    h, f, heads = config.hidden_size, config.ffn_hidden_size, config.num_attention_heads
    if w["mlp.fc1.weight"].shape != (f, h) or w["self_attn.q_proj.weight"].shape != (h, h):
        raise ClipConversionError(
            f"CLIP layer {i}: fc1 {tuple(w['mlp.fc1.weight'].shape)}, "
            f"q_proj {tuple(w['self_attn.q_proj.weight'].shape)} do not fit hidden {h}, ffn {f}"
        )
    fc1_w, fc1_b = w["mlp.fc1.weight"], w["mlp.fc1.bias"]
    p = f"{PRE}layers.{i}."
    return {
        p + "input_layernorm.weight": w["layer_norm1.weight"].clone(),
        p + "input_layernorm.bias": w["layer_norm1.bias"].clone(),
        p + "self_attention.linear_qkv.weight": _fuse_qkv(
            w["self_attn.q_proj.weight"], w["self_attn.k_proj.weight"], w["self_attn.v_proj.weight"], heads
        ),
        p + "self_attention.linear_qkv.bias": _fuse_qkv(
            w["self_attn.q_proj.bias"], w["self_attn.k_proj.bias"], w["self_attn.v_proj.bias"], heads
        ),
        p + "self_attention.linear_proj.weight": w["self_attn.out_proj.weight"].clone(),
        p + "self_attention.linear_proj.bias": w["self_attn.out_proj.bias"].clone(),
        p + "pre_mlp_layernorm.weight": w["layer_norm2.weight"].clone(),
        p + "pre_mlp_layernorm.bias": w["layer_norm2.bias"].clone(),
        # gate = fc1; up = 0·x + 1, so act(gate)·up = quick_gelu(fc1 x) exactly
        p + "mlp.linear_fc1.weight": torch.cat([fc1_w, torch.zeros_like(fc1_w)]),
        p + "mlp.linear_fc1.bias": torch.cat([fc1_b, torch.ones_like(fc1_b)]),
        p + "mlp.linear_fc2.weight": w["mlp.fc2.weight"].clone(),
        p + "mlp.linear_fc2.bias": w["mlp.fc2.bias"].clone(),
    }


def pre_decoder_weights(converted: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The ``pre_decoder.`` entries of :func:`clip_to_haplo`'s output, named as the block's own state dict."""
    return {k[len(PRE) :]: v for k, v in converted.items() if k.startswith(PRE)}


def load_pre_decoder(block: torch.nn.Module, weights: Mapping[str, Tensor]) -> None:
    """Copy ``weights`` (block-local names) into a pre-decoder ``TransformerBlock``; every parameter must be
    given (megatron-core's ``_extra_state`` entries aside) and nothing else."""
    own = {k for k in block.state_dict() if not k.endswith("_extra_state")}
    missing, unknown = sorted(own - set(weights)), sorted(set(weights) - own)
    if missing or unknown:
        raise ClipConversionError(f"pre-decoder weights: missing {missing[:4]}…, unknown {unknown[:4]}…")
    result = block.load_state_dict(dict(weights), strict=False)
    if result.unexpected_keys or [k for k in result.missing_keys if not k.endswith("_extra_state")]:
        raise ClipConversionError(f"pre-decoder load: {result}")
