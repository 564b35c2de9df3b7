"""HF Mistral / SOLO ↔ megatron-core ``GPTModel`` weights: one declarative name table, pure functions.

Both directions work on state dicts of *full* tensors (TP=1, unsharded); sharding for TP/PP is the
Megatron checkpoint writer's job. Every name is listed in :data:`TABLE` (``{i}`` = layer index); there is
no substring renaming, so an unknown or missing key is always an error (:class:`ConversionError`),
except known harmless HF buffers (rotary ``inv_freq``) and megatron's ``_extra_state`` entries.

Layouts (megatron-core, local layer spec; the mapping is 1:1 and was checked bit-exact against HF):

* ``linear_qkv.weight`` ``[(nq + 2·nkv)·d, H]``: for each of the nkv KV groups g, its nq/nkv query heads
  (d rows each), then k_g, then v_g. HF's q/k rows need **no** RoPE permutation: HF Mistral and
  megatron-core both apply non-interleaved (``rotate_half``) RoPE to the checkpoint's rows as they are
  (proved by ``tests/convert/test_mcore_parity.py``, not just argued).
* ``linear_fc1.weight`` ``[2F, H]`` = ``cat[gate_proj, up_proj]`` (megatron's SwiGLU chunks it in that order).
* ``patch_embedding.weight`` ``[H, 3072]`` ↔ HF ``model.embed_vision_patch.weight`` (SOLO-7B's name).

Vocabulary policy (``hf_to_megatron``), for the input embedding and the untied output layer alike:

* rows present in the HF checkpoint are copied;
* *new real-token rows* — ``[rows in the checkpoint, arch.vocab_size)``, e.g. SOLO's 1029 specials
  32000…33028 when starting from plain Mistral-7B — are the **mean of the existing rows**. The mean keeps
  a new token's initial logit at the average (it neither dominates the softmax nor starts at zero),
  following Hewitt, "Initializing New Word Embeddings for Pretrained Language Models" (2021);
* pure padding rows ``[arch.vocab_size, padded_vocab_size)`` are zero.

``megatron_to_hf`` drops every row from ``vocab_size`` on (the padding). A checkpoint with *more* rows than
``arch.vocab_size`` is refused instead of being truncated silently (the reference's 33031 → 33029 bug).

Patch projection policy (``hf_to_megatron``): copied from ``model.embed_vision_patch.weight`` when the HF
checkpoint has it (SOLO-7B, or one of our exports); otherwise drawn from N(0, std²) with
``std = rms(existing token embeddings) / sqrt(patch_dim)``, so that a patch of unit-variance inputs
(SOLO's ImageNet-normalised pixels) projects to a vector with the same RMS as a token embedding. The
reference's std 0.02 gives patch vectors ~100× larger than Mistral's token embeddings. The draw uses
``generator`` (default: seeded with :data:`PATCH_INIT_SEED`), so conversions are reproducible.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from megatron.solo.config import ModelConfig

PATCH_INIT_SEED = 0
HF_PATCH = "model.embed_vision_patch.weight"
MEGATRON_PATCH = "patch_embedding.weight"
# Non-persistent RoPE buffers that some HF versions wrote into checkpoints; recomputed from the config.
_HARMLESS_HF = re.compile(r"(^|\.)rotary_emb\.(inv_freq|original_inv_freq)$")
_HARMLESS_MEGATRON = re.compile(r"(^|\.)_extra_state$")


class ConversionError(ValueError):
    """A state dict that does not fit the table: a missing/unexpected key or a wrong shape."""


def model_config_from_hf(cfg, *, vocab_size: int | None = None) -> ModelConfig:
    """The architecture of a ``MistralConfig`` (plain Mistral or SOLO-7B's) or a ``SoloConfig``.

    ``vocab_size`` overrides the config's, e.g. 33029 when converting plain Mistral (32000) for SOLO.
    """
    if getattr(cfg, "tie_word_embeddings", False):
        raise ConversionError("tied input/output embeddings are not supported: SOLO's Megatron model is untied")
    if getattr(cfg, "hidden_act", "silu") != "silu":
        raise ConversionError(f"hidden_act must be 'silu' (SwiGLU), got {cfg.hidden_act!r}")
    heads = cfg.num_attention_heads
    rope = getattr(cfg, "rope_parameters", None) or {}
    rope_theta = rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))
    if rope.get("rope_type", "default") != "default":
        raise ConversionError(f"rope_type must be 'default', got {rope.get('rope_type')!r}")
    return ModelConfig(
        num_layers=cfg.num_hidden_layers,
        hidden_size=cfg.hidden_size,
        ffn_hidden_size=cfg.intermediate_size,
        num_attention_heads=heads,
        num_query_groups=getattr(cfg, "num_key_value_heads", None) or heads,
        kv_channels=getattr(cfg, "head_dim", None) or cfg.hidden_size // heads,
        vocab_size=vocab_size if vocab_size is not None else cfg.vocab_size,
        max_sequence_length=cfg.max_position_embeddings,
        rotary_base=float(rope_theta),
        norm_epsilon=cfg.rms_norm_eps,
        sliding_window=getattr(cfg, "sliding_window", None),
        patch_size=getattr(cfg, "vision_patch_size", 32),
    )


def _dims(arch: ModelConfig, **extra: int) -> dict[str, int]:
    """Values of the symbolic dimensions used in :data:`TABLE`."""
    q, kv = arch.num_attention_heads * arch.head_dim, arch.num_query_groups * arch.head_dim
    return dict(
        H=arch.hidden_size,
        F=arch.ffn_hidden_size,
        F2=2 * arch.ffn_hidden_size,
        Q=q,
        KV=kv,
        QKV=q + 2 * kv,
        P=arch.patch_dim,
        **extra,
    )


# --- transforms: (HF tensors → one Megatron tensor, Megatron tensor → HF tensors) ------------------


def _copy(tensors: Sequence[Tensor], arch: ModelConfig) -> Tensor:
    return tensors[0]


def _uncopy(tensor: Tensor, arch: ModelConfig) -> tuple[Tensor, ...]:
    return (tensor,)


def _fuse_qkv(tensors: Sequence[Tensor], arch: ModelConfig) -> Tensor:
    """q [nq·d, H], k [nkv·d, H], v [nkv·d, H] → [(nq+2nkv)·d, H], grouped per KV head: [q_g…, k_g, v_g]."""
    q, k, v = tensors
    g, d, h = arch.num_query_groups, arch.head_dim, arch.hidden_size
    return torch.cat([q.reshape(g, -1, h), k.reshape(g, d, h), v.reshape(g, d, h)], dim=1).reshape(-1, h)


def _split_qkv(tensor: Tensor, arch: ModelConfig) -> tuple[Tensor, ...]:
    g, d, h = arch.num_query_groups, arch.head_dim, arch.hidden_size
    per_group = tensor.reshape(g, -1, h)
    q, k, v = per_group.split([per_group.shape[1] - 2 * d, d, d], dim=1)
    return q.reshape(-1, h), k.reshape(-1, h), v.reshape(-1, h)


def _fuse_gate_up(tensors: Sequence[Tensor], arch: ModelConfig) -> Tensor:
    return torch.cat(list(tensors), dim=0)


def _split_gate_up(tensor: Tensor, arch: ModelConfig) -> tuple[Tensor, ...]:
    return tuple(tensor.chunk(2, dim=0))


@dataclass(frozen=True)
class Transform:
    to_megatron: Callable[[Sequence[Tensor], ModelConfig], Tensor]
    to_hf: Callable[[Tensor, ModelConfig], tuple[Tensor, ...]]


COPY = Transform(_copy, _uncopy)
QKV = Transform(_fuse_qkv, _split_qkv)
GATE_UP = Transform(_fuse_gate_up, _split_gate_up)


_SYMBOLS = {"H", "F", "F2", "Q", "KV", "QKV", "P", "V"}  # _dims() plus V, the vocabulary rows


@dataclass(frozen=True)
class Rule:
    """One Megatron tensor and the HF tensors it is made of. Shapes use the symbols of :func:`_dims`;
    ``V`` is the vocabulary rows on either side (HF: the checkpoint's; Megatron: padded)."""

    megatron: str
    megatron_shape: tuple[str, ...]
    hf: tuple[str, ...]
    hf_shapes: tuple[tuple[str, ...], ...]
    transform: Transform = COPY
    optional_in_hf: bool = False
    """Initialised when the HF checkpoint lacks it (the patch projection of a plain Mistral)."""

    def __post_init__(self):
        if len(self.hf) != len(self.hf_shapes):
            raise ValueError(f"Rule.hf_shapes: {len(self.hf_shapes)} shapes for {len(self.hf)} names ({self.megatron})")
        unknown = {s for shape in (self.megatron_shape, *self.hf_shapes) for s in shape} - _SYMBOLS
        if unknown:
            raise ValueError(f"Rule.megatron_shape/hf_shapes: unknown symbols {sorted(unknown)} ({self.megatron})")
        if any(("{i}" in name) != self.per_layer for name in self.hf):
            raise ValueError(f"Rule.hf: every name must be per layer ({{i}}) exactly when {self.megatron!r} is")

    @property
    def is_vocab(self) -> bool:
        return "V" in self.megatron_shape

    @property
    def per_layer(self) -> bool:
        return "{i}" in self.megatron


_L = "model.layers.{i}."
TABLE: tuple[Rule, ...] = (
    Rule("embedding.word_embeddings.weight", ("V", "H"), ("model.embed_tokens.weight",), (("V", "H"),)),
    Rule("decoder.layers.{i}.input_layernorm.weight", ("H",), (_L + "input_layernorm.weight",), (("H",),)),
    Rule(
        "decoder.layers.{i}.self_attention.linear_qkv.weight",
        ("QKV", "H"),
        (_L + "self_attn.q_proj.weight", _L + "self_attn.k_proj.weight", _L + "self_attn.v_proj.weight"),
        (("Q", "H"), ("KV", "H"), ("KV", "H")),
        QKV,
    ),
    Rule(
        "decoder.layers.{i}.self_attention.linear_proj.weight",
        ("H", "Q"),
        (_L + "self_attn.o_proj.weight",),
        (("H", "Q"),),
    ),
    Rule(
        "decoder.layers.{i}.pre_mlp_layernorm.weight",
        ("H",),
        (_L + "post_attention_layernorm.weight",),
        (("H",),),
    ),
    Rule(
        "decoder.layers.{i}.mlp.linear_fc1.weight",
        ("F2", "H"),
        (_L + "mlp.gate_proj.weight", _L + "mlp.up_proj.weight"),
        (("F", "H"), ("F", "H")),
        GATE_UP,
    ),
    Rule("decoder.layers.{i}.mlp.linear_fc2.weight", ("H", "F"), (_L + "mlp.down_proj.weight",), (("H", "F"),)),
    Rule("decoder.final_layernorm.weight", ("H",), ("model.norm.weight",), (("H",),)),
    Rule("output_layer.weight", ("V", "H"), ("lm_head.weight",), (("V", "H"),)),
    Rule(MEGATRON_PATCH, ("H", "P"), (HF_PATCH,), (("H", "P"),), optional_in_hf=True),
)


def expand(arch: ModelConfig) -> Iterator[tuple[Rule, str, tuple[str, ...]]]:
    """Every (rule, Megatron name, HF names) with the layer index filled in."""
    for rule in TABLE:
        for i in range(arch.num_layers) if rule.per_layer else [None]:
            yield rule, _fill(rule.megatron, i), tuple(_fill(name, i) for name in rule.hf)


def _fill(pattern: str, layer: int | None) -> str:
    return pattern if layer is None else pattern.format(i=layer)


def hf_shapes(arch: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Expected HF names → shapes, with ``arch.vocab_size`` vocabulary rows (what an export holds)."""
    dims = _dims(arch, V=arch.vocab_size)
    return {
        name: _resolve(shape, dims) for rule, _, names in expand(arch) for name, shape in zip(names, rule.hf_shapes)
    }


def megatron_shapes(arch: ModelConfig, padded_vocab_size: int) -> dict[str, tuple[int, ...]]:
    """Expected Megatron names → full (unsharded) shapes."""
    dims = _dims(arch, V=padded_vocab_size)
    return {m_name: _resolve(rule.megatron_shape, dims) for rule, m_name, _ in expand(arch)}


# --- the converters ------------------------------------------------------------------------------


def hf_to_megatron(
    hf_sd: Mapping[str, Tensor], arch: ModelConfig, *, padded_vocab_size: int, generator: torch.Generator | None = None
) -> dict[str, Tensor]:
    """HF Mistral/SOLO state dict → megatron-core ``GPTModel`` state dict (plus ``patch_embedding.weight``).

    Vocabulary rows grow to ``padded_vocab_size`` and the patch projection is loaded or initialised as the
    module docstring says; ``generator`` seeds only that initialisation. Tensors that need no transform are
    returned as they are (shared with ``hf_sd``, not copied: a 7B model is never held twice).
    """
    _check_keys(hf_sd, {n for _, _, names in expand(arch) for n in names}, _HARMLESS_HF, "HF", optional={HF_PATCH})
    hf_rows = _vocab_rows(hf_sd, arch, padded_vocab_size)
    hf_dims, m_dims = _dims(arch, V=hf_rows), _dims(arch, V=padded_vocab_size)
    out: dict[str, Tensor] = {}
    for rule, m_name, hf_names in expand(arch):
        if rule.optional_in_hf and hf_names[0] not in hf_sd:
            out[m_name] = _init_patch_projection(hf_sd["model.embed_tokens.weight"], arch, generator)
            continue
        tensors = [_checked(hf_sd[n], n, shape, hf_dims, "HF") for n, shape in zip(hf_names, rule.hf_shapes)]
        tensor = rule.transform.to_megatron(tensors, arch)
        if rule.is_vocab:
            tensor = _extend_vocab_rows(tensor, arch.vocab_size, padded_vocab_size)
        out[m_name] = _checked(tensor, m_name, rule.megatron_shape, m_dims, "Megatron")
    return out


def megatron_to_hf(m_sd: Mapping[str, Tensor], arch: ModelConfig, *, vocab_size: int) -> dict[str, Tensor]:
    """megatron-core ``GPTModel`` state dict (full tensors) → HF SOLO state dict with ``vocab_size`` rows.

    Outputs may be views of ``m_sd``'s tensors (q/k/v of the fused QKV, the first rows of the vocabulary).
    """
    _check_keys(m_sd, {m for _, m, _ in expand(arch)}, _HARMLESS_MEGATRON, "Megatron")
    padded = m_sd["embedding.word_embeddings.weight"].shape[0]
    if not 1 <= vocab_size <= padded:
        raise ConversionError(f"vocab_size {vocab_size} must be in 1..{padded} (the Megatron embedding's rows)")
    m_dims, hf_dims = _dims(arch, V=padded), _dims(arch, V=vocab_size)
    out: dict[str, Tensor] = {}
    for rule, m_name, hf_names in expand(arch):
        tensor = _checked(m_sd[m_name], m_name, rule.megatron_shape, m_dims, "Megatron")
        if rule.is_vocab:
            tensor = tensor[:vocab_size]
        for name, shape, t in zip(hf_names, rule.hf_shapes, rule.transform.to_hf(tensor, arch)):
            out[name] = _checked(t, name, shape, hf_dims, "HF")
    return out


# --- helpers -------------------------------------------------------------------------------------


def _resolve(shape: tuple[str, ...], dims: Mapping[str, int]) -> tuple[int, ...]:
    return tuple(dims[s] for s in shape)


def _checked(tensor: Tensor, name: str, shape: tuple[str, ...], dims: Mapping[str, int], side: str) -> Tensor:
    """``tensor`` itself, once its shape is the symbolic ``shape`` under ``dims``."""
    want = _resolve(shape, dims)
    if tuple(tensor.shape) != want:
        symbolic = "[" + ", ".join(f"{s}={dims[s]}" for s in shape) + "]"
        raise ConversionError(f"{side} tensor {name!r} has shape {list(tensor.shape)}, expected {symbolic}")
    return tensor


def _check_keys(
    sd: Mapping[str, Tensor],
    expected: set[str],
    harmless: re.Pattern,
    side: str,
    optional: frozenset[str] | set[str] = frozenset(),
) -> None:
    missing = sorted(expected - set(sd) - set(optional))
    unexpected = sorted(k for k in set(sd) - expected if not harmless.search(k))
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} key(s): {_few(missing)}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} key(s): {_few(unexpected)}")
    if problems:
        raise ConversionError(f"{side} state dict does not match the architecture: " + "; ".join(problems))


def _few(names: list[str], limit: int = 5) -> str:
    return ", ".join(names[:limit]) + (f", … ({len(names) - limit} more)" if len(names) > limit else "")


def _vocab_rows(hf_sd: Mapping[str, Tensor], arch: ModelConfig, padded_vocab_size: int) -> int:
    """Rows of the HF embeddings, checked against ``arch.vocab_size`` ≤ ``padded_vocab_size``."""
    rows = hf_sd["model.embed_tokens.weight"].shape[0]
    head_rows = hf_sd["lm_head.weight"].shape[0]
    if head_rows != rows:
        raise ConversionError(f"HF 'lm_head.weight' has {head_rows} rows but 'model.embed_tokens.weight' has {rows}")
    if rows > arch.vocab_size:
        raise ConversionError(
            f"HF 'model.embed_tokens.weight' has {rows} rows, more than the vocabulary ({arch.vocab_size}): "
            "refusing to drop rows; convert with the tokenizer that has them (--tokenizer-model)"
        )
    if padded_vocab_size < arch.vocab_size:
        raise ConversionError(f"padded_vocab_size {padded_vocab_size} is smaller than vocab_size {arch.vocab_size}")
    return rows


def _extend_vocab_rows(weight: Tensor, vocab_size: int, padded_vocab_size: int) -> Tensor:
    """[rows, H] → [padded, H]: copied rows, then new real tokens at the mean (Hewitt 2021), then zeros."""
    rows = weight.shape[0]
    if rows == padded_vocab_size:
        return weight
    out = weight.new_zeros(padded_vocab_size, weight.shape[1])
    out[:rows] = weight
    # float64 mean: the result does not depend on the reduction order (threads) of the machine.
    out[rows:vocab_size] = weight.double().mean(dim=0).to(weight.dtype)
    return out


def _init_patch_projection(embed_tokens: Tensor, arch: ModelConfig, generator: torch.Generator | None) -> Tensor:
    """[H, P] ~ N(0, std²), std = rms(embed_tokens)/sqrt(P): unit-variance patches land at token-embedding scale."""
    if generator is None:
        generator = torch.Generator().manual_seed(PATCH_INIT_SEED)
    std = embed_tokens.double().pow(2).mean().sqrt().item() / math.sqrt(arch.patch_dim)
    weight = torch.randn(arch.hidden_size, arch.patch_dim, generator=generator, dtype=torch.float32) * std
    return weight.to(embed_tokens.dtype)


__all__ = [
    "ConversionError",
    "HF_PATCH",
    "MEGATRON_PATCH",
    "PATCH_INIT_SEED",
    "Rule",
    "TABLE",
    "Transform",
    "expand",
    "hf_shapes",
    "hf_to_megatron",
    "megatron_shapes",
    "model_config_from_hf",
    "megatron_to_hf",
]
