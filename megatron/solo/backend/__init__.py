"""Compute backends: megatron-core as shipped on GPUs, plus a CPU shim for machines without CUDA."""

from megatron.solo.backend.cpu import init_torch_optimizer_state, install_cpu_backend_if_needed

__all__ = ["init_torch_optimizer_state", "install_cpu_backend_if_needed"]
