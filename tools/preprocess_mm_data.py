#!/usr/bin/env python
"""Preprocess multimodal data into packed, indexed binaries for SOLO pre-training.

    python tools/preprocess_mm_data.py --input 'data/captions-*.jsonl.zst' --output-prefix out/captions \\
        [--input-format auto|chat|llava|sft|caption|webdataset|imagenet|text] [--image-root DIR] \\
        [--allow-outside-root] [--class-names FILE] [--shuffle-seed N | --no-shuffle] [--tokenizer-model PATH] \\
        [--seq-length 32768] [--max-sample-length N] [--workers N] [--resume] [--strict]

Writes OUT.bin/.idx (tokens), OUT.pack.bin/.idx (targets, document boundaries, images),
OUT.errors.jsonl and OUT.stats.json; see megatron/solo/data/packed_format.py for the layout.
"""

from __future__ import annotations

import argparse
import sys
import warnings

# Only light modules at the top: worker processes re-import this file as their __main__.
from megatron.solo.data import codec, encode, packing, sources


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n", 2)[2],
    )
    g = p.add_argument_group("input")
    g.add_argument(
        "--input",
        nargs="+",
        required=True,
        metavar="FILE_OR_GLOB",
        help="input files, globs (quote them; ** allowed) or ImageNet root directories",
    )
    g.add_argument(
        "--input-format",
        default="auto",
        choices=("auto",) + sources.FORMATS,
        help="input format (default: detected from the first record of each input)",
    )
    g.add_argument(
        "--image-root",
        default=None,
        help="directory relative image paths are resolved against "
        "(default: the input file's directory); image paths resolving outside it (../, absolute, "
        "file://, symlinks) are skipped as outside_root",
    )
    g.add_argument(
        "--allow-outside-root",
        action="store_true",
        help="also read image paths (and ImageNet symlinks) that resolve outside the image root",
    )
    g.add_argument("--class-names", default=None, help="imagenet: wnid → class name file ('wnid name' lines or JSON)")
    g.add_argument(
        "--shuffle-seed",
        type=int,
        default=0,
        help="imagenet: images are read in this seed's random order, so packs mix classes (default 0)",
    )
    g.add_argument(
        "--no-shuffle",
        action="store_true",
        help="imagenet: read class by class, sorted (every pack then holds one class)",
    )
    g = p.add_argument_group("output")
    g.add_argument(
        "--output-prefix", required=True, help="write OUT.bin/.idx, OUT.pack.bin/.idx, OUT.stats.json, OUT.errors.jsonl"
    )
    g.add_argument(
        "--tokenizer-model",
        default=None,
        help="tokenizer.model, or a directory holding one or an HF tokenizer.json (Llama-3's) "
        "(default: Mistral-7B-v0.1's, from mistral-common)",
    )
    g.add_argument("--seq-length", type=int, default=packing.DEFAULT_SEQ_LENGTH, help="tokens per pack (default 32768)")
    g.add_argument(
        "--max-sample-length",
        type=int,
        default=None,
        help="cut each sample to at most N tokens (SFT: 4096, the recipe's); each cut is counted in "
        "OUT.stats.json (truncated_samples) and listed in OUT.errors.jsonl as 'truncated' (default: no limit)",
    )
    g.add_argument(
        "--pack-buffer-size",
        type=int,
        default=packing.DEFAULT_BUFFER_SIZE,
        help="open packs the best-fit packer chooses among (default %(default)s; 1 = sequential greedy)",
    )
    g.add_argument(
        "--append-eod",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="end every document with EOS (default on)",
    )
    g.add_argument(
        "--chat-template",
        default="mistral",
        choices=encode.TEMPLATES,
        help="mistral: [INST] user [/INST] assistant</s> (default); plain: the reference's concatenation; "
        "llama3: Llama-3-Instruct's <|start_header_id|>role<|end_header_id|> … <|eot_id|> (its tokenizer)",
    )
    g.add_argument(
        "--image-layout",
        default="solo",
        choices=encode.LAYOUTS,
        help="solo: <vision> rows of 32-px patches </vision> (default); haplo: HaploVL's anyres tiles of "
        "14-px patches, a newline position per row (CLIP normalisation)",
    )
    g.add_argument(
        "--haplo-tile-size",
        type=int,
        default=336,
        help="haplo layout: tile side in pixels; the pinpoints are every grid of at most 6 such tiles (default 336)",
    )
    g.add_argument(
        "--image-format",
        default=codec.DEFAULT_FORMAT,
        choices=tuple(codec.CODECS),
        help="how resized images are stored (default jpeg; png/webp-lossless are lossless, raw is uint8)",
    )
    g.add_argument(
        "--image-quality", type=int, default=codec.DEFAULT_QUALITY, help="quality of jpeg/webp (default %(default)s)"
    )
    g.add_argument(
        "--max-aspect-distortion",
        type=float,
        default=4.0,
        help="skip images (as 'sliver') whose aspect ratio the size rule changes by more than this "
        "factor (default 4; 0 = never)",
    )
    g = p.add_argument_group("running")
    g.add_argument(
        "--workers",
        type=int,
        default=None,
        help="worker processes (default: all CPUs; 0 = in-process); the output is byte-identical for any value",
    )
    g.add_argument("--resume", action="store_true", help="continue an interrupted run from its last checkpoint")
    g.add_argument("--strict", action="store_true", help="fail on the first bad sample instead of skipping it")
    g.add_argument("--checkpoint-interval", type=float, default=60.0, help="seconds between checkpoints (default 60)")
    g.add_argument(
        "--log-interval",
        type=float,
        default=30.0,
        help="seconds between progress lines when stderr is not a terminal (default 30)",
    )
    return p


def haplo_tiling(tile_size: int):
    """HaploVL's tiling at ``tile_size``: the released grid's shape (every canvas of at most 6 tiles)."""
    from megatron.solo.haplo.anyres import AnyresConfig

    grid = tuple((tile_size * h, tile_size * w) for h in range(1, 7) for w in range(1, 7) if h * w <= 6)
    return AnyresConfig(tile_size=tile_size, pinpoints=grid)


def config_from_args(args: argparse.Namespace):
    from megatron.solo.data.pipeline import PreprocessConfig, default_workers

    return PreprocessConfig(
        inputs=tuple(args.input),
        output_prefix=args.output_prefix,
        input_format=args.input_format,
        image_root=args.image_root,
        allow_outside_root=args.allow_outside_root,
        class_names=args.class_names,
        shuffle_seed=None if args.no_shuffle else args.shuffle_seed,
        tokenizer_model=args.tokenizer_model,
        encode=encode.EncodeConfig(
            layout=args.image_layout,
            anyres=haplo_tiling(args.haplo_tile_size),
            image_format=args.image_format,
            image_quality=args.image_quality,
            chat_template=args.chat_template,
            append_eod=args.append_eod,
            max_aspect_distortion=args.max_aspect_distortion or None,
            max_sample_length=args.max_sample_length,
        ),
        pack=packing.PackConfig(seq_length=args.seq_length, buffer_size=args.pack_buffer_size),
        workers=default_workers() if args.workers is None else args.workers,
        resume=args.resume,
        strict=args.strict,
        checkpoint_interval=args.checkpoint_interval,
        log_interval=args.log_interval,
    )


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    with warnings.catch_warnings():  # megatron-core's notes about Transformer Engine/Apex: irrelevant here
        warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
        import megatron.solo.data.pipeline  # noqa: F401  (torch, megatron-core: kept out of the workers)
    try:
        config = config_from_args(args)
    except ValueError as e:
        parser.error(str(e))
    from megatron.solo.data.errors import SampleError
    from megatron.solo.data.pipeline import preprocess

    try:
        stats = preprocess(config)
    except SampleError as e:
        print(f"error: {e} (--strict stops at the first bad sample)", file=sys.stderr)
        return 1
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    skipped = sum(stats["skipped"].values())
    print(
        f"{config.output_prefix}: {stats['packs']:,} packs of ≤ {stats['seq_length']:,} tokens from "
        f"{stats['documents']:,} documents ({skipped:,} samples skipped, "
        f"{stats.get('truncated_samples', 0):,} truncated, see {config.output_prefix}.errors.jsonl); "
        f"padding {100 * stats['padding_fraction']:.2f}%, {stats['bytes_per_vision_token']:.0f} bytes per vision token",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
