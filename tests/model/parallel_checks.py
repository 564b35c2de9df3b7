"""Multi-process checks of SoloModel, run under torchrun by test_model_parallel.py (2 ranks, gloo, CPU).

Each parallel layout runs twice: with dense logits, and with logits at the loss targets only (``loss_mask``
passed to the model, as the trainer does). Reference: the TP=1/PP=1 model (dense) on every rank, its initial
weights perturbed (so a layout that failed to load the checkpoint would differ, whatever the seeds). Each
layout (TP=2, TP=2+SP, PP=2, TP=1 reloaded from a TP=2 save) loads the same weights from a dist checkpoint
saved at TP=1, runs the same micro-batches, and rank 0 writes the largest differences to
``OUT/results.json``.
"""

from __future__ import annotations

import argparse
import json
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

from megatron.solo.backend import install_cpu_backend_if_needed
from megatron.solo.batch import PackedExample, collate
from megatron.solo.checkpointing import CheckpointMetadata, load_model, save_model
from megatron.solo.config import get_preset
from megatron.solo.model import build_model, make_transformer_config, masked_token_loss
from megatron.solo.parallel import initialize_model_parallel

SEQ, PAD = 32, 2
CFG = get_preset("tiny").replace(vocab_size=500, sliding_window=8, max_sequence_length=SEQ)
METADATA = CheckpointMetadata(CFG, CFG.padded_vocab_size(2))


def micro_batches(n: int = 2, per: int = 2):
    """Packs with several documents, images, padding and targets; identical on every rank."""
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        examples = []
        for _ in range(per):
            lens = rng.integers(3, 12, size=3)
            lens = lens[np.cumsum(lens) <= SEQ - 1]
            total = int(lens.sum())
            positions = np.sort(rng.choice(total, size=min(5, total), replace=False))
            examples.append(
                PackedExample(
                    tokens=rng.integers(3, CFG.vocab_size, total),
                    targets=rng.random(total) < 0.7,
                    doc_offsets=np.concatenate([[0], np.cumsum(lens)]),
                    patches=rng.standard_normal((len(positions), CFG.patch_dim)).astype(np.float32),
                    patch_positions=positions,
                )
            )
        out.append(collate(examples, SEQ, pad_id=PAD, patch_dim=CFG.patch_dim))
    return out


def build(tp: int, pp: int = 1, sp: bool = False, seed: int = 99):
    initialize_model_parallel(tp, pp, seed=seed)
    tc = make_transformer_config(CFG, tensor_parallel=tp, pipeline_parallel=pp, sequence_parallel=sp)
    return build_model(
        CFG,
        tc,
        padded_vocab_size=METADATA.padded_vocab_size,
        pre_process=ps.is_pipeline_first_stage(),
        post_process=ps.is_pipeline_last_stage(),
    )


def forward_backward(model, batches, targets_only: bool = False):
    """Per-micro-batch (loss sum, target count) through megatron-core's schedule (PP-aware).
    ``targets_only``: pass the loss mask, so logits are computed at the targets only."""
    model.zero_grad()

    def step(data_iterator, m):
        b = next(data_iterator)
        out = m(
            b.tokens,
            b.position_ids,
            b.cu_seqlens,
            b.max_seqlen,
            b.patches,
            b.patch_index,
            labels=b.labels,
            loss_mask=b.loss_mask if targets_only else None,
        )
        return out, partial(masked_token_loss, b.loss_mask)

    results = get_forward_backward_func()(
        forward_step_func=step,
        data_iterator=iter(batches),
        model=[model],
        num_microbatches=len(batches),
        seq_length=SEQ,
        micro_batch_size=batches[0].tokens.shape[0],
    )
    return [r["lm loss"].tolist() for r in results]


def full_grad(model, name: str, partition_dim: int | None):
    grad = dict(model.named_parameters())[name].grad
    if partition_dim is None or ps.get_tensor_model_parallel_world_size() == 1:
        return grad
    parts = [torch.empty_like(grad) for _ in range(ps.get_tensor_model_parallel_world_size())]
    dist.all_gather(parts, grad.contiguous(), group=ps.get_tensor_model_parallel_group())
    return torch.cat(parts, partition_dim)


def logits(model, batch):
    with torch.no_grad():
        out = model(
            batch.tokens, batch.position_ids, batch.cu_seqlens, batch.max_seqlen, batch.patches, batch.patch_index
        )
    return gather_from_tensor_model_parallel_region(out)[..., : CFG.vocab_size]


GRADS = [
    ("patch_embedding.weight", None),
    ("embedding.word_embeddings.weight", 0),
    ("decoder.layers.0.self_attention.linear_qkv.weight", 0),
    ("decoder.layers.1.mlp.linear_fc2.weight", 1),
]


def reference(ckpt: Path, batches):
    model = build(1, seed=1234)
    generator = torch.Generator().manual_seed(7)  # weights no fresh build has: the checks must load them
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.02 * torch.randn(param.shape, generator=generator))
    save_model(ckpt / "tp1", model, METADATA)
    losses = forward_backward(model, batches)
    return model, losses, {n: full_grad(model, n, d).clone() for n, d in GRADS}, logits(model, batches[0])


def max_diff(a, b) -> float:
    return float((torch.as_tensor(a, dtype=torch.float64) - torch.as_tensor(b, dtype=torch.float64)).abs().max())


def compare_tp(ckpt: Path, batches, ref, sp: bool, targets_only: bool = False) -> dict:
    _, ref_losses, ref_grads, ref_logits = ref
    model = build(2, sp=sp)
    load_model(ckpt / "tp1", model)
    losses = forward_backward(model, batches, targets_only)
    out = {"loss": max_diff(losses, ref_losses), "logits": max_diff(logits(model, batches[0]), ref_logits)}
    for name, dim in GRADS:
        out[f"grad {name}"] = max_diff(full_grad(model, name, dim), ref_grads[name])
    return out, model


def compare_pp(ckpt: Path, batches, ref, targets_only: bool = False) -> dict:
    model = build(1, pp=2)
    load_model(ckpt / "tp1", model)
    losses = forward_backward(model, batches, targets_only)
    result = {}
    if ps.is_pipeline_last_stage():
        result["loss"] = max_diff(losses, ref[1])
    else:
        result["grad patch_embedding.weight"] = max_diff(
            full_grad(model, "patch_embedding.weight", None), ref[2]["patch_embedding.weight"]
        )
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, result)
    return {k: v for part in gathered for k, v in part.items()}


def main() -> None:
    install_cpu_backend_if_needed()
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    batches = micro_batches()
    ref = reference(args.out, batches)
    results = {}
    results["tp2"], tp2_model = compare_tp(args.out, batches, ref, sp=False)
    save_model(args.out / "tp2", tp2_model, METADATA, iteration=7)
    results["tp2_sp"], _ = compare_tp(args.out, batches, ref, sp=True)
    results["pp2"] = compare_pp(args.out, batches, ref)
    # the trainer's path: logits at the targets only, against the reference's dense logits
    results["tp2_targets"], _ = compare_tp(args.out, batches, ref, sp=False, targets_only=True)
    results["tp2_sp_targets"], _ = compare_tp(args.out, batches, ref, sp=True, targets_only=True)
    results["pp2_targets"] = compare_pp(args.out, batches, ref, targets_only=True)
    tp1 = build(1)
    load_model(args.out / "tp2", tp1)  # saved at TP=2, loaded at TP=1
    results["tp2_saved_tp1_loaded"] = {"logits": max_diff(logits(tp1, batches[0]), ref[3])}
    results["reference_loss"] = ref[1]
    if dist.get_rank() == 0:
        (args.out / "results.json").write_text(json.dumps(results, indent=2))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":  # required: torch_dist saving spawns a Manager process
    main()
