"""Prove the GPU path in one command: ``bash tests/gpu/run_checks.sh [--out FILE] [--only a,b] [--smoke]``.

Runs every check in ``CHECKS`` (each returns a dict of figures with ``"ok"``; an exception is recorded and
the rest still run) and prints one JSON report on stdout, also written to ``--out`` after every check (so a
run cut short by the outer timeout still leaves what it finished). Exit code 0 only if every check that ran
passed; a check that needs more GPUs than the machine has says "not run" and gives the command to run it.

Without ``--smoke`` it needs CUDA and Transformer Engine and refuses to start otherwise. ``--smoke`` runs the
same code paths on the CPU: the local backend on both sides of every comparison, fp32, tiny sizes, and no
MFU (there is no peak to compare with). See docs/gpu_checks.md.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import shutil
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path

MODULES_NEEDED = {
    "skimage": "scikit-image",
    "mistral_common": "mistral-common",
    "transformers": "transformers",
    "safetensors": "safetensors",
}
ORDER = (
    "te_local_parity",
    "checkpoint_local_te",
    "checkpoint_hf_roundtrip",
    "trainer_build",
    "trainer_build_distributed_optimizer",
    "pretrain_kill_resume",
    "tp2_sp_parity",
    "pp2_parity",
    "mfu",
    "environment",
)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="gpu_checks.json", help="where the JSON report is written (also on stdout)")
    p.add_argument("--smoke", action="store_true", help="CPU, local backend, fp32, tiny sizes (CI)")
    p.add_argument("--only", help=f"comma-separated subset of: {', '.join(ORDER)}")
    p.add_argument("--peak-tflops", type=float, help="dense bf16 peak per GPU (default: from the GPU's name)")
    p.add_argument("--min-mfu", type=float, default=0.2, help="the MFU check fails below this (GPU runs)")
    p.add_argument("--keep-tmp", action="store_true", help="keep the temporary directory (debugging)")
    args = p.parse_args(argv)
    if args.only:
        unknown = sorted(set(args.only.split(",")) - set(ORDER))
        if unknown:
            p.error(f"--only: unknown check(s) {', '.join(unknown)}; choose from {', '.join(ORDER)}")
    return args


def prepare_environment(smoke: bool) -> None:
    """Before torch and TE are imported: hide GPUs in smoke mode, ask TE to log its attention backend."""
    if smoke:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    else:
        os.environ.setdefault("NVTE_DEBUG", "1")
        os.environ.setdefault("NVTE_DEBUG_LEVEL", "2")
    os.environ.setdefault("PYTHONWARNINGS", "ignore")


def preflight(smoke: bool) -> str | None:
    """Why this run cannot start (a message), or None."""
    missing = [pip for module, pip in MODULES_NEEDED.items() if importlib.util.find_spec(module) is None]
    if missing:
        return f"missing Python packages: pip install {' '.join(missing)}"
    if smoke:
        return None
    import torch

    if not torch.cuda.is_available():
        return "no CUDA device: the GPU checks need one (use --smoke for the CPU code-path test)"
    if importlib.util.find_spec("transformer_engine") is None:
        return "transformer_engine is not installed: run inside the project's Docker image (NGC PyTorch)"
    return None


def environment(ctx, backend_log) -> dict:
    """Versions, the GPU, and the attention backend TE logged (informational; captured by the parity check)."""
    import torch
    from megatron.core import __version__ as mcore

    te = None
    if importlib.util.find_spec("transformer_engine") is not None:
        import transformer_engine

        te = transformer_engine.__version__
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    info = {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
        "transformer_engine": te,
        "megatron_core": mcore,
        "gpu": gpu,
        "gpus": ctx.gpus,
        "nvidia_pytorch_container": os.environ.get("NVIDIA_PYTORCH_VERSION"),
        "te_attention_backend": backend_log.lines or (None if ctx.smoke else "not reported by TE"),
    }
    problems = [] if mcore == "0.16.1" else [f"megatron-core {mcore}, the project pins 0.16.1"]
    if not ctx.smoke:
        if te is None or int(te.split(".")[0]) < 2:
            problems.append(f"Transformer Engine {te}: 2.x expected")
        if info["cudnn"] is None:
            problems.append("cuDNN not available to torch")
    return {"ok": not problems, "problems": problems, **info}


def registry(ctx, backend_log) -> dict:
    """name → zero-argument callable; imported lazily so that preflight failures stay cheap."""
    from checks_mfu import check_mfu
    from checks_model import check_checkpoint_hf, check_checkpoint_local_te, check_te_local_parity, check_trainer_build
    from checks_training import check_kill_resume, check_layout

    return {
        "te_local_parity": lambda: check_te_local_parity(ctx, backend_log),
        "checkpoint_local_te": lambda: check_checkpoint_local_te(ctx),
        "checkpoint_hf_roundtrip": lambda: check_checkpoint_hf(ctx),
        "trainer_build": lambda: check_trainer_build(ctx, distributed_optimizer=False),
        "trainer_build_distributed_optimizer": lambda: check_trainer_build(ctx, distributed_optimizer=True),
        "pretrain_kill_resume": lambda: check_kill_resume(ctx),
        "tp2_sp_parity": lambda: check_layout(
            ctx, "tp2_sp_parity", ["--tensor-model-parallel-size", "2", "--sequence-parallel"]
        ),
        "pp2_parity": lambda: check_layout(ctx, "pp2_parity", ["--pipeline-model-parallel-size", "2"]),
        "mfu": lambda: check_mfu(ctx),
        "environment": lambda: environment(ctx, backend_log),
    }


def run_check(fn) -> dict:
    """The check's dict, or the exception it raised; always with ``ok`` and ``seconds``."""
    start = time.monotonic()
    try:
        result = fn()
        if not isinstance(result, dict) or "ok" not in result:
            raise TypeError(f"a check must return a dict with 'ok', got {type(result).__name__}")
    except Exception as err:  # noqa: BLE001 - recorded in the report; the other checks still run
        lines = traceback.format_exc().rstrip().splitlines()
        result = {
            "ok": False,
            "error": {"type": type(err).__name__, "message": str(err)[-4000:], "traceback": lines[-15:]},
        }
    result["seconds"] = round(time.monotonic() - start, 2)
    return result


def jsonable(value):
    """JSON without NaN/inf (written as strings) and with dtypes, paths, tuples made plain."""
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if value is None or isinstance(value, (bool, int, str)):
        return value
    return str(value)


def make_report(mode: str, checks: dict, started: float, fatal: str | None = None) -> dict:
    failed = [n for n, c in checks.items() if c["ok"] is False]
    not_run = [n for n, c in checks.items() if c["ok"] is None]
    return jsonable(
        {
            "ok": fatal is None and bool(checks) and not failed,
            "mode": mode,
            "fatal": fatal,
            "seconds": round(time.monotonic() - started, 2),
            "passed": [n for n, c in checks.items() if c["ok"] is True],
            "failed": failed,
            "not_run": not_run,
            "checks": checks,
        }
    )


def write_report(report: dict, out: str) -> None:
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(tmp, path)


def run_all(args) -> dict:
    """Every selected check in order; the report after each one goes to ``--out``."""
    import logging

    from gpu_common import BackendLog, Context

    backend_log = BackendLog()
    logging.getLogger().addHandler(backend_log)  # before TE is imported (by megatron-core, below)
    import torch

    from megatron.solo.backend import install_cpu_backend_if_needed
    from megatron.solo.parallel import initialize_model_parallel

    install_cpu_backend_if_needed()  # the entry point's job (a no-op with CUDA), as in pretrain_solo.py
    initialize_model_parallel(1, 1, seed=1234)
    started, mode = time.monotonic(), "smoke" if args.smoke else "gpu"
    selected = args.only.split(",") if args.only else list(ORDER)
    checks: dict[str, dict] = {}
    tmp = Path(tempfile.mkdtemp(prefix="solo-gpu-checks-"))
    try:
        ctx = Context(
            smoke=args.smoke,
            root=tmp,
            peak_tflops=args.peak_tflops,
            min_mfu=args.min_mfu,
            gpus=0 if args.smoke else torch.cuda.device_count(),
        )
        table = registry(ctx, backend_log)
        for name in (n for n in ORDER if n in selected):
            print(f"[gpu_checks] {name} ...", file=sys.stderr, flush=True)
            checks[name] = run_check(table[name])
            if backend_log.lines:
                backend_log.quiet_te()  # TE has said which backend it chose; no need for its debug flood
            print(
                f"[gpu_checks] {name}: ok={checks[name]['ok']} ({checks[name]['seconds']} s)",
                file=sys.stderr,
                flush=True,
            )
            write_report(make_report(mode, checks, started), args.out)
    finally:
        if args.keep_tmp:
            print(f"[gpu_checks] kept {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return make_report(mode, checks, started)


def stop_on_sigterm() -> None:
    """``timeout`` (run_checks.sh) sends SIGTERM: end the launched trainers too, and remove the temporary
    directory on the way out (the report of the checks finished so far is already in ``--out``)."""

    def handler(signum, _frame):
        from gpu_common import kill_sessions

        kill_sessions()
        print("gpu_checks: stopped (SIGTERM, probably the 480 s timeout); partial report in --out", file=sys.stderr)
        sys.exit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


def main(argv=None) -> int:
    args = parse_args(argv)
    prepare_environment(args.smoke)
    stop_on_sigterm()
    stdout = os.fdopen(os.dup(1), "w")  # the report's channel; fd 1 itself goes to stderr while checks run
    os.dup2(2, 1)
    started = time.monotonic()
    fatal = preflight(args.smoke)
    if fatal:
        print(f"gpu_checks: cannot run: {fatal}", file=sys.stderr)
        report = make_report("smoke" if args.smoke else "gpu", {}, started, fatal=fatal)
    else:
        report = run_all(args)
    write_report(report, args.out)
    sys.stdout.flush()
    stdout.write(json.dumps(report, indent=2) + "\n")
    stdout.flush()
    return 0 if report["ok"] else (2 if fatal else 1)


if __name__ == "__main__":
    sys.exit(main())
