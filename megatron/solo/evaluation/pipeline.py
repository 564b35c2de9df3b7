"""Checkpoint → HF export → lmms-eval: the steps of ``tools/evaluate.py``, as functions.

lmms-eval runs as a subprocess (``python -m lmms_eval --model solo …``, exactly the command a user would type):
its CLI sets up logging, seeds and accelerate process state globally, and a crash in a task's code then
leaves this process and the temporary export's clean-up intact.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

from megatron.solo.evaluation import LMMS_EVAL_VERSION

INSTALL_HINT = f'pip install -e ".[eval]" && pip install --no-deps lmms-eval=={LMMS_EVAL_VERSION}'


class EvaluationSetupError(RuntimeError):
    """The environment or the arguments cannot run an evaluation; the message says how to fix it."""


def is_hf_export(path: str | os.PathLike) -> bool:
    return (Path(path) / "config.json").is_file()


def is_megatron_checkpoint(path: str | os.PathLike) -> bool:
    path = Path(path)
    return (path / "latest_checkpointed_iteration.txt").is_file() or any(path.glob("iter_*"))


@contextlib.contextmanager
def hf_model_dir(
    load: str | os.PathLike, iteration: int | None = None, work_dir: str | os.PathLike | None = None
) -> Iterator[Path]:
    """``load`` itself when it is an HF export; a Megatron checkpoint (``iteration`` or the latest) converted to
    a temporary export under ``work_dir`` (default: the system's), removed on exit whatever happens."""
    load = Path(load)
    if is_hf_export(load):
        if iteration is not None:
            raise EvaluationSetupError(f"--iteration applies to Megatron checkpoints; {load} is an HF export")
        yield load
        return
    if not is_megatron_checkpoint(load):
        raise EvaluationSetupError(
            f"{load}: neither an HF export (no config.json) nor a Megatron checkpoint "
            "(no latest_checkpointed_iteration.txt or iter_* directory)"
        )
    from megatron.solo.backend import install_cpu_backend_if_needed
    from megatron.solo.convert.checkpoint import megatron_to_hf_checkpoint

    install_cpu_backend_if_needed()
    tmp = Path(tempfile.mkdtemp(prefix="solo-eval-export-", dir=work_dir))
    try:
        out = megatron_to_hf_checkpoint(load, tmp / "hf", iteration="latest" if iteration is None else iteration)
        yield out
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def check_environment() -> None:
    """Refuse to start where lmms-eval cannot run, naming the fix: lmms-eval missing, or a torchvision that does
    not load beside this torch (PyPI's CUDA wheel beside the CPU torch), which breaks ``import transformers``."""
    if importlib.util.find_spec("lmms_eval") is None:
        raise EvaluationSetupError(f"lmms-eval is not installed: {INSTALL_HINT}")
    if importlib.util.find_spec("torchvision") is not None:
        probe = subprocess.run(
            [sys.executable, "-c", "import torchvision"], capture_output=True, text=True, timeout=120, check=False
        )
        if probe.returncode != 0:
            last = (probe.stderr.strip().splitlines() or ["?"])[-1]
            raise EvaluationSetupError(
                f"torchvision is installed but does not load beside this torch ({last}); transformers imports it "
                "when present and then fails. Nothing here needs torchvision: `pip uninstall -y torchvision` "
                "(or install the torchvision built for this torch)."
            )


def lmms_command(
    model_dir: str | os.PathLike,
    tasks: Sequence[str],
    output_path: str | os.PathLike,
    *,
    template: str = "mistral",
    batch_size: int = 8,
    limit: int | None = None,
    include_path: str | os.PathLike | None = None,
    device: str | None = None,
    extra_model_args: Sequence[str] = (),
) -> list[str]:
    """The ``python -m lmms_eval --model solo …`` command line."""
    if not tasks:
        raise EvaluationSetupError("--tasks: give at least one task")
    model_args = [f"pretrained={Path(model_dir).resolve()}", f"template={template}", *extra_model_args]
    if any("," in a for a in model_args):
        raise EvaluationSetupError(f"model arguments must not contain commas: {model_args}")
    cmd = [sys.executable, "-m", "lmms_eval", "--model", "solo", "--model_args", ",".join(model_args)]
    cmd += ["--tasks", ",".join(tasks), "--batch_size", str(batch_size), "--output_path", str(output_path)]
    cmd += ["--log_samples"]
    if limit is not None:
        cmd += ["--limit", str(limit)]
    if include_path is not None:
        cmd += ["--include_path", str(Path(include_path).resolve())]
    if device is not None:
        cmd += ["--device", device]
    return cmd


def run_lmms(cmd: Sequence[str], log_path: str | os.PathLike, *, offline: bool = False) -> None:
    """Run ``cmd``, its output to the console and ``log_path``; raises CalledProcessError on failure.

    ``offline``: datasets and models only from local files (HF_HUB_OFFLINE, HF_DATASETS_OFFLINE).
    """
    env = dict(os.environ)
    if offline:
        env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    with open(log_path, "w", encoding="utf-8") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        try:
            for line in proc.stdout:
                sys.stdout.write(line)
                log.write(line)
            proc.wait()
        except BaseException:
            proc.kill()
            proc.wait()
            raise
    if proc.returncode != 0:
        raise subprocess.CalledProcessError(proc.returncode, list(cmd))


__all__ = [
    "EvaluationSetupError",
    "INSTALL_HINT",
    "check_environment",
    "hf_model_dir",
    "is_hf_export",
    "is_megatron_checkpoint",
    "lmms_command",
    "run_lmms",
]
