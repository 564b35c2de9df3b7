"""From a ``ModelConfig`` and a parallel layout to megatron-core's ``TransformerConfig`` and a ``SoloModel``.

The caller (the trainer's setup, a tool, a test) owns the process groups and says which pipeline stage
this is; nothing here reads ranks or the environment.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from megatron.core.transformer import TransformerConfig

from megatron.solo.config import ModelConfig
from megatron.solo.model.solo_model import SoloModel
from megatron.solo.model.specs import Backend, decoder_block_spec, resolve_backend

Recompute = Literal["full", "selective"]


def make_transformer_config(
    cfg: ModelConfig, *, tensor_parallel: int = 1, pipeline_parallel: int = 1, sequence_parallel: bool = False,
    params_dtype: torch.dtype = torch.float32, backend: Backend | Literal["auto"] = "auto",
    recompute_granularity: Recompute | None = None, recompute_method: Literal["uniform", "block"] | None = None,
    recompute_num_layers: int | None = None, perform_initialization: bool = True,
    calculate_per_token_loss: bool = True,
) -> TransformerConfig:
    """Mistral's decoder (RMSNorm, SwiGLU, GQA, no biases, no dropout) for one parallel layout.

    ``backend`` must be the one ``build_model`` gets (both default to ``auto``): it decides the fusions
    and whether the sliding window goes to Transformer Engine or into the local mask.
    """
    backend = resolve_backend(backend)
    cfg.validate_parallel(tensor_parallel=tensor_parallel, pipeline_parallel=pipeline_parallel,
                          sequence_parallel=sequence_parallel)
    if params_dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"params_dtype: unsupported {params_dtype}")
    window = None
    if backend == "te" and cfg.sliding_window is not None:
        window = (cfg.sliding_window - 1, 0)  # TE counts keys to the left of the query, not the query
    return TransformerConfig(
        num_layers=cfg.num_layers, hidden_size=cfg.hidden_size, ffn_hidden_size=cfg.ffn_hidden_size,
        num_attention_heads=cfg.num_attention_heads, num_query_groups=cfg.num_query_groups,
        kv_channels=cfg.head_dim, layernorm_epsilon=cfg.norm_epsilon, normalization="RMSNorm",
        gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False, add_qkv_bias=False,
        hidden_dropout=0.0, attention_dropout=0.0, init_method_std=cfg.init_method_std,
        window_size=window,
        tensor_model_parallel_size=tensor_parallel, pipeline_model_parallel_size=pipeline_parallel,
        sequence_parallel=sequence_parallel,
        params_dtype=params_dtype, pipeline_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16, fp16=params_dtype == torch.float16,
        use_cpu_initialization=not torch.cuda.is_available(), perform_initialization=perform_initialization,
        # Fusions that need Apex/TE kernels (or torch.compile on CPU) stay off on the local backend.
        bias_dropout_fusion=backend == "te", bias_activation_fusion=backend == "te",
        masked_softmax_fusion=backend == "te", apply_rope_fusion=False,
        gradient_accumulation_fusion=False, persist_layer_norm=False,
        recompute_granularity=recompute_granularity, recompute_method=recompute_method,
        recompute_num_layers=recompute_num_layers,
        calculate_per_token_loss=calculate_per_token_loss,
    )


def build_model(
    cfg: ModelConfig, transformer_config: TransformerConfig, *, backend: Backend | Literal["auto"] = "auto",
    padded_vocab_size: int | None = None, pre_process: bool = True, post_process: bool = True,
    vp_stage: int | None = None,
) -> SoloModel:
    """One pipeline stage of the SOLO model. ``padded_vocab_size`` defaults to the TP-padded vocab."""
    backend = resolve_backend(backend)
    _check_backend_matches(cfg, transformer_config, backend)
    tp = transformer_config.tensor_model_parallel_size
    vocab = padded_vocab_size or cfg.padded_vocab_size(tp)
    if vocab < cfg.vocab_size or vocab % tp:
        raise ValueError(f"padded_vocab_size: {vocab} must be ≥ vocab_size={cfg.vocab_size} and a multiple of "
                         f"tensor_model_parallel_size={tp}")
    return SoloModel(
        transformer_config, decoder_block_spec(transformer_config, backend, vp_stage), vocab_size=vocab,
        max_sequence_length=cfg.max_sequence_length, patch_dim=cfg.patch_dim, rotary_base=cfg.rotary_base,
        backend=backend, sliding_window=cfg.sliding_window, pre_process=pre_process,
        post_process=post_process, vp_stage=vp_stage,
    )


def _check_backend_matches(cfg: ModelConfig, tc: TransformerConfig, backend: Backend) -> None:
    # With window_size set, megatron-core's local softmax swaps our packed mask for a plain sliding causal
    # one (documents would see each other); without it TE would silently drop the window.
    te_window = None if cfg.sliding_window is None else (cfg.sliding_window - 1, 0)
    expected = te_window if backend == "te" else None
    if tc.window_size != expected:
        raise ValueError(f"backend: the TransformerConfig was made for another backend than {backend!r} "
                         "(pass the same backend to make_transformer_config and build_model)")
