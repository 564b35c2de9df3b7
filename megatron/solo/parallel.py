"""Process groups: the one place that reads the launcher's environment and sets up parallel state."""

from __future__ import annotations

import os
import socket
from datetime import timedelta

import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel

from megatron.solo.backend import cpu_backend_installed


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_distributed(timeout_s: float = 600.0) -> None:
    """Join the torchrun job (``RANK``/``WORLD_SIZE``/``MASTER_*``), or form a world of one.

    NCCL on CUDA machines, gloo elsewhere, where the entry point must have installed the CPU backend
    (``megatron.solo.backend.install_cpu_backend_if_needed()``) first: joining a world never patches
    ``torch.cuda`` behind the caller's back. Idempotent.
    """
    if not torch.cuda.is_available() and not cpu_backend_installed():
        raise RuntimeError(
            "no CUDA here: call megatron.solo.backend.install_cpu_backend_if_needed() first "
            "(pretrain_solo.py and the tools do it at start)"
        )
    if dist.is_initialized():
        return
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    timeout = timedelta(seconds=timeout_s)
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if "RANK" in os.environ:
        dist.init_process_group(backend, timeout=timeout)
    else:  # a plain `python` run (a tool, a test): a world of one, leaving the environment untouched
        dist.init_process_group(
            backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1, timeout=timeout
        )


def initialize_model_parallel(tensor_parallel: int = 1, pipeline_parallel: int = 1, seed: int = 1234) -> None:
    """(Re)build megatron-core's TP/PP/DP groups over the current world and seed its RNG tracker."""
    init_distributed()
    world = dist.get_world_size()
    if world % (tensor_parallel * pipeline_parallel):
        raise ValueError(
            f"tensor_model_parallel_size × pipeline_model_parallel_size = "
            f"{tensor_parallel}×{pipeline_parallel} does not divide the world size {world}"
        )
    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tensor_parallel, pipeline_model_parallel_size=pipeline_parallel
    )
    tensor_parallel_seed(seed)


def tensor_parallel_seed(seed: int) -> None:
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def ensure_model_parallel_of_one(seed: int = 1234) -> None:
    """TP=PP=1 groups for a whole model in this process (tools, generation, conversion).

    Forms them (and a world of one) where none exist; reuses a caller's TP=PP=1 groups as they are, and
    refuses, rather than tears down, groups of another layout.
    """
    init_distributed()
    if not parallel_state.model_parallel_is_initialized():
        initialize_model_parallel(1, 1, seed=seed)
        return
    tp = parallel_state.get_tensor_model_parallel_world_size()
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    if (tp, pp) != (1, 1):
        raise RuntimeError(f"a whole model needs TP=PP=1 process groups, but this process has TP={tp}, PP={pp}")
