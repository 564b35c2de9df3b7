"""lmms-eval results → the table: headline metrics, MME's sum, the reported figures, missing values."""

import json
import sys
from pathlib import Path

import pytest

from megatron.solo.evaluation.results import (
    BENCHMARKS,
    REPORTED_SOLO_7B,
    MissingResultsError,
    headline,
    markdown,
    missing_tasks,
    read_lmms_results,
    rows,
)


def test_headline_metrics_and_scales():
    assert headline("mmstar", {"alias": "mmstar", "average,none": 0.358, "math,none": 0.3}) == ("average", 35.8)
    metric, value = headline("mme", {"mme_perception_score,none": 1100.5, "mme_cognition_score,none": 250.0})
    assert metric == "mme_perception_score+mme_cognition_score" and value == 1350.5  # points, summed
    # a filter name after the comma and stderr entries are ignored
    assert headline("ai2d", {"exact_match,flexible-extract": 0.5, "exact_match_stderr,flexible-extract": 0.1}) == (
        "exact_match",
        50.0,
    )
    # an unknown task: its first numeric metric, as lmms-eval gives it (its unit is unknown)
    assert headline("other", {"alias": "x", "bleu,none": 0.25, "acc,none": 0.9}) == ("bleu", 0.25)
    assert headline("mathvista_testmini_cot", {"llm_as_judge_eval,none": None}) == ("llm_as_judge_eval", None)


def test_rows_and_markdown_put_reported_figures_beside_ours(tmp_path):
    lmms = {
        "results": {
            "seedbench": {"alias": "seedbench", "seed_image,none": 0.6},
            "solo_shapes_mc": {"alias": "solo_shapes_mc", "acc,none": 0.25, "acc_stderr,none": 0.1},
        },
        "n-samples": {"seedbench": {"original": 19, "effective": 19}, "solo_shapes_mc": {"effective": 4}},
    }
    table = rows(lmms)
    assert [(r.task, r.metric, r.value, r.n, r.reported) for r in table] == [
        ("seedbench", "seed_image", 60.0, 19, REPORTED_SOLO_7B["seedbench"]),
        ("solo_shapes_mc", "acc", 25.0, 4, None),
    ]
    md = markdown(table, "ckpt")
    assert "| seedbench | seed_image | 60.0 | 64.4 | 19 |" in md
    assert "| solo_shapes_mc | acc | 25.0 | — | 4 |" in md
    # one run's folder: its results file, with its samples
    out = tmp_path / "raw" / "model"
    out.mkdir(parents=True)
    (out / "20260102_000000_results.json").write_text(json.dumps(lmms))
    (out / "20260102_000000_samples_solo_shapes_mc.jsonl").write_text("{}\n")
    got, samples = read_lmms_results(tmp_path / "raw", ["seedbench", "solo_shapes_mc"])
    assert got == lmms and [p.name for p in samples] == ["20260102_000000_samples_solo_shapes_mc.jsonl"]


def test_no_results_or_a_requested_task_missing_is_a_failed_run(tmp_path):
    with pytest.raises(MissingResultsError, match="no \\*_results.json"):
        read_lmms_results(tmp_path)
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "1_results.json").write_text(json.dumps({"results": {"ai2d": {"exact_match,none": 0.5}}}))
    with pytest.raises(MissingResultsError, match="no results for mme$"):
        read_lmms_results(tmp_path, ["ai2d", "mme"])
    assert read_lmms_results(tmp_path, ["ai2d"])[0]["results"]["ai2d"]
    (tmp_path / "m" / "2_results.json").write_text("{}")
    with pytest.raises(MissingResultsError, match="2 \\*_results.json"):
        read_lmms_results(tmp_path)
    # a tag names tasks in their configs; a group is in group_subtasks
    results = {
        "results": {"g": {" ": " "}, "t1": {}},
        "group_subtasks": {"g": ["t1"]},
        "configs": {"t1": {"tag": ["x"]}},
    }
    assert missing_tasks(results, ["g", "t1", "x", "y"]) == ["y"]


MATHVISTA = ("mathvista_testmini_cot", "mathvista_testmini_solution", "mathvista_testmini_format")


def test_mathvista_is_a_group_of_three_subtasks_whose_accuracy_is_already_a_percentage(monkeypatch):
    """As lmms-eval 0.7.3 defines it: a group without an aggregate; each subtask's llm_as_judge_eval is what
    mathvista_aggregate_results returns, a percentage. The table shows each subtask as it is."""
    import types

    import lmms_eval
    import yaml

    # its scoring module imports Levenshtein (answer extraction; not installed here, unused by the aggregation)
    monkeypatch.setitem(sys.modules, "Levenshtein", types.SimpleNamespace(distance=lambda a, b: 0))
    from lmms_eval.tasks.mathvista.utils import mathvista_aggregate_results

    meta = {"split": "testmini", "language": "en", "source": "s", "category": "c", "task": "t", "context": "x"}
    per_doc = [
        {"question_id": str(i), "true_false": i < 3, "question_type": "q", "answer_type": "a"}
        | {"metadata": {**meta, "grade": "g", "skills": ["k"]}}
        for i in range(4)
    ]
    assert mathvista_aggregate_results(per_doc, None) == 75.0  # 3 of 4 right: percent, not a fraction

    tasks = Path(lmms_eval.__file__).parent / "tasks" / "mathvista"
    group = yaml.safe_load((tasks / "mathvista_testmini.yaml").read_text())
    assert group["group"] == "mathvista_testmini" and tuple(group["task"]) == MATHVISTA
    assert "aggregate_metric_list" not in group
    for task in MATHVISTA:
        assert (BENCHMARKS[task].metrics, BENCHMARKS[task].scale) == (("llm_as_judge_eval",), 1.0)
    assert "mathvista_testmini" not in BENCHMARKS

    # the results file's shape for such a group (as a real run of a local group writes it: test_lmms_eval_cli)
    lmms = {
        "results": {
            "mathvista_testmini": {" ": " ", "alias": "mathvista_testmini"},
            **{
                t: {"alias": f" - {t}", "llm_as_judge_eval,none": v, "llm_as_judge_eval_stderr,none": "N/A"}
                for t, v in zip(MATHVISTA, (41.3, 38.9, None))
            },
        },
        "group_subtasks": {"mathvista_testmini": list(MATHVISTA)},
        "n-samples": {t: {"original": 1000, "effective": 1000} for t in MATHVISTA},
    }
    table = rows(lmms)
    assert [(r.task, r.value, r.n) for r in table] == [
        (MATHVISTA[0], 41.3, 1000),
        (MATHVISTA[1], 38.9, 1000),
        (MATHVISTA[2], None, 1000),
    ]
    assert missing_tasks(lmms, ["mathvista_testmini"]) == []
    # a group that aggregates (its own metric) keeps its row, n over its subtasks
    lmms["results"]["mathvista_testmini"]["llm_as_judge_eval,none"] = 40.1
    assert (rows(lmms)[0].task, rows(lmms)[0].n) == ("mathvista_testmini", 3000)
