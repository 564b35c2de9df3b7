"""``Batch``: the contract between the data loader and the model, and the collation that builds it.

One micro-batch of ``b`` packs of ``s`` token slots (see ``docs/architecture.md``). Nothing here is ever
``s × s``: document structure travels as ``cu_seqlens`` and the model builds what attention needs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

import numpy as np
import torch


@dataclass
class Batch:
    """Host tensors of one micro-batch.

    tokens        int64 [b, s]    input ids, ``pad_id`` after the last document of a pack
    labels        int64 [b, s]    next-token targets: ``tokens`` shifted left by one within a document
    loss_mask     float32 [b, s]  1 where ``labels`` is a target
    position_ids  int64 [b, s]    restart at 0 at every document (and in the padding span)
    cu_seqlens    int32 [n + 1]   document boundaries over the flattened ``b·s`` stream; padding is a span
    max_seqlen    int             longest span
    patches       float32 [p, D]  normalised pixels, image by image, row-major; D = 3·32·32
    patch_index   int64 [p]       flat index ``row·s + col`` of the ``<vpatch>`` token each patch lands on
    pack_lengths  int64 [b]       real tokens of each pack (the rest of its row is padding)
    """

    tokens: torch.Tensor
    labels: torch.Tensor
    loss_mask: torch.Tensor
    position_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int
    patches: torch.Tensor
    patch_index: torch.Tensor
    pack_lengths: torch.Tensor

    def to(self, device, non_blocking: bool = False) -> Batch:
        moved = {
            f.name: getattr(self, f.name).to(device, non_blocking=non_blocking)
            if isinstance(getattr(self, f.name), torch.Tensor) else getattr(self, f.name)
            for f in fields(self)
        }
        return Batch(**moved)


@dataclass(frozen=True)
class PackedExample:
    """One pack as the reader returns it (before padding to the sequence length).

    tokens           int [n]          token ids
    targets          bool [n]         token i is to be predicted from the tokens before it
    doc_offsets      int [d + 1]      document starts, then n
    patches          float32 [p, D]   the pack's patches, image by image, row-major
    patch_positions  int [p]          token index of the ``<vpatch>`` each patch lands on
    """

    tokens: np.ndarray
    targets: np.ndarray
    doc_offsets: np.ndarray
    patches: np.ndarray
    patch_positions: np.ndarray


def _check_example(i: int, ex: PackedExample, seq_length: int, patch_dim: int) -> None:
    n = len(ex.tokens)
    problems = []
    if n > seq_length:
        problems.append(f"{n} tokens exceed seq_length={seq_length}")
    if len(ex.targets) != n:
        problems.append(f"targets has {len(ex.targets)} entries for {n} tokens")
    offsets = np.asarray(ex.doc_offsets)
    if len(offsets) < 2 or offsets[0] != 0 or offsets[-1] != n or np.any(np.diff(offsets) <= 0):
        problems.append(f"doc_offsets {offsets.tolist()} must rise strictly from 0 to {n}")
    if ex.patches.ndim != 2 or ex.patches.shape[1] != patch_dim or len(ex.patches) != len(ex.patch_positions):
        problems.append(f"patches {ex.patches.shape} / patch_positions {len(ex.patch_positions)} do not match")
    elif len(ex.patch_positions) and (min(ex.patch_positions) < 0 or max(ex.patch_positions) >= n):
        problems.append("a patch position lies outside the pack")
    elif np.ndim(ex.patch_positions) != 1 or len(np.unique(ex.patch_positions)) != len(ex.patch_positions):
        problems.append("patch_positions must be 1-D and distinct (one patch per <vpatch> token)")
    if problems:
        raise ValueError(f"pack {i} of the micro-batch: " + "; ".join(problems))


def collate(examples: Sequence[PackedExample], seq_length: int, *, pad_id: int, patch_dim: int = 3072) -> Batch:
    """Pad ``examples`` to ``seq_length`` and derive labels, loss mask, positions and ``cu_seqlens``.

    The last slot of a document has no label inside the document, so it is never a target (the packer
    stores documents whole, so nothing is lost). Padding forms one span per pack, never a target.
    """
    if not examples:
        raise ValueError("collate: no examples")
    b, s = len(examples), seq_length
    tokens = np.full((b, s), pad_id, dtype=np.int64)
    labels = np.full((b, s), pad_id, dtype=np.int64)
    loss_mask = np.zeros((b, s), dtype=np.float32)
    position_ids = np.zeros((b, s), dtype=np.int64)
    cu_seqlens, patch_index = [0], []
    for row, ex in enumerate(examples):
        _check_example(row, ex, s, patch_dim)
        n = len(ex.tokens)
        tokens[row, :n] = ex.tokens
        offsets = np.asarray(ex.doc_offsets, dtype=np.int64)
        for start, end in zip(offsets[:-1], offsets[1:]):
            labels[row, start:end - 1] = tokens[row, start + 1:end]
            loss_mask[row, start:end - 1] = np.asarray(ex.targets[start + 1:end], dtype=np.float32)
            position_ids[row, start:end] = np.arange(end - start)
        spans = offsets[1:] if n == s else np.append(offsets[1:], s)
        position_ids[row, n:] = np.arange(s - n)
        cu_seqlens.extend((row * s + spans).tolist())
        patch_index.append(row * s + np.asarray(ex.patch_positions, dtype=np.int64))
    cu = np.asarray(cu_seqlens, dtype=np.int32)
    return Batch(
        tokens=torch.from_numpy(tokens),
        labels=torch.from_numpy(labels),
        loss_mask=torch.from_numpy(loss_mask),
        position_ids=torch.from_numpy(position_ids),
        cu_seqlens=torch.from_numpy(cu),
        max_seqlen=int(np.diff(cu).max()),
        patches=_gather_patches(examples, patch_dim),
        patch_index=torch.from_numpy(np.concatenate(patch_index)),
        pack_lengths=torch.tensor([len(ex.tokens) for ex in examples], dtype=torch.int64),
    )


def _gather_patches(examples: Sequence[PackedExample], patch_dim: int) -> torch.Tensor:
    """float32 [p, D]: every example's patches, in order, copied at most once.

    In a DataLoader worker the output is allocated in shared memory (as torch's ``default_collate`` does),
    so handing it to the main process copies nothing more: at 32K a pack carries ~370 MB of patches.
    """
    parts = [np.asarray(ex.patches, dtype=np.float32).reshape(-1, patch_dim) for ex in examples]
    if torch.utils.data.get_worker_info() is None:
        return torch.from_numpy(np.concatenate(parts) if len(parts) > 1 else np.require(parts[0], requirements="CW"))
    count = sum(len(p) for p in parts)
    like = torch.empty(0, dtype=torch.float32)
    out = like.new(like._typed_storage()._new_shared(count * patch_dim)).view(count, patch_dim)
    np.concatenate(parts, out=out.numpy())
    return out
