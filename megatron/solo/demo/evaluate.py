"""The demo's evaluation: greedy answers on held-out images, scored; loss curves; the report.

Scores compare generated text with the truth after stripping and lower-casing, nothing else: a label is
right only if the whole class name ("red triangle") comes out, a caption only if every word does.
Per-attribute accuracy parses the generated caption (:func:`scenes.parse_caption`) and counts, over all
slots of the true scene (count, colour and shape of each group, and the relation), the ones it states
correctly; a slot the answer leaves out counts as wrong.
"""

from __future__ import annotations

import io
import json
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from megatron.solo.data.workdir import write_atomic
from megatron.solo.demo.scenes import QUESTION_KINDS, parse_caption


def read_heldout(path: str | os.PathLike, key: str) -> list[tuple[str, str]]:
    """(absolute image path, truth) pairs of a held-out JSONL file."""
    path = Path(path)
    pairs = []
    for line in path.read_text(encoding="utf-8").splitlines():
        obj = json.loads(line)
        pairs.append((str(path.parent / obj["image"]), obj[key]))
    return pairs


def _norm(text: str) -> str:
    return " ".join(text.strip().lower().rstrip(".").split())


@dataclass
class LabelScore:
    accuracy: float
    colour_accuracy: float
    shape_accuracy: float
    n: int
    examples: list[tuple[str, str]] = field(default_factory=list)
    """(truth, answer) of the first few mistakes (or answers, when none)."""


def score_labels(truths: Sequence[str], answers: Sequence[str], n_examples: int = 5) -> LabelScore:
    pairs = [(_norm(t), _norm(a)) for t, a in zip(truths, answers, strict=True)]
    n = max(len(pairs), 1)
    right = sum(t == a for t, a in pairs)
    colour = sum(a.split()[:1] == t.split()[:1] for t, a in pairs)
    shape = sum(a.split()[1:] == t.split()[1:] for t, a in pairs)
    wrong = [(t, a) for t, a in pairs if t != a]
    return LabelScore(right / n, colour / n, shape / n, len(pairs), (wrong or pairs)[:n_examples])


@dataclass
class CaptionScore:
    exact_match: float
    attribute_accuracy: dict[str, float]
    """count / colour / shape / relation → fraction of those slots stated correctly."""
    n: int
    examples: list[tuple[str, str]] = field(default_factory=list)


def score_captions(truths: Sequence[str], answers: Sequence[str], n_examples: int = 6) -> CaptionScore:
    pairs = [(_norm(t), _norm(a)) for t, a in zip(truths, answers, strict=True)]
    right, total = Counter(), Counter()
    for t, a in pairs:
        truth, said = parse_caption(t), parse_caption(a)
        for slot, value in truth.items():
            kind = slot.split("_")[0]
            total[kind] += 1
            right[kind] += said.get(slot) == value
    exact = sum(t == a for t, a in pairs) / max(len(pairs), 1)
    attrs = {k: right[k] / total[k] for k in ("count", "colour", "shape", "relation") if total[k]}
    return CaptionScore(exact, attrs, len(pairs), pairs[:n_examples])


@dataclass
class ChatScore:
    accuracy: float
    by_kind: dict[str, float]
    """count / colour / shape / relation → fraction of those questions answered exactly."""
    n_by_kind: dict[str, int]
    n: int
    examples: list[tuple[str, str, str]] = field(default_factory=list)
    """(question, truth, answer): one right and one wrong per kind where there are."""


def read_questions(path: str | os.PathLike, image_root: str | os.PathLike) -> list[dict]:
    """Held-out questions ({"image", "kind", "question", "answer"}), images made absolute against ``image_root``."""
    rows = [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    return [{**r, "image": str(Path(image_root) / r["image"])} for r in rows]


def score_chat(questions: Sequence[dict], answers: Sequence[str]) -> ChatScore:
    """Exact one-word answers (after :func:`_norm`), per question kind."""
    right, total, examples = Counter(), Counter(), {}
    for q, a in zip(questions, answers, strict=True):
        ok = _norm(a) == _norm(q["answer"])
        right[q["kind"]] += ok
        total[q["kind"]] += 1
        examples.setdefault((q["kind"], ok), (q["question"], q["answer"], a))
    kinds = [k for k in QUESTION_KINDS if total[k]]
    shown = [examples[(k, ok)] for k in kinds for ok in (True, False) if (k, ok) in examples]
    return ChatScore(
        sum(right.values()) / max(sum(total.values()), 1),
        {k: right[k] / total[k] for k in kinds},
        {k: total[k] for k in kinds},
        sum(total.values()),
        shown,
    )


@dataclass
class LmmsScore:
    """The demo's checkpoints scored through lmms-eval (``tools/evaluate.py`` on the local task solo_shapes)."""

    rows: list[dict]
    """One per task: task, metric, value (%), n, checkpoint (from each run's results.json)."""
    same_label_answers: int | None = None
    """Held-out label images where lmms-eval's answer is the demo evaluator's, of ``compared``."""
    compared: int | None = None


def read_lmms(
    results: Sequence[str | os.PathLike],
    *,
    task_labels: str | os.PathLike | None = None,
    heldout: Sequence[tuple[str, str]] = (),
    answers: Sequence[str] = (),
) -> LmmsScore:
    """``tools/evaluate.py``'s results.json files → their rows; with the task's labels.jsonl and the demo
    evaluator's (image, truth) pairs and answers, how many of those images got the same answer from lmms-eval
    (images matched by file name: the task's label images are the demo's held-out ones)."""
    rows, same, compared = [], None, None
    for path in results:
        report = json.loads(Path(path).read_text(encoding="utf-8"))
        rows += [{**row, "checkpoint": report["checkpoint"]} for row in report["rows"]]
        label_samples = [s for s in report.get("samples", []) if s.endswith("_samples_solo_shapes_label.jsonl")]
        if label_samples and task_labels is not None and heldout:
            docs = Path(task_labels).read_text(encoding="utf-8").splitlines()
            by_name = {}
            for line in Path(label_samples[0]).read_text(encoding="utf-8").splitlines():
                sample = json.loads(line)
                by_name[Path(json.loads(docs[sample["doc_id"]])["image"]).name] = sample["filtered_resps"]
            pairs = [(by_name.get(Path(image).name), a) for (image, _), a in zip(heldout, answers, strict=True)]
            compared = sum(lmms is not None for lmms, _ in pairs)
            same = sum(lmms is not None and _norm(lmms) == _norm(a) for lmms, a in pairs)
    return LmmsScore(rows, same, compared)


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The trainer's ``--metrics-file`` (one JSON object per logged iteration)."""
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def loss_summary(metrics: list[dict]) -> dict[str, tuple[float | None, float | None]]:
    """lm / img / txt loss → (first logged, last logged)."""

    def ends(key: str):
        values = [m[key] for m in metrics if m.get(key) is not None]
        return (values[0], values[-1]) if values else (None, None)

    return {"lm": ends("lm_loss"), "img": ends("img_lm_loss"), "txt": ends("txt_lm_loss")}


def plot_losses(stages: Sequence[tuple[str, list[dict]]], out: str | os.PathLike) -> None:
    """A PNG of image-pack and text-pack loss over iterations, stages one after another."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    offset = 0
    for i, (name, metrics) in enumerate(stages):
        for key, label, colour in (
            ("img_lm_loss", "image packs", "tab:blue"),
            ("txt_lm_loss", "text packs", "tab:orange"),
        ):
            points = [(offset + m["iteration"], m[key]) for m in metrics if m.get(key) is not None]
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, color=colour, label=label if i == 0 else None, linewidth=1.5)
        end = offset + (metrics[-1]["iteration"] if metrics else 0)
        ax.axvspan(offset, end, color="grey", alpha=0.06 if i % 2 == 0 else 0.0)
        ax.text((offset + end) / 2, 0.97, name, transform=ax.get_xaxis_transform(), ha="center", va="top", fontsize=9)
        offset = end
    ax.set_yscale("log")
    ax.set_xlabel("iteration (stages one after another)")
    ax.set_ylabel("loss per target token (SFT: per sample)")
    ax.set_title("SOLO CPU demo: training loss on image-bearing vs text-only packs")
    ax.legend(loc="upper right", bbox_to_anchor=(1.0, 0.9))
    ax.grid(alpha=0.3)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png")
    plt.close(fig)
    write_atomic(str(out), png.getvalue())


def plot_runs(runs: Sequence[tuple[str, list[dict]]], out: str | os.PathLike, title: str) -> None:
    """A PNG of several runs over the same iterations: loss on image-bearing (solid) and text-only (dashed) packs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    for (name, metrics), colour in zip(runs, ("tab:blue", "tab:green", "tab:red", "tab:purple")):
        for key, style, what in (("img_lm_loss", "-", "caption packs"), ("txt_lm_loss", "--", "text packs")):
            points = [(m["iteration"], m[key]) for m in metrics if m.get(key) is not None]
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, style, color=colour, label=f"{name}: {what}", linewidth=1.5)
    ax.set_yscale("log")
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss per target token")
    ax.set_title(title)
    ax.legend(loc="upper right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png")
    plt.close(fig)
    write_atomic(str(out), png.getvalue())


def format_ablation(runs: Sequence[tuple[str, CaptionScore, dict]], timings: dict[str, float] | None = None) -> str:
    """The ablation's report: per run, the loss (first → last logged) and the held-out caption scores."""
    lines = ["SOLO CPU demo: curriculum ablation (stage 2 at equal compute, after stage 1 vs from scratch)", ""]
    for name, score, losses in runs:
        attrs = ", ".join(f"{k} {_pct(v)}" for k, v in score.attribute_accuracy.items())
        lines += [
            f"{name}:",
            f"  loss (first → last logged): {_losses(losses)}",
            f"  held-out caption exact match: {_pct(score.exact_match)} of {score.n}",
            f"  per attribute: {attrs}",
        ]
        lines += [f"    truth {t!r} → answer {a!r}" for t, a in score.examples[:3]]
        lines.append("")
    if timings:
        lines.append(
            "wall time: "
            + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items())
            + f"; total {sum(timings.values()) / 60:.1f} min"
        )
    return "\n".join(lines).rstrip()


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _losses(summary) -> str:
    parts = []
    for key, (first, last) in summary.items():
        if first is not None:
            parts.append(f"{key} {first:.3f} → {last:.3f}")
    return ", ".join(parts)


def format_report(
    *,
    stage1_labels: LabelScore,
    stage1_losses,
    stage2_labels: LabelScore | None = None,
    captions: CaptionScore | None = None,
    stage2_losses=None,
    chat: ChatScore | None = None,
    sft_losses=None,
    timings: dict[str, float] | None = None,
    min_label_accuracy: float = 0.9,
    lmms: LmmsScore | None = None,
) -> str:
    """The human-readable report."""
    ok = stage1_labels.accuracy >= min_label_accuracy
    lines = [
        "SOLO CPU demo: report",
        "",
        "stage 1 (ImageNet-style labels + text):",
        f"  loss (first → last logged): {_losses(stage1_losses)}",
        f"  held-out label accuracy: {_pct(stage1_labels.accuracy)} of {stage1_labels.n} "
        f"(colour {_pct(stage1_labels.colour_accuracy)}, shape {_pct(stage1_labels.shape_accuracy)}) "
        f"[{'PASS' if ok else 'FAIL'}: the goal is ≥ {_pct(min_label_accuracy)}]",
    ]
    lines += [f"    truth {t!r:>22} → answer {a!r}" for t, a in stage1_labels.examples]
    if captions is not None:
        attrs = ", ".join(f"{k} {_pct(v)}" for k, v in captions.attribute_accuracy.items())
        lines += [
            "",
            "stage 2 (captions + labels + text, loading stage 1):",
            f"  loss (first → last logged): {_losses(stage2_losses)}",
            f"  held-out caption exact match: {_pct(captions.exact_match)} of {captions.n}",
            f"  per attribute: {attrs}",
        ]
        if stage2_labels is not None:
            lines.append(f"  held-out label accuracy after stage 2: {_pct(stage2_labels.accuracy)}")
        lines += [f"    truth {t!r} → answer {a!r}" for t, a in captions.examples]
    if chat is not None:
        kinds = ", ".join(f"{k} {_pct(v)} of {chat.n_by_kind[k]}" for k, v in chat.by_kind.items())
        lines += [
            "",
            "SFT (question-answer chats, loading stage 2; [INST] … [/INST], per-sample loss):",
            f"  loss per sample (first → last logged): {_losses(sft_losses)}",
            f"  held-out questions answered exactly: {_pct(chat.accuracy)} of {chat.n}",
            f"  by kind: {kinds}",
        ]
        lines += [f"    {q!r} → {a!r} (truth {t!r})" for q, t, a in chat.examples]
    if lmms is not None:
        lines += ["", "lmms-eval (python -m lmms_eval --model solo, local task examples/solo/lmms_tasks/solo_shapes):"]
        for row in lmms.rows:
            value = "—" if row["value"] is None else f"{row['value']:.1f}%"
            lines.append(f"  {row['task']} ({Path(row['checkpoint']).name}): {row['metric']} {value} of {row['n']}")
        if lmms.compared:
            lines.append(
                f"  same label answer as this report's stage-1 evaluation on {lmms.same_label_answers} of "
                f"{lmms.compared} held-out images"
            )
    if timings:
        lines += [
            "",
            "wall time: "
            + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items())
            + f"; total {sum(timings.values()) / 60:.1f} min",
        ]
    return "\n".join(lines)


def read_timings(path: str | os.PathLike) -> dict[str, float]:
    """``name seconds`` lines (written by demo.sh) → {name: seconds}, in order."""
    out: dict[str, float] = {}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.strip():
            name, seconds = line.rsplit(maxsplit=1)
            out[name] = out.get(name, 0.0) + float(seconds)
    return out


__all__ = [
    "CaptionScore",
    "LmmsScore",
    "ChatScore",
    "LabelScore",
    "format_ablation",
    "format_report",
    "plot_runs",
    "read_questions",
    "score_chat",
    "loss_summary",
    "plot_losses",
    "read_heldout",
    "read_lmms",
    "read_metrics",
    "read_timings",
    "score_captions",
    "score_labels",
]
