"""Run a command in a session of its own, under a hard timeout (shared by the multi-process tests).

On timeout the whole process group is killed: trainers, data-loader workers and checkpoint writers that
would otherwise hold the output pipes open, so a hang (a known megatron-core trap) never outlives its test.
"""

from __future__ import annotations

import os
import signal
import subprocess


def run_in_session(cmd: list[str], *, timeout: float, env: dict[str, str] | None = None,
                   cwd=None) -> subprocess.CompletedProcess:
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        raise AssertionError(f"{' '.join(map(str, cmd))} timed out after {timeout} s:\n{stdout[-3000:]}\n"
                             f"{stderr[-5000:]}") from None
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)
