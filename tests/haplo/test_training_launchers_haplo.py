"""examples/haplo/'s two stage launchers: their --dry-run resolves HaploVL's recipe through SOLO's launcher
machinery and the trainer's own checks (about 5 s each: it imports megatron-core)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(300)
ROOT = Path(__file__).resolve().parents[2]


def dry_run(script: str, tmp_path: Path, **extra: str) -> tuple[subprocess.CompletedProcess, dict[str, str]]:
    env = {
        "PATH": os.environ["PATH"],
        "HOME": str(tmp_path),
        "PYTHON": sys.executable,
        "DATA_ROOT": str(tmp_path / "data"),
        "CKPT_ROOT": str(tmp_path / "ckpt"),
        "PYTHONWARNINGS": "ignore",
        **extra,
    }
    proc = subprocess.run(
        [str(ROOT / "examples" / "haplo" / script), "--dry-run"],
        env=env,
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=180,
    )
    resolved = {}
    for line in proc.stdout.splitlines():
        if ": " in line and not re.fullmatch(r"[A-Z_]+=.*", line):
            name, _, value = line.partition(": ")
            resolved.setdefault(name, value)
    return proc, resolved


def test_stage1_dry_run_is_the_distillation_recipe(tmp_path):
    proc, got = dry_run("stage1_distill.sh", tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert got["model_preset"] == "haplo-vicuna-7b" and got["transformer_impl"] == "local"
    assert got["distill_teacher"] == str(tmp_path / "ckpt" / "clip-vit-large-patch14-336")
    assert (got["train_iters"], got["global_batch_size"], got["pipeline_model_parallel_size"]) == ("40000", "256", "1")
    assert got["bf16"] == "True" and got["sequence_parallel"] == "True"
    weights = [float(w) for w in got["data_path"].split()[0::2]]
    assert len(weights) == 3 and abs(sum(weights) - 1) < 1e-6


def test_stage2_dry_run_is_full_fine_tuning_and_takes_another_llm(tmp_path):
    proc, got = dry_run("stage2_finetune.sh", tmp_path, HAPLO_PRESET="haplo-llama3-8b", SEQ_LENGTH="6144")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert got["distill_teacher"] == "None" and got["loss_averaging"] == "sample" and got["finetune"] == "True"
    assert (got["train_iters"], got["global_batch_size"], got["seq_length"]) == ("30000", "128", "6144")
    assert got["model_preset"] == "haplo-llama3-8b" and got["vocab_size"] == "128256"


def test_stage1_takes_pipeline_parallelism(tmp_path):
    """PP=2 splits the pre-decoder's 24 layers (the LLM does not run in stage 1)."""
    proc, got = dry_run("stage1_distill.sh", tmp_path, PP="2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert got["pipeline_model_parallel_size"] == "2"
