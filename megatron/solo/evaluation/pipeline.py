"""Checkpoint → HF export → lmms-eval: the steps of ``tools/evaluate.py``, as functions.

lmms-eval runs as a subprocess (``python -m lmms_eval --model solo …``, exactly the command a user would type):
its CLI sets up logging, seeds and accelerate process state globally, and a crash in a task's code then
leaves this process and the temporary export's clean-up intact.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
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


def scored_iteration(load: str | os.PathLike, iteration: int | None) -> int | None:
    """The iteration a Megatron checkpoint ``load`` is scored at (``iteration``, else the tracker's; ``None``
    for a release checkpoint); EvaluationSetupError, naming the fix, for what cannot be exported."""
    from megatron.solo.checkpointing import (
        METADATA_FILE,
        RELEASE,
        TRACKER_FILE,
        CheckpointMetadata,
        iteration_dir,
        latest_iteration,
    )

    load = Path(load)
    if not (load / METADATA_FILE).is_file():
        raise EvaluationSetupError(f"{load}: not a SOLO Megatron checkpoint (no {METADATA_FILE})")
    try:
        family = CheckpointMetadata.read(load).model.family
        if iteration is None:
            iteration = latest_iteration(load)
    except (OSError, ValueError) as e:
        raise EvaluationSetupError(str(e)) from None
    if family != "solo":
        raise EvaluationSetupError(f"{load}: a {family} checkpoint; evaluation scores SOLO checkpoints only")
    if not iteration_dir(load, iteration).is_dir():
        have = sorted(p.name for p in load.glob("iter_*")) + ([RELEASE] if (load / RELEASE).is_dir() else [])
        raise EvaluationSetupError(
            f"{load}: no {iteration_dir(load, iteration).name} (--iteration {iteration}; "
            f"{TRACKER_FILE} and the folders give: {', '.join(have) or 'none'})"
        )
    return iteration


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
        model_type = json.loads((load / "config.json").read_text()).get("model_type")
        if model_type != "solo":
            raise EvaluationSetupError(
                f"{load}: an HF export of model_type {model_type!r}; evaluation scores SOLO exports (model_type "
                "'solo', tools/convert_checkpoint.py megatron-to-hf) only"
            )
        yield load
        return
    if not is_megatron_checkpoint(load):
        inside = load.name.startswith("iter_") or load.name == "release"
        raise EvaluationSetupError(
            f"{load}: neither an HF export (no config.json) nor a Megatron checkpoint "
            "(no latest_checkpointed_iteration.txt or iter_* directory)"
            + (f"; an iteration's folder: pass --load {load.parent} --iteration N" if inside else "")
        )
    iteration = scored_iteration(load, iteration)
    from megatron.solo.backend import install_cpu_backend_if_needed
    from megatron.solo.convert.checkpoint import megatron_to_hf_checkpoint

    install_cpu_backend_if_needed()
    tmp = Path(tempfile.mkdtemp(prefix="solo-eval-export-", dir=work_dir))
    try:
        yield megatron_to_hf_checkpoint(load, tmp / "hf", iteration=iteration)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def installed_lmms_eval_version() -> str | None:
    try:
        return importlib.metadata.version("lmms-eval")
    except importlib.metadata.PackageNotFoundError:
        return None


def check_lmms_eval_version() -> None:
    """Refuse an lmms-eval other than the pinned one: scoring relies on its conventions (multiple choice takes
    the smallest value a model returns, hence the negative log-likelihood)."""
    have = installed_lmms_eval_version()
    if have != LMMS_EVAL_VERSION:
        raise EvaluationSetupError(
            f"lmms-eval {have or '(no package metadata)'} is installed; this evaluation is written and tested for "
            f"lmms-eval=={LMMS_EVAL_VERSION} (its multiple-choice convention differs between releases): "
            f"pip install --no-deps lmms-eval=={LMMS_EVAL_VERSION}"
        )


def check_environment() -> None:
    """Refuse to start where lmms-eval cannot run, naming the fix: lmms-eval missing, or a torchvision that does
    not load beside this torch (PyPI's CUDA wheel beside the CPU torch), which breaks ``import transformers``."""
    if importlib.util.find_spec("lmms_eval") is None:
        raise EvaluationSetupError(f"lmms-eval is not installed: {INSTALL_HINT}")
    check_lmms_eval_version()
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


def fresh_run_dir(root: str | os.PathLike) -> Path:
    """A new, empty folder under ``root`` for one lmms-eval run, so that only this run's results are read."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=time.strftime("run-%Y%m%d-%H%M%S-"), dir=root))


def run_lmms(cmd: Sequence[str], log_path: str | os.PathLike, *, offline: bool = False) -> None:
    """Run ``cmd``, its output to the console and ``log_path``; raises CalledProcessError on failure.

    ``offline``: datasets and models only from local files (HF_HUB_OFFLINE, HF_DATASETS_OFFLINE). The child
    runs in its own process group, killed whole if this function is left early (an exception, or SystemExit
    from a signal: tools/evaluate.py turns SIGTERM/SIGHUP into one). lmms-eval 0.7.3 exits 0 after most
    failures ("Error during evaluation"), so a zero exit proves nothing: read the results with
    :func:`megatron.solo.evaluation.results.read_lmms_results` and check them.
    """
    env = dict(os.environ)
    if offline:
        env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    with open(log_path, "w", encoding="utf-8") as log:
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True
        )
        try:
            for line in proc.stdout:
                sys.stdout.write(line)
                sys.stdout.flush()
                log.write(line)
            proc.wait()
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # its group: lmms-eval's own workers too
            proc.wait()
            raise
    if proc.returncode != 0:
        raise subprocess.CalledProcessError(proc.returncode, list(cmd))


@contextlib.contextmanager
def exit_on_termination(code: int = 143) -> Iterator[None]:
    """SIGTERM and SIGHUP raise ``SystemExit(code)`` meanwhile, so ``finally`` blocks and context managers run
    (the default handlers end the process at once: the temporary export and the lmms-eval child would stay)."""

    def handler(signum, frame):
        sys.exit(code)

    old = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)


__all__ = [
    "EvaluationSetupError",
    "INSTALL_HINT",
    "check_environment",
    "check_lmms_eval_version",
    "exit_on_termination",
    "fresh_run_dir",
    "hf_model_dir",
    "installed_lmms_eval_version",
    "is_hf_export",
    "is_megatron_checkpoint",
    "lmms_command",
    "run_lmms",
    "scored_iteration",
]
