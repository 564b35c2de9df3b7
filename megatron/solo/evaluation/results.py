"""lmms-eval's results → one row per task (its headline metric) and a Markdown table beside SOLO-7B's figures.

Each benchmark the paper reports (MMStar, MME, SEED-Bench, AI2D, ScienceQA-IMG, MathVista) has one headline
metric in lmms-eval 0.7.3's task config; MME's is the sum of its perception and cognition scores, the total
papers print. MathVista (``mathvista_testmini``) is a group in lmms-eval 0.7.3: its three subtasks (``_cot``,
``_solution``, ``_format``, differing in prompt) each give an accuracy already in percent, and the group row
carries no metric of its own, so the table shows one row per subtask. Any other task shows its first metric as
lmms-eval gives it (its unit unknown: no scaling).
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
        *(
            Benchmark(
                f"mathvista_testmini_{kind}",
                ("llm_as_judge_eval",),
                f"visual math ({kind} prompt); answers extracted by an LLM judge (needs an API key)",
                scale=1.0,  # mathvista_aggregate_results returns a percentage
            )
            for kind in ("cot", "solution", "format")
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
    """On the table's scale (% or MME points; unregistered tasks: lmms-eval's value); None where it gave none."""
    n: int | None
    reported: float | None


def headline(task: str, metrics: dict) -> tuple[str, float | None]:
    """(metric name, value on the table's scale) of one task's lmms-eval results (``"name,filter": value``)."""
    values = {key.split(",")[0]: v for key, v in metrics.items() if "," in key and "_stderr" not in key}
    bench = BENCHMARKS.get(task)
    if bench is not None and all(m in values for m in bench.metrics):
        parts = [values[m] for m in bench.metrics]
        if all(_number(v) for v in parts):
            return "+".join(bench.metrics), float(sum(parts)) * bench.scale
        return "+".join(bench.metrics), None
    for name, v in values.items():
        if _number(v):
            return name, float(v)  # an unregistered task: its unit is unknown, so its value as lmms-eval gives it
    return "-", None


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def groups(results: dict) -> dict[str, list[str]]:
    """lmms-eval's groups among the results (``group_subtasks``: name → its subtasks; tasks map to ``[]``)."""
    return {g: list(subs) for g, subs in results.get("group_subtasks", {}).items() if subs}


def rows(results: dict) -> list[Row]:
    """One row per task of an lmms-eval results dict (``results``, ``n-samples``), in task order. A group's
    subtasks have their own rows; the group has a row only where lmms-eval aggregated a metric for it."""
    n_samples = results.get("n-samples", {})
    grouped = groups(results)
    out = []
    for task, metrics in results["results"].items():
        metric, value = headline(task, metrics)
        if task in grouped and value is None:
            continue  # a group without an aggregate: its subtasks' rows say it all
        if task in grouped:
            n = sum(n_samples.get(t, {}).get("effective") or 0 for t in grouped[task]) or None
        else:
            n = n_samples.get(task, {}).get("effective")
        out.append(Row(task, metric, value, n, REPORTED_SOLO_7B.get(task)))
    return out


def missing_tasks(results: dict, tasks: list[str]) -> list[str]:
    """The requested ``tasks`` (task, group or tag names) that lmms-eval's ``results`` do not cover."""
    covered = set(results.get("results", {})) | set(results.get("group_subtasks", {}))
    for config in results.get("configs", {}).values():
        tag = config.get("tag") if isinstance(config, dict) else None
        covered |= set([tag] if isinstance(tag, str) else tag or [])
    return [t for t in tasks if t not in covered]


def markdown(table: list[Row], title: str) -> str:
    """The Markdown table (values in %, MME in points, unregistered tasks as lmms-eval gives them)."""

    def fmt(x):
        return "—" if x is None else f"{x:.1f}"

    lines = [
        f"## {title}",
        "",
        "| task | metric | ours | SOLO-7B reported | n |",
        "|---|---|---:|---:|---:|",
    ]
    lines += [f"| {r.task} | {r.metric} | {fmt(r.value)} | {fmt(r.reported)} | {r.n or '—'} |" for r in table]
    lines += [
        "",
        "Values in % (MME: points; a task tools/evaluate.py does not know: lmms-eval's own value). "
        f"Reported: {REPORTED_SOURCE}; — where no figure is available.",
    ]
    return "\n".join(lines) + "\n"


class MissingResultsError(RuntimeError):
    """lmms-eval left no results, or results without a requested task: the run failed (0.7.3 exits 0 anyway)."""


def read_lmms_results(run_dir: str | os.PathLike, tasks: list[str] | None = None) -> tuple[dict, list[Path]]:
    """The ``*_results.json`` lmms-eval wrote in ``run_dir`` (one run's own folder) and its ``*_samples_*.jsonl``;
    MissingResultsError when there is none, or several, or (``tasks`` given) one lacks a requested task."""
    found = sorted(Path(run_dir).rglob("*_results.json"))
    if len(found) != 1:
        what = "no *_results.json" if not found else f"{len(found)} *_results.json (one run's folder expected)"
        raise MissingResultsError(f"{run_dir}: lmms-eval wrote {what}")
    results = json.loads(found[0].read_text())
    missing = missing_tasks(results, tasks or [])
    if missing:
        raise MissingResultsError(f"{found[0]}: no results for {', '.join(missing)}")
    stamp = found[0].name[: -len("_results.json")]
    return results, sorted(found[0].parent.glob(f"{stamp}_samples_*.jsonl"))


def summary(table: list[Row]) -> list[dict]:
    return [asdict(r) for r in table]


__all__ = [
    "BENCHMARKS",
    "Benchmark",
    "MissingResultsError",
    "REPORTED_SOLO_7B",
    "Row",
    "groups",
    "headline",
    "markdown",
    "missing_tasks",
    "read_lmms_results",
    "rows",
    "summary",
]
