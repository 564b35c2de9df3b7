"""Run megatron-core 0.16.1 on CPU/gloo: a torch.cuda shim plus fixes for its no-Apex optimizer bugs.

megatron-core calls ``torch.cuda.*`` and hard-codes ``device="cuda"`` / ``.cuda()`` in about 30 places a
training run reaches (listed in ``megatron_core_cpu.md`` §4). On a machine without CUDA we

- point ``torch.cuda.current_device()`` at the CPU and make streams, events and synchronize no-ops;
- enter a process-wide ``TorchFunctionMode`` that rewrites ``device="cuda"``, ``.cuda()`` and
  ``.to("cuda")`` to the CPU, and makes ``Tensor.type()`` report ``torch.cuda.*Tensor`` (megatron's
  optimizers check that string);
- replace the CUDA RNG tracker with one holding CPU generator states (it is forked on every attention
  forward and by activation recompute);
- run megatron-core's torch AdamW with torch's fused CPU kernel (:func:`use_fused_cpu_adam`, called by the
  trainer).

megatron-core's own bugs with torch's AdamW are not CPU-specific: their fixes live in
:mod:`megatron.solo.backend.mcore_fixes`.

Nothing happens on import: each entry point (``pretrain_solo.py``, the tools, the test session) calls
``install_cpu_backend_if_needed()`` once at start, a no-op where CUDA is available. The mode is
thread-local: code that runs megatron-core in a new thread must enter ``CudaToCpuMode()`` itself.
The patches target private megatron-core 0.16.1 functions, hence the exact version pin in setup.py.
"""

from __future__ import annotations

import contextlib

import torch
from torch.overrides import TorchFunctionMode

_CPU = torch.device("cpu")
_CUDA_TYPE_NAMES = {
    "torch.FloatTensor": "torch.cuda.FloatTensor",
    "torch.HalfTensor": "torch.cuda.HalfTensor",
    "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor",
}
_MODE: CudaToCpuMode | None = None


def _to_cpu_device(device):
    if isinstance(device, str) and device.startswith("cuda"):
        return _CPU
    if isinstance(device, torch.device) and device.type == "cuda":
        return _CPU
    return device


class CudaToCpuMode(TorchFunctionMode):
    """``device="cuda"`` → cpu in every torch call; ``x.cuda()``/``x.to("cuda")`` → x on cpu."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return _CUDA_TYPE_NAMES.get(name, name)
        if "device" in kwargs:
            kwargs["device"] = _to_cpu_device(kwargs["device"])
        if func is torch.Tensor.to and len(args) > 1:
            args = (args[0], _to_cpu_device(args[1]), *args[2:])
        return func(*args, **kwargs)


class _NullCudaObject:
    """Stands in for ``torch.cuda.Stream`` / ``Event``: every method is a harmless no-op."""

    def __init__(self, *args, **kwargs):
        pass

    def __getattr__(self, name):
        if name == "elapsed_time":
            return lambda *a, **k: 0.0
        if name == "query":
            return lambda *a, **k: True
        return lambda *a, **k: None


def _install_rng_tracker() -> None:
    from megatron.core.tensor_parallel import random as mpu_random

    class CpuRNGStatesTracker(mpu_random.CudaRNGStatesTracker):
        """The CUDA tracker's API over CPU generator states."""

        def add(self, name, seed):
            self._is_initialized = True
            if seed in self.seeds_:
                raise Exception(f"seed {seed} already exists")
            if name in self.states_:
                raise Exception(f"rng state {name} already exists")
            self.seeds_.add(seed)
            generator = torch.Generator()
            generator.manual_seed(seed)
            self.states_[name] = generator.get_state()

        @contextlib.contextmanager
        def fork(self, name=mpu_random._MODEL_PARALLEL_RNG_TRACKER_NAME):
            if name not in self.states_:
                raise Exception(f"rng state {name} is not added")
            outer = torch.get_rng_state()
            torch.set_rng_state(self.states_[name])
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(outer)

    # initialize_rng_tracker() looks the class up by name, so replacing the attribute is enough.
    mpu_random.CudaRNGStatesTracker = CpuRNGStatesTracker
    mpu_random._CUDA_RNG_STATE_TRACKER = None
    mpu_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = False
    mpu_random._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    mpu_random._set_cuda_rng_state = lambda state, *a, **k: torch.set_rng_state(state)


def use_fused_cpu_adam(megatron_optimizer) -> None:
    """Switch megatron-core's torch Adam(W) to torch's fused CPU kernel.

    Without Apex megatron-core builds ``torch.optim.AdamW`` with default arguments, which on CPU runs the
    per-tensor Python loop: ~10x slower than ``fused=True`` (25 ms vs 2.4 ms a step for the demo model's 4.3M
    parameters: a quarter of its training step). Same update rule; the group flag is read at every step.
    """
    for optimizer in getattr(megatron_optimizer, "chained_optimizers", [megatron_optimizer]):
        inner = optimizer.optimizer
        if isinstance(inner, (torch.optim.Adam, torch.optim.AdamW)):
            for group in inner.param_groups:
                group.update(fused=True, foreach=False)


def install_cpu_backend() -> None:
    """Install the shim in this process (idempotent). Requires a machine without CUDA."""
    global _MODE
    if _MODE is not None:
        return
    if torch.cuda.is_available():
        raise RuntimeError("the CPU backend must not be installed where CUDA is available")
    cuda = torch.cuda
    cuda.current_device = lambda: _CPU
    cuda.synchronize = cuda.empty_cache = lambda *a, **k: None
    cuda.Stream = cuda.Event = _NullCudaObject
    cuda.stream = lambda *a, **k: contextlib.nullcontext()
    cuda.default_stream = cuda.current_stream = lambda *a, **k: _NullCudaObject()
    cuda.get_rng_state = lambda *a, **k: torch.get_rng_state()
    cuda.set_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    _install_rng_tracker()
    _MODE = CudaToCpuMode()
    _MODE.__enter__()  # process-wide for the main thread (modes are thread-local)


def cpu_backend_installed() -> bool:
    return _MODE is not None


def install_cpu_backend_if_needed() -> bool:
    """Install the CPU shim iff CUDA is absent; returns whether it is (now) installed."""
    if torch.cuda.is_available():
        return False
    install_cpu_backend()
    return True
