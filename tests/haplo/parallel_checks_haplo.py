"""Multi-process checks of HaploModel, run under torchrun by test_model_parallel_haplo.py (2 ranks, gloo, CPU).

As tests/model/parallel_checks.py for SOLO: the TP=1/PP=1 model (its initial weights perturbed, so a layout
that failed to load them would differ) is saved; TP=2, TP=2+SP and PP=2 load it, run the same micro-batches
(packs with several documents, images with newlines, padding) through megatron-core's schedule, and rank 0
writes the largest differences of losses, logits and gradients (stem, pre-decoder, connector, LLM) to
``OUT/results.json``. Stage 1 (distillation: heads, frozen text targets, fixed teacher features) likewise
compares TP=2, TP=2+SP and PP=2 (the pre-decoder's layers split over the stages) with TP=1, and checks that
the PP=2 stage-1 checkpoint loads, weight for weight, into stage 1 and stage 2 at PP=1.
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
from megatron.solo.families import build_model
from megatron.solo.haplo.config import HAPLO_PRESETS
from megatron.solo.haplo.distill import DistillConfig
from megatron.solo.model import make_transformer_config, masked_token_loss
from megatron.solo.parallel import initialize_model_parallel

SEQ, PAD = 32, 0
CFG = HAPLO_PRESETS["haplo-tiny"].replace(vocab_size=300, max_sequence_length=SEQ)
METADATA = CheckpointMetadata(CFG, CFG.padded_vocab_size(2))


def micro_batches(n: int = 2, per: int = 2):
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        examples = []
        for _ in range(per):
            lens = [int(rng.integers(12, 16)), int(rng.integers(8, 14))]
            positions, table, spans = [], [], []
            for doc_start, (rows, cols) in ((0, (2, 3)), (lens[0], (2, 2))):
                start = doc_start + 2
                for r in range(rows):
                    for c in range(cols):
                        positions.append(start + r * (cols + 1) + c)
                        table.append(r * CFG.tile_patches + c)
                spans.append((start, start + rows * (cols + 1)))
            total = sum(lens)
            examples.append(
                PackedExample(
                    tokens=rng.integers(3, CFG.vocab_size, total),
                    targets=rng.random(total) < 0.7,
                    doc_offsets=np.array([0, lens[0], total]),
                    patches=rng.standard_normal((len(positions), CFG.patch_dim)).astype(np.float32),
                    patch_positions=np.array(positions),
                    image_spans=np.array(spans),
                    patch_table_index=np.array(table),
                )
            )
        out.append(collate(examples, SEQ, pad_id=PAD, patch_dim=CFG.patch_dim))
    return out


TEACHER = 24


def build(tp: int, pp: int = 1, sp: bool = False, seed: int = 99, stage1: bool = False):
    initialize_model_parallel(tp, pp, seed=seed)
    tc = make_transformer_config(CFG, tensor_parallel=tp, pipeline_parallel=pp, sequence_parallel=sp)
    extra = {"distill": DistillConfig(), "teacher_hidden_size": TEACHER} if stage1 else {}
    return build_model(
        CFG,
        tc,
        padded_vocab_size=METADATA.padded_vocab_size,
        pre_process=ps.is_pipeline_first_stage(),
        post_process=ps.is_pipeline_last_stage(),
        **extra,
    )


def stage1_inputs(batches):
    """Per micro-batch: fixed teacher features [p, C], the text mask and every distilled position."""
    out = []
    for i, b in enumerate(batches):
        teacher = torch.randn(len(b.patch_index), TEACHER, generator=torch.Generator().manual_seed(i))
        real = torch.arange(SEQ)[None, :] < b.pack_lengths[:, None]
        text = (real & (b.image_block_ids == -1)).float()
        positions = text.clone()
        positions.view(-1)[b.patch_index] = 1.0
        out.append((teacher, text, positions))
    return out


def stage1_forward_backward(model, batches):
    model.zero_grad()
    extra = iter(stage1_inputs(batches))

    def step(data_iterator, m):
        b = next(data_iterator)
        teacher, text, positions = next(extra)
        out = m(
            b.tokens,
            b.position_ids,
            b.cu_seqlens,
            b.max_seqlen,
            b.patches,
            b.patch_index,
            image_block_ids=b.image_block_ids,
            patch_table_index=b.patch_table_index,
            teacher_features=teacher,
            distill_mask=text,
        )
        return out, partial(masked_token_loss, positions)

    results = get_forward_backward_func()(
        forward_step_func=step,
        data_iterator=iter(batches),
        model=[model],
        num_microbatches=len(batches),
        seq_length=SEQ,
        micro_batch_size=batches[0].tokens.shape[0],
        **model.pipeline_schedule_kwargs(),  # stage 1 under PP: pre-decoder-width p2p tensors
    )
    if model.config.sequence_parallel:
        for p in model.parameters():
            if getattr(p, "sequence_parallel", False) and p.grad is not None:
                dist.all_reduce(p.grad, group=ps.get_tensor_model_parallel_group())
    return [r["lm loss"].tolist() for r in results]


STAGE1_GRADS = [
    ("distill_heads.vision_head.weight", None),
    ("distill_heads.text_head.weight", None),
    ("distill_heads.log_logit_scale", None),
    ("pre_decoder.layers.1.mlp.linear_fc2.weight", 1),
    ("pre_decoder.layers.0.self_attention.linear_qkv.weight", 0),
    ("embedding.word_embeddings.weight", 0),
    ("patch_embed.weight", None),
]


def stage1_checks(out: Path, batches, tp2_pp2_only: bool = False) -> dict:
    ref = build(1, seed=1234, stage1=True)
    generator = torch.Generator().manual_seed(8)
    with torch.no_grad():
        for param in ref.parameters():
            param.add_(0.02 * torch.randn(param.shape, generator=generator))
    save_model(out / "s1_tp1", ref, METADATA)
    ref_losses = stage1_forward_backward(ref, batches)
    ref_grads = {n: full_grad(ref, n, d).clone() for n, d in STAGE1_GRADS}
    results = {"reference_loss": ref_losses}
    if tp2_pp2_only:  # 4 ranks: TP=2 + SP inside each of PP=2 stages
        results["s1_tp2_sp_pp2"] = stage1_pp2(out, batches, ref, ref_losses, ref_grads, tp=2)
        return results
    for name, sp in (("s1_tp2", False), ("s1_tp2_sp", True)):
        model = build(2, sp=sp, stage1=True)
        load_model(out / "s1_tp1", model)
        got = {"loss": max_diff(stage1_forward_backward(model, batches), ref_losses)}
        for grad, dim in STAGE1_GRADS:
            got[f"grad {grad}"] = max_diff(full_grad(model, grad, dim), ref_grads[grad])
        results[name] = got
    results["s1_pp2"] = stage1_pp2(out, batches, ref, ref_losses, ref_grads)
    return results


# PP=2 stage 1, pre-decoder layer 1 on the last stage is its local layer 0
S1_LAST_STAGE_LOCAL = {"pre_decoder.layers.1.mlp.linear_fc2.weight": "pre_decoder.layers.0.mlp.linear_fc2.weight"}


def stage1_pp2(out: Path, batches, ref, ref_losses, ref_grads, tp: int = 1) -> dict:
    """Stage 1 at PP=2 (with TP=``tp``, and SP when 2) against TP=1: losses, gradients on both stages,
    where each part lives; then its checkpoint (saved at PP=2) loaded at PP=1 into stage 1 and stage 2 equals
    the reference weights."""
    model = build(tp, pp=2, sp=tp > 1, stage1=True)
    load_model(out / "s1_tp1", model)
    losses = stage1_forward_backward(model, batches)
    names = set(dict(model.named_parameters()))
    got = {"layers on this stage": len(model.pre_decoder.layers)}
    frozen = [p.requires_grad for n, p in model.named_parameters() if n.startswith(("decoder.", "connector."))]
    got[f"LLM frozen on stage {ps.get_pipeline_model_parallel_rank()}"] = bool(frozen) and not any(frozen)
    if ps.is_pipeline_last_stage():
        got["loss"] = max_diff(losses, ref_losses)
        got["last stage has no stem"] = not any(n.startswith(("embedding.", "patch_embed", "pre_norm")) for n in names)
    else:
        got["first stage has no heads"] = not any(n.startswith(("distill_heads.", "llm_embedding.")) for n in names)
    for grad, dim in STAGE1_GRADS:
        local = S1_LAST_STAGE_LOCAL.get(grad, grad) if ps.is_pipeline_last_stage() else grad
        if local in names and not (grad.startswith("pre_decoder.layers.0") and ps.is_pipeline_last_stage()):
            got[f"grad {grad}"] = max_diff(full_grad(model, local, dim), ref_grads[grad])
    save_model(out / "s1_pp2", model, METADATA)
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, got)
    result = {k: v for part in gathered for k, v in part.items() if k != "layers on this stage"}
    result["layers per stage"] = [part["layers on this stage"] for part in gathered]
    reference_weights = dict(ref.named_parameters())
    for name, stage1 in (("s1_pp2_to_s1_pp1", True), ("s1_pp2_to_s2_pp1", False)):
        reloaded = build(1, stage1=stage1)
        load_model(out / "s1_pp2", reloaded)
        result[name] = {
            "params": len(list(reloaded.parameters())),
            "weights": max(max_diff(p.detach(), reference_weights[n].detach()) for n, p in reloaded.named_parameters()),
        }
    return result


def forward_backward(model, batches, targets_only: bool = False):
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
            image_block_ids=b.image_block_ids,
            patch_table_index=b.patch_table_index,
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
    # What finalize_model_grads does for the trainer: under sequence parallelism, sum the gradients of the
    # weights that saw only this rank's share of the sequence (marked .sequence_parallel) over TP ranks.
    if model.config.sequence_parallel:
        for p in model.parameters():
            if getattr(p, "sequence_parallel", False) and p.grad is not None:
                dist.all_reduce(p.grad, group=ps.get_tensor_model_parallel_group())
    return [r["lm loss"].tolist() for r in results]


def full_grad(model, name: str, partition_dim: int | None):
    grad = dict(model.named_parameters())[name].grad
    if partition_dim is None or ps.get_tensor_model_parallel_world_size() == 1:
        return grad
    parts = [torch.empty_like(grad) for _ in range(ps.get_tensor_model_parallel_world_size())]
    dist.all_gather(parts, grad.contiguous(), group=ps.get_tensor_model_parallel_group())
    return torch.cat(parts, partition_dim)


def logits(model, b):
    with torch.no_grad():
        out = model(
            b.tokens,
            b.position_ids,
            b.cu_seqlens,
            b.max_seqlen,
            b.patches,
            b.patch_index,
            image_block_ids=b.image_block_ids,
            patch_table_index=b.patch_table_index,
        )
    return gather_from_tensor_model_parallel_region(out)[..., : CFG.vocab_size]


FIRST_STAGE_GRADS = [
    ("patch_embed.weight", None),
    ("pos_embed", None),
    ("image_newline", None),
    ("pre_norm.weight", None),
    ("connector.weight", None),
    ("embedding.word_embeddings.weight", 0),
    ("pre_decoder.layers.0.self_attention.linear_qkv.weight", 0),
    ("pre_decoder.layers.0.input_layernorm.weight", None),
    ("pre_decoder.layers.1.mlp.linear_fc2.weight", 1),
    ("decoder.layers.0.self_attention.linear_qkv.weight", 0),
]
GRADS = [*FIRST_STAGE_GRADS, ("decoder.layers.1.mlp.linear_fc2.weight", 1)]


def reference(ckpt: Path, batches):
    model = build(1, seed=1234)
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.02 * torch.randn(param.shape, generator=generator))
    save_model(ckpt / "tp1", model, METADATA)
    losses = forward_backward(model, batches)
    return model, losses, {n: full_grad(model, n, d).clone() for n, d in GRADS}, logits(model, batches[0])


def max_diff(a, b) -> float:
    return float((torch.as_tensor(a, dtype=torch.float64) - torch.as_tensor(b, dtype=torch.float64)).abs().max())


def compare_tp(ckpt: Path, batches, ref, sp: bool, targets_only: bool = False):
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
        result["grad decoder.layers.0.mlp.linear_fc2.weight (LLM layer 1)"] = max_diff(
            full_grad(model, "decoder.layers.0.mlp.linear_fc2.weight", None),
            ref[2]["decoder.layers.1.mlp.linear_fc2.weight"],
        )
    else:
        for name, _ in FIRST_STAGE_GRADS:
            result[f"grad {name}"] = max_diff(full_grad(model, name, None), ref[2][name])
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, result)
    return {k: v for part in gathered for k, v in part.items()}


def main() -> None:
    install_cpu_backend_if_needed()
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--stage1-tp2-pp2", action="store_true", help="4 ranks: only stage 1 at TP=2+SP × PP=2")
    args = parser.parse_args()
    torch.set_num_threads(1)
    batches = micro_batches()
    if args.stage1_tp2_pp2:
        results = {"stage1": stage1_checks(args.out, batches, tp2_pp2_only=True)}
        if dist.get_rank() == 0:
            (args.out / "results.json").write_text(json.dumps(results, indent=2))
        dist.barrier()
        dist.destroy_process_group()
        return
    ref = reference(args.out, batches)
    results = {}
    results["tp2"], tp2_model = compare_tp(args.out, batches, ref, sp=False)
    save_model(args.out / "tp2", tp2_model, METADATA, iteration=7)
    results["tp2_sp"], _ = compare_tp(args.out, batches, ref, sp=True)
    results["tp2_sp_targets"], _ = compare_tp(args.out, batches, ref, sp=True, targets_only=True)
    results["pp2"] = compare_pp(args.out, batches, ref)
    results["pp2_targets"] = compare_pp(args.out, batches, ref, targets_only=True)
    tp1 = build(1)
    load_model(args.out / "tp2", tp1)  # saved at TP=2, loaded at TP=1
    results["tp2_saved_tp1_loaded"] = {"logits": max_diff(logits(tp1, batches[0]), ref[3])}
    results["reference_loss"] = ref[1]
    results["stage1"] = stage1_checks(args.out, batches)
    if dist.get_rank() == 0:
        (args.out / "results.json").write_text(json.dumps(results, indent=2))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":  # required: torch_dist saving spawns a Manager process
    main()
