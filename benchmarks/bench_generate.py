"""HF ``generate()`` tokens/s with and without the KV cache, at a ~1K-token image prompt.

    python benchmarks/bench_generate.py [--new-tokens 32] [--batch 1] [--repeats 3] [--layers 4] [--hidden 256]

A small random ``SoloForCausalLM`` (default: 4 layers, hidden 256, 4 heads / 2 KV groups, FFN 1024, the SOLO
vocabulary) and ``SoloProcessor`` with the real Mistral tokenizer; the prompt is one 960×1024 image (30×32
patches: 993 vision tokens) plus a question, about 1K tokens. Greedy decoding of exactly ``--new-tokens``
tokens (EOS ignored). With the cache the prompt is processed once and every later step feeds one token
(patches are embedded once, at prefill); without it every step re-runs the whole sequence. Runs alternate
between the two and the medians are reported (CPU, fp32, one process), with the ratio.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from PIL import Image

from megatron.solo.convert.hf_solo import SoloConfig, SoloForCausalLM, SoloProcessor
from megatron.solo.convert.hf_tokenizer import build_hf_tokenizer
from megatron.solo.tokenizer import SoloTokenizer


def build(layers: int, hidden: int) -> tuple[SoloForCausalLM, SoloProcessor]:
    tokenizer = SoloTokenizer()
    config = SoloConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        bos_token_id=tokenizer.bos_id,
        eos_token_id=tokenizer.eos_id,
        pad_token_id=tokenizer.pad_id,
    )
    torch.manual_seed(0)
    return SoloForCausalLM(config).eval(), SoloProcessor(build_hf_tokenizer(tokenizer))


def prompt(processor: SoloProcessor, batch: int):
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (1024, 960, 3), dtype=np.uint8))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the image?"}]}]
    text = processor.apply_chat_template(messages)
    return processor(images=[[image]] * batch, text=[text] * batch)


def timed(model, inputs, new_tokens: int, use_cache: bool) -> float:
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(
            **inputs,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            use_cache=use_cache,
            pad_token_id=model.config.pad_token_id,
        )
    elapsed = time.perf_counter() - start
    assert out.shape[1] == inputs["input_ids"].shape[1] + new_tokens
    return elapsed


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    args = p.parse_args(argv)

    model, processor = build(args.layers, args.hidden)
    inputs = prompt(processor, args.batch)
    seq = inputs["input_ids"].shape[1]
    params = sum(p.numel() for p in model.parameters()) / 1e6
    print(
        f"model: {args.layers} layers, hidden {args.hidden}, {params:.1f}M parameters, fp32, "
        f"{torch.get_num_threads()} threads; prompt {seq} tokens ({len(inputs['vision_patches'])} patches), "
        f"batch {args.batch}, {args.new_tokens} new tokens"
    )
    timed(model, inputs, 2, True)  # warm-up
    times = {True: [], False: []}
    for _ in range(args.repeats):
        for use_cache in (True, False):
            times[use_cache].append(timed(model, inputs, args.new_tokens, use_cache))
    rate = {k: args.batch * args.new_tokens / statistics.median(v) for k, v in times.items()}
    print(f"{'':14}{'tokens/s':>10}{'s/generate':>12}")
    for use_cache, name in ((True, "KV cache"), (False, "no cache")):
        print(f"{name:14}{rate[use_cache]:10.1f}{statistics.median(times[use_cache]):12.2f}")
    print(f"cache / no cache: {rate[True] / rate[False]:.1f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
