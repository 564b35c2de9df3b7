#!/usr/bin/env python
"""Greedy generation from a Megatron SOLO checkpoint, given images and a prompt.

    python tools/generate.py --load ckpt/demo/stage2 --image cat.png [--image more.png] [--prompt TEXT]
    python tools/generate.py --load ckpt/stage3 --image doc.png --prompt "What is written here?" \
        --chat-template mistral --max-new-tokens 64

Several ``--image`` flags make one prompt with all of them, in order. ``--each`` instead asks the same
prompt of every image in turn (one batch), one answer per line prefixed by the image path.
``--chat-template none`` (default) continues the pretraining format: BOS, the images, then the prompt
text, as captions and labels were trained; ``mistral`` wraps them in ``[INST] … [/INST]``.
The checkpoint is loaded whole in this process (TP=PP=1, any saved layout); no GPU is needed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing


def parse_args(argv=None) -> argparse.Namespace:
    from megatron.solo.inference import TEMPLATES

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--load", required=True, type=Path, help="Megatron checkpoint directory (pretrain_solo.py --save)")
    p.add_argument("--iteration", type=int, default=None, help="default: the latest (or release)")
    p.add_argument("--image", action="append", default=[], help="an image file (repeat for several)")
    p.add_argument("--prompt", default="", help="text after the images")
    p.add_argument("--each", action="store_true", help="one prompt per --image instead of one with all")
    p.add_argument("--chat-template", choices=TEMPLATES, default="none")
    p.add_argument("--max-new-tokens", type=int, default=32)
    args = p.parse_args(argv)
    if not args.image and not args.prompt:
        p.error("give --image and/or --prompt")
    if args.max_new_tokens < 1:
        p.error(f"--max-new-tokens must be ≥ 1, got {args.max_new_tokens}")
    for path in args.image:
        if not Path(path).is_file():
            p.error(f"--image: no such file: {path}")
    if not (args.load / "solo_config.json").is_file():
        p.error(f"--load: {args.load} is not a SOLO checkpoint (no solo_config.json)")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    from megatron.solo.backend import install_cpu_backend_if_needed
    from megatron.solo.inference import Generator

    install_cpu_backend_if_needed()

    generator = Generator(args.load, iteration="latest" if args.iteration is None else args.iteration)
    requests = [([image], args.prompt) for image in args.image] if args.each else [(args.image, args.prompt)]
    answers = generator(requests, template=args.chat_template, max_new_tokens=args.max_new_tokens)
    for (images, _), answer in zip(requests, answers):
        print(f"{images[0]}\t{answer}" if args.each else answer)
    return 0


if __name__ == "__main__":
    sys.exit(main())
