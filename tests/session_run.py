"""Running the tests' child processes (a module shared by the test folders, imported by name).

:func:`run_in_session` runs a command in a session of its own under a hard timeout; on timeout the whole
process group is killed: trainers, data-loader workers and checkpoint writers that would otherwise hold the
output pipes open, so a hang (a known megatron-core trap) never outlives its test. :func:`child_env` and
:func:`free_port` are what every multi-process launch needs.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT", "MASTER_ADDR")


def child_env(**extra: str) -> dict[str, str]:
    """This environment without a launcher's rank variables (a child forms its own world), one thread per
    process (the CI machine has two cores), warnings off; plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARIABLES}
    env.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", **extra)
    return env


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun_command(script: str | Path, nproc: int, *args: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        f"--master_port={free_port()}",
        str(script),
        *map(str, args),
    ]


def run_in_session(
    cmd: list[str], *, timeout: float, env: dict[str, str] | None = None, cwd=None, started=None
) -> subprocess.CompletedProcess:
    """``started(pid)``, if given, is called once the session exists (its process-group id is ``pid``)."""
    proc = subprocess.Popen(
        cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    if started is not None:
        started(proc.pid)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        raise AssertionError(
            f"{' '.join(map(str, cmd))} timed out after {timeout} s:\n{stdout[-3000:]}\n{stderr[-5000:]}"
        ) from None
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)
