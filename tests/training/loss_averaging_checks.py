"""``--loss-averaging sample`` under parallel layouts, run under torchrun by test_loss_averaging.py (2 gloo ranks).

Reference (every rank, TP=1): the model's dense per-token loss, averaged document by document (documents
found from the position ids restarting at 0, not from ``cu_seqlens``), then over the documents of all
micro-batches; its gradients by autograd through that computation. Each layout (TP=2, TP=2+SP: all
micro-batches on both ranks; DP=2: one micro-batch per rank) loads the same weights, runs megatron-core's
schedule with the trainer's loss function and weights, and forms the step's loss and gradients as
``calculate_per_token_loss`` does: Σ sums / Σ counts over micro-batches and data-parallel ranks. Rank 0
writes the largest differences to ``OUT/results.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.pipeline_parallel import get_forward_backward_func

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "model"))
from parallel_checks import GRADS, METADATA, SEQ, build, full_grad, max_diff, micro_batches  # noqa: E402

from megatron.solo.backend import install_cpu_backend_if_needed  # noqa: E402
from megatron.solo.checkpointing import load_model, save_model  # noqa: E402
from megatron.solo.model import sample_weights  # noqa: E402
from megatron.solo.training.metrics import loss_with_breakdown  # noqa: E402


def direct_per_sample_mean(per_token: torch.Tensor, batch) -> list[torch.Tensor]:
    """Each document's mean loss over its targets (documents with none left out), from position restarts."""
    means = []
    for row in range(per_token.shape[0]):
        starts = (batch.position_ids[row] == 0).nonzero().flatten().tolist() + [per_token.shape[1]]
        for a, b in zip(starts, starts[1:]):
            mask = batch.loss_mask[row, a:b]
            if mask.sum() > 0:
                means.append((per_token[row, a:b] * mask).sum() / mask.sum())
    return means


def reference(ckpt: Path, batches):
    model = build(1, seed=1234)
    generator = torch.Generator().manual_seed(7)  # weights no fresh build has: the layouts must load them
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.02 * torch.randn(param.shape, generator=generator))
    save_model(ckpt / "tp1", model, METADATA)
    model.zero_grad()
    means, tokens, count = [], 0.0, 0.0
    for b in batches:
        per_token = model(
            b.tokens, b.position_ids, b.cu_seqlens, b.max_seqlen, b.patches, b.patch_index, labels=b.labels
        )
        means += direct_per_sample_mean(per_token, b)
        tokens, count = tokens + (per_token.detach() * b.loss_mask).sum().item(), count + b.loss_mask.sum().item()
    loss = torch.stack(means).mean()
    loss.backward()
    grads = {n: full_grad(model, n, d).clone() for n, d in GRADS}
    return {"loss": loss.item(), "samples": len(means), "token_mean": tokens / count, "grads": grads}


def schedule(model, batches):
    """(Σ loss sums, Σ counts) over this rank's micro-batches through megatron-core's schedule, the trainer's
    loss function with per-sample weights; gradients left unscaled (Σ, as before finalize_model_grads)."""
    model.zero_grad()

    def step(data_iterator, m):
        b = next(data_iterator)
        weights, samples = sample_weights(b.loss_mask, b.cu_seqlens)
        out = m(
            b.tokens,
            b.position_ids,
            b.cu_seqlens,
            b.max_seqlen,
            b.patches,
            b.patch_index,
            labels=b.labels,
            loss_mask=b.loss_mask,
        )  # the trainer's path: logits at the targets only
        return out, partial(loss_with_breakdown, b.loss_mask, b.image_rows(), torch.zeros(2), samples, weights=weights)

    outputs = get_forward_backward_func()(
        forward_step_func=step,
        data_iterator=iter(batches),
        model=[model],
        num_microbatches=len(batches),
        seq_length=SEQ,
        micro_batch_size=batches[0].tokens.shape[0],
    )
    return torch.stack([o["lm loss"] for o in outputs]).sum(0)  # [Σ sum, Σ count]


def compare(model, pair: torch.Tensor, ref: dict, dp_group=None) -> dict:
    """The step's loss and gradients (divided by the count, reduced over ``dp_group``) against the reference."""
    if dp_group is not None:
        dist.all_reduce(pair, group=dp_group)
    total, count = pair.tolist()
    out = {"loss": abs(total / count - ref["loss"])}
    for name, dim in GRADS:
        grad = full_grad(model, name, dim).clone()
        if dp_group is not None:
            dist.all_reduce(grad, group=dp_group)
        out[f"grad {name}"] = max_diff(grad / count, ref["grads"][name])
    return out


def main() -> None:
    install_cpu_backend_if_needed()
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    batches = micro_batches()
    ref = reference(args.out, batches)
    results = {"samples": ref["samples"], "direct": ref["loss"], "token_mean": ref["token_mean"]}
    for name, sp in (("tp2", False), ("tp2_sp", True)):
        model = build(2, sp=sp)
        load_model(args.out / "tp1", model)
        results[name] = compare(model, schedule(model, batches), ref)
    model = build(1)  # 2 ranks at TP=1: DP=2, one micro-batch each
    load_model(args.out / "tp1", model)
    mine = batches[ps.get_data_parallel_rank() :: ps.get_data_parallel_world_size()]
    results["dp2"] = compare(model, schedule(model, mine), ref, dp_group=ps.get_data_parallel_group())
    if dist.get_rank() == 0:
        (args.out / "results.json").write_text(json.dumps(results, indent=2))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":  # required: torch_dist saving spawns a Manager process
    main()
