"""Fault injection for the tests only: kill a process at a chosen point, to test resume and clean-up.

Never set in production: no configuration class or flag carries these. One environment variable, read
once per process, names the faults::

    SOLO_FAULT=train.kill_at_iteration=3                 # pretrain_solo.py: SIGKILL its process group after it 3
    SOLO_FAULT=preprocess.kill_after_packs=5             # preprocessing: SIGKILL the driver after writing pack 5

(several: comma-separated). An unknown name is an error, so a misspelt fault never silently does nothing.
"""

from __future__ import annotations

import functools
import os
import signal

FAULT_ENV = "SOLO_FAULT"

# name → what dies: the process group (a job killed with its data-loader workers and checkpoint writer, no
# clean-up at all) or this process only (its workers are left to notice, as after an OOM kill).
FAULTS = {
    "train.kill_at_iteration": "group",
    "preprocess.kill_after_packs": "process",
}


def env(name: str, count: int) -> dict[str, str]:
    """``{FAULT_ENV: "name=count"}``, to add to a child process's environment."""
    if name not in FAULTS:
        raise ValueError(f"unknown fault {name!r}; known: {sorted(FAULTS)}")
    return {FAULT_ENV: f"{name}={count}"}


@functools.cache
def _configured() -> dict[str, int]:
    """The faults set for this process (parsed once)."""
    out = {}
    for item in filter(None, (part.strip() for part in os.environ.get(FAULT_ENV, "").split(","))):
        name, sep, value = item.partition("=")
        if not sep or name not in FAULTS:
            raise ValueError(f"${FAULT_ENV}: {item!r} is not NAME=COUNT with NAME one of {sorted(FAULTS)}")
        out[name] = int(value)
    return out


def kill_at(name: str, count: int) -> None:
    """SIGKILL (no clean-up, as an OOM killer or a failed node) when fault ``name`` is set to ``count``."""
    if _configured().get(name) != count:
        return
    if FAULTS[name] == "group":
        os.killpg(os.getpgid(0), signal.SIGKILL)
    os.kill(os.getpid(), signal.SIGKILL)
