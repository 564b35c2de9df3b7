"""Fixtures for the HF ↔ Megatron conversion tests: megatron-core on CPU (tiny models: tiny_models.py).

TODO(issue 4): the CPU shim below is a minimal, test-local stand-in, to be replaced by
``megatron.solo.backend.cpu.install()`` (the project's real shim) once that module exists in this
checkout; the fixture already prefers it when it can be imported. It is based on §4 of
megatron_core_cpu.md and covers only what a single-process forward of ``GPTModel`` needs.
Unlike the real shim it is *reversible*: the TorchFunctionMode and the monkeypatches are undone when
the fixture ends, so no other test in the session sees a patched ``torch.cuda``.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

# --- test-local CPU shim for megatron-core 0.16.1 (replace with megatron.solo.backend.cpu.install()) ---

_CPU = torch.device("cpu")


def _to_cpu(device):
    if isinstance(device, str) and device.startswith("cuda"):
        return _CPU
    if isinstance(device, torch.device) and device.type == "cuda":
        return _CPU
    return device


class _CudaToCpuMode(torch.overrides.TorchFunctionMode):
    """``device="cuda"`` → cpu in every torch call; ``x.cuda()`` → ``x``; ``x.to("cuda")`` → ``x``."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0]
        if "device" in kwargs:
            kwargs["device"] = _to_cpu(kwargs["device"])
        if func is torch.Tensor.to and len(args) > 1:
            args = (args[0], _to_cpu(args[1])) + tuple(args[2:])
        return func(*args, **kwargs)


def _cpu_rng_tracker_class(random_module):
    """megatron's RNG tracker keeps CUDA generator states; this one keeps CPU ones (fork() runs every forward)."""

    class CpuRNGStatesTracker(random_module.CudaRNGStatesTracker):
        def add(self, name, seed):
            self._is_initialized = True
            if seed in self.seeds_:
                raise Exception(f"seed {seed} already exists")
            self.seeds_.add(seed)
            if name in self.states_:
                raise Exception(f"rng state {name} already exists")
            self.states_[name] = torch.Generator().manual_seed(seed).get_state()

        @contextlib.contextmanager
        def fork(self, name=random_module._MODEL_PARALLEL_RNG_TRACKER_NAME):
            if name not in self.states_:
                raise Exception(f"rng state {name} is not added")
            orig = torch.get_rng_state()
            torch.set_rng_state(self.states_[name])
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(orig)

    return CpuRNGStatesTracker


@contextlib.contextmanager
def _test_local_cpu_shim():
    from megatron.core.tensor_parallel import random as R

    mp = pytest.MonkeyPatch()
    try:
        mp.setattr(torch.cuda, "current_device", lambda: _CPU)
        mp.setattr(torch.cuda, "get_rng_state", lambda *a, **k: torch.get_rng_state())
        mp.setattr(torch.cuda, "set_rng_state", lambda s, *a, **k: torch.set_rng_state(s))
        mp.setattr(R, "CudaRNGStatesTracker", _cpu_rng_tracker_class(R))  # looked up by name at tracker creation
        mp.setattr(R, "_CUDA_RNG_STATE_TRACKER", None)
        mp.setattr(R, "_CUDA_RNG_STATE_TRACKER_INITIALIZED", False)
        with _CudaToCpuMode():
            yield
    finally:
        mp.undo()


@pytest.fixture(scope="module")
def megatron_cpu(tmp_path_factory):
    """megatron-core usable on CPU in this process: the shim, gloo world of 1, TP=PP=1, seeded RNG tracker."""
    if torch.cuda.is_available():
        pytest.skip("the CPU shim is for CUDA-less machines")
    import torch.distributed as dist
    from megatron.core import parallel_state, tensor_parallel

    try:  # the project's shim, once it lands in this checkout
        from megatron.solo.backend import cpu as backend
    except ModuleNotFoundError:
        shim = _test_local_cpu_shim()
    else:
        backend.install()
        shim = contextlib.nullcontext()
    with shim:
        owns_group = not dist.is_initialized()
        if owns_group:
            init_file = tmp_path_factory.mktemp("gloo") / "init"
            dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=0, world_size=1)
        parallel_state.initialize_model_parallel()
        tensor_parallel.model_parallel_cuda_manual_seed(1234)
        try:
            yield
        finally:
            parallel_state.destroy_model_parallel()
            if owns_group:
                dist.destroy_process_group()
