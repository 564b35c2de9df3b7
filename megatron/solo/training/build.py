"""Model, DDP wrapper, optimizer and LR schedule of a training run (after ``initialize_model_parallel``)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import (
    OptimizerConfig,
    ParamKey,
    ParamPredicate,
    get_megatron_optimizer,
    get_standard_config_overrides,
)
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.module import Float16Module

from megatron.solo.backend.cpu import use_fused_cpu_adam
from megatron.solo.backend.mcore_fixes import install_distributed_optimizer_fixes
from megatron.solo.config import ModelConfig
from megatron.solo.families import build_model
from megatron.solo.model import SoloModel, make_transformer_config
from megatron.solo.training.arguments import ConfigError, TrainConfig

PATCH_PARAMETERS = "patch_embedding."


@dataclass
class Components:
    """One rank's share of the run: its pipeline stage of the model and what trains it."""

    model: SoloModel  # unwrapped (a HaploModel is a SoloModel): checkpoints and tools use this
    ddp: DistributedDataParallel  # what the schedule runs (wraps Float16Module under --bf16)
    config: TransformerConfig
    optimizer: object  # megatron-core MegatronOptimizer
    scheduler: OptimizerParamScheduler


def build_components(
    cfg: TrainConfig, model_cfg: ModelConfig, padded_vocab_size: int, teacher_hidden_size: int | None = None
) -> Components:
    """This rank's model stage, randomly initialised (from the seed), wrapped for training.

    Always initialised, even when weights are loaded next: megatron-core 0.16.1 marks tensor-parallel
    weights (``tensor_model_parallel``, ``partition_dim``) only inside its init functions, and without the
    marks the gradient norm skips every sharded weight on tensor-parallel ranks > 0 (so clipping is wrong).
    """
    if cfg.freeze_language_model and model_cfg.family != "solo":
        raise ConfigError(
            f"--freeze-language-model: SOLO's warm-up of the patch projection alone; a {model_cfg.family} model "
            "has no such stage"
        )
    dtype = params_dtype(cfg)
    tc = make_transformer_config(
        model_cfg,
        tensor_parallel=cfg.tensor_model_parallel_size,
        pipeline_parallel=cfg.pipeline_model_parallel_size,
        sequence_parallel=cfg.sequence_parallel,
        params_dtype=dtype,
        # HaploVL's mask runs on the local backend only (haplo/mask.py): auto means local there
        backend="local" if model_cfg.family == "haplo" and cfg.backend == "auto" else cfg.backend,
        recompute_granularity=cfg.recompute_granularity,
        recompute_method=cfg.recompute_method,
        recompute_num_layers=cfg.recompute_num_layers,
        gradient_accumulation_fusion=True,
    )
    model = build_model(
        model_cfg,
        tc,
        padded_vocab_size=padded_vocab_size,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        **stage1_options(cfg, teacher_hidden_size),
    )
    if torch.cuda.is_available():
        model.cuda(torch.cuda.current_device())  # as Megatron-LM's get_model: every parameter, ours included
    if cfg.freeze_language_model:
        freeze_language_model(model)
    wrapped = Float16Module(tc, model) if cfg.bf16 else model
    ddp = DistributedDataParallel(
        tc,
        DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, use_distributed_optimizer=cfg.use_distributed_optimizer, overlap_grad_reduce=False
        ),
        wrapped,
    )
    tc.finalize_model_grads_func = finalize_model_grads  # DP all-reduce + per-token normalisation
    tc.no_sync_func = ddp.no_sync  # grads accumulate over micro-batches; reduced once per step
    install_distributed_optimizer_fixes()  # only where megatron-core wraps torch's Adam
    config = OptimizerConfig(
        optimizer="adam",
        lr=cfg.lr,
        min_lr=cfg.min_lr,
        decoupled_lr=cfg.decoupled_lr,
        decoupled_min_lr=cfg.decoupled_min_lr,
        weight_decay=cfg.weight_decay,
        adam_beta1=cfg.adam_beta1,
        adam_beta2=cfg.adam_beta2,
        adam_eps=cfg.adam_eps,
        clip_grad=cfg.clip_grad,
        bf16=cfg.bf16,
        params_dtype=dtype,
        use_distributed_optimizer=cfg.use_distributed_optimizer,
    )
    optimizer = get_megatron_optimizer(config, [ddp], config_overrides=weight_decay_overrides(config))
    if not torch.cuda.is_available():
        use_fused_cpu_adam(optimizer)
    return Components(model, ddp, tc, optimizer, build_scheduler(cfg, optimizer))


def weight_decay_overrides(config: OptimizerConfig) -> dict:
    """megatron-core's standard parameter groups (``--decoupled-lr``'s included) with its no-weight-decay rule
    widened from 1-d parameters and biases to every parameter of at most one dimension and biases: 0-d ones too,
    such as HaploVL stage 1's learned logit scale (CLIP's recipe does not decay it)."""
    overrides = {key: value for key, value in get_standard_config_overrides(config).items() if "wd_mult" not in value}
    at_most_1d = ParamPredicate(name="ndim_at_most_1", fn=lambda param: param.dim() <= 1)
    overrides[ParamKey(name="*.bias", predicate=at_most_1d)] = {"wd_mult": 0.0}
    return overrides


def params_dtype(cfg: TrainConfig) -> torch.dtype:
    """The model's parameters' dtype (bf16 under ``--bf16``); stage 1's teacher runs in it too."""
    return torch.bfloat16 if cfg.bf16 else torch.float32


def stage1_options(cfg: TrainConfig, teacher_hidden_size: int | None) -> dict:
    """HaploVL stage 1's model options (distillation heads sized for the teacher), or none."""
    if cfg.distill_teacher is None:
        return {}
    from megatron.solo.haplo.distill import DistillConfig

    distill = DistillConfig(head=cfg.distill_head, teacher_layer=cfg.distill_teacher_layer)
    return {"distill": distill, "teacher_hidden_size": teacher_hidden_size}


def freeze_language_model(model: SoloModel) -> None:
    """Leave only the patch projection trainable (stage-0 warm-up); gradients still flow through the decoder."""
    for name, param in model.named_parameters():
        param.requires_grad = name.startswith(PATCH_PARAMETERS)


def build_scheduler(cfg: TrainConfig, optimizer) -> OptimizerParamScheduler:
    """Linear warmup from 0 to ``--lr``, then ``--lr-decay-style`` down to ``--min-lr`` at ``--lr-decay-iters``.

    One scheduler step per iteration. On resume the checkpoint's schedule must match the flags unless
    ``--override-opt-param-scheduler``.
    """
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=cfg.lr,
        min_lr=cfg.min_lr,
        lr_warmup_steps=cfg.lr_warmup_iters,
        lr_decay_steps=max(cfg.decay_iters, cfg.lr_warmup_iters + 1),
        lr_decay_style=cfg.lr_decay_style,
        start_wd=cfg.weight_decay,
        end_wd=cfg.weight_decay,
        wd_incr_steps=max(cfg.train_iters, 1),
        wd_incr_style="constant",
        use_checkpoint_opt_param_scheduler=False,
        override_opt_param_scheduler=cfg.override_opt_param_scheduler,
    )
