"""Helper processes forked by the trainer die with it (``mcore_fixes.forked_children_die_with_this_process``)."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")

# A parent that forks a child blocked for ten minutes, as megatron-core's writer worker does when its results
# are never read, prints the child's pid, then waits to be killed.
PARENT = textwrap.dedent(
    """
    import multiprocessing as mp, sys, time
    if sys.argv[1] == "tied":
        from megatron.solo.backend.mcore_fixes import forked_children_die_with_this_process
        forked_children_die_with_this_process()
    child = mp.get_context("fork").Process(target=time.sleep, args=(600,))
    child.start()
    print(child.pid, flush=True)
    time.sleep(600)
    """
)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"  # a zombie has died; only its reaping is left


def _child_after_parent_killed(mode: str) -> bool:
    """Start the parent, SIGKILL it, and say whether its child is still alive 5 s later."""
    parent = subprocess.Popen([sys.executable, "-c", PARENT, mode], stdout=subprocess.PIPE, text=True)
    child = None
    try:
        child = int(parent.stdout.readline())
        assert _alive(child)
        parent.kill()
        parent.wait(timeout=30)
        deadline = time.monotonic() + 5
        while _alive(child) and time.monotonic() < deadline:
            time.sleep(0.1)
        return _alive(child)
    finally:
        parent.kill()
        if child is not None and _alive(child):
            os.kill(child, signal.SIGKILL)


@pytest.mark.timeout(120)
def test_children_forked_by_the_trainer_die_with_it():
    assert _child_after_parent_killed("tied") is False


@pytest.mark.timeout(120)
def test_without_it_the_child_outlives_its_parent():
    """The control: the test above would fail if the hook did nothing."""
    assert _child_after_parent_killed("plain") is True
