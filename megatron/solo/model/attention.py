"""What attention needs to keep packed documents apart, built from ``cu_seqlens``.

- local backend: a boolean ``[b, 1, s, s]`` mask (True = masked out), causal and block-diagonal per
  document, with the sliding window applied inside each document; built here, inside the model, so the
  data side never holds an ``s × s`` tensor;
- Transformer Engine backend: THD ``PackedSeqParams`` (varlen attention over the flattened ``b·s`` stream),
  with the window passed to TE through ``TransformerConfig.window_size``.
"""

from __future__ import annotations

import torch
from megatron.core.packed_seq_params import PackedSeqParams


def document_ids(cu_seqlens: torch.Tensor, batch_size: int, seq_length: int) -> torch.Tensor:
    """int64 [b, s]: the index of the span (document or padding) each token slot belongs to."""
    positions = torch.arange(batch_size * seq_length, device=cu_seqlens.device)
    ids = torch.searchsorted(cu_seqlens[1:].to(torch.int64), positions, right=True)
    return ids.view(batch_size, seq_length)


def packed_causal_mask(
    cu_seqlens: torch.Tensor, batch_size: int, seq_length: int, sliding_window: int | None = None
) -> torch.Tensor:
    """bool [b, 1, s, s], True where query ``q`` must not see key ``k``.

    A query sees keys of its own document at ``k ≤ q`` and, with a window ``W``, ``q - k < W`` (HF Mistral's
    rule). Every row sees at least itself, so padding rows stay finite.
    """
    docs = document_ids(cu_seqlens, batch_size, seq_length)
    q = torch.arange(seq_length, device=cu_seqlens.device)
    distance = q[:, None] - q[None, :]
    allowed = (docs[:, :, None] == docs[:, None, :]) & (distance >= 0)
    if sliding_window is not None:
        allowed &= distance < sliding_window
    return ~allowed[:, None]


def thd_packed_seq_params(cu_seqlens: torch.Tensor, max_seqlen: int) -> PackedSeqParams:
    """Varlen attention over the flattened stream: every span attends only within itself."""
    cu = cu_seqlens.to(torch.int32)
    return PackedSeqParams(
        qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=int(max_seqlen), max_seqlen_kv=int(max_seqlen)
    )
