"""From a ``ModelConfig`` and a parallel layout to megatron-core's ``TransformerConfig`` and a ``SoloModel``.

The caller (the trainer's setup, a tool, a test) owns the process groups and says which pipeline stage
this is; nothing here reads ranks or the environment.
"""

from __future__ import annotations

import functools
from typing import Literal

import torch
import torch.nn.functional as F
from megatron.core.transformer import TransformerConfig

from megatron.solo.config import ModelConfig
from megatron.solo.model.mcore_seam import check_internals
from megatron.solo.model.solo_model import SoloModel
from megatron.solo.model.specs import (
    Backend,
    backend_of,
    decoder_block_spec,
    grad_accumulation_fusion_available,
    resolve_backend,
)

Recompute = Literal["full", "selective"]


def make_transformer_config(
    cfg: ModelConfig,
    *,
    tensor_parallel: int = 1,
    pipeline_parallel: int = 1,
    sequence_parallel: bool = False,
    params_dtype: torch.dtype = torch.float32,
    backend: Backend | Literal["auto"] = "auto",
    recompute_granularity: Recompute | None = None,
    recompute_method: Literal["uniform", "block"] | None = None,
    recompute_num_layers: int | None = None,
    perform_initialization: bool = True,
    calculate_per_token_loss: bool = True,
    cpu_initialization: bool | None = None,
    gradient_accumulation_fusion: bool = False,
) -> TransformerConfig:
    """Mistral's decoder (RMSNorm, SwiGLU, GQA, no dropout; biases as ``cfg.linear_biases``, Mistral none) for
    one parallel layout and backend.

    The backend is decided here, once, and recorded as ``transformer_impl``: ``build_model`` reads it from
    the config. It decides the fusions and whether the sliding window goes to Transformer Engine or into
    the local mask. ``cpu_initialization`` (default: no CUDA) creates the weights without a device, i.e.
    on the CPU or under a ``torch.device`` context (conversion builds on ``meta``); otherwise on the current
    GPU. ``gradient_accumulation_fusion`` is for DDP-wrapped training only (it accumulates into ``main_grad``)
    and is dropped where the backend or the installed kernels cannot do it.
    """
    backend = resolve_backend(backend, params_dtype)
    te = backend == "te"
    cfg.validate_parallel(
        tensor_parallel=tensor_parallel, pipeline_parallel=pipeline_parallel, sequence_parallel=sequence_parallel
    )
    if params_dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"params_dtype: unsupported {params_dtype}")
    window = None
    if te and cfg.sliding_window is not None:
        window = (cfg.sliding_window - 1, 0)  # TE counts keys to the left of the query, not the query
    if cpu_initialization is None:
        cpu_initialization = not torch.cuda.is_available()
    return TransformerConfig(
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        ffn_hidden_size=cfg.ffn_hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        num_query_groups=cfg.num_query_groups,
        kv_channels=cfg.head_dim,
        layernorm_epsilon=cfg.norm_epsilon,
        normalization="RMSNorm",
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=cfg.linear_biases[1],
        add_qkv_bias=cfg.linear_biases[0],
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=cfg.init_method_std,
        window_size=window,
        transformer_impl="transformer_engine" if te else "local",
        tensor_model_parallel_size=tensor_parallel,
        pipeline_model_parallel_size=pipeline_parallel,
        sequence_parallel=sequence_parallel,
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        use_cpu_initialization=cpu_initialization,
        perform_initialization=perform_initialization,
        # Fusions need TE/Apex kernels (or torch.compile on CPU): on for TE, off for the local backend.
        # TE's fused RoPE takes the THD cu_seqlens (positions restart per document) with no host sync;
        # the unfused THD path loops over documents in Python with two syncs per call.
        bias_dropout_fusion=te,
        bias_activation_fusion=te,
        masked_softmax_fusion=te,
        apply_rope_fusion=te,
        cross_entropy_loss_fusion=te,
        cross_entropy_fusion_impl="native",
        gradient_accumulation_fusion=gradient_accumulation_fusion and te and grad_accumulation_fusion_available(),
        persist_layer_norm=False,
        recompute_granularity=recompute_granularity,
        recompute_method=recompute_method,
        recompute_num_layers=recompute_num_layers,
        calculate_per_token_loss=calculate_per_token_loss,
    )


def build_model(
    cfg: ModelConfig,
    transformer_config: TransformerConfig,
    *,
    padded_vocab_size: int | None = None,
    pre_process: bool = True,
    post_process: bool = True,
    vp_stage: int | None = None,
) -> SoloModel:
    """One pipeline stage of the SOLO model, on the backend ``transformer_config`` was made for.

    ``padded_vocab_size`` defaults to the TP-padded vocab.
    """
    tp = transformer_config.tensor_model_parallel_size
    vocab = padded_vocab_size or cfg.padded_vocab_size(tp)
    if vocab < cfg.vocab_size or vocab % tp:
        raise ValueError(
            f"padded_vocab_size: {vocab} must be ≥ vocab_size={cfg.vocab_size} and a multiple of "
            f"tensor_model_parallel_size={tp}"
        )
    check_megatron_core()
    backend = backend_of(transformer_config)
    return SoloModel(
        transformer_config,
        decoder_block_spec(transformer_config, backend, vp_stage),
        vocab_size=vocab,
        max_sequence_length=cfg.max_sequence_length,
        patch_dim=cfg.patch_dim,
        rotary_base=cfg.rotary_base,
        sliding_window=cfg.sliding_window,
        pre_process=pre_process,
        post_process=post_process,
        vp_stage=vp_stage,
    )


@functools.cache
def check_megatron_core() -> None:
    """Once per process: the megatron-core internals SoloModel relies on are there (a clear error if not)."""
    check_internals()
