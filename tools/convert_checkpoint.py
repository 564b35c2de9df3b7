#!/usr/bin/env python
"""HF Mistral/SOLO ↔ Megatron SOLO checkpoints; HaploVL's stage-1 start from an HF LLM and CLIP.

    python tools/convert_checkpoint.py hf-to-megatron --hf-model DIR --out DIR \
        [--tensor-model-parallel-size N] [--pipeline-model-parallel-size M] [--tokenizer-model PATH]
    python tools/convert_checkpoint.py megatron-to-hf --load DIR --out DIR [--iteration K] [--dtype fp32|bf16|fp16]
    python tools/convert_checkpoint.py haplo-init --llm DIR (--clip DIR [--clip-layers N] | --pre-decoder-init random)
        --out DIR [--preset haplo-vicuna-7b] [--text-embedding-init project|random]
        [--connector-init random|projection] [--tensor-model-parallel-size N] [--tokenizer-model PATH]
        [--dtype fp32|bf16|fp16] [--seed S]

hf-to-megatron: a HF ``MistralForCausalLM`` directory (e.g. Mistral-7B-v0.1) or a SOLO-7B HF checkpoint →
a Megatron dist checkpoint (layout-free: it loads at any TP/PP/DP; the TP size sets the vocabulary
padding, 128·TP). The vocabulary grows to 33029 (new rows: the mean of the existing ones), the patch
projection is loaded from SOLO-7B or initialised at token-embedding scale, and the tokenizer is copied.
megatron-to-hf: a Megatron checkpoint (the latest iteration, ``release``, or ``--iteration``) → an HF
directory with safetensors and our ``SoloForCausalLM`` code (``model_type: solo``), loadable with
``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)``.
HaploVL: ``megatron-to-hf`` on a HaploVL checkpoint writes the released HaploVL layout with ``HaploForCausalLM`` and
``HaploProcessor`` code (``megatron.solo.convert.haplo_export``); ``hf-to-megatron`` on a directory in that layout
(``model_type: haplo``) converts it into a HaploVL checkpoint. The family is read, never a flag.
haplo-init: HaploVL's stage-1 starting checkpoint (``megatron.solo.convert.haplo_init`` says what each tensor
starts from): the LLM (an HF Mistral/Llama directory: Mistral-7B, Vicuna-7B, Llama-3-8B) as the post-decoder,
its input embedding as stage 1's frozen text targets, the pre-decoder and stem from an HF CLIP vision tower
(or random), the pre-width text table as the LLM's embedding × a random orthonormal projection (or random).
``--preset`` gives the image settings (tiles, pinpoints) and, without CLIP, the pre-decoder's geometry.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="direction", required=True)
    to_mg = sub.add_parser(
        "hf-to-megatron", help="HF Mistral / SOLO-7B / released-layout HaploVL directory → Megatron checkpoint"
    )
    to_mg.add_argument("--hf-model", required=True, type=Path, help="HF model directory")
    to_mg.add_argument("--out", required=True, type=Path, help="Megatron checkpoint directory to create")
    to_mg.add_argument(
        "--tensor-model-parallel-size",
        type=int,
        default=1,
        help="sets the vocabulary padding (128·TP) and is validated; the checkpoint loads at any TP",
    )
    to_mg.add_argument(
        "--pipeline-model-parallel-size",
        type=int,
        default=1,
        help="validated against the layer count only: the checkpoint loads at any PP",
    )
    to_mg.add_argument(
        "--tokenizer-model",
        type=Path,
        default=None,
        help="tokenizer.model or a directory with it or a tokenizer.json (default: the one in --hf-model)",
    )
    to_mg.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: the HF weights' dtype")
    to_mg.add_argument("--seed", type=int, default=0, help="seed of the patch projection's initialisation")
    to_hf = sub.add_parser(
        "megatron-to-hf", help="Megatron checkpoint → HF SoloForCausalLM or HaploForCausalLM directory"
    )
    to_hf.add_argument("--load", required=True, type=Path, help="Megatron checkpoint directory")
    to_hf.add_argument("--out", required=True, type=Path, help="HF directory to write")
    to_hf.add_argument("--iteration", type=int, default=None, help="default: the latest (or release)")
    to_hf.add_argument(
        "--dtype",
        choices=sorted(DTYPES),
        default=None,
        help="default: the checkpoint's own dtype (an fp32 checkpoint stays fp32)",
    )
    to_hf.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    to_hf.add_argument(
        "--chat-template",
        choices=["mistral", "llama3"],
        default="mistral",
        help="the processor's chat layout: preprocessing's --chat-template of the training data (llama3: HaploVL)",
    )
    _haplo_init_parser(sub)
    return parser.parse_args(argv)


def _haplo_init_parser(sub) -> None:
    init = sub.add_parser("haplo-init", help="HF LLM (+ CLIP) → HaploVL stage-1 starting checkpoint")
    init.add_argument("--llm", required=True, type=Path, help="HF Mistral/Llama *ForCausalLM directory")
    source = init.add_mutually_exclusive_group(required=True)
    source.add_argument("--clip", type=Path, help="HF CLIP (vision) directory: the stem and pre-decoder")
    source.add_argument(
        "--pre-decoder-init", choices=["random"], help="random stem and pre-decoder (--preset's geometry)"
    )
    init.add_argument("--clip-layers", type=int, default=None, help="CLIP layers the pre-decoder takes (all)")
    init.add_argument("--out", required=True, type=Path, help="Megatron checkpoint directory to create")
    init.add_argument(
        "--preset", default="haplo-vicuna-7b", help="HaploVL preset: image settings (and the pre-decoder without CLIP)"
    )
    init.add_argument("--text-embedding-init", choices=["project", "random"], default="project")
    init.add_argument("--connector-init", choices=["random", "projection"], default="random")
    init.add_argument("--tensor-model-parallel-size", type=int, default=1, help="sets the vocabulary padding")
    init.add_argument("--pipeline-model-parallel-size", type=int, default=1, help="validated only")
    init.add_argument("--tokenizer-model", type=Path, default=None, help="default: the one in --llm")
    init.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: the LLM weights' dtype")
    init.add_argument("--seed", type=int, default=0, help="seed of every random initialisation")


def haplo_init(args: argparse.Namespace):
    from megatron.solo.convert.haplo_init import haplo_init_checkpoint
    from megatron.solo.families import get_preset
    from megatron.solo.haplo.config import HaploConfig

    base = get_preset(args.preset)
    if not isinstance(base, HaploConfig):
        raise SystemExit(f"--preset: {args.preset!r} is not a HaploVL preset")
    return haplo_init_checkpoint(
        args.llm,
        args.out,
        base=base,
        clip_dir=args.clip,
        clip_layers=args.clip_layers,
        text_embedding=args.text_embedding_init,
        connector=args.connector_init,
        tensor_parallel_size=args.tensor_model_parallel_size,
        pipeline_parallel_size=args.pipeline_model_parallel_size,
        tokenizer_model=args.tokenizer_model,
        dtype=DTYPES[args.dtype] if args.dtype else None,
        seed=args.seed,
    )


def main(argv=None) -> int:
    args = parse_args(argv)
    from megatron.solo.backend import install_cpu_backend_if_needed
    from megatron.solo.convert.checkpoint import hf_to_megatron_checkpoint, megatron_to_hf_checkpoint

    install_cpu_backend_if_needed()

    if args.direction == "haplo-init":
        meta = haplo_init(args)
        pre = meta.model.pre_decoder
        print(
            f"wrote {args.out}: HaploVL, pre-decoder {pre.num_layers} × {pre.hidden_size}, LLM {meta.model.num_layers} "
            f"× {meta.model.hidden_size}, vocab {meta.model.vocab_size} (padded {meta.padded_vocab_size})"
        )
    elif args.direction == "hf-to-megatron":
        meta = hf_to_megatron_checkpoint(
            args.hf_model,
            args.out,
            tensor_parallel=args.tensor_model_parallel_size,
            pipeline_parallel=args.pipeline_model_parallel_size,
            tokenizer_model=args.tokenizer_model,
            dtype=DTYPES[args.dtype] if args.dtype else None,
            seed=args.seed,
        )
        print(
            f"wrote {args.out}: {meta.model.num_layers} layers, hidden {meta.model.hidden_size}, "
            f"vocab {meta.model.vocab_size} (padded {meta.padded_vocab_size})"
        )
    else:
        iteration = "latest" if args.iteration is None else args.iteration
        out = megatron_to_hf_checkpoint(
            args.load,
            args.out,
            iteration=iteration,
            dtype=DTYPES[args.dtype] if args.dtype else None,
            overwrite=args.overwrite,
            chat_template=args.chat_template,
        )
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":  # required: torch_dist saving spawns a Manager process
    sys.exit(main())
