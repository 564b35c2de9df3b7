"""Fixes for megatron-core 0.16.1 bugs that this project's runs reach, each with where it applies.

These are not about the CPU: they follow from which Adam megatron-core picked at import time
(``distrib_optimizer.HAVE_APEX_OR_TE``): Transformer Engine's or Apex's ``FusedAdam`` where either is
installed (the GPU product), torch's ``AdamW`` otherwise (CPU machines, and a GPU without TE or Apex).

- :func:`install_distributed_optimizer_fixes`: ``DistributedOptimizer`` over torch's Adam(W), any device.
  ``distrib_optimizer.py:821-825`` shares one ``step`` tensor between all params after a load, which AdamW
  increments once per param, silently breaking bias correction; ``:940`` ``fully_reshardable`` loads fail
  with ``KeyError: 'step'``.
- :func:`own_checkpoint_writer_queue`: every torch_dist save, any device. ``filesystem_async.py:51-56``
  starts a manager process, and ``:266-295`` forks writer workers, that outlive a killed trainer (and keep the
  resource tracker alive).
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
import threading

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


def _prctl_death_signal():
    """libc's ``prctl`` bound to PR_SET_PDEATHSIG/SIGKILL, or None off Linux. Resolved before any fork: a forked
    child of a threaded process must not ``dlopen`` (another thread may have held the loader's lock)."""
    import ctypes
    import signal

    try:
        prctl = ctypes.CDLL("libc.so.6", use_errno=True).prctl
    except OSError:
        return None
    return lambda: prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _die_with_parent(parent_pid: int, request=None) -> None:
    """Runs first in a helper process: ask Linux to kill it when its parent dies."""
    request = request or _prctl_death_signal()
    if request is None:  # not Linux: the helper then ends as before (when its parent shuts it down)
        return
    request()
    if os.getppid() != parent_pid:  # the parent died before the request took effect
        os._exit(0)


_fork_state = {"installed": False, "request": None, "parent": 0, "main_thread": False}


def _before_fork() -> None:
    _fork_state["parent"] = os.getpid()
    _fork_state["main_thread"] = threading.current_thread() is threading.main_thread()


def _after_fork_in_child() -> None:
    # Linux sends the signal when the forking *thread* ends: only the main thread lives as long as the process,
    # so children forked by other threads are left as they were.
    if _fork_state["main_thread"]:
        _die_with_parent(_fork_state["parent"], _fork_state["request"])


def forked_children_die_with_this_process() -> None:
    """Every child this process's main thread forks from now on is killed by Linux when this process dies.

    megatron-core's checkpoint writer forks one worker per file (``filesystem_async.py:266-295``, ``fork``),
    which sends its results through a ``multiprocessing.Queue`` to the trainer. Killed mid-save (OOM killer, a
    failed node), the trainer never reads them: a worker whose results exceed the pipe's buffer blocks in its
    queue's feeder thread forever, and keeps the resource tracker alive with it. Idempotent; Linux only.
    """
    if _fork_state["installed"]:
        return
    _fork_state.update(installed=True, request=_prctl_death_signal())
    if _fork_state["request"] is not None:
        os.register_at_fork(before=_before_fork, after_in_child=_after_fork_in_child)


def own_checkpoint_writer_queue() -> None:
    """Tie megatron-core's checkpoint writer's helper processes to this process's life.

    ``dist_checkpointing``'s torch_dist writer lazily starts a ``multiprocessing`` manager (``spawn``) for
    its results queue (``filesystem_async.py:51-56``), and forks a worker per file for every save. If the
    trainer is killed (OOM killer, a failed node), both, and through them the resource tracker, outlive it
    (the manager for minutes, a worker blocked on its results forever). Started here instead, the manager dies
    with the trainer, as do the forked workers (:func:`forked_children_die_with_this_process`); a clean exit
    shuts them down as before. Idempotent; all devices.
    """
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    forked_children_die_with_this_process()
    if filesystem_async._results_queue is not None:
        return
    manager = mp.managers.SyncManager(ctx=mp.get_context("spawn"))
    manager.start(initializer=_die_with_parent, initargs=(os.getpid(),))
    filesystem_async._results_queue = manager.Queue()  # the queue's proxy keeps the manager alive
