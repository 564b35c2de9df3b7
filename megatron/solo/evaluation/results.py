"""lmms-eval's results → one row per task (its headline metric) and a Markdown table beside SOLO-7B's figures.

Each benchmark the paper reports (MMStar, MME, SEED-Bench, AI2D, ScienceQA-IMG, MathVista) has one headline
metric in lmms-eval 0.7.3's task config; MME's is the sum of its perception and cognition scores, the total
papers print. Any other task shows its first metric (tasks' metric order is the YAML's).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True)
class Benchmark:
    """A benchmark's lmms-eval task, its headline metric(s) (summed when several) and what it measures."""

    task: str
    metrics: tuple[str, ...]
    measures: str
    scale: float = 100.0
    """Multiplier from lmms-eval's value to the table's (fractions → %; MME is already in points)."""


BENCHMARKS = {
    b.task: b
    for b in (
        Benchmark("mmstar", ("average",), "vision-indispensable multiple choice (1.5K questions, 6 abilities)"),
        Benchmark(
            "mme",
            ("mme_perception_score", "mme_cognition_score"),
            "yes/no perception (10 subtasks) + cognition (4), summed points",
            scale=1.0,
        ),
        Benchmark("seedbench", ("seed_image",), "multiple choice over 12 dimensions (image part)"),
        Benchmark("ai2d", ("exact_match",), "science diagrams, multiple choice"),
        Benchmark("scienceqa_img", ("exact_match",), "ScienceQA questions with an image, multiple choice"),
        Benchmark(
            "mathvista_testmini",
            ("llm_as_judge_eval",),
            "visual math; answers extracted by an LLM judge (needs an API key)",
        ),
        # the local task of this repository (examples/solo/lmms_tasks/solo_shapes): the CPU demo's held-out shapes
        Benchmark("solo_shapes_label", ("label_accuracy",), "name the coloured shape (pretraining format)"),
        Benchmark("solo_shapes_qa", ("answer_accuracy",), "one-word answers about a scene (chat format)"),
        Benchmark("solo_shapes_mc", ("acc",), "the same questions as multiple choice (log-likelihood)"),
    )
}

# SOLO-7B's published figures. Table 2 of the SOLO paper (arXiv 2407.06438) is an image and is not in the
# reference text this project holds; the figures below are the ones that text gives: the NEO paper's
# (arXiv 2510.14979, Tables 1-2) report of SOLO (Mistral-7B), as quoted in shared/reference/haplovl_spec.md.
REPORTED_SOLO_7B = {"seedbench": 64.4, "ai2d": 61.4}
REPORTED_SOURCE = "SOLO-7B as reported by NEO (arXiv 2510.14979, Tables 1-2)"


@dataclass(frozen=True)
class Row:
    task: str
    metric: str
    value: float | None
    """On the table's scale (% or MME points); None where lmms-eval gave no number."""
    n: int | None
    reported: float | None


def headline(task: str, metrics: dict) -> tuple[str, float | None]:
    """(metric name, value on the table's scale) of one task's lmms-eval results (``"name,filter": value``)."""
    values = {key.split(",")[0]: v for key, v in metrics.items() if "," in key and "_stderr" not in key}
    bench = BENCHMARKS.get(task)
    if bench is not None and all(m in values for m in bench.metrics):
        parts = [values[m] for m in bench.metrics]
        if all(isinstance(v, (int, float)) for v in parts):
            return "+".join(bench.metrics), float(sum(parts)) * bench.scale
        return "+".join(bench.metrics), None
    for name, v in values.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            return name, float(v) * 100.0  # the local tasks' accuracies: fractions → %
    return "-", None


def rows(results: dict) -> list[Row]:
    """One row per task of an lmms-eval results dict (``results``, ``n-samples``), in task order."""
    n_samples = results.get("n-samples", {})
    out = []
    for task, metrics in results["results"].items():
        metric, value = headline(task, metrics)
        n = n_samples.get(task, {}).get("effective")
        out.append(Row(task, metric, value, n, REPORTED_SOLO_7B.get(task)))
    return out


def markdown(table: list[Row], title: str) -> str:
    """The Markdown table (values in %, MME in points)."""

    def fmt(x):
        return "—" if x is None else f"{x:.1f}"

    lines = [
        f"## {title}",
        "",
        "| task | metric | ours | SOLO-7B reported | n |",
        "|---|---|---:|---:|---:|",
    ]
    lines += [f"| {r.task} | {r.metric} | {fmt(r.value)} | {fmt(r.reported)} | {r.n or '—'} |" for r in table]
    lines += ["", f"Values in % (MME: points). Reported: {REPORTED_SOURCE}; — where no figure is available."]
    return "\n".join(lines) + "\n"


def read_lmms_results(output_path: str | os.PathLike) -> tuple[dict, list[Path]]:
    """The newest ``*_results.json`` lmms-eval wrote under ``output_path`` and its ``*_samples_*.jsonl``."""
    found = sorted(Path(output_path).rglob("*_results.json"), key=lambda p: p.name)  # names start with a timestamp
    if not found:
        raise FileNotFoundError(f"{output_path}: lmms-eval wrote no *_results.json")
    newest = found[-1]
    stamp = newest.name[: -len("_results.json")]
    return json.loads(newest.read_text()), sorted(newest.parent.glob(f"{stamp}_samples_*.jsonl"))


def summary(table: list[Row]) -> list[dict]:
    return [asdict(r) for r in table]


__all__ = [
    "BENCHMARKS",
    "Benchmark",
    "REPORTED_SOLO_7B",
    "Row",
    "headline",
    "markdown",
    "read_lmms_results",
    "rows",
    "summary",
]
