"""The HaploVL miniature end to end (``examples/haplo/demo.sh --smoke``): every step connects, and the report's
two held-out accuracies are the runs' own (recomputed from the per-question answers, whose scores are
recomputed from the saved checkpoints).

The full miniature (``bash examples/haplo/demo.sh``) is a command, not a test: its figures are in the README.
"""

import json
import os
import sys
from pathlib import Path

import pytest
from session_run import run_in_session

ROOT = Path(__file__).resolve().parents[2]
RUNS = ("with stage 1", "without stage 1")
ITERS = 6
pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("haplo-demo") / "run"
    env = {**os.environ, "HAPLO_DEMO_DIR": str(out), "PYTHON": sys.executable}  # this Python has everything
    proc = run_in_session(["bash", "examples/haplo/demo.sh", "--smoke"], timeout=840, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-6000:]
    return out, proc.stdout + proc.stderr


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def test_every_step_ran(smoke):
    out, log = smoke
    steps = ["data", "teacher", "preprocess", "start", "stage1", "stage2_with_stage1", "stage2_without_stage1"]
    assert [line.split()[0] for line in (out / "timings.txt").read_text().splitlines()] == steps
    for name in ("labels", "captions", "text", "sft"):
        stats = json.loads((out / "data" / f"{name}.stats.json").read_text())
        assert stats["packs"] > 0 and stats["skipped"] == {}, (name, stats)
    assert (out / "teacher" / "config.json").is_file()
    for name in ("stage1", "with_stage1", "without_stage1"):
        assert (out / "ckpt" / name / "latest_checkpointed_iteration.txt").is_file()
        assert [m["iteration"] for m in read_jsonl(out / f"{name}.metrics.jsonl")] == list(range(1, ITERS + 1))
    assert (out / "loss_curves.png").stat().st_size > 10_000


def test_report_has_both_accuracies_from_the_runs(smoke):
    out, log = smoke
    report = json.loads((out / "report.json").read_text())
    text = (out / "report.md").read_text()
    assert [r["name"] for r in report["runs"]] == list(RUNS)
    for run in report["runs"]:
        rows = read_jsonl(out / run["answers"])
        assert rows and all(r["predicted"] == r["candidates"][_argmax(r["scores"])] for r in _with_candidates(rows))
        accuracy = sum(r["predicted"] == r["answer"] for r in rows) / len(rows)
        assert run["accuracy"] == pytest.approx(accuracy)
        assert f"| {run['name']} | **{100 * accuracy:.1f}%** of {len(rows)} |" in text
        metrics = read_jsonl(out / f"{Path(run['checkpoint']).name}.metrics.jsonl")
        assert run["losses"]["lm"] == pytest.approx([metrics[0]["lm_loss"], metrics[-1]["lm_loss"]])
    assert "held-out accuracy" in log


def test_stored_scores_are_the_checkpoints(smoke):
    """A question's candidate scores, recomputed here from each run's checkpoint, are the stored ones; the two
    runs' checkpoints differ (their scores do)."""
    sys.path.insert(0, str(ROOT / "tools"))
    import haplo_demo

    out, _ = smoke
    report = json.loads((out / "report.json").read_text())
    stored = []
    for run in report["runs"]:
        first = read_jsonl(out / run["answers"])[0]
        question = {k: first[k] for k in ("image", "kind", "question", "answer")}
        answers, scores = haplo_demo.evaluate_run(run["checkpoint"], [question])
        assert answers == [first["predicted"]]
        assert scores[0] == pytest.approx(first["scores"], abs=1e-4)
        stored.append(first["scores"])
    assert stored[0] != pytest.approx(stored[1], abs=1e-3)


def _with_candidates(rows):
    from megatron.solo.demo.likelihood import CANDIDATES

    return [{**r, "candidates": CANDIDATES[r["kind"]]} for r in rows]


def _argmax(values):
    return max(range(len(values)), key=values.__getitem__)
