"""HaploModel: TP=2, TP=2+SP and PP=2 ≡ TP=1 for losses, logits and gradients of every part (stem,
pre-decoder, connector, LLM), in both stages (stage 1 also at TP=2+SP × PP=2, on 4 ranks); a TP=2
checkpoint loads at TP=1, a stage-1 PP=2 one at PP=1 into either stage (gloo ranks under torchrun)."""

import json
from pathlib import Path

import pytest
from session_run import child_env, run_in_session, torchrun_command

pytestmark = pytest.mark.timeout(400)


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("haplo_parallel")
    cmd = torchrun_command(Path(__file__).with_name("parallel_checks_haplo.py"), 2, "--out", str(out))
    proc = run_in_session(cmd, timeout=360, env=child_env())
    assert proc.returncode == 0, f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stderr[-6000:]}"
    return json.loads((out / "results.json").read_text())


def test_reference_has_targets(results):
    (loss0, count0), (loss1, count1) = results["reference_loss"]
    assert count0 > 0 and count1 > 0 and loss0 > 0 and loss1 > 0


@pytest.mark.parametrize("layout", ["tp2", "tp2_sp", "tp2_sp_targets"])
def test_tensor_parallel_matches_tp1(results, layout):
    got = results[layout]
    assert got["loss"] < 1e-6 * 250 and got["logits"] < 1e-5, got  # fp32 reduction-order noise
    grads = {name: diff for name, diff in got.items() if name.startswith("grad")}
    assert len(grads) == 11
    assert all(diff < 2e-5 for diff in grads.values()), grads


@pytest.mark.parametrize("layout", ["pp2", "pp2_targets"])
def test_pipeline_parallel_matches_pp1(results, layout):
    got = results[layout]  # stage 0: stem, pre-decoder, connector, LLM layer 0; stage 1: LLM layer 1, loss
    assert got["loss"] < 1e-6 * 250, got
    grads = {name: diff for name, diff in got.items() if name.startswith("grad")}
    assert len(grads) == 11 and all(diff < 1e-6 for diff in grads.values()), grads


def test_checkpoint_saved_at_tp2_loads_at_tp1(results):
    assert results["tp2_saved_tp1_loaded"]["logits"] < 1e-6


@pytest.mark.parametrize("layout", ["s1_tp2", "s1_tp2_sp"])
def test_stage1_tensor_parallel_matches_tp1(results, layout):
    """Distillation: heads on the gathered sequence, vocab-parallel text targets and current-token CE."""
    stage1 = results["stage1"]
    assert all(loss > 0 and count > 0 for loss, count in stage1["reference_loss"])
    got = stage1[layout]
    assert got["loss"] < 1e-6 * 250, got
    grads = {name: diff for name, diff in got.items() if name.startswith("grad")}
    assert len(grads) == 7 and all(diff < 2e-5 for diff in grads.values()), grads


def test_stage1_pipeline_parallel_matches_pp1(results):
    """Stage 1 at PP=2 splits the pre-decoder (one layer a stage): embeddings and stem first, heads last."""
    got = results["stage1"]["s1_pp2"]
    assert got["layers per stage"] == [1, 1]
    assert got["first stage has no heads"] and got["last stage has no stem"]
    assert got["LLM frozen on stage 0"] and got["LLM frozen on stage 1"]  # its layers live on both stages
    assert got["loss"] < 1e-6 * 250, got
    grads = {name: diff for name, diff in got.items() if name.startswith("grad")}
    assert len(grads) == 7 and all(diff < 1e-6 for diff in grads.values()), grads


def test_stage1_pp2_checkpoint_loads_at_pp1_into_both_stages(results):
    got = results["stage1"]["s1_pp2"]
    stage1, stage2 = got["s1_pp2_to_s1_pp1"], got["s1_pp2_to_s2_pp1"]
    assert stage1["weights"] == 0.0 and stage2["weights"] == 0.0, got
    assert stage1["params"] > stage2["params"]  # the heads and text targets stay behind in stage 2


def test_stage1_tp2_sp_inside_pp2_matches_tp1(tmp_path):
    """4 ranks (about 30 s on 2 cores): TP=2 + SP inside each of the PP=2 stages of a split pre-decoder."""
    script = Path(__file__).with_name("parallel_checks_haplo.py")
    cmd = torchrun_command(script, 4, "--out", str(tmp_path), "--stage1-tp2-pp2")
    proc = run_in_session(cmd, timeout=360, env=child_env())
    assert proc.returncode == 0, f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stderr[-6000:]}"
    got = json.loads((tmp_path / "results.json").read_text())["stage1"]["s1_tp2_sp_pp2"]
    assert got["layers per stage"] == [1, 1, 1, 1]  # per rank: TP ranks of a stage hold the same layer
    assert got["LLM frozen on stage 0"] and got["LLM frozen on stage 1"]
    assert got["first stage has no heads"] and got["last stage has no stem"]
    assert got["loss"] < 1e-6 * 250, got
    grads = {name: diff for name, diff in got.items() if name.startswith("grad")}
    assert len(grads) == 7 and all(diff < 2e-5 for diff in grads.values()), grads
    assert got["s1_pp2_to_s1_pp1"]["weights"] == 0.0 and got["s1_pp2_to_s2_pp1"]["weights"] == 0.0
