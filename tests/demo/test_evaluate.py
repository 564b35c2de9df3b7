"""Scoring, the report and the loss-curve plot of the demo's evaluation."""

import json

import pytest
from PIL import Image

from megatron.solo.demo import evaluate as ev


def test_label_scores():
    s = ev.score_labels(
        ["red circle", "blue square", "green triangle", "red square"],
        ["Red circle.", "blue circle", "purple triangle", ""],
    )
    assert s.n == 4 and s.accuracy == 0.25 and s.colour_accuracy == 0.5 and s.shape_accuracy == 0.5
    assert s.examples[0] == ("blue square", "blue circle")  # the mistakes come first


def test_caption_scores_count_every_slot_of_the_truth():
    truths = ["two blue circles left of a green square", "three red triangles", "a yellow square above a red circle"]
    answers = ["two blue circles left of a green square", "two red triangles", "a yellow square"]
    s = ev.score_captions(truths, answers)
    assert s.exact_match == pytest.approx(1 / 3)
    # count: 2 + 0 + (1 of 2: the second group is missing); colour and shape: 2 + 1 + 1 of 2 + 1 + 2
    assert s.attribute_accuracy == {
        "count": pytest.approx(3 / 5),
        "colour": pytest.approx(4 / 5),
        "shape": pytest.approx(4 / 5),
        "relation": 0.5,
    }


def metrics(n, start):
    return [
        {"iteration": i, "lm_loss": start / i, "img_lm_loss": start / i, "txt_lm_loss": start / i + 1}
        for i in range(1, n + 1)
    ]


def test_loss_summary_and_plot(tmp_path):
    m = metrics(5, 10.0)
    assert ev.loss_summary(m) == {"lm": (10.0, 2.0), "img": (10.0, 2.0), "txt": (11.0, 3.0)}
    out = tmp_path / "loss.png"
    ev.plot_losses([("stage 1", m), ("stage 2", metrics(3, 4.0))], out)
    with Image.open(out) as img:
        assert img.format == "PNG" and img.width > 400 and img.height > 200
    assert not list(tmp_path.glob("*.tmp*"))


def test_report_says_pass_or_fail_and_sums_times(tmp_path):
    good = ev.score_labels(["red circle"] * 10, ["red circle"] * 10)
    bad = ev.score_labels(["red circle"] * 10, ["red circle"] * 8 + ["red square"] * 2)
    summary = ev.loss_summary(metrics(3, 9.0))
    caps = ev.score_captions(["a red circle"], ["a red circle"])
    report = ev.format_report(
        stage1_labels=good,
        stage1_losses=summary,
        captions=caps,
        stage2_losses=summary,
        stage2_labels=bad,
        timings={"stage1": 60, "stage2": 90},
    )
    assert "label accuracy: 100.0% of 10" in report and "PASS" in report and "total 2.5 min" in report
    assert "caption exact match: 100.0% of 1" in report and "after stage 2: 80.0%" in report
    assert "FAIL" in ev.format_report(stage1_labels=bad, stage1_losses=summary)
    timings = tmp_path / "t.txt"
    timings.write_text("data 3\npreprocess 4\npreprocess 5\n")
    assert ev.read_timings(timings) == {"data": 3.0, "preprocess": 9.0}


def test_read_heldout_resolves_paths(tmp_path):
    (tmp_path / "h.jsonl").write_text(json.dumps({"image": "a/b.png", "label": "red circle"}) + "\n")
    assert ev.read_heldout(tmp_path / "h.jsonl", "label") == [(str(tmp_path / "a/b.png"), "red circle")]


def test_chat_scores_by_kind_and_examples(tmp_path):
    questions = [
        {"kind": "count", "question": "How many?", "answer": "two"},
        {"kind": "count", "question": "How many now?", "answer": "one"},
        {"kind": "relation", "question": "Left?", "answer": "yes"},
    ]
    s = ev.score_chat(questions, ["Two.", "three", "yes"])
    assert s.accuracy == pytest.approx(2 / 3) and s.by_kind == {"count": 0.5, "relation": 1.0}
    assert s.n_by_kind == {"count": 2, "relation": 1}
    assert s.examples == [("How many?", "two", "Two."), ("How many now?", "one", "three"), ("Left?", "yes", "yes")]
    summary = ev.loss_summary(metrics(3, 9.0))
    report = ev.format_report(
        stage1_labels=ev.score_labels(["a b"], ["a b"]), stage1_losses=summary, chat=s, sft_losses=summary
    )
    assert "answered exactly: 66.7% of 3" in report and "count 50.0% of 2, relation 100.0% of 1" in report
    (tmp_path / "q.jsonl").write_text(json.dumps({"image": "heldout/1.png", **questions[0]}) + "\n")
    assert ev.read_questions(tmp_path / "q.jsonl", tmp_path / "c")[0]["image"] == str(tmp_path / "c/heldout/1.png")


def test_ablation_report_and_plot(tmp_path):
    a = ev.score_captions(["a red circle", "two blue squares"], ["a red circle", "two red squares"])
    b = ev.score_captions(["a red circle", "two blue squares"], ["a red square", "a blue circle"])
    report = ev.format_ablation(
        [("after stage 1", a, ev.loss_summary(metrics(3, 9.0))), ("from scratch", b, ev.loss_summary(metrics(3, 8.0)))],
        {"after_stage1": 120},
    )
    assert "after stage 1:" in report and "exact match: 50.0% of 2" in report and "exact match: 0.0% of 2" in report
    assert "colour 50.0%" in report and "colour 100.0%" in report and "total 2.0 min" in report
    ev.plot_runs([("after stage 1", metrics(5, 9.0)), ("from scratch", metrics(5, 8.0))], tmp_path / "a.png", "t")
    with Image.open(tmp_path / "a.png") as img:
        assert img.format == "PNG" and img.width > 400


def test_lmms_results_are_read_and_label_answers_matched_by_image(tmp_path):
    """tools/evaluate.py's results.json + lmms-eval's per-sample log → rows and the per-image agreement."""
    labels = tmp_path / "labels.jsonl"  # the task's rows: doc_id → image
    labels.write_text("".join(json.dumps({"image": f"images/heldout/{n}.png", "label": "x"}) + "\n" for n in "abc"))
    samples = tmp_path / "20260101_000000_samples_solo_shapes_label.jsonl"
    samples.write_text(
        "".join(
            json.dumps({"doc_id": i, "filtered_resps": r}) + "\n" for i, r in enumerate(["red circle", "blue", "z"])
        )
    )
    results = tmp_path / "results.json"
    row = {"task": "solo_shapes_label", "metric": "label_accuracy", "value": 50.0, "n": 3, "reported": None}
    results.write_text(json.dumps({"checkpoint": "/r/ckpt/stage1", "rows": [row], "samples": [str(samples)]}))
    heldout = [("/raw/labels/heldout/b.png", "blue square"), ("/raw/labels/heldout/a.png", "red circle")]
    got = ev.read_lmms([results], task_labels=labels, heldout=heldout, answers=["Blue.", "red square"])
    assert got.rows == [{**row, "checkpoint": "/r/ckpt/stage1"}]
    assert (got.same_label_answers, got.compared) == (1, 2)  # b: "blue" = "Blue."; a: "red circle" ≠ "red square"
    summary = ev.loss_summary(metrics(3, 9.0))
    report = ev.format_report(stage1_labels=ev.score_labels(["a"], ["a"]), stage1_losses=summary, lmms=got)
    assert "solo_shapes_label (stage1): label_accuracy 50.0% of 3" in report
    assert "same label answer as this report's stage-1 evaluation on 1 of 2 held-out images" in report
