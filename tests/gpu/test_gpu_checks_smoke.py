"""tests/gpu/run_checks.sh on the CPU: every check's code path (--smoke) and the JSON report's shape."""

import json
import os
import sys
from pathlib import Path

import pytest
from session_run import run_in_session

REPO = Path(__file__).resolve().parents[2]
CHECKS = {
    "te_local_parity",
    "checkpoint_local_te",
    "checkpoint_hf_roundtrip",
    "trainer_build",
    "trainer_build_distributed_optimizer",
    "pretrain_kill_resume",
    "tp2_sp_parity",
    "pp2_parity",
    "mfu",
    "environment",
}
NEEDS_TWO_GPUS = {"tp2_sp_parity", "pp2_parity"}


def _env() -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT", "MASTER_ADDR")
    }
    env.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    return env


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_smoke_run_passes_every_check_and_reports_json(tmp_path):
    out = tmp_path / "report.json"
    proc = run_in_session(
        ["bash", str(REPO / "tests/gpu/run_checks.sh"), "--smoke", "--out", str(out)],
        timeout=240,
        env=_env(),
        cwd=tmp_path,
    )  # run_checks.sh finds the repo itself
    assert proc.returncode == 0, f"{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}"
    report = json.loads(proc.stdout)  # stdout holds the report and nothing else
    assert report == json.loads(out.read_text())
    assert report["ok"] is True and report["mode"] == "smoke" and report["fatal"] is None
    assert set(report["checks"]) == CHECKS and not report["failed"]
    assert set(report["not_run"]) == NEEDS_TWO_GPUS
    for name, check in report["checks"].items():
        assert isinstance(check["seconds"], float), name
        if name in NEEDS_TWO_GPUS:
            assert check["ok"] is None and "needs 2 GPUs" in check["status"] and "--only" in check["command"]
        else:
            assert check["ok"] is True, (name, check)

    parity = report["checks"]["te_local_parity"]
    assert parity["head_dim"] == 128 and parity["patches"] > 0
    lengths = parity["document_lengths"]
    assert max(lengths) > parity["sliding_window"] > min(lengths)  # documents longer and shorter than the window
    assert parity["parity"]["logits"] == 0.0  # local vs local in fp32: the same computation
    for control in parity["negative_controls"].values():  # the real figures, far beyond the tolerances
        assert all(control[k] > 10 * parity["tolerance"][k] for k in ("logits", "loss", "grads"))
        assert control["worst_grad"]

    resume = report["checks"]["pretrain_kill_resume"]
    assert resume["killed_returncode"] == -9 and resume["latest_after_kill"] == "2"
    assert resume["resumed_lm_loss"] == {k: resume["reference_lm_loss"][k] for k in ("3", "4")}

    mfu = report["checks"]["mfu"]
    assert [(r["pack"], r["recompute"] is not None) for r in mfu["runs"]] == [
        ("image", False),
        ("image", True),
        ("text", False),
        ("text", True),
    ]
    assert all(r["mfu"] is None and r["tokens_per_s"] > 0 and r["attention_pairs"] > 0 for r in mfu["runs"])
    assert report["checks"]["trainer_build_distributed_optimizer"]["max_abs_drift_from_0.5"] < 1e-2


def test_without_cuda_and_without_smoke_it_refuses_loudly(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the refusal is for machines without it")
    out = tmp_path / "report.json"
    proc = run_in_session(
        [sys.executable, str(REPO / "tests/gpu/gpu_checks.py"), "--out", str(out)], timeout=120, env=_env(), cwd=REPO
    )
    assert proc.returncode != 0
    assert "no CUDA device" in proc.stderr
    report = json.loads(proc.stdout)
    assert report["ok"] is False and "no CUDA device" in report["fatal"] and report["checks"] == {}
    assert json.loads(out.read_text()) == report
