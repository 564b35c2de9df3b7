"""``python -m lmms_eval --model solo`` end to end on the local task, and tools/evaluate.py from a Megatron
checkpoint: lmms-eval finds the model through its entry point, and the scores it reports are the runner's."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TASKS

from megatron.solo.evaluation.results import read_lmms_results

pytestmark = pytest.mark.timeout(400)
ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))
import evaluate  # noqa: E402

OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def questions(n):
    lines = (TASKS / "solo_shapes" / "data" / "questions.jsonl").read_text().splitlines()[:n]
    return [json.loads(line) for line in lines]


def test_lmms_eval_cli_runs_the_solo_model_and_ranks_choices_by_its_likelihoods(tiny_export, tmp_path):
    cmd = [sys.executable, "-m", "lmms_eval", "--model", "solo", "--model_args", f"pretrained={tiny_export}"]
    cmd += ["--tasks", "solo_shapes_mc,solo_shapes_qa", "--include_path", str(TASKS), "--limit", "6"]
    cmd += ["--batch_size", "4", "--output_path", str(tmp_path / "out"), "--log_samples"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, **OFFLINE}, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results, samples = read_lmms_results(tmp_path / "out")
    assert results["n-samples"]["solo_shapes_mc"]["effective"] == 6
    assert {p.name.split("_samples_")[1] for p in samples} == {"solo_shapes_mc.jsonl", "solo_shapes_qa.jsonl"}

    # the accuracy lmms-eval reports = the runner's own choice of highest likelihood on the same questions
    from megatron.solo.demo.evaluate import _norm
    from megatron.solo.evaluation.hf_runner import Request, SoloRunner

    runner = SoloRunner(tiny_export, device="cpu")
    right = []
    for q in questions(6):
        image = TASKS / "solo_shapes" / "data" / q["image"]
        lls = runner.loglikelihood([Request([image], q["question"])] * len(q["choices"]), q["choices"])
        best = max(range(len(lls)), key=lambda i: lls[i][0])
        right.append(q["choices"][best] == q["answer"])
    assert results["results"]["solo_shapes_mc"]["acc,none"] == pytest.approx(sum(right) / 6)
    answers = runner.generate(
        [Request([TASKS / "solo_shapes" / "data" / q["image"]], q["question"]) for q in questions(6)], max_new_tokens=6
    )
    qa = sum(_norm(a) == _norm(q["answer"]) for a, q in zip(answers, questions(6))) / 6
    assert results["results"]["solo_shapes_qa"]["answer_accuracy,none"] == pytest.approx(qa)


def test_evaluate_tool_from_a_megatron_checkpoint_agrees_with_the_demo_evaluator(tiny_megatron, tmp_path):
    """The label task in the pretraining format: lmms-eval's per-image answers and accuracy are those of the
    demo's evaluator (megatron.solo.inference + demo.evaluate.score_labels) on the same 15 images."""
    from megatron.solo.demo import evaluate as ev
    from megatron.solo.inference import Generator

    out = tmp_path / "eval"
    argv = ["--load", str(tiny_megatron), "--tasks", "solo_shapes_label", "--template", "none", "--limit", "15"]
    argv += ["--include-path", str(TASKS), "--offline", "--batch-size", "8", "--output", str(out)]
    assert evaluate.main(argv) == 0
    report = json.loads((out / "results.json").read_text())
    (row,) = report["rows"]
    assert (row["task"], row["metric"], row["n"]) == ("solo_shapes_label", "label_accuracy", 15)
    assert not [p for p in out.iterdir() if p.name.startswith("solo-eval-export-")]  # the export is gone
    assert (out / "results.md").read_text().count("| solo_shapes_label |") == 1

    samples = [json.loads(line) for line in Path(report["samples"][0]).read_text().splitlines()]
    labels = ev.read_heldout(TASKS / "solo_shapes" / "data" / "labels.jsonl", "label")[:15]
    demo_answers = Generator(tiny_megatron)([([p], "") for p, _ in labels], max_new_tokens=16)
    lmms_answers = {s["doc_id"]: s["filtered_resps"] for s in samples}
    assert [lmms_answers[i] for i in range(15)] == [a.strip() for a in demo_answers]
    demo = ev.score_labels([t for _, t in labels], demo_answers)
    assert row["value"] == pytest.approx(100 * demo.accuracy)


def test_evaluate_tool_refuses_what_is_not_a_checkpoint(tmp_path, capsys):
    assert evaluate.main(["--load", str(tmp_path), "--tasks", "mme", "--output", str(tmp_path / "o")]) == 2
    assert "neither an HF export" in capsys.readouterr().err
