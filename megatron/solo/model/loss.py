"""The training objective: per-token cross-entropy on target tokens, averaged over the global batch."""

from __future__ import annotations

import torch


def masked_token_loss(loss_mask: torch.Tensor, per_token_loss: torch.Tensor):
    """Loss function for megatron-core's ``forward_backward_func`` with ``calculate_per_token_loss``.

    loss_mask, per_token_loss: [b, s]. Returns (sum of target-token losses, number of target tokens, logs);
    megatron-core divides the gradients by the target-token count summed over micro-batches and
    data-parallel ranks, so every target token of the global batch weighs the same (the reference instead
    averaged per pack, then over packs).
    """
    mask = loss_mask.float()
    total = (per_token_loss.float() * mask).sum()
    count = mask.sum().to(torch.int)
    # clone: the pipeline schedules may divide the returned loss in place
    return total, count, {"lm loss": torch.stack([total.detach().clone(), mask.sum().detach()])}
