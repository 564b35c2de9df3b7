"""The demo end to end in miniature (``examples/solo/demo.sh --smoke``): every step connects, the loss falls.

The full demo (``bash examples/solo/demo.sh``) is a command, not a test: its figures are in the README.
"""

import json
import math
import os
import sys
from pathlib import Path

import pytest
from session_run import run_in_session

from megatron.solo.demo import scenes

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "run"
    env = {
        **os.environ,
        "DEMO_DIR": str(out),
        "PYTHON": sys.executable,  # this Python has everything (the demo and eval extras): no install
    }
    proc = run_in_session(["bash", "examples/solo/demo.sh", "--smoke"], timeout=840, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-6000:]
    return out, proc.stdout + proc.stderr


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def test_every_step_ran_and_wrote_its_outputs(smoke):
    out, log = smoke
    for step in ("data", "preprocess", "stage1", "stage2", "sft", "lmms", "evaluate"):
        assert f"demo: {step}" in log
    for name in ("labels", "captions", "text", "sft"):
        stats = json.loads((out / "data" / f"{name}.stats.json").read_text())
        assert stats["packs"] > 0 and stats["skipped"] == {}, (name, stats)
    assert json.loads((out / "data" / "labels.stats.json").read_text())["input_format"] == "imagenet"
    assert json.loads((out / "data" / "sft.stats.json").read_text())["input_format"] == "sft"
    for stage in ("stage1", "stage2", "sft"):
        assert (out / "ckpt" / stage / "latest_checkpointed_iteration.txt").is_file()
    assert (out / "loss_curves.png").stat().st_size > 10_000
    assert "SOLO CPU demo: report" in (out / "report.txt").read_text()
    assert [line.split()[0] for line in (out / "timings.txt").read_text().splitlines()] == [
        "data",
        "preprocess",
        "stage1",
        "stage2",
        "sft",
        "lmms",
    ]


def test_each_stage_starts_from_the_last_and_the_losses_fall(smoke):
    out, log = smoke
    assert f"weights of {out / 'ckpt' / 'stage1'} (iteration 16)" in log  # stage 2 says where it starts
    assert f"weights of {out / 'ckpt' / 'stage2'} (iteration 16)" in log  # and SFT
    for stage in ("stage1", "stage2"):
        losses = [m["lm_loss"] for m in read_jsonl(out / f"{stage}.metrics.jsonl")]
        assert len(losses) >= 6
        head, tail = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
        assert tail < 0.9 * head, (stage, losses)
    # SFT's few steps of one pack are too noisy to show a trend: it ran, from stage 2, with per-sample means
    sft = read_jsonl(out / "sft.metrics.jsonl")
    assert len(sft) == 8 and all(math.isfinite(m["lm_loss"]) for m in sft)
    assert all(m["target_tokens"] > m["samples"] > 0 for m in sft)  # several samples per pack, each one mean


def test_report_scores_every_heldout_image(smoke):
    out, _ = smoke
    report = json.loads((out / "report.json").read_text())
    assert report["stage1_labels"]["n"] == len(scenes.classes())  # one held-out image per class
    assert report["captions"]["n"] == 6
    assert set(report["timings"]) == {"data", "preprocess", "stage1", "stage2", "sft", "lmms", "evaluate"}
    questions = [json.loads(line) for line in (out / "raw" / "sft" / "heldout.jsonl").read_text().splitlines()]
    assert report["sft"]["n"] == len(questions) >= 4 and set(report["sft"]["by_kind"]) <= set(scenes.QUESTION_KINDS)
    for truth, answer in report["captions"]["examples"]:
        assert scenes.parse_caption(truth) and isinstance(answer, str)


def test_lmms_eval_scores_agree_with_the_demos_own_evaluator(smoke):
    """The demo's last step: lmms-eval's label accuracy on the held-out images is the report's stage-1 accuracy,
    answer for answer; the SFT model's question scores are there too."""
    out, _ = smoke
    report = json.loads((out / "report.json").read_text())
    lmms = report["lmms_eval"]
    rows = {r["task"]: r for r in lmms["rows"]}
    assert set(rows) == {"solo_shapes_label", "solo_shapes_qa", "solo_shapes_mc"}
    assert rows["solo_shapes_label"]["n"] == report["stage1_labels"]["n"] == len(scenes.classes())
    assert rows["solo_shapes_label"]["value"] == pytest.approx(100 * report["stage1_labels"]["accuracy"])
    assert lmms["same_label_answers"] == lmms["compared"] == len(scenes.classes())
    assert rows["solo_shapes_qa"]["n"] == rows["solo_shapes_mc"]["n"] == 8
    assert all(0 <= rows[t]["value"] <= 100 for t in rows)
    assert "lmms-eval (python -m lmms_eval --model solo" in (out / "report.txt").read_text()
    assert not list((out / "lmms").rglob("*.safetensors"))  # the temporary exports are removed


def test_generate_tool_answers_from_the_demo_checkpoint(smoke):
    out, _ = smoke
    images = sorted((out / "raw" / "labels" / "heldout").glob("*.png"))[:2]
    proc = run_in_session(
        [
            sys.executable,
            "tools/generate.py",
            "--load",
            str(out / "ckpt" / "stage2"),
            "--each",
            "--max-new-tokens",
            "4",
            *[a for i in images for a in ("--image", str(i))],
        ],
        timeout=300,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    answers = [line for line in proc.stdout.splitlines() if line.startswith(str(images[0].parent))]
    assert [a.split("\t")[0] for a in answers] == [str(i) for i in images]


def test_ablation_command_runs_from_the_demos_stage1(smoke, tmp_path):
    """demo_ablation.sh end to end in a few steps, reusing the smoke run's data and stage 1."""
    out, _ = smoke
    env = {
        **os.environ,
        "PYTHON": sys.executable,
        "REUSE_DEMO": str(out),
        "ITERS": "4",
        "ABLATION_DIR": str(tmp_path / "ablation"),
    }
    proc = run_in_session(["bash", "examples/solo/demo_ablation.sh"], timeout=400, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-6000:]
    report = json.loads((tmp_path / "ablation" / "ablation_report.json").read_text())
    assert set(report["runs"]) == {"after stage 1", "from scratch"}
    assert all(run["captions"]["n"] == 6 for run in report["runs"].values())
    assert (tmp_path / "ablation" / "ablation_loss_curves.png").stat().st_size > 10_000
    assert f"weights of {out / 'ckpt' / 'stage1'}" in proc.stdout + proc.stderr  # only one run loads stage 1
