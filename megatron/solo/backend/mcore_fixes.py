"""Fixes for megatron-core 0.16.1 bugs that this project's runs reach, each with where it applies.

These are not about the CPU: they follow from which Adam megatron-core picked at import time
(``distrib_optimizer.HAVE_APEX_OR_TE``): Transformer Engine's or Apex's ``FusedAdam`` where either is
installed (the GPU product), torch's ``AdamW`` otherwise (CPU machines, and a GPU without TE or Apex).

- :func:`install_distributed_optimizer_fixes`: ``DistributedOptimizer`` over torch's Adam(W), any device.
  ``distrib_optimizer.py:821-825`` shares one ``step`` tensor between all params after a load, which AdamW
  increments once per param, silently breaking bias correction; ``:940`` ``fully_reshardable`` loads fail
  with ``KeyError: 'step'``.
- :func:`own_checkpoint_writer_queue`: every torch_dist save, any device. ``filesystem_async.py:51-56``
  starts a manager process that outlives a killed trainer (and keeps the resource tracker alive).
- :func:`init_torch_optimizer_state`: torch's Adam(W) only (TE's/Apex's FusedAdam ``state_dict()`` raises
  ``KeyError: 'step'`` with it). ``distrib_optimizer.py:642`` asserts a single shared step on a fresh
  optimizer.

The trainer calls them explicitly (:func:`megatron.solo.training.build.build_components`, checkpoint loads);
nothing is patched at import.
"""

from __future__ import annotations

import multiprocessing as mp
import multiprocessing.managers
import os

import torch

_INSTALLED = False


def uses_torch_adam() -> bool:
    """Whether megatron-core's optimizers wrap torch's Adam(W) (neither TE nor Apex was importable)."""
    from megatron.core.optimizer import distrib_optimizer

    return not distrib_optimizer.HAVE_APEX_OR_TE


def install_distributed_optimizer_fixes() -> bool:
    """Patch ``DistributedOptimizer``'s torch-Adam ``step`` handling (idempotent); a no-op (False) where
    megatron-core uses TE's or Apex's FusedAdam, which keep ``step`` per param group and are not affected."""
    global _INSTALLED
    if _INSTALLED or not uses_torch_adam():
        return _INSTALLED
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    original_set = DistributedOptimizer._set_main_param_and_optimizer_states
    original_load = DistributedOptimizer.load_state_dict

    def set_states_keeping_step(self, model_param, tensors):
        # A reshardable checkpoint carries `step` in param_groups, not per tensor: keep the restored one.
        if not self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
            group_index, order = self.model_param_group_index_map[model_param]
            state = self.optimizer.state[self.optimizer.param_groups[group_index]["params"][order]]
            if "step" in state:
                tensors = dict(tensors, step=state["step"])
        return original_set(self, model_param, tensors)

    def load_with_private_steps(self, state_dict):
        out = original_load(self, state_dict)
        for state in self.optimizer.state.values():
            if isinstance(state.get("step"), torch.Tensor):
                state["step"] = state["step"].clone()  # AdamW increments it in place, once per param
        return out

    DistributedOptimizer._set_main_param_and_optimizer_states = set_states_keeping_step
    DistributedOptimizer.load_state_dict = load_with_private_steps
    _INSTALLED = True
    return True


def _inner_optimizers(megatron_optimizer):
    for optimizer in getattr(megatron_optimizer, "chained_optimizers", [megatron_optimizer]):
        yield optimizer.optimizer


def init_torch_optimizer_state(megatron_optimizer) -> None:
    """Give every param of a fresh torch Adam(W) its (zero) state; leave any other optimizer alone.

    Call before ``optimizer.sharded_state_dict(..., is_loading=True)``. TE's and Apex's FusedAdam need no
    such state, and TE's breaks with it (its ``state_dict()`` raises ``KeyError: 'step'``).
    """
    for inner in _inner_optimizers(megatron_optimizer):
        if not isinstance(inner, torch.optim.Adam | torch.optim.AdamW):
            continue
        for group in inner.param_groups:
            for param in group["params"]:
                state = inner.state[param]
                if not state:
                    state.update(
                        step=torch.tensor(0.0), exp_avg=torch.zeros_like(param), exp_avg_sq=torch.zeros_like(param)
                    )


def _die_with_parent(parent_pid: int) -> None:
    """Runs first in the writer's manager process: ask Linux to kill it when its parent dies."""
    import ctypes
    import signal

    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:  # not Linux: the manager then ends as before (when its parent shuts it down)
        return
    if os.getppid() != parent_pid:  # the parent died before the request took effect
        os._exit(0)


def own_checkpoint_writer_queue() -> None:
    """Start the manager process of megatron-core's checkpoint writer ourselves, tied to this process's life.

    ``dist_checkpointing``'s torch_dist writer lazily starts a ``multiprocessing`` manager (``spawn``) for
    its results queue (``filesystem_async.py:51-56``). If the trainer is killed (OOM killer, a failed node),
    that manager, and through it the resource tracker, outlive it for minutes. Started here instead, the
    manager dies with the trainer, and a clean exit shuts it down as before. Idempotent; all devices.
    """
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if filesystem_async._results_queue is not None:
        return
    manager = mp.managers.SyncManager(ctx=mp.get_context("spawn"))
    manager.start(initializer=_die_with_parent, initargs=(os.getpid(),))
    filesystem_async._results_queue = manager.Queue()  # the queue's proxy keeps the manager alive
