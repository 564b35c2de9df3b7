"""HaploVL's attention mask over packed documents, built inside the model from ``cu_seqlens`` and the
per-token image-block ids (``Batch.image_block_ids``).

A query ``q`` sees key ``k`` when both lie in the same document and either ``k ≤ q`` (causal) or both lie in
the same image block (bidirectional inside an image: its patches and its newline positions). Between blocks
the order is causal; text before an image does not see it; documents never see each other. This is the
released code's ``attention_start_ids`` rule (spec §2.9: key ``j`` is hidden from ``i`` iff ``start[j] > i``,
``start`` = the block's first index inside an image, the token's own index elsewhere) with packing added.
The same mask is used by every layer, pre-decoder and LLM alike (as released).

GPU path: Transformer Engine's fused THD attention takes ``cu_seqlens`` and a causal/padding mask type, not a
per-token rule, so it cannot express this as is. Options (docs/architecture.md, "HaploVL"): TE's
``arbitrary`` mask (an explicit ``[b, 1, s, s]`` mask through the unfused or cuDNN-arbitrary path: s² bits
per row of memory and no flash kernel), FlexAttention with a ``block_mask`` from the same two tensors
(sparse, keeps the flash-like tiling), or splitting each document at image boundaries into THD segments
(images bidirectional, text causal) joined by a second pass for the cross-block keys. Only the local
(explicit mask) path is implemented: ``HaploModel`` refuses the TE backend.
"""

from __future__ import annotations

import torch

from megatron.solo.model.attention import packed_causal_mask

NO_IMAGE = -1


def haplo_attention_mask(cu_seqlens: torch.Tensor, image_block_ids: torch.Tensor) -> torch.Tensor:
    """bool [b, 1, s, s], True where query ``q`` must not see key ``k``: the packed causal mask, opened inside
    each image block.

    cu_seqlens int32 [n + 1] over the flat ``b·s`` stream; image_block_ids int64 [b, s], ``NO_IMAGE`` (-1)
    outside images, else an id shared by exactly the positions of one image block (so inside one document).
    Every row sees itself, so padding rows stay finite.
    """
    b, s = image_block_ids.shape
    blocks = image_block_ids
    same_image = (blocks[:, :, None] == blocks[:, None, :]) & (blocks[:, :, None] != NO_IMAGE)
    return packed_causal_mask(cu_seqlens, b, s) & ~same_image[:, None]
