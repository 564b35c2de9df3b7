"""HaploVL's pre-decoder: N transformer layers at their own width, a megatron-core ``TransformerBlock``.

Default geometry is CLIP-ViT-L/14's (24 layers × 1024, 16 heads, ffn 4096, LayerNorm eps 1e-5) with the
released ``HaploDecoderLayer``'s form (spec §2.2, §2.6): biased q/k/v/o, a *gated* MLP with biases on all
three projections (CLIP's ungated ``fc2(quick_gelu(fc1 x))`` maps onto it exactly with gate = fc1, up weight
0 / bias 1, down = fc2; see ``haplo/clip.py``) and RoPE in every layer. There is no norm after the last
layer (the released model applies ``pre_connector`` straight to its output), so the block is built with
``post_layer_norm=False``.

State-dict names (local spec) are ``layers.{i}.input_layernorm.{weight,bias}``,
``layers.{i}.self_attention.linear_qkv.{weight,bias}`` (megatron-core's per-KV-group ``[q_g…, k_g, v_g]``
rows), ``.linear_proj.{weight,bias}``, ``layers.{i}.pre_mlp_layernorm.{weight,bias}``,
``layers.{i}.mlp.linear_fc1.{weight,bias}`` (``[gate; up]`` stacked) and ``.linear_fc2.{weight,bias}``.
The Transformer Engine spec folds the norms into ``linear_qkv``/``linear_fc1`` (``layer_norm_weight``…);
megatron-core maps its keys onto the local names in ``sharded_state_dict`` as for the LLM.

In stage 2 the pre-decoder lives on one pipeline stage (the first, where the embeddings are): its
``TransformerConfig`` says ``pipeline_model_parallel_size=1``, so megatron-core builds all its layers there
and numbers them from 0, whatever the LLM's pipeline layout. In stage 1 (distillation, where the pre-decoder
is the whole network that runs) it is split over the pipeline stages instead (``pipeline_parallel=`` of
:func:`make_pre_decoder_transformer_config`): megatron-core builds each stage's share of the layers and
numbers them globally in checkpoints, so either layout loads the other's.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from megatron.core.fusions.fused_bias_geglu import quick_gelu
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_layer_local_spec,
    get_gpt_layer_with_transformer_engine_spec,
)
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (
    TransformerBlock,
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)

from megatron.solo.model.specs import RMSNorm, backend_of

Activation = Literal["quick_gelu", "gelu", "silu"]
Normalization = Literal["LayerNorm", "RMSNorm"]
# megatron-core compares the activation by identity (its fused paths), so these are its own functions.
ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": F.gelu, "silu": F.silu}
# Fused bias+activation kernels megatron-core has (MLP.forward): gelu either way, silu only gated.
_FUSABLE = {("gelu", True), ("gelu", False), ("silu", True)}


def _require(condition: bool, field: str, message: str) -> None:
    if not condition:
        raise ValueError(f"PreDecoderConfig.{field}: {message}")


@dataclass(frozen=True, kw_only=True)
class PreDecoderConfig:
    """The pre-decoder's architecture (what a checkpoint needs to rebuild it).

    Defaults: CLIP-ViT-L/14 geometry in the released layer form. ``rope`` defaults to on because the released
    ``HaploDecoderLayer`` applies RoPE to q and k in every layer, pre-decoder included (spec §2.2; its
    ``pre_config`` must set ``attention_rope=True`` with its own head_dim, so ``rotary_base`` is that
    config's, whose class default is 10000). CLIP itself has no RoPE: ``rope=False`` reproduces CLIP
    exactly (``haplo/clip.py``'s test).
    """

    num_layers: int = 24
    hidden_size: int = 1024
    num_attention_heads: int = 16
    num_query_groups: int | None = None
    kv_channels: int | None = None
    ffn_hidden_size: int = 4096
    activation: Activation = "quick_gelu"
    normalization: Normalization = "LayerNorm"
    norm_epsilon: float = 1e-5
    add_bias: bool = True
    gated: bool = True
    rope: bool = True
    rotary_base: float = 10000.0
    init_method_std: float = 0.02

    def __post_init__(self) -> None:
        for name in ("num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size"):
            value = getattr(self, name)
            _require(isinstance(value, int) and value > 0, name, f"must be a positive int, got {value!r}")
        groups = self.num_query_groups
        if groups is not None:
            _require(
                isinstance(groups, int) and groups > 0, "num_query_groups", f"must be a positive int, got {groups!r}"
            )
            _require(
                self.num_attention_heads % groups == 0,
                "num_query_groups",
                f"{groups} does not divide num_attention_heads={self.num_attention_heads}",
            )
        if self.kv_channels is None:
            _require(
                self.hidden_size % self.num_attention_heads == 0,
                "hidden_size",
                f"{self.hidden_size} is not a multiple of num_attention_heads={self.num_attention_heads}"
                " (or set kv_channels)",
            )
        else:
            _require(
                isinstance(self.kv_channels, int) and self.kv_channels > 0,
                "kv_channels",
                f"must be a positive int or None, got {self.kv_channels!r}",
            )
        _require(
            self.activation in ACTIVATIONS,
            "activation",
            f"unknown {self.activation!r}; choose from {sorted(ACTIVATIONS)}",
        )
        _require(
            self.normalization in ("LayerNorm", "RMSNorm"),
            "normalization",
            f"unknown {self.normalization!r}; choose LayerNorm or RMSNorm",
        )
        _require(self.norm_epsilon > 0, "norm_epsilon", f"must be positive, got {self.norm_epsilon}")
        _require(self.rotary_base > 0, "rotary_base", f"must be positive, got {self.rotary_base}")
        _require(self.init_method_std > 0, "init_method_std", f"must be positive, got {self.init_method_std}")
        if self.rope:
            _require(self.head_dim % 2 == 0, "kv_channels", f"RoPE needs an even head dim, got {self.head_dim}")

    @property
    def query_groups(self) -> int:
        return self.num_query_groups or self.num_attention_heads

    @property
    def head_dim(self) -> int:
        return self.kv_channels or self.hidden_size // self.num_attention_heads

    def validate_parallel(self, *, tensor_parallel: int = 1, pipeline_parallel: int = 1) -> None:
        """Raise ``ValueError`` naming the field when ``tensor_parallel`` (or ``pipeline_parallel``, stage 1's
        split of the layers) cannot split this pre-decoder."""
        _require(
            self.num_layers % pipeline_parallel == 0,
            "num_layers",
            f"{self.num_layers} is not divisible by pipeline_model_parallel_size={pipeline_parallel} (stage 1 "
            "splits the pre-decoder's layers evenly over the pipeline stages)",
        )
        for name, value in (
            ("num_attention_heads", self.num_attention_heads),
            ("num_query_groups", self.query_groups),
            ("ffn_hidden_size", self.ffn_hidden_size),
        ):
            _require(
                value % tensor_parallel == 0,
                name,
                f"{value} is not divisible by tensor_model_parallel_size={tensor_parallel}",
            )

    def num_parameters(self) -> int:
        """Parameters of the block (no stem, no connector)."""
        h, d, f = self.hidden_size, self.head_dim, self.ffn_hidden_size
        qkv_rows = d * (self.num_attention_heads + 2 * self.query_groups)
        fc1_rows = 2 * f if self.gated else f
        weights = h * qkv_rows + self.num_attention_heads * d * h + h * fc1_rows + f * h
        biases = (qkv_rows + h + fc1_rows + h) if self.add_bias else 0
        norms = 2 * (2 * h if self.normalization == "LayerNorm" else h)
        return self.num_layers * (weights + biases + norms)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PreDecoderConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown pre-decoder config field(s): {', '.join(unknown)}")
        return cls(**data)

    def replace(self, **changes: Any) -> PreDecoderConfig:
        return dataclasses.replace(self, **changes)


# Settings the pre-decoder takes from the LLM's TransformerConfig: one dtype, one parallel layout, one
# backend and the same fusions/recompute policy for the whole model.
_INHERITED = (
    "tensor_model_parallel_size",
    "context_parallel_size",
    "sequence_parallel",
    "params_dtype",
    "pipeline_dtype",
    "bf16",
    "fp16",
    "use_cpu_initialization",
    "perform_initialization",
    "transformer_impl",
    "bias_dropout_fusion",
    "masked_softmax_fusion",
    "apply_rope_fusion",
    "gradient_accumulation_fusion",
    "persist_layer_norm",
    "recompute_granularity",
    "recompute_method",
    "recompute_num_layers",
    "calculate_per_token_loss",
)


def make_pre_decoder_transformer_config(
    cfg: PreDecoderConfig, llm: TransformerConfig, *, pipeline_parallel: int = 1
) -> TransformerConfig:
    """The pre-decoder's ``TransformerConfig``: its own geometry, everything else as ``llm``'s.

    ``llm`` is the LLM's config (``megatron.solo.model.build.make_transformer_config``): tensor/sequence
    parallelism, dtypes, device placement, backend (``transformer_impl``), fusions and recompute are copied.
    ``pipeline_parallel``: 1 (stage 2) builds the block whole on the stage that owns it; more (stage 1) splits
    its layers evenly over that many pipeline stages.
    """
    cfg.validate_parallel(tensor_parallel=llm.tensor_model_parallel_size, pipeline_parallel=pipeline_parallel)
    inherited = {name: getattr(llm, name) for name in _INHERITED}
    if inherited["recompute_method"] == "block" and (inherited["recompute_num_layers"] or 0) > cfg.num_layers:
        inherited["recompute_num_layers"] = cfg.num_layers
    fusable = (cfg.activation, cfg.gated) in _FUSABLE and cfg.add_bias
    return TransformerConfig(
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        ffn_hidden_size=cfg.ffn_hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        num_query_groups=cfg.query_groups,
        kv_channels=cfg.head_dim,
        layernorm_epsilon=cfg.norm_epsilon,
        normalization=cfg.normalization,
        gated_linear_unit=cfg.gated,
        activation_func=ACTIVATIONS[cfg.activation],
        add_bias_linear=cfg.add_bias,
        add_qkv_bias=cfg.add_bias,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=cfg.init_method_std,
        pipeline_model_parallel_size=pipeline_parallel,
        # megatron-core has no fused bias+quick_gelu GLU kernel for the plain MLP (it raises).
        bias_activation_fusion=llm.bias_activation_fusion and fusable,
        **inherited,
    )


class LayerNorm(torch.nn.LayerNorm):
    """torch LayerNorm (weight and bias) that also runs under sequence parallelism.

    As ``megatron.solo.model.specs.RMSNorm``: megatron-core's ``WrappedTorchNorm`` refuses
    ``sequence_parallel``; the norm is pointwise over the sequence, so only its parameters' gradients need the
    TP all-reduce that ``finalize_model_grads`` does for parameters marked ``.sequence_parallel``.
    """

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **_):
        device = None if config.use_cpu_initialization else torch.cuda.current_device()  # as megatron-core's layers
        super().__init__(hidden_size, eps=eps, dtype=config.params_dtype, device=device)
        self.weight.sequence_parallel = config.sequence_parallel
        self.bias.sequence_parallel = config.sequence_parallel


def _local_norm(normalization: Normalization) -> type[torch.nn.Module]:
    return LayerNorm if normalization == "LayerNorm" else RMSNorm


def pre_decoder_layer_spec(
    config: TransformerConfig, attn_mask_type: AttnMaskType = AttnMaskType.arbitrary
) -> ModuleSpec:
    """One pre-decoder layer on the backend ``config`` was made for.

    ``attn_mask_type`` defaults to ``arbitrary``: HaploVL's mask (bidirectional inside each image) is never
    plain causal; the local backend follows whatever mask the block is given either way.
    """
    if backend_of(config) == "te":
        # TE's LayerNorm-fused linears read config.normalization and the bias flags themselves.
        layer = get_gpt_layer_with_transformer_engine_spec()
    else:
        layer = get_gpt_layer_local_spec(normalization=config.normalization)
        norm = _local_norm(config.normalization)
        layer.submodules.input_layernorm = norm
        layer.submodules.pre_mlp_layernorm = norm
    layer.submodules.self_attention.params = {
        **layer.submodules.self_attention.params,
        "attn_mask_type": attn_mask_type,
    }
    return layer


def pre_decoder_block_spec(
    config: TransformerConfig, attn_mask_type: AttnMaskType = AttnMaskType.arbitrary
) -> TransformerBlockSubmodules:
    """This pipeline stage's share of the layers (all ``config.num_layers`` unless ``config`` splits them);
    no final norm."""
    layer = pre_decoder_layer_spec(config, attn_mask_type)
    num_layers = config.num_layers if config.pipeline_model_parallel_size == 1 else get_num_layers_to_build(config)
    return TransformerBlockSubmodules(layer_specs=[layer] * num_layers, layer_norm=None)


def build_pre_decoder(
    config: TransformerConfig, attn_mask_type: AttnMaskType = AttnMaskType.arbitrary, *, pre_process: bool = True
) -> TransformerBlock:
    """The pre-decoder block (this stage's share of it) from :func:`make_pre_decoder_transformer_config`'s
    ``config``.

    Call it as megatron-core's ``TransformerBlock``: ``block(hidden_states [s, b, h], attention_mask
    [b, 1, s, s] bool (True = masked out), rotary_pos_emb=[s, b, 1, d] or None)`` → ``[s, b, h]`` (``[s/tp, b,
    h]`` in and out under sequence parallelism). ``pre_process=False`` (a later stage of a split block): the
    input is what ``block.set_input_tensor`` was given, not ``hidden_states``.
    """
    return TransformerBlock(
        config,
        pre_decoder_block_spec(config, attn_mask_type),
        post_layer_norm=False,
        pre_process=pre_process,
        post_process=True,
    )


def build_pre_decoder_rotary(cfg: PreDecoderConfig, config: TransformerConfig) -> RotaryEmbedding | None:
    """The pre-decoder's own rotary table (its head dim and base; HF ``rotate_half`` form), or None without RoPE.

    ``rotary(n)`` → ``[n, 1, 1, head_dim]`` for positions 0..n-1; index it by position ids as
    ``megatron.solo.model.mcore_seam.rotary_at_positions`` does.
    """
    if not cfg.rope:
        return None
    return RotaryEmbedding(
        kv_channels=cfg.head_dim,
        rotary_percent=1.0,
        rotary_base=cfg.rotary_base,
        use_cpu_initialization=config.use_cpu_initialization,
    )
