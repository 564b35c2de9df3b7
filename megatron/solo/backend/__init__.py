"""Compute backends: megatron-core as shipped on GPUs, a CPU shim for machines without CUDA, and fixes for
megatron-core bugs that apply on either (``mcore_fixes``)."""

from megatron.solo.backend.cpu import cpu_backend_installed, install_cpu_backend_if_needed
from megatron.solo.backend.mcore_fixes import init_torch_optimizer_state, install_distributed_optimizer_fixes

__all__ = [
    "cpu_backend_installed",
    "init_torch_optimizer_state",
    "install_cpu_backend_if_needed",
    "install_distributed_optimizer_fixes",
]
