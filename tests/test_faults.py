"""The test-only fault hooks: one environment variable, checked names, nothing in production configs."""

import subprocess
import sys

import pytest

from megatron.solo import faults

KILL_AT_2 = (
    "from megatron.solo import faults\nfor i in (1, 2, 3):\n    print(i, flush=True)\n    faults.kill_at('{}', i)\n"
)


@pytest.mark.parametrize("name", sorted(faults.FAULTS))
def test_a_fault_kills_at_its_count_and_only_there(name):
    proc = subprocess.run(
        [sys.executable, "-c", KILL_AT_2.format(name)],
        env=faults.env(name, 2),
        text=True,
        capture_output=True,
        timeout=60,
        start_new_session=True,
    )
    assert proc.returncode == -9 and proc.stdout.split() == ["1", "2"], proc.stderr
    unset = subprocess.run(
        [sys.executable, "-c", KILL_AT_2.format(name)], text=True, capture_output=True, timeout=60, env={}
    )
    assert unset.returncode == 0 and unset.stdout.split() == ["1", "2", "3"], unset.stderr


def test_unknown_faults_are_errors(monkeypatch):
    with pytest.raises(ValueError, match="unknown fault"):
        faults.env("train.kill_at_iteraton", 3)
    monkeypatch.setenv(faults.FAULT_ENV, "train.kill_at_iteraton=3")
    faults._configured.cache_clear()
    try:
        with pytest.raises(ValueError, match="SOLO_FAULT.*kill_at_iteraton"):
            faults.kill_at("train.kill_at_iteration", 1)
    finally:
        faults._configured.cache_clear()
