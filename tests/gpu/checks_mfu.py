"""Throughput and MFU of a Mistral-7B-width model (8 layers) on one 32K pack, image-like and text-like,
with and without full recompute. Times forward + backward (no optimizer step) with CUDA events."""

from __future__ import annotations

import math
import time

import numpy as np
import torch
from gpu_common import Context, build, free

WARMUP, TIMED = 2, 3
SMOKE_WARMUP, SMOKE_TIMED = 1, 1
RECOMPUTE = {"granularity": "full", "method": "uniform", "num_layers": 1}
LOSS_AGREEMENT = 1e-3  # recompute re-runs the same kernels: the first step's loss must not move


def mfu_config(ctx: Context):
    from megatron.solo.config import get_preset

    if ctx.smoke:  # the same shape of network, small enough for 2 CPU cores
        return get_preset("tiny").replace(num_layers=2, sliding_window=64, max_sequence_length=512), 512
    return get_preset("mistral-7b").replace(num_layers=8), 32768


def _scaled(lengths: list[int], seq: int) -> list[int]:
    """Document lengths given for 32K, scaled to ``seq`` (they still fill it exactly)."""
    out = [length * seq // 32768 for length in lengths]
    out[-1] += seq - sum(out)
    return out


def make_pack(cfg, seq: int, kind: str, seed: int = 0):
    """A one-pack micro-batch of ``seq`` tokens, all real.

    image-like: two 16K documents, each 14K ``<vpatch>`` positions with patches then a 2K caption (the targets);
    text-like: documents of 12K, 8K, 6K, 4K and 2K tokens, every position a target.
    """
    from megatron.solo.batch import PackedExample, collate

    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, cfg.vocab_size, seq)
    if kind == "image":
        lengths = _scaled([16384, 16384], seq)
        image = [int(0.875 * n) for n in lengths]
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        positions = np.concatenate([s + np.arange(k) for s, k in zip(starts, image)])
        targets = np.ones(seq, bool)
        targets[positions] = False
    else:
        lengths = _scaled([12288, 8192, 6144, 4096, 2048], seq)
        positions, targets = np.zeros(0, np.int64), np.ones(seq, bool)
    example = PackedExample(
        tokens=tokens,
        targets=targets,
        doc_offsets=np.concatenate([[0], np.cumsum(lengths)]),
        patches=rng.standard_normal((len(positions), cfg.patch_dim)).astype(np.float32),
        patch_positions=positions,
    )
    return collate([example], seq, pad_id=0, patch_dim=cfg.patch_dim)


class _Timer:
    """CUDA events on the GPU (no host sync inside the timed region), wall clock on the CPU."""

    def __init__(self, cuda: bool):
        self.cuda = cuda

    def __enter__(self):
        if self.cuda:
            self.start, self.end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.start.record()
        else:
            self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            self.end.record()
            torch.cuda.synchronize()
            self.seconds = self.start.elapsed_time(self.end) / 1000.0
        else:
            self.seconds = time.perf_counter() - self.t0


def _train_step(model, batch) -> torch.Tensor:
    """Forward with labels and loss mask, mean over the targets, backward; the mean (no host sync)."""
    model.zero_grad(set_to_none=True)
    loss = model(
        batch.tokens,
        batch.position_ids,
        batch.cu_seqlens,
        batch.max_seqlen,
        batch.patches,
        batch.patch_index,
        labels=batch.labels,
        loss_mask=batch.loss_mask,
    )
    mean = (loss.float() * batch.loss_mask).sum() / batch.loss_mask.sum()
    mean.backward()
    return mean.detach()


def measure(ctx: Context, cfg, seq: int, kind: str, recompute: bool, peak: float | None) -> dict:
    """One (pack, recompute) configuration: a fresh model, warm-up steps, then timed steps."""
    from megatron.solo.training.metrics import batch_work, model_flops

    host = make_pack(cfg, seq, kind)
    tokens, pairs = batch_work(host.cu_seqlens, host.pack_lengths, seq, cfg.sliding_window).tolist()
    batch = host.to(ctx.device)
    extra = (
        {
            "recompute_granularity": RECOMPUTE["granularity"],
            "recompute_method": RECOMPUTE["method"],
            "recompute_num_layers": RECOMPUTE["num_layers"],
        }
        if recompute
        else {}
    )
    model = build(cfg, ctx, ctx.backend, seed=1234, **extra)

    cuda = not ctx.smoke
    first = _train_step(model, batch).item()
    for _ in range((SMOKE_WARMUP if ctx.smoke else WARMUP) - 1):
        _train_step(model, batch)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    timed = SMOKE_TIMED if ctx.smoke else TIMED
    with _Timer(cuda) as timer:
        for _ in range(timed):
            last = _train_step(model, batch)
    seconds = timer.seconds / timed
    # As the trainer counts it: logits at the targets only (the model computes them nowhere else).
    flops = model_flops(
        cfg, tokens, pairs, logit_tokens=float(host.loss_mask.sum()), padded_vocab_size=cfg.padded_vocab_size()
    )
    attention = 12.0 * cfg.num_layers * cfg.num_attention_heads * cfg.head_dim * pairs
    tflops = flops / seconds / 1e12
    result = {
        "pack": kind,
        "recompute": RECOMPUTE if recompute else None,
        "tokens": int(tokens),
        "documents": int(len(host.cu_seqlens) - 1),
        "patches": int(host.patches.shape[0]),
        "targets": int(host.loss_mask.sum()),
        "attention_pairs": pairs,
        "attention_flops_share": attention / flops,
        "first_loss": first,
        "last_loss": last.item(),
        "seconds_per_step": seconds,
        "tokens_per_s": tokens / seconds,
        "tflops_per_s": tflops,
        "mfu": tflops / peak if peak else None,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
    }
    del model, batch, host
    free()
    return result


def check_mfu(ctx: Context) -> dict:
    """Four configurations, one model at a time. Fails on a non-finite loss, recompute changing the loss or
    not saving memory, or (on a GPU) an MFU under ``--min-mfu`` or an unknown peak."""
    from megatron.solo.training.metrics import default_peak_tflops

    cfg, seq = mfu_config(ctx)
    peak = None if ctx.smoke else (ctx.peak_tflops or default_peak_tflops())
    runs = [measure(ctx, cfg, seq, kind, recompute, peak) for kind in ("image", "text") for recompute in (False, True)]
    problems = []
    for r in runs:
        if not (math.isfinite(r["first_loss"]) and math.isfinite(r["last_loss"]) and r["tokens_per_s"] > 0):
            problems.append(f"{r['pack']}: non-finite loss or no throughput")
        if not ctx.smoke and (r["mfu"] is None or r["mfu"] < ctx.min_mfu):
            problems.append(
                f"{r['pack']} recompute={bool(r['recompute'])}: MFU {r['mfu']} below --min-mfu {ctx.min_mfu}"
            )
    for kind in ("image", "text"):
        plain, recomputed = (r for r in runs if r["pack"] == kind)
        if abs(recomputed["first_loss"] - plain["first_loss"]) > LOSS_AGREEMENT * abs(plain["first_loss"]):
            problems.append(f"{kind}: recompute changed the loss ({plain['first_loss']} → {recomputed['first_loss']})")
        if not ctx.smoke and not recomputed["peak_memory_gib"] < plain["peak_memory_gib"]:
            problems.append(f"{kind}: recompute did not lower peak memory")
    if peak is None and not ctx.smoke:
        problems.append(f"no peak TFLOP/s known for {torch.cuda.get_device_name()}: pass --peak-tflops")
    return {
        "ok": not problems,
        "problems": problems,
        "model": "mistral-7b width, 8 layers" if not ctx.smoke else "tiny",
        "hidden_size": cfg.hidden_size,
        "num_layers": cfg.num_layers,
        "sliding_window": cfg.sliding_window,
        "seq_length": seq,
        "backend": ctx.backend,
        "dtype": str(ctx.dtype),
        "peak_tflops": peak,
        "min_mfu": None if ctx.smoke else ctx.min_mfu,
        "timed": f"forward + backward, no optimizer step; {WARMUP if not ctx.smoke else SMOKE_WARMUP} warm-up, "
        f"mean of {TIMED if not ctx.smoke else SMOKE_TIMED} steps",
        "flops": "megatron.solo.training.metrics.model_flops: 6 per decoder weight and token, the output layer "
        "at the targets, attention pairs within the window",
        "runs": runs,
    }
