"""Helpers for the model tests (a module, not a test; imported by name)."""

from pathlib import Path

from session_run import child_env, run_in_session, torchrun_command


def run_torchrun(script: Path, nproc: int, *args: str, timeout: float = 300) -> None:
    """Run ``script`` under torchrun on CPU with a hard timeout (megatron-core hangs are a known trap)."""
    cmd = torchrun_command(script, nproc, *args)
    proc = run_in_session(cmd, timeout=timeout, env=child_env())
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
