"""Training-step time of SoloModel with images vs a plain megatron-core GPTModel on the same tokens.

    python benchmarks/bench_model.py [--seq-length 1024] [--micro-batch 2] [--steps 8] [--image-fraction 0.5]

Both models share one architecture (default: 4 layers, hidden 256, 4 heads / 2 KV groups, FFN 1024, the
SOLO vocabulary) and the same weights; one step is forward + backward + SGD update on one micro-batch.
The plain GPTModel gets a single causal document per row (its fastest case: megatron's built-in causal
mask); SoloModel gets packed documents with images (``--image-fraction`` of the tokens are patches), so
the ratio is the whole cost of the vision path: the patch projection, the merge, the per-document mask and
RoPE lookup. Timings interleave the variants step by step and report medians (CPU, fp32, one process).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from megatron.core.models.gpt import GPTModel

from megatron.solo.backend import install_cpu_backend_if_needed
from megatron.solo.batch import PackedExample, collate
from megatron.solo.config import ModelConfig
from megatron.solo.model import build_model, make_transformer_config
from megatron.solo.model.specs import decoder_block_spec
from megatron.solo.parallel import initialize_model_parallel


def make_batch(cfg: ModelConfig, seq: int, micro_batch: int, image_fraction: float, seed: int = 0):
    """Rows of ~4 documents, each an image (patch block) followed by text, filling the row."""
    rng = np.random.default_rng(seed)
    examples = []
    for _ in range(micro_batch):
        lens = np.full(4, seq // 4)
        lens[-1] += seq - lens.sum()
        positions = []
        for start, n in zip(np.cumsum([0, *lens[:-1]]), lens):
            positions.extend(range(start + 1, start + 1 + int(n * image_fraction)))
        examples.append(
            PackedExample(
                tokens=rng.integers(3, cfg.vocab_size, seq),
                targets=np.ones(seq, bool),
                doc_offsets=np.concatenate([[0], np.cumsum(lens)]),
                patches=rng.standard_normal((len(positions), cfg.patch_dim)).astype(np.float32),
                patch_positions=np.asarray(positions),
            )
        )
    return collate(examples, seq, pad_id=2, patch_dim=cfg.patch_dim)


def timed_step(model, optimizer, forward) -> float:
    start = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    forward(model).float().mean().backward()
    optimizer.step()
    return time.perf_counter() - start


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-length", type=int, default=1024)
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--image-fraction", type=float, default=0.5)
    parser.add_argument("--num-layers", type=int, default=4)
    parser.add_argument("--hidden-size", type=int, default=256)
    args = parser.parse_args(argv)

    install_cpu_backend_if_needed()
    initialize_model_parallel(1, 1)
    cfg = ModelConfig(
        num_layers=args.num_layers,
        hidden_size=args.hidden_size,
        ffn_hidden_size=4 * args.hidden_size,
        num_attention_heads=4,
        num_query_groups=2,
        max_sequence_length=args.seq_length,
        sliding_window=None,
    )
    tc = make_transformer_config(cfg)
    torch.manual_seed(0)
    solo = build_model(cfg, tc)
    plain = GPTModel(
        tc,
        decoder_block_spec(tc, "local"),
        vocab_size=cfg.padded_vocab_size(),
        max_sequence_length=cfg.max_sequence_length,
        position_embedding_type="rope",
        rotary_base=cfg.rotary_base,
        share_embeddings_and_output_weights=False,
    )
    missing = plain.load_state_dict(solo.state_dict(), strict=False)
    assert missing.unexpected_keys == ["patch_embedding.weight"], missing
    batch = make_batch(cfg, args.seq_length, args.micro_batch, args.image_fraction)
    text_only = make_batch(cfg, args.seq_length, args.micro_batch, 0.0)
    positions = torch.arange(args.seq_length).expand(args.micro_batch, -1)

    variants = {
        "GPTModel, causal, no images": (plain, lambda m: m(batch.tokens, positions, None, labels=batch.labels)),
        "SoloModel, packed, no images": (
            solo,
            lambda m: m(
                text_only.tokens,
                text_only.position_ids,
                text_only.cu_seqlens,
                text_only.max_seqlen,
                labels=text_only.labels,
            ),
        ),
        f"SoloModel, packed, {args.image_fraction:.0%} patches": (
            solo,
            lambda m: m(
                batch.tokens,
                batch.position_ids,
                batch.cu_seqlens,
                batch.max_seqlen,
                batch.patches,
                batch.patch_index,
                labels=batch.labels,
            ),
        ),
    }
    optimizers = {name: torch.optim.SGD(model.parameters(), lr=1e-6) for name, (model, _) in variants.items()}
    times = {name: [] for name in variants}
    for step in range(args.steps + 2):  # two warm-up rounds
        for name, (model, forward) in variants.items():
            elapsed = timed_step(model, optimizers[name], forward)
            if step >= 2:
                times[name].append(elapsed)

    tokens = args.seq_length * args.micro_batch
    base = statistics.median(times["GPTModel, causal, no images"])
    print(
        f"model: {cfg.num_layers} layers, hidden {cfg.hidden_size}, vocab {cfg.padded_vocab_size()}, "
        f"{sum(p.numel() for p in solo.parameters()) / 1e6:.1f}M params | micro-batch {args.micro_batch} × "
        f"{args.seq_length} tokens | {torch.get_num_threads()} threads | median of {args.steps} steps"
    )
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:<34} {median * 1e3:8.1f} ms/step  {tokens / median:8.0f} tokens/s  ratio {median / base:5.2f}")


if __name__ == "__main__":
    main()
