"""The demos' shared shell (examples/demo_common.sh): arguments and the output directory, for every script
that sources it."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DEMOS = {  # script → the variable that moves its outputs
    "examples/solo/demo.sh": "DEMO_DIR",
    "examples/haplo/demo.sh": "HAPLO_DEMO_DIR",
    "examples/solo/demo_ablation.sh": "ABLATION_DIR",
}


def _run(script: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHON": sys.executable, **env}  # this Python has everything: nothing installs
    return subprocess.run(["bash", script, *args], cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("script", ["examples/solo/demo.sh", "examples/haplo/demo.sh"])
def test_an_unknown_argument_is_refused_before_anything_runs(script):
    proc = _run(script, "--smok")
    assert proc.returncode == 2 and "unknown argument --smok" in proc.stderr


@pytest.mark.parametrize("script", sorted(DEMOS))
def test_a_folder_that_is_not_the_demos_is_left_alone(script, tmp_path):
    keep = tmp_path / "mine" / "notes.txt"
    keep.parent.mkdir()
    keep.write_text("not the demo's")
    proc = _run(script, **{DEMOS[script]: str(keep.parent)})
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "refusing to replace it" in proc.stderr and DEMOS[script] in proc.stderr
    assert keep.read_text() == "not the demo's" and sorted(keep.parent.iterdir()) == [keep]
