"""Training checkpoints: where a run starts from, and the full state saved and restored for exact resume.

A training checkpoint is a :mod:`megatron.solo.checkpointing` checkpoint whose iteration directory also holds
the optimizer (``fully_reshardable``: loads at any TP/PP/DP), the LR schedule, the iteration, the number of
samples consumed (the data position) and every rank's RNG states. The model entry is the same as a converted
release's, so ``tools/convert_checkpoint.py megatron-to-hf`` reads either.

Where a run starts (:func:`resolve_start`), in order:

1. ``--save`` already holds a checkpoint: this run was interrupted; resume it exactly (``--load`` is then only
   where it originally started). This makes every launcher safe to re-submit.
2. ``--load`` holding a release (a converted model) or given with ``--finetune``: its weights only;
   iteration 0, fresh optimizer, schedule and data order (a new stage).
3. ``--load`` holding an iteration: resume it (Megatron-LM semantics).
4. Otherwise ``--model-preset`` from scratch.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject

from megatron.solo.backend.mcore_fixes import init_torch_optimizer_state
from megatron.solo.checkpointing import (
    TRACKER_FILE,
    CheckpointMetadata,
    check_finite_parameters,
    iteration_dir,
    latest_iteration,
    load_model_state,
    load_sharded,
    model_sharded_state_dict,
    save_sharded,
    verify_checkpoint,
)
from megatron.solo.config import ModelConfig
from megatron.solo.families import get_preset
from megatron.solo.training.arguments import ConfigError, TrainConfig

log = logging.getLogger(__name__)

# megatron-core 0.16.1: the default sharding type cannot be saved without TE/Apex; this one reshards freely.
OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}


@dataclass(frozen=True)
class Start:
    """Where the run's weights (and maybe its whole state) come from."""

    model: ModelConfig
    padded_vocab_size: int
    kind: Literal["scratch", "weights", "resume"]
    root: str | None = None
    iteration: int | None = None
    warnings: tuple[str, ...] = ()

    @property
    def description(self) -> str:
        if self.kind == "scratch":
            return "from scratch (random initialisation)"
        where = f"{self.root} ({'release' if self.iteration is None else f'iteration {self.iteration}'})"
        return f"weights of {where}" if self.kind == "weights" else f"resume {where}"


def has_checkpoint(root: str | None) -> bool:
    return root is not None and (Path(root) / TRACKER_FILE).is_file()


def resolve_start(cfg: TrainConfig, allow_missing: bool = False) -> Start:
    """Apply the precedence in the module docstring. ``allow_missing`` (dry runs) turns a missing ``--load``
    into a warning and falls back to ``--model-preset``."""
    warnings: list[str] = []
    if has_checkpoint(cfg.save):
        iteration = latest_iteration(cfg.save)
        return _from_checkpoint(cfg, cfg.save, iteration, "resume" if iteration is not None else "weights")
    if cfg.load is not None:
        if has_checkpoint(cfg.load):
            iteration = latest_iteration(cfg.load)
            kind = "weights" if cfg.finetune or iteration is None else "resume"
            return _from_checkpoint(cfg, cfg.load, iteration, kind)
        if not allow_missing:
            raise ConfigError(f"--load: {cfg.load}: no checkpoint ({TRACKER_FILE} is missing)")
        warnings.append(f"--load {cfg.load}: no checkpoint here; the architecture comes from --model-preset")
    if cfg.model_preset is None:
        raise ConfigError("--model-preset: needed when there is no checkpoint to start from")
    model = get_preset(cfg.model_preset)
    return Start(model, model.padded_vocab_size(cfg.tensor_model_parallel_size), "scratch", warnings=tuple(warnings))


def _from_checkpoint(cfg: TrainConfig, root: str, iteration: int | None, kind: str) -> Start:
    metadata = CheckpointMetadata.read(root)
    if cfg.model_preset is not None:
        preset = get_preset(cfg.model_preset)
        saved, wanted = metadata.model.to_dict(), preset.to_dict()
        differ = [name for name in sorted(set(saved) | set(wanted)) if saved.get(name) != wanted.get(name)]
        if differ:
            raise ConfigError(
                f"--model-preset: {cfg.model_preset} differs from the checkpoint in {root} in "
                f"{', '.join(differ)} (drop --model-preset to use the checkpoint's architecture)"
            )
    return Start(metadata.model, metadata.padded_vocab_size, kind, root, iteration)


# ---------------------------------------------------------------------------------------------
# RNG


def _rng_states() -> dict[str, Any]:
    states = {
        "random": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def _set_rng_states(states: dict[str, Any]) -> None:
    random.setstate(states["random"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(states["tracker"])


def _layout() -> dict[str, int]:
    return {
        "tp": parallel_state.get_tensor_model_parallel_world_size(),
        "pp": parallel_state.get_pipeline_model_parallel_world_size(),
        "dp": parallel_state.get_data_parallel_world_size(),
    }


def _rng_sharded(states: dict[str, Any] | None) -> ShardedObject:
    """One entry per rank: RNG streams only make sense in the layout that made them."""
    layout = _layout()
    offset = (
        parallel_state.get_pipeline_model_parallel_rank(),
        parallel_state.get_tensor_model_parallel_rank(),
        parallel_state.get_data_parallel_rank(),
    )
    return ShardedObject("rng_state", states, (layout["pp"], layout["tp"], layout["dp"]), offset, replica_id=0)


# ---------------------------------------------------------------------------------------------
# save / load


@dataclass
class TrainingState:
    """What advances during training besides the weights and the optimizer."""

    iteration: int = 0
    consumed_samples: int = 0


def save_training_checkpoint(
    root: str, state: TrainingState, *, model, optimizer, scheduler, metadata: CheckpointMetadata, cfg: TrainConfig
) -> Path:
    """Collectively save the full training state at ``state.iteration`` (atomic; then marked latest).

    ``model`` is this rank's unwrapped ``SoloModel`` (one pipeline stage). Refuses non-finite weights.
    """
    check_finite_parameters(model)
    msd = model_sharded_state_dict(model)
    sharded = {
        "model": msd,
        "optimizer": optimizer.sharded_state_dict(msd, metadata=OPTIMIZER_METADATA),
        "opt_param_scheduler": scheduler.state_dict(),
        "rng_state": _rng_sharded(_rng_states()),
        "iteration": state.iteration,
        "consumed_samples": state.consumed_samples,
        "layout": _layout(),
        "train_config": cfg.to_dict(),
    }
    return save_sharded(root, state.iteration, sharded, metadata, content_metadata=OPTIMIZER_METADATA)


def _absent_optional_entries(start: Start, model, msd: dict[str, Any]) -> list[str]:
    """The model's optional entries (``model.optional_checkpoint_prefixes``: HaploVL stage 1's heads and text
    targets) that ``start``'s checkpoint does not hold: a new stage keeps their initialisation (logged)."""
    prefixes = getattr(model, "optional_checkpoint_prefixes", ())
    if not prefixes:
        return []
    saved = dist_checkpointing.load_tensors_metadata(str(iteration_dir(start.root, start.iteration)))
    absent = [k for k in msd if k.startswith(prefixes) and k not in saved]
    if absent:
        log.warning("%s holds no %s: they start from their initialisation", start.root, ", ".join(absent))
    return absent


def load_training_checkpoint(start: Start, cfg: TrainConfig, *, model, optimizer, scheduler) -> TrainingState:
    """Load ``start``'s weights, and for a resume also optimizer, schedule, data position and RNG.

    Returns the iteration and consumed samples to continue from (zeros for new weights).
    """
    msd = model_sharded_state_dict(model)
    resume = start.kind == "resume"
    same_layout = False
    if not cfg.no_verify_checkpoint:
        verify_checkpoint(start.root, start.iteration)
    absent = [] if resume else _absent_optional_entries(start, model, msd)
    msd = {k: v for k, v in msd.items() if k not in absent}
    request: dict[str, Any] = {"model": msd}
    if resume:
        common = dist_checkpointing.load_common_state_dict(str(iteration_dir(start.root, start.iteration)))
        same_layout = common.get("layout") == _layout()
        if not cfg.no_load_optim:
            init_torch_optimizer_state(optimizer)  # megatron-core asserts on a fresh torch Adam otherwise
            request["optimizer"] = optimizer.sharded_state_dict(msd, is_loading=True, metadata=OPTIMIZER_METADATA)
        if same_layout and not cfg.no_load_rng:
            request["rng_state"] = _rng_sharded(None)
        elif not cfg.no_load_rng:
            log.warning(
                "parallel layout %s differs from the checkpoint's %s: RNG states start afresh from --seed",
                _layout(),
                common.get("layout"),
            )
    loaded = load_sharded(start.root, request, start.iteration, verify=False)  # verified above
    load_model_state(model, loaded["model"], optional=tuple(absent))
    # Mixed-precision optimizers hold fp32 main copies of the weights, taken when they were built: refresh
    # them from what was just loaded, or the first step writes the initialisation back (bf16 stage starts).
    # A resume then overwrites them with the checkpoint's own fp32 copies.
    optimizer.reload_model_params()
    if not resume:
        return TrainingState()
    if "optimizer" in request:
        with torch.no_grad():  # megatron-core 0.16.1 writes into leaf params without it
            optimizer.load_state_dict(loaded["optimizer"])
    try:
        scheduler.load_state_dict(loaded["opt_param_scheduler"])
    except AssertionError as err:
        raise ConfigError(
            f"--override-opt-param-scheduler: the checkpoint's LR schedule differs from the flags "
            f"({err}); pass it to use the flags' schedule from the checkpoint's step"
        ) from None
    if "rng_state" in request:
        _set_rng_states(loaded["rng_state"])
    return TrainingState(int(loaded["iteration"]), int(loaded["consumed_samples"]))
