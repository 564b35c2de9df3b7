"""lmms-eval results → the table: headline metrics, MME's sum, the reported figures, missing values."""

import json

from megatron.solo.evaluation.results import REPORTED_SOLO_7B, headline, markdown, read_lmms_results, rows


def test_headline_metrics_and_scales():
    assert headline("mmstar", {"alias": "mmstar", "average,none": 0.358, "math,none": 0.3}) == ("average", 35.8)
    metric, value = headline("mme", {"mme_perception_score,none": 1100.5, "mme_cognition_score,none": 250.0})
    assert metric == "mme_perception_score+mme_cognition_score" and value == 1350.5  # points, summed
    # a filter name after the comma and stderr entries are ignored
    assert headline("ai2d", {"exact_match,flexible-extract": 0.5, "exact_match_stderr,flexible-extract": 0.1}) == (
        "exact_match",
        50.0,
    )
    # an unknown task: its first numeric metric, as a percentage
    assert headline("other", {"alias": "x", "bleu,none": 0.25, "acc,none": 0.9}) == ("bleu", 25.0)
    assert headline("mathvista_testmini", {"llm_as_judge_eval,none": "N/A"}) == ("llm_as_judge_eval", None)


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
    # the newest results file lmms-eval wrote, with its samples
    out = tmp_path / "raw" / "model"
    out.mkdir(parents=True)
    (out / "20260101_000000_results.json").write_text(json.dumps({"results": {}}))
    (out / "20260102_000000_results.json").write_text(json.dumps(lmms))
    (out / "20260102_000000_samples_solo_shapes_mc.jsonl").write_text("{}\n")
    got, samples = read_lmms_results(tmp_path / "raw")
    assert got == lmms and [p.name for p in samples] == ["20260102_000000_samples_solo_shapes_mc.jsonl"]
