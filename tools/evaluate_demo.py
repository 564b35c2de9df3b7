#!/usr/bin/env python
"""Evaluate the CPU demo: greedy answers on held-out images, the report, the loss-curve PNG.

    python tools/evaluate_demo.py --data demo_run/raw --stage1 demo_run/ckpt/stage1 --stage2 demo_run/ckpt/stage2 \
        --metrics demo_run/stage1.metrics.jsonl demo_run/stage2.metrics.jsonl demo_run/sft.metrics.jsonl \
        [--sft demo_run/ckpt/sft] [--lmms demo_run/lmms/*/results.json] --out demo_run [--timings FILE]

Writes ``OUT/report.txt`` (also printed), ``OUT/report.json`` and ``OUT/loss_curves.png``. Exits 1 when the
stage-1 held-out label accuracy is below ``--min-label-accuracy`` (default 0.9), so a demo that did not
learn fails loudly.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, type=Path, help="tools/make_demo_data.py --out")
    p.add_argument("--stage1", required=True, type=Path, help="stage-1 checkpoint")
    p.add_argument("--stage2", type=Path, default=None, help="stage-2 checkpoint (captions)")
    p.add_argument("--sft", type=Path, default=None, help="SFT checkpoint (question-answer chats)")
    p.add_argument("--metrics", nargs="+", type=Path, default=[], help="--metrics-file of each stage, in order")
    p.add_argument("--timings", type=Path, default=None, help="'step seconds' lines to report")
    p.add_argument("--lmms", nargs="+", type=Path, default=[], help="tools/evaluate.py results.json files to report")
    p.add_argument(
        "--lmms-task-labels",
        type=Path,
        default=Path(__file__).resolve().parents[1] / "examples/solo/lmms_tasks/solo_shapes/data/labels.jsonl",
        help="the local task's labels.jsonl (to match lmms-eval's label answers to the held-out images)",
    )
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--min-label-accuracy", type=float, default=0.9)
    p.add_argument("--batch-size", type=int, default=32)
    return p.parse_args(argv)


def answer_all(generator, pairs, batch_size: int) -> list[str]:
    return generator([([path], "") for path, _ in pairs], max_new_tokens=16, batch_size=batch_size)


def main(argv=None) -> int:
    args = parse_args(argv)
    from megatron.solo.backend import install_cpu_backend_if_needed
    from megatron.solo.data.workdir import write_atomic
    from megatron.solo.demo import evaluate as ev
    from megatron.solo.inference import Generator

    install_cpu_backend_if_needed()
    start = time.perf_counter()
    labels = ev.read_heldout(args.data / "labels" / "heldout.jsonl", "label")
    gen1 = Generator(args.stage1)
    stage1_answers = answer_all(gen1, labels, args.batch_size)
    stage1 = ev.score_labels([t for _, t in labels], stage1_answers)
    lmms = None
    if args.lmms:
        lmms = ev.read_lmms(args.lmms, task_labels=args.lmms_task_labels, heldout=labels, answers=stage1_answers)
    stage2_labels = captions = None
    if args.stage2 is not None:
        gen2 = Generator(args.stage2)
        stage2_labels = ev.score_labels([t for _, t in labels], answer_all(gen2, labels, args.batch_size))
        caps = ev.read_heldout(args.data / "captions" / "heldout.jsonl", "caption")
        captions = ev.score_captions([t for _, t in caps], answer_all(gen2, caps, args.batch_size))
    chat = None
    if args.sft is not None:
        questions = ev.read_questions(args.data / "sft" / "heldout.jsonl", args.data / "captions")
        answers = Generator(args.sft)(
            [([q["image"]], q["question"]) for q in questions],
            template="mistral",
            max_new_tokens=6,
            batch_size=args.batch_size,
        )
        chat = ev.score_chat(questions, answers)
    metrics = [ev.read_metrics(p) for p in args.metrics]
    names = ["stage 1", "stage 2", "SFT"][: len(metrics)]
    args.out.mkdir(parents=True, exist_ok=True)
    if metrics:
        ev.plot_losses(list(zip(names, metrics)), args.out / "loss_curves.png")
    timings = ev.read_timings(args.timings) if args.timings else {}
    timings["evaluate"] = time.perf_counter() - start
    summaries = [ev.loss_summary(m) for m in metrics] + [None, None, None]
    report = ev.format_report(
        stage1_labels=stage1,
        stage1_losses=summaries[0],
        stage2_labels=stage2_labels,
        captions=captions,
        stage2_losses=summaries[1],
        chat=chat,
        sft_losses=summaries[2],
        timings=timings,
        min_label_accuracy=args.min_label_accuracy,
        lmms=lmms,
    )
    print(report)
    write_atomic(str(args.out / "report.txt"), (report + "\n").encode())
    write_atomic(
        str(args.out / "report.json"),
        (
            json.dumps(
                {
                    "stage1_labels": dataclasses.asdict(stage1),
                    "stage2_labels": dataclasses.asdict(stage2_labels) if stage2_labels else None,
                    "captions": dataclasses.asdict(captions) if captions else None,
                    "sft": dataclasses.asdict(chat) if chat else None,
                    "lmms_eval": dataclasses.asdict(lmms) if lmms else None,
                    "losses": summaries[: len(metrics)],
                    "timings": timings,
                },
                indent=2,
            )
            + "\n"
        ).encode(),
    )
    print(
        f"\nwritten: {args.out / 'report.txt'}, {args.out / 'report.json'}"
        + (f", {args.out / 'loss_curves.png'}" if metrics else "")
    )
    return 0 if stage1.accuracy >= args.min_label_accuracy else 1


if __name__ == "__main__":
    sys.exit(main())
