#!/usr/bin/env python
"""Write the CPU demo's synthetic datasets (deterministic by seed).

    python tools/make_demo_data.py --out demo_run/raw [--per-class 80] [--captions 1500] [--seed 0]

Stage 1: ImageNet-style class folders of single shapes (``OUT/labels/train/<wnid>/*.png`` and
``OUT/labels/classes.txt``); stage 2: caption JSONL of scenes (``OUT/captions/train.jsonl``); a text-only
corpus (``OUT/text/corpus.jsonl``); held-out images with their truth (``OUT/*/heldout.jsonl``). See
:mod:`megatron.solo.demo.data`.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from megatron.solo.demo.data import DemoDataConfig, write_demo_data  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    d = DemoDataConfig()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, type=Path, help="directory to (re)create")
    p.add_argument("--per-class", type=int, default=d.per_class, help="stage-1 training images per class")
    p.add_argument("--heldout-per-class", type=int, default=d.heldout_per_class)
    p.add_argument("--captions", type=int, default=d.captions, help="stage-2 training scenes")
    p.add_argument("--heldout-captions", type=int, default=d.heldout_captions)
    p.add_argument("--text-documents", type=int, default=d.text_documents)
    p.add_argument("--sft-chats", type=int, default=d.sft_chats, help="SFT chats (one per caption image at most)")
    p.add_argument("--sft-heldout", type=int, default=d.sft_heldout, help="held-out scenes asked questions")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--workers", type=int, default=None, help="processes (default: all CPUs; same bytes for any)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        config = DemoDataConfig(
            per_class=args.per_class,
            heldout_per_class=args.heldout_per_class,
            captions=args.captions,
            heldout_captions=args.heldout_captions,
            text_documents=args.text_documents,
            sft_chats=args.sft_chats,
            sft_heldout=args.sft_heldout,
            seed=args.seed,
        )
    except ValueError as e:
        print(f"make_demo_data: {e}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    try:
        counts = write_demo_data(args.out, config, workers=args.workers)
    except ValueError as e:
        print(f"make_demo_data: {e}", file=sys.stderr)
        return 2
    print(
        f"{args.out}: "
        + ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in counts.items())
        + f" in {time.perf_counter() - start:.1f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
