#!/usr/bin/env python
"""Evaluate the curriculum ablation (examples/solo/demo_ablation.sh): held-out captions of each run, the plot.

    python tools/evaluate_ablation.py --heldout demo_run/raw/captions/heldout.jsonl \
        --run "after stage 1" CKPT METRICS --run "from scratch" CKPT METRICS --out demo_ablation [--timings FILE]

Writes ``OUT/ablation_report.txt`` (also printed), ``OUT/ablation_report.json`` and
``OUT/ablation_loss_curves.png``.
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
    p.add_argument("--heldout", required=True, type=Path, help="held-out caption JSONL ({image, caption})")
    p.add_argument("--run", nargs=3, action="append", required=True, metavar=("NAME", "CKPT", "METRICS"))
    p.add_argument("--timings", type=Path, default=None, help="'step seconds' lines to report")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--batch-size", type=int, default=32)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from megatron.solo.backend import install_cpu_backend_if_needed
    from megatron.solo.data.workdir import write_atomic
    from megatron.solo.demo import evaluate as ev
    from megatron.solo.inference import Generator

    install_cpu_backend_if_needed()
    start = time.perf_counter()
    caps = ev.read_heldout(args.heldout, "caption")
    runs, curves = [], []
    for name, ckpt, metrics_file in args.run:
        answers = Generator(ckpt)([([path], "") for path, _ in caps], max_new_tokens=16, batch_size=args.batch_size)
        metrics = ev.read_metrics(metrics_file)
        runs.append((name, ev.score_captions([t for _, t in caps], answers), ev.loss_summary(metrics)))
        curves.append((name, metrics))
    args.out.mkdir(parents=True, exist_ok=True)
    ev.plot_runs(
        curves,
        args.out / "ablation_loss_curves.png",
        "SOLO CPU demo: stage 2 after stage 1 vs from scratch (equal compute)",
    )
    timings = ev.read_timings(args.timings) if args.timings else {}
    timings["evaluate"] = time.perf_counter() - start
    report = ev.format_ablation(runs, timings)
    print(report)
    write_atomic(str(args.out / "ablation_report.txt"), (report + "\n").encode())
    write_atomic(
        str(args.out / "ablation_report.json"),
        (
            json.dumps(
                {
                    "runs": {
                        name: {"captions": dataclasses.asdict(score), "losses": losses} for name, score, losses in runs
                    },
                    "timings": timings,
                },
                indent=2,
            )
            + "\n"
        ).encode(),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
