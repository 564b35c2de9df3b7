#!/usr/bin/env python
"""Print one pack of a preprocessed prefix, and optionally write its images back as PNG.

python tools/inspect_mm_data.py out/captions --index 0 [--save-images DIR] [--tokenizer-model PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("prefix", help="output prefix given to preprocess_mm_data.py")
    p.add_argument("--index", type=int, default=0, help="pack to show (default 0; negative counts from the end)")
    p.add_argument(
        "--save-images", metavar="DIR", default=None, help="write the pack's images as DIR/pack<I>_image_<K>.png"
    )
    p.add_argument(
        "--tokenizer-model", default=None, help="the tokenizer used to preprocess (default: Mistral-7B-v0.1's)"
    )
    p.add_argument("--max-chars", type=int, default=2000, help="characters of text shown per document (default 2000)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    with warnings.catch_warnings():  # megatron-core's notes about Transformer Engine/Apex: irrelevant here
        warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
        from megatron.solo.data.describe import describe_pack, save_images
        from megatron.solo.data.packed_format import PackedDataset
    from megatron.solo.tokenizer import SoloTokenizer

    try:
        ds = PackedDataset(args.prefix)
        view = ds[args.index]
    except (FileNotFoundError, IndexError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    tokenizer = SoloTokenizer(args.tokenizer_model)
    stats = _stats(args.prefix)
    try:
        ds.check_tokenizer(tokenizer.fingerprint(), "--tokenizer-model")
    except ValueError as e:
        print(f"warning: not the tokenizer the prefix was made with: {e}", file=sys.stderr)
    index = args.index % len(ds)
    print(f"{args.prefix}: {len(ds):,} packs")
    print(describe_pack(view, tokenizer, index=index, seq_length=stats.get("seq_length"), max_chars=args.max_chars))
    if args.save_images:
        for path in save_images(view, args.save_images, stem=f"pack{index}_image"):
            print(f"wrote {path}")
    return 0


def _stats(prefix: str) -> dict:
    path = prefix + ".stats.json"
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)


if __name__ == "__main__":
    sys.exit(main())
