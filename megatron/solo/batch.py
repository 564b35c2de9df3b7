"""``Batch``: the contract between the data loader and the model, and the collation that builds it.

One micro-batch of ``b`` packs of ``s`` token slots (see ``docs/architecture.md``). Nothing here is ever
``s × s``: document structure travels as ``cu_seqlens`` and the model builds what attention needs.

Patches travel as the stored pixels, uint8 ``[p, 3·P·P]`` (a quarter of float32's bytes: ~50 MB instead of
~200 MB per 32K pack host → device); :meth:`Batch.normalized` turns them into the model's float32 input
on the device, bit-identical to the numpy front end (:func:`megatron.solo.image.normalize_patches_torch`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields, replace

import numpy as np
import torch

from megatron.solo.image import DEFAULT_CONFIG, ImageConfig, normalize_patches_torch

PATCH_DTYPES = (np.uint8, np.float32)


@dataclass
class Batch:
    """Host tensors of one micro-batch.

    tokens        int64 [b, s]    input ids, ``pad_id`` after the last document of a pack
    labels        int64 [b, s]    next-token targets: ``tokens`` shifted left by one within a document
    loss_mask     float32 [b, s]  1 where ``labels`` is a target
    position_ids  int64 [b, s]    restart at 0 at every document (and in the padding span)
    cu_seqlens    int32 [n + 1]   document boundaries over the flattened ``b·s`` stream; padding is a span
    max_seqlen    int             longest span
    patches       uint8 [p, D]    the stored pixels of each patch, image by image, row-major, each
                                  patch C×P×P; D = 3·P·P (3072 for P=32). The model takes float32:
                                  :meth:`normalized` after the copy to the device. float32 [p, D] when
                                  the examples carried normalised patches (synthetic batches); [0, D] when
                                  they carried none (pipeline stages that do not embed)
    patch_index   int64 [p]       flat index ``row·s + col`` of the ``<vpatch>`` token each patch lands on
                                  (complete even when ``patches`` is [0, D])
    pack_lengths  int64 [b]       real tokens of each pack (the rest of its row is padding)
    image_block_ids  int64 [b, s] -1 outside images; inside an image that attends bidirectionally (HaploVL),
                                  an id shared by exactly that image's positions (unique in the micro-batch).
                                  All -1 for SOLO data: the SOLO model is causal and ignores it
    patch_table_index  int64 [p]  each patch's row in the per-tile learned position table (HaploVL); -1
                                  where the data has none (SOLO)
    tile_patches  uint8 [t, D]    HaploVL stage 1 only (else [0, D]): every image's whole tiles as patches,
                                  tile-major, each tile row-major: the vision teacher's input
    patch_tile_rows  int64 [p]    each patch's row in ``tile_patches`` (-1 when they are not loaded)
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
    image_block_ids: torch.Tensor
    patch_table_index: torch.Tensor
    tile_patches: torch.Tensor
    patch_tile_rows: torch.Tensor

    def _map_tensors(self, fn) -> Batch:
        return Batch(
            **{f.name: fn(v) if isinstance(v := getattr(self, f.name), torch.Tensor) else v for f in fields(self)}
        )

    def to(self, device, non_blocking: bool = False) -> Batch:
        return self._map_tensors(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> Batch:
        """Every tensor in page-locked memory (torch's DataLoader calls this on custom batch types)."""
        return self._map_tensors(torch.Tensor.pin_memory)

    def normalized(self, config: ImageConfig = DEFAULT_CONFIG) -> Batch:
        """This batch with float32 patches: uint8 ones normalised by ``config`` where they are (call it
        after :meth:`to`: a quarter of the bytes cross to the device), float32 ones as they are."""
        if self.patches.dtype != torch.uint8:
            return self
        tiles = self.tile_patches
        tiles = normalize_patches_torch(tiles, config) if tiles.dtype == torch.uint8 else tiles
        return replace(self, patches=normalize_patches_torch(self.patches, config), tile_patches=tiles)

    def image_rows(self) -> torch.Tensor:
        """bool [b]: the rows (packs) holding at least one patch, from ``patch_index``."""
        rows = torch.zeros(self.tokens.shape[0], dtype=torch.bool, device=self.patch_index.device)
        rows[self.patch_index // self.tokens.shape[1]] = True
        return rows


@dataclass(frozen=True)
class PackedExample:
    """One pack as the reader returns it (before padding to the sequence length).

    tokens           int [n]          token ids
    targets          bool [n]         token i is to be predicted from the tokens before it
    doc_offsets      int [d + 1]      document starts, then n
    patches          uint8 [p, D]     the pack's patches as stored pixels, image by image, row-major (or
                                      float32 normalised ones); None: not loaded (stages that do not embed)
    patch_positions  int [p]          token index of the ``<vpatch>`` each patch lands on
    image_spans      int [m, 2]       ``[start, end)`` token ranges of the pack's bidirectional image blocks
                                      (HaploVL: an image's patches and newlines); None: none (SOLO)
    patch_table_index  int [p]        each patch's row in the per-tile position table; None: none (SOLO)
    tile_patches     uint8 [t, D]     HaploVL stage 1: the images' whole tiles as patches; None: not loaded
    patch_tile_rows  int [p]          each patch's row in ``tile_patches``; None: not loaded
    """

    tokens: np.ndarray
    targets: np.ndarray
    doc_offsets: np.ndarray
    patches: np.ndarray | None
    patch_positions: np.ndarray
    image_spans: np.ndarray | None = None
    patch_table_index: np.ndarray | None = None
    tile_patches: np.ndarray | None = None
    patch_tile_rows: np.ndarray | None = None


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
    if ex.patches is not None and (
        ex.patches.ndim != 2 or ex.patches.shape[1] != patch_dim or len(ex.patches) != len(ex.patch_positions)
    ):
        problems.append(f"patches {ex.patches.shape} / patch_positions {len(ex.patch_positions)} do not match")
    elif ex.patches is not None and ex.patches.dtype not in PATCH_DTYPES:
        problems.append(f"patches are {ex.patches.dtype}: uint8 pixels or float32 normalised values expected")
    elif len(ex.patch_positions) and (min(ex.patch_positions) < 0 or max(ex.patch_positions) >= n):
        problems.append("a patch position lies outside the pack")
    elif np.ndim(ex.patch_positions) != 1 or len(np.unique(ex.patch_positions)) != len(ex.patch_positions):
        problems.append("patch_positions must be 1-D and distinct (one patch per <vpatch> token)")
    if ex.patch_table_index is not None and len(ex.patch_table_index) != len(ex.patch_positions):
        problems.append(
            f"patch_table_index has {len(ex.patch_table_index)} entries for {len(ex.patch_positions)} patches"
        )
    if ex.image_spans is not None and len(ex.image_spans):
        spans = np.asarray(ex.image_spans)
        ordered = np.concatenate([[0], spans.reshape(-1), [n]])
        if spans.ndim != 2 or spans.shape[1] != 2 or np.any(spans[:, 1] <= spans[:, 0]) or np.any(np.diff(ordered) < 0):
            problems.append(f"image_spans {spans.tolist()} must be ordered, disjoint, non-empty [start, end) ranges")
        elif np.any(
            np.searchsorted(offsets, spans[:, 0], "right") != np.searchsorted(offsets, spans[:, 1] - 1, "right")
        ):
            problems.append("an image span crosses a document boundary")
    if problems:
        raise ValueError(f"pack {i} of the micro-batch: " + "; ".join(problems))


def collate(
    examples: Sequence[PackedExample], seq_length: int, *, pad_id: int, patch_dim: int = DEFAULT_CONFIG.patch_dim
) -> Batch:
    """Pad ``examples`` to ``seq_length`` and derive labels, loss mask, positions and ``cu_seqlens``.

    The patches keep their dtype (uint8 from the loader); every example carries the same kind.

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
    image_block_ids = np.full((b, s), -1, dtype=np.int64)
    cu_seqlens, patch_index, table_index, blocks = [0], [], [], 0
    tiles, tile_rows, tile_offset = [], [], 0
    for row, ex in enumerate(examples):
        _check_example(row, ex, s, patch_dim)
        n = len(ex.tokens)
        tokens[row, :n] = ex.tokens
        offsets = np.asarray(ex.doc_offsets, dtype=np.int64)
        for start, end in zip(offsets[:-1], offsets[1:]):
            labels[row, start : end - 1] = tokens[row, start + 1 : end]
            loss_mask[row, start : end - 1] = np.asarray(ex.targets[start + 1 : end], dtype=np.float32)
            position_ids[row, start:end] = np.arange(end - start)
        spans = offsets[1:] if n == s else np.append(offsets[1:], s)
        position_ids[row, n:] = np.arange(s - n)
        cu_seqlens.extend((row * s + spans).tolist())
        patch_index.append(row * s + np.asarray(ex.patch_positions, dtype=np.int64))
        given = ex.patch_table_index is not None
        table_index.append(
            np.asarray(ex.patch_table_index if given else np.full(len(ex.patch_positions), -1), np.int64)
        )
        if ex.tile_patches is not None:
            tiles.append(ex.tile_patches)
            tile_rows.append(np.asarray(ex.patch_tile_rows, np.int64) + tile_offset)
            tile_offset += len(ex.tile_patches)
        else:
            tile_rows.append(np.full(len(ex.patch_positions), -1, np.int64))
        for start, end in np.asarray(ex.image_spans if ex.image_spans is not None else [], np.int64).reshape(-1, 2):
            image_block_ids[row, start:end] = blocks
            blocks += 1
    kinds = {None if ex.patches is None else np.dtype(ex.patches.dtype) for ex in examples}
    if len(kinds) > 1:
        raise ValueError(f"the micro-batch mixes kinds of patches ({', '.join(sorted(map(str, kinds)))})")
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
        image_block_ids=torch.from_numpy(image_block_ids),
        patch_table_index=torch.from_numpy(np.concatenate(table_index)),
        tile_patches=torch.from_numpy(np.concatenate(tiles) if tiles else np.zeros((0, patch_dim), np.uint8)),
        patch_tile_rows=torch.from_numpy(np.concatenate(tile_rows)),
    )


def _gather_patches(examples: Sequence[PackedExample], patch_dim: int) -> torch.Tensor:
    """[p, D] in the examples' dtype (uint8 without any): every example's patches, in order, copied once.

    In a DataLoader worker the output is allocated in shared memory, so handing it to the main process
    copies nothing more. This is torch's private ``_new_shared``, as torch's own ``default_collate`` does:
    there is no public call that allocates in shared memory, and the public ``torch.empty(…).share_memory_()``
    allocates private memory first and copies it over (measured on a 32K micro-batch's uint8 patches:
    ~50 ms against ~18 ms, next to ~400 ms of decoding).
    """
    parts = [ex.patches for ex in examples if ex.patches is not None]
    dtype = parts[0].dtype if parts else np.dtype(np.uint8)
    parts = [np.asarray(p).reshape(-1, patch_dim) for p in parts] or [np.zeros((0, patch_dim), dtype)]
    if torch.utils.data.get_worker_info() is None:
        return torch.from_numpy(np.concatenate(parts) if len(parts) > 1 else np.require(parts[0], requirements="CW"))
    count = sum(len(p) for p in parts)
    like = torch.from_numpy(parts[0][:0])
    out = like.new(like._typed_storage()._new_shared(count * patch_dim)).view(count, patch_dim)
    np.concatenate(parts, out=out.numpy())
    return out
