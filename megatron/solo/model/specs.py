"""Layer specs: megatron-core's local modules (CPU, tests) or Transformer Engine's (GPU).

The two backends build identical checkpoints: megatron-core maps the local spec's keys onto the TE names
(``input_layernorm`` → ``self_attention.linear_qkv.layer_norm_weight``) in ``sharded_state_dict``.
"""

from __future__ import annotations

import importlib.util
from typing import Literal

import torch
from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_layer_local_spec,
    get_gpt_layer_with_transformer_engine_spec,
)
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build

Backend = Literal["local", "te"]


class RMSNorm(torch.nn.RMSNorm):
    """torch RMSNorm that also runs under sequence parallelism.

    megatron-core's ``WrappedTorchNorm`` refuses ``sequence_parallel``; the norm itself is pointwise over
    the sequence, so only its weight gradient needs a TP all-reduce, which ``finalize_model_grads`` does
    for parameters marked ``.sequence_parallel``.
    """

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **_):
        device = None if config.use_cpu_initialization else torch.cuda.current_device()  # as megatron-core's layers
        super().__init__(hidden_size, eps=eps, dtype=config.params_dtype, device=device)
        self.weight.sequence_parallel = config.sequence_parallel


def transformer_engine_available() -> bool:
    return importlib.util.find_spec("transformer_engine") is not None


def grad_accumulation_fusion_available() -> bool:
    """megatron-core's own ``ColumnParallelLinear`` (our output layer) needs Apex's CUDA kernel for it."""
    return importlib.util.find_spec("fused_weight_gradient_mlp_cuda") is not None


def resolve_backend(backend: Backend | Literal["auto"], params_dtype: torch.dtype = torch.bfloat16) -> Backend:
    """``auto``: Transformer Engine on a CUDA machine that has it and a 16-bit run, the local spec otherwise.

    TE's packed (THD) attention has no fp32 kernel, so ``te`` with fp32 is a configuration error.
    """
    if backend not in ("auto", "local", "te"):
        raise ValueError(f"attention backend: unknown {backend!r}; choose local, te or auto")
    sixteen_bit = params_dtype in (torch.bfloat16, torch.float16)
    if backend == "auto":
        return "te" if sixteen_bit and torch.cuda.is_available() and transformer_engine_available() else "local"
    if backend == "te" and not sixteen_bit:
        raise ValueError(
            f"attention backend 'te': Transformer Engine's packed (THD) attention has no {params_dtype} "
            "kernel; train in bf16 (--bf16) or use the local backend (--transformer-impl local)"
        )
    if backend == "te" and not transformer_engine_available():
        raise ValueError("attention backend 'te' needs transformer-engine (use an NGC PyTorch container)")
    return backend


def backend_of(config: TransformerConfig) -> Backend:
    """The backend a ``TransformerConfig`` from ``make_transformer_config`` was made for."""
    return "te" if config.transformer_impl == "transformer_engine" else "local"


def decoder_block_spec(config: TransformerConfig, backend: Backend, vp_stage: int | None = None) -> ModuleSpec:
    """The decoder of this pipeline stage: Mistral layers (RMSNorm, SwiGLU, GQA) and a final norm."""
    num_layers = get_num_layers_to_build(config, vp_stage=vp_stage)
    if backend == "te":
        from megatron.core.extensions.transformer_engine import TENorm

        return TransformerBlockSubmodules(
            layer_specs=[get_gpt_layer_with_transformer_engine_spec()] * num_layers, layer_norm=TENorm
        )
    layer = get_gpt_layer_local_spec(normalization="RMSNorm")
    layer.submodules.input_layernorm = RMSNorm
    layer.submodules.pre_mlp_layernorm = RMSNorm
    return TransformerBlockSubmodules(layer_specs=[layer] * num_layers, layer_norm=RMSNorm)
