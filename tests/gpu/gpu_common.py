"""Shared pieces of the GPU checks: the run context, model building, comparisons, and TE's log lines.

Imported by ``gpu_checks.py`` (a script, run as ``python tests/gpu/gpu_checks.py``), never by pytest.
"""

from __future__ import annotations

import gc
import logging
import os
import re
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
for _helpers in (REPO / "tests", REPO / "tests" / "training", REPO / "tests" / "convert"):
    if str(_helpers) not in sys.path:  # session_run, pretrain_helpers, loader_helpers, tiny_models
        sys.path.insert(0, str(_helpers))


@dataclass
class Context:
    """What every check needs to know about this run.

    ``smoke``: CPU, the local backend on both sides of every comparison, fp32, tiny sizes.
    Otherwise: CUDA, Transformer Engine as the candidate backend, bf16.
    """

    smoke: bool
    root: Path  # temporary directory, removed at exit
    peak_tflops: float | None
    min_mfu: float
    gpus: int
    cache: dict = field(default_factory=dict)  # lazily built artefacts shared by checks (data, release, runs)

    @property
    def device(self) -> torch.device:
        return torch.device("cpu") if self.smoke else torch.device("cuda", torch.cuda.current_device())

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32 if self.smoke else torch.bfloat16

    @property
    def backend(self) -> str:
        """The backend under test (the reference side is always the local spec)."""
        return "local" if self.smoke else "te"

    def workdir(self, name: str) -> Path:
        path = self.root / name
        path.mkdir(parents=True, exist_ok=True)
        return path


def build(cfg, ctx: Context, backend: str, seed: int, dtype: torch.dtype | None = None, **config_kw):
    """A freshly initialised ``SoloModel`` (TP=PP=1) on ``ctx.device``, from ``seed``."""
    from megatron.solo.model import build_model, make_transformer_config
    from megatron.solo.parallel import tensor_parallel_seed

    tensor_parallel_seed(seed)
    tc = make_transformer_config(cfg, params_dtype=dtype or ctx.dtype, backend=backend, **config_kw)
    model = build_model(cfg, tc)
    if model.backend != backend:
        raise AssertionError(f"asked for the {backend} backend, got {model.backend}")
    return model.to(ctx.device)


def free() -> None:
    """Give the memory of models the caller has just ``del``-ed back (between big models)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def checkpoint_parameters(model) -> dict[str, torch.nn.Parameter]:
    """Parameters keyed by their checkpoint name: ``TE name[layer]``, the same for the local and the TE spec.

    ``model_sharded_state_dict`` already names tensors the TE way on both backends; the layer comes from
    the module path (``decoder.layers.N.``), which holds for plain sharded tensors and factories alike.
    Raises when a parameter is missing from the checkpoint or an entry is not a parameter.
    """
    from megatron.solo.checkpointing import model_sharded_state_dict

    out: dict[str, torch.nn.Parameter] = {}
    for name, entry in model_sharded_state_dict(model).items():
        data = getattr(entry, "data", None)
        if not isinstance(data, torch.nn.Parameter):
            raise TypeError(f"checkpoint entry {name} ({type(entry).__name__}) is not a parameter")
        layer = _LAYER.search(name)
        key = f"{entry.key}[{layer.group(1)}]" if layer else entry.key
        if key in out:
            raise AssertionError(f"two checkpoint entries map to {key}")
        out[key] = data
    covered = {id(p) for p in out.values()}
    missing = [n for n, p in model.named_parameters() if id(p) not in covered]
    if missing:
        raise AssertionError(f"parameters not in the checkpoint: {missing[:5]}")
    return out


def same_keys(a: dict, b: dict, what: str) -> list[str]:
    if set(a) != set(b):
        raise AssertionError(
            f"{what}: key sets differ: only in the first {sorted(set(a) - set(b))[:5]}, "
            f"only in the second {sorted(set(b) - set(a))[:5]}"
        )
    return sorted(a)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in fp32 (inf when b is zero and a is not)."""
    a, b = a.detach().float(), b.detach().float()
    diff, norm = (a - b).norm().item(), b.norm().item()
    return diff / norm if norm else (0.0 if diff == 0 else float("inf"))


def bitwise_differences(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[str]:
    """Keys whose tensors differ in dtype, shape or any bit."""
    return [
        k
        for k in same_keys(a, b, "tensors")
        if a[k].dtype != b[k].dtype or not torch.equal(a[k].detach().cpu(), b[k].detach().cpu())
    ]


def set_all_parameters(model, value: float) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(value)


class BackendLog(logging.Handler):
    """Keeps Transformer Engine's log lines about the attention backend it chose.

    TE (with ``NVTE_DEBUG=1 NVTE_DEBUG_LEVEL=2`` set before it is imported) logs "Available backends",
    "Selected backend" and "Running with ... backend" through loggers that propagate to the root, where
    this handler sits. Installed first, it also keeps TE from adding its own stderr handler.
    """

    def __init__(self, limit: int = 20):
        super().__init__(level=logging.DEBUG)
        self.lines: list[str] = []
        self.limit = limit

    def emit(self, record: logging.LogRecord) -> None:
        if "backend" not in record.getMessage().lower() or not _is_te_logger(record.name):
            return
        line = f"[{record.name}] {record.getMessage()}"[:500]
        if line not in self.lines and len(self.lines) < self.limit:
            self.lines.append(line)

    def quiet_te(self) -> None:
        """Back to warnings only: level-2 debugging logs every attention call (floods stderr, costs time)."""
        for name in list(logging.root.manager.loggerDict):
            if _is_te_logger(name):
                logging.getLogger(name).setLevel(logging.WARNING)


def _is_te_logger(name: str) -> bool:
    return name.startswith("transformer_engine") or "Attention" in name


_SESSIONS: set[int] = set()  # process groups of the launches still running


def run_in_session(cmd: list[str], *, timeout: float, env: dict[str, str], cwd) -> subprocess.CompletedProcess:
    """``session_run.run_in_session``, remembering the launch's process group so that :func:`kill_sessions`
    can end it when this script itself is stopped."""
    import session_run

    try:
        return session_run.run_in_session(cmd, timeout=timeout, env=env, cwd=cwd, started=_SESSIONS.add)
    finally:
        _SESSIONS.clear()  # one launch at a time: it has ended (or was killed with its group)


def kill_sessions() -> None:
    """SIGKILL every launch still running (their data-loader workers and checkpoint writers included)."""
    for pgid in list(_SESSIONS):
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
