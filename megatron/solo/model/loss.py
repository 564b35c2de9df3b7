"""The training objective: per-token cross-entropy on target tokens, averaged over the global batch either
per target token (pre-training) or per sample (SOLO's SFT recipe: each sample's mean, then their mean)."""

from __future__ import annotations

import torch

LOSS_AVERAGING = ("token", "sample")


def masked_token_loss(loss_mask: torch.Tensor, per_token_loss: torch.Tensor):
    """Loss function for megatron-core's ``forward_backward_func`` with ``calculate_per_token_loss``.

    loss_mask, per_token_loss: [b, s]. Returns (sum of target-token losses, number of target tokens, logs);
    megatron-core divides the gradients by the target-token count summed over micro-batches and
    data-parallel ranks, so every target token of the global batch weighs the same (the reference instead
    averaged per pack, then over packs).
    """
    mask = loss_mask.float()
    return weighted_token_loss(mask, mask.sum().to(torch.int), per_token_loss)


def weighted_token_loss(weights: torch.Tensor, count: torch.Tensor, per_token_loss: torch.Tensor):
    """(Σ weights · loss, ``count``, logs) for ``calculate_per_token_loss``: megatron-core sums both over
    micro-batches and data-parallel ranks and divides once, so the step's loss is Σ(w·loss) / Σ count.

    weights float [b, s] (the loss mask, or :func:`sample_weights`); count int [] (what the weights sum to)."""
    total = (per_token_loss.float() * weights).sum()
    # clone: the pipeline schedules may divide the returned loss in place
    return total, count, {"lm loss": torch.stack([total.detach().clone(), count.detach().float()])}


def sample_weights(loss_mask: torch.Tensor, cu_seqlens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Token weights that make the summed loss a sum of per-sample means: 1 / (its document's target
    count) at each target, 0 elsewhere; and the number of documents with at least one target.

    loss_mask float [b, s]; cu_seqlens int32 [n + 1] over the flat ``b·s`` stream (every document, and each
    row's padding, is a span: :func:`megatron.solo.batch.collate`). Returns (float32 [b, s], int32 []).
    With these, Σ(w·loss) / Σ count over micro-batches and data-parallel ranks is the mean over the global
    batch's samples of each sample's mean, exactly, however they are packed (a document counts once:
    the packer never splits one that fits ``seq_length``, and SFT samples are cut to fit).
    """
    flat = loss_mask.reshape(-1).float()
    lengths = torch.diff(cu_seqlens.to(torch.int64))
    document = torch.repeat_interleave(torch.arange(len(lengths), device=flat.device), lengths.to(flat.device))
    targets = torch.zeros(len(lengths), device=flat.device).index_add_(0, document, flat)
    weights = flat / targets.clamp(min=1.0)[document]
    return weights.view_as(loss_mask), (targets > 0).sum().to(torch.int)
