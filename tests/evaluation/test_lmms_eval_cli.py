"""``python -m lmms_eval --model solo`` end to end on the local task, and tools/evaluate.py from a Megatron
checkpoint: lmms-eval finds the model through its entry point, and the scores it reports are the runner's."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_checkpoint import TASKS

from megatron.solo.evaluation import LMMS_EVAL_VERSION
from megatron.solo.evaluation.results import read_lmms_results, rows

pytestmark = pytest.mark.timeout(400)
ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))
import evaluate  # noqa: E402

OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def questions(n):
    lines = (TASKS / "solo_shapes" / "data" / "questions.jsonl").read_text().splitlines()[:n]
    return [json.loads(line) for line in lines]


def group_tasks(root: Path) -> Path:
    """The local tasks plus a group of two of them (lmms-eval's group layout, as MathVista's): a task folder."""
    shutil.copytree(TASKS / "solo_shapes", root / "solo_shapes")
    (root / "solo_shapes_group.yaml").write_text(
        "group: solo_shapes_group\ntask:\n  - solo_shapes_mc\n  - solo_shapes_qa\n"
    )
    return root


def test_lmms_eval_cli_runs_the_solo_model_and_ranks_choices_by_its_likelihoods(tiny_export, tmp_path):
    """A group of the multiple-choice and the short-answer task: each document's choice and answer in lmms-eval's
    samples are the runner's own, and the table has one row per subtask (the group has no metric)."""
    cmd = [sys.executable, "-m", "lmms_eval", "--model", "solo", "--model_args", f"pretrained={tiny_export}"]
    cmd += ["--tasks", "solo_shapes_group", "--include_path", str(group_tasks(tmp_path / "tasks")), "--limit", "6"]
    cmd += ["--batch_size", "4", "--output_path", str(tmp_path / "out"), "--log_samples"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, **OFFLINE}, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results, samples = read_lmms_results(tmp_path / "out", ["solo_shapes_group"])
    assert sorted(results["group_subtasks"]["solo_shapes_group"]) == ["solo_shapes_mc", "solo_shapes_qa"]
    assert results["n-samples"]["solo_shapes_mc"]["effective"] == 6
    by_task = {p.name.split("_samples_")[1][: -len(".jsonl")]: p for p in samples}
    assert set(by_task) == {"solo_shapes_mc", "solo_shapes_qa"}
    logged = {t: {s["doc_id"]: s for s in map(json.loads, p.read_text().splitlines())} for t, p in by_task.items()}

    # lmms-eval's choice per question = the runner's choice of highest likelihood on the same question
    from megatron.solo.demo.evaluate import _norm
    from megatron.solo.evaluation.hf_runner import Request, SoloRunner

    runner = SoloRunner(tiny_export, device="cpu")
    right = []
    for doc_id, q in enumerate(questions(6)):
        image = TASKS / "solo_shapes" / "data" / q["image"]
        lls = runner.loglikelihood([Request([image], q["question"])] * len(q["choices"]), q["choices"])
        best = max(range(len(lls)), key=lambda i: lls[i][0])
        # per choice (value, greedy), as text
        negated = [float(value) for value, _ in logged["solo_shapes_mc"][doc_id]["filtered_resps"]]
        assert min(range(len(negated)), key=negated.__getitem__) == best  # lmms-eval takes the least: a loss
        assert negated == pytest.approx([-ll for ll, _ in lls], rel=1e-4, abs=1e-4)
        assert logged["solo_shapes_mc"][doc_id]["acc"] == float(q["choices"][best] == q["answer"])
        right.append(q["choices"][best] == q["answer"])
    assert results["results"]["solo_shapes_mc"]["acc,none"] == pytest.approx(sum(right) / 6)
    answers = runner.generate(
        [Request([TASKS / "solo_shapes" / "data" / q["image"]], q["question"]) for q in questions(6)], max_new_tokens=6
    )
    assert [logged["solo_shapes_qa"][i]["filtered_resps"] for i in range(6)] == answers
    qa = sum(_norm(a) == _norm(q["answer"]) for a, q in zip(answers, questions(6))) / 6
    assert results["results"]["solo_shapes_qa"]["answer_accuracy,none"] == pytest.approx(qa)
    table = rows(results)
    assert [(r.task, r.metric, r.n) for r in table] == [
        ("solo_shapes_mc", "acc", 6),
        ("solo_shapes_qa", "answer_accuracy", 6),
    ]
    assert [r.value for r in table] == pytest.approx([100 * sum(right) / 6, 100 * qa])


def _label_argv(checkpoint, out: Path) -> list[str]:
    argv = ["--load", str(checkpoint), "--template", "none", "--include-path", str(TASKS), "--offline"]
    return [*argv, "--batch-size", "8", "--output", str(out)]


@pytest.fixture(scope="module")
def label_eval(tiny_megatron, tmp_path_factory) -> Path:
    """tools/evaluate.py's label task on 15 images of the Megatron checkpoint: its --output (only read after)."""
    out = tmp_path_factory.mktemp("label-eval") / "eval"
    assert evaluate.main([*_label_argv(tiny_megatron, out), "--tasks", "solo_shapes_label", "--limit", "15"]) == 0
    return out


def test_evaluate_tool_from_a_megatron_checkpoint_agrees_with_the_demo_evaluator(tiny_megatron, label_eval):
    """The label task in the pretraining format: lmms-eval's per-image answers and accuracy are those of the
    demo's evaluator (megatron.solo.inference + demo.evaluate.score_labels) on the same 15 images."""
    from megatron.solo.demo import evaluate as ev
    from megatron.solo.inference import Generator

    out = label_eval
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
    # what was scored: the tracker's iteration (none was given), the installed lmms-eval
    assert report["iteration"] == 3 and "(iteration 3)" in (out / "results.md").read_text()
    assert report["lmms_eval_version"] == LMMS_EVAL_VERSION


def test_a_failed_lmms_eval_run_fails_and_leaves_the_previous_table(tiny_megatron, label_eval, tmp_path, capsys):
    """lmms-eval 0.7.3 exits 0 after an unknown task ("Error during evaluation"): no results for what was asked
    is a failure, and the earlier run's results.json/results.md in the same --output stay as they were (the
    earlier run: ``label_eval``'s, in a copy of its --output)."""
    out = tmp_path / "eval"
    shutil.copytree(label_eval, out)
    before = {name: (out / name).read_bytes() for name in ("results.json", "results.md")}
    capsys.readouterr()
    assert evaluate.main([*_label_argv(tiny_megatron, out), "--tasks", "no_such_task", "--limit", "2"]) == 1
    err = capsys.readouterr().err
    assert "lmms-eval failed" in err and str(out / "lmms_eval.log") in err
    assert {name: (out / name).read_bytes() for name in before} == before
    assert not [p for p in out.iterdir() if p.name.startswith("solo-eval-export-")]


def test_evaluate_tool_refuses_what_is_not_a_checkpoint(tmp_path, capsys):
    assert evaluate.main(["--load", str(tmp_path), "--tasks", "mme", "--output", str(tmp_path / "o")]) == 2
    assert "neither an HF export" in capsys.readouterr().err


def test_the_solo_model_refuses_acc_mutual_info_requests_before_scoring_any(tiny_export):
    """lmms-eval adds (context, continuation) requests without images or document for acc_mutual_info."""
    from lmms_eval.api.instance import Instance

    from megatron.solo.evaluation.lmms_model import Solo

    model = Solo(pretrained=str(tiny_export), device="cpu", dtype="fp32")
    meta = {"task": "t", "doc_id": 0, "repeats": 1}
    full = Instance("loglikelihood", ("Q", " red", None, 0, "t", "test"), 0, meta)
    with pytest.raises(NotImplementedError, match="task t: .*acc_mutual_info.*use acc"):
        model.loglikelihood([full, Instance("loglikelihood", ("", " red"), 1, meta)])
    with pytest.raises(ValueError, match="dtype must be auto or one of"):
        Solo(pretrained=str(tiny_export), device="cpu", dtype="bf")
