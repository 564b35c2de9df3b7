"""Training-time data: a weighted blend of preprocessed prefixes → micro-batches for one data-parallel rank.

    parse_data_path     Megatron-LM's ``--data-path`` syntax → [(weight, prefix)]
    BlendedPackDataset  global sample index → :class:`~megatron.solo.batch.PackedExample`
    build_train_loader  → ``Iterator[Batch]`` for one DP rank, resumable at ``consumed_samples``

Order. Global sample ``i`` comes from dataset ``dataset_index[i]``, chosen like megatron-core's
``BlendedDataset``: the dataset whose count so far lags its target ``weight·(i+1)`` the most (ties: the
earlier one; megatron-core's C++ helper compares with ``weight·max(i, 1)``, a step behind). Within a
dataset, its k-th sample is pack ``perm_e[k mod n]`` of epoch ``e = k div n``, each
epoch a fresh permutation drawn from (seed, dataset position, epoch). Both rules read only the past, so the
first N samples do not change when ``num_samples`` grows, and nothing depends on the worker count.

Batches follow Megatron-LM's ``MegatronPretrainingSampler``: the global samples are consumed in order, in
chunks of ``micro_batch_size · data_parallel_size``; rank r takes ``[r·mbs, (r+1)·mbs)`` of each chunk, so
a global batch holds the same samples whatever the DP split. A last incomplete chunk is dropped.

Memory is O(sequence length) per sample: collation builds ``[b, s]`` arrays and ``cu_seqlens``, never an
``s × s`` mask (the model derives what attention needs).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from megatron.solo.batch import Batch, PackedExample, collate
from megatron.solo.data.packed_format import PackedDataset, check_header, header_file
from megatron.solo.image import DEFAULT_CONFIG, ImageConfig
from megatron.solo.training.arguments import parse_data_path  # re-exported: the loader's input syntax


class BadPackError(ValueError):
    """A pack that cannot be read, decoded or collated; the message names its prefix and pack index."""


# ---------------------------------------------------------------------------------------------
# Sample order


def blend_order(weights: Sequence[float], num_samples: int) -> np.ndarray:
    """int16/int32 [num_samples]: the dataset of each global sample (the largest lag behind ``w·(i+1)``).

    Each dataset's count stays within ±½ of ``w·(i+1)`` at every prefix for two datasets, about ±1 for
    more (a greedy rule: up to ~1.1 seen with several weights under 1%).
    A plain loop: the choice depends on every earlier one (~0.35 s per million samples for two datasets).
    """
    w = [float(x) for x in weights]
    dtype = np.int16 if len(w) <= np.iinfo(np.int16).max else np.int32
    if len(w) == 1:
        return np.zeros(num_samples, dtype)
    counts = [0] * len(w)
    out = [0] * num_samples
    others = range(1, len(w))
    for i in range(num_samples):
        t = i + 1
        best, lag = 0, w[0] * t - counts[0]
        for d in others:
            e = w[d] * t - counts[d]
            if e > lag:
                best, lag = d, e
        counts[best] += 1
        out[i] = best
    return np.array(out, dtype)


def epoch_order(n_packs: int, count: int, seed: int, position: int) -> np.ndarray:
    """int64 [count]: pack of each of a dataset's first ``count`` samples, a fresh permutation per epoch.

    Epoch e's permutation is row e of one stream seeded by (seed, position): it depends only on
    (seed, position, e, n_packs), not on ``count``.
    """
    epochs = -(-count // n_packs)
    rng = np.random.default_rng(np.random.SeedSequence([seed, position]))
    return rng.permuted(np.tile(np.arange(n_packs, dtype=np.int64), (epochs, 1)), axis=1).reshape(-1)[:count]


# ---------------------------------------------------------------------------------------------
# The dataset


def _open(prefix: str) -> PackedDataset:
    if os.path.isfile(prefix + ".bin") and os.path.getsize(prefix + ".bin") == 0:  # megatron-core cannot mmap it
        raise ValueError(f"--data-path prefix {prefix!r} holds no packs but has a positive weight")
    try:
        ds = PackedDataset(prefix)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"--data-path prefix {prefix!r}: {e}") from e
    except ValueError as e:
        raise ValueError(f"--data-path prefix {prefix!r}: {e}") from e
    if len(ds) == 0:
        raise ValueError(f"--data-path prefix {prefix!r} holds no packs but has a positive weight")
    return ds


def _check_headers(datasets: list[PackedDataset], tokenizer: dict | None) -> None:
    first = datasets[0]
    for ds in datasets[1:]:
        check_header(
            ds.header,
            first.header,
            f"--data-path prefix {ds.prefix!r} ({header_file(ds.prefix)})",
            f"--data-path prefix {first.prefix!r} of the same blend",
        )
    if tokenizer is not None:
        for ds in datasets:
            ds.check_tokenizer(tokenizer, "the run's tokenizer (--tokenizer-model or the checkpoint's)")


class BlendedPackDataset(Dataset):
    """Global sample index → :class:`PackedExample`, over a weighted blend of preprocessed prefixes.

    ``dataset_index``  int16 [num_samples]  position in ``blend`` of each sample's prefix
    ``sample_index``   int64 [num_samples]  pack index within that prefix

    Patches are the stored pixels, uint8 (the trainer normalises them on the device). ``decode_patches=False``
    skips the images (patches None, patch positions still given): for pipeline stages that do not embed,
    which need the token layout but not the pixels.

    Every prefix's header (``PREFIX.pack.json``) must agree with the first's on patch size, normalisation
    and tokenizer, and with ``tokenizer`` (a ``SoloTokenizer.fingerprint()``) when the run knows it: a
    ValueError names the prefix and the field otherwise. ``image_config`` is the blend's.
    """

    def __init__(
        self,
        blend: list[tuple[float, str]],
        num_samples: int,
        seed: int,
        *,
        decode_patches: bool = True,
        tokenizer: dict | None = None,
        teacher_inputs: bool = False,
    ):
        if not blend:
            raise ValueError("BlendedPackDataset: empty blend (no --data-path prefix)")
        if not (isinstance(num_samples, int) and num_samples >= 0):
            raise ValueError(f"BlendedPackDataset: num_samples must be an int >= 0, got {num_samples!r}")
        weights = np.array([w for w, _ in blend], dtype=np.float64)
        if not (np.isfinite(weights).all() and (weights > 0).all()):
            raise ValueError(f"BlendedPackDataset: weights must be positive, got {weights.tolist()}")
        self.prefixes = [p for _, p in blend]
        self.weights = weights  # as given: parse_data_path (training/arguments.py) is the one place that normalises
        self.seed = int(seed)
        self.decode_patches = decode_patches
        self.teacher_inputs = teacher_inputs  # HaploVL stage 1: also the images' whole tiles (PackView.teacher_inputs)
        self.datasets = [_open(p) for p in self.prefixes]
        _check_headers(self.datasets, tokenizer)
        self.dataset_index = blend_order(self.weights, num_samples)
        self.sample_index = np.empty(num_samples, dtype=np.int64)
        for d, ds in enumerate(self.datasets):
            rows = np.flatnonzero(self.dataset_index == d)
            self.sample_index[rows] = epoch_order(len(ds), len(rows), self.seed, d)

    def __len__(self) -> int:
        return len(self.dataset_index)

    @property
    def image_config(self) -> ImageConfig:
        """Patch size and normalisation of every prefix of the blend (their headers agree)."""
        return self.datasets[0].image_config

    @property
    def patch_dim(self) -> int:
        return self.image_config.patch_dim

    def source(self, i: int) -> tuple[str, int]:
        """(prefix, pack index) of global sample ``i``."""
        return self.prefixes[int(self.dataset_index[i])], int(self.sample_index[i])

    def where(self, i: int) -> str:
        """Sample ``i`` named for an error message."""
        prefix, pack = self.source(i)
        return f"{prefix} pack {pack} (global sample {i}, from --data-path)"

    def __getitem__(self, i: int) -> PackedExample:
        if not 0 <= i < len(self):
            raise IndexError(f"sample {i} out of range (0..{len(self) - 1})")
        try:
            view = self.datasets[int(self.dataset_index[i])][int(self.sample_index[i])]
            return PackedExample(
                tokens=view.tokens.astype(np.int64),
                targets=view.targets,
                doc_offsets=view.doc_offsets,
                patch_positions=view.patch_positions,
                image_spans=view.image_spans,
                patch_table_index=view.patch_table_index,
                **self._images(view),
            )
        except Exception as e:  # decode errors come as PIL/OSError/ValueError: name the pack whatever they are
            raise BadPackError(f"{self.where(i)}: {type(e).__name__}: {e}") from e

    def _images(self, view) -> dict:
        """The decoded pixels: the sequence's patches (``decode_patches``: the first pipeline stage) and, for
        HaploVL stage 1 (``teacher_inputs``: the last stage), the images' whole tiles for the vision teacher.
        Where both are wanted the patches are taken from the tiles (one decode per image)."""
        if not self.teacher_inputs:
            return {"patches": view.patches_uint8() if self.decode_patches else None}
        tiles, rows = view.teacher_inputs()
        patches = tiles[rows] if self.decode_patches else None
        return {"patches": patches, "tile_patches": tiles, "patch_tile_rows": rows}

    def max_pack_length(self) -> list[int]:
        """Longest pack of each prefix, in tokens."""
        return [int(ds.sequence_lengths.max()) for ds in self.datasets]

    def describe(self) -> list[str]:
        """One line per prefix: weight, packs, samples drawn and the epochs they make."""
        drawn = np.bincount(self.dataset_index, minlength=len(self.datasets))
        return [
            f"{prefix}: weight {w:.4f}, {len(ds):,} packs, {n:,} samples drawn = {n / len(ds):.2f} epochs"
            for prefix, w, ds, n in zip(self.prefixes, self.weights, self.datasets, drawn.tolist())
        ]


# ---------------------------------------------------------------------------------------------
# The loader


class PretrainingBatchSampler(Sampler[list[int]]):
    """Megatron-LM's ``MegatronPretrainingSampler`` (drop_last): this rank's micro-batches of global indices."""

    def __init__(
        self,
        total_samples: int,
        consumed_samples: int,
        micro_batch_size: int,
        data_parallel_rank: int,
        data_parallel_size: int,
    ):
        self.total_samples = total_samples
        self.consumed_samples = consumed_samples
        self.micro_batch_size = micro_batch_size
        self.rank = data_parallel_rank
        self.chunk = micro_batch_size * data_parallel_size

    def __len__(self) -> int:
        return (self.total_samples - self.consumed_samples) // self.chunk

    def __iter__(self) -> Iterator[list[int]]:
        first = self.consumed_samples + self.rank * self.micro_batch_size
        for start in range(first, first + len(self) * self.chunk, self.chunk):
            yield list(range(start, start + self.micro_batch_size))


class _Named(Dataset):
    """``ds[i]`` → (where, example): collation errors can then name the pack without the dataset."""

    def __init__(self, dataset: BlendedPackDataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> tuple[str, PackedExample]:
        return self.dataset.where(i), self.dataset[i]


@dataclass(frozen=True)
class _Collate:
    """[(where, example)] → :class:`Batch` (the DataLoader pins it with :meth:`Batch.pin_memory`).

    :func:`collate` gathers the patches straight into shared memory inside a worker: one copy of the pixels.
    """

    seq_length: int
    pad_id: int
    patch_dim: int

    def __call__(self, items: list[tuple[str, PackedExample]]) -> Batch:
        try:
            return self.collate([ex for _, ex in items])
        except ValueError as e:
            raise BadPackError(self._culprit(items, e)) from e

    def collate(self, examples: list[PackedExample]) -> Batch:
        return collate(examples, self.seq_length, pad_id=self.pad_id, patch_dim=self.patch_dim)

    def _culprit(self, items: list[tuple[str, PackedExample]], error: ValueError) -> str:
        for where, ex in items:
            try:
                self.collate([ex])
            except ValueError as e:
                return f"{where}: {e}"
        return f"micro-batch of {', '.join(w for w, _ in items)}: {error}"


def _check_loader_args(
    dataset: BlendedPackDataset,
    seq_length: int,
    micro_batch_size: int,
    data_parallel_rank: int,
    data_parallel_size: int,
    consumed_samples: int,
    num_workers: int,
    patch_dim: int,
) -> None:
    for name, value, low in (
        ("seq_length", seq_length, 1),
        ("micro_batch_size", micro_batch_size, 1),
        ("data_parallel_size", data_parallel_size, 1),
        ("consumed_samples", consumed_samples, 0),
        ("num_workers", num_workers, 0),
    ):
        if not (isinstance(value, int) and value >= low):
            raise ValueError(f"build_train_loader: {name} must be an int >= {low}, got {value!r}")
    if not 0 <= data_parallel_rank < data_parallel_size:
        raise ValueError(
            f"build_train_loader: data_parallel_rank {data_parallel_rank} outside 0..{data_parallel_size - 1}"
        )
    chunk = micro_batch_size * data_parallel_size
    if consumed_samples % chunk:
        raise ValueError(
            f"build_train_loader: consumed_samples={consumed_samples} is not a multiple of "
            f"micro_batch_size × data_parallel_size = {chunk}"
        )
    if consumed_samples > len(dataset):
        raise ValueError(
            f"build_train_loader: consumed_samples={consumed_samples} exceeds the dataset's "
            f"{len(dataset)} samples (was --train-samples lowered?)"
        )
    if patch_dim != dataset.patch_dim:
        cfg = dataset.image_config
        raise ValueError(
            f"--data-path prefix {dataset.prefixes[0]!r}: patch_size is {cfg.patch_size} "
            f"({header_file(dataset.prefixes[0])}: patches of 3·{cfg.patch_size}² = {cfg.patch_dim} "
            f"values), but the model takes patches of {patch_dim} values"
        )
    for prefix, longest in zip(dataset.prefixes, dataset.max_pack_length()):
        if longest > seq_length:
            raise ValueError(
                f"--data-path prefix {prefix!r} has packs of {longest} tokens, more than "
                f"seq_length={seq_length}: preprocess it for this sequence length"
            )


def build_train_loader(
    dataset: BlendedPackDataset,
    *,
    seq_length: int,
    micro_batch_size: int,
    data_parallel_rank: int,
    data_parallel_size: int,
    consumed_samples: int = 0,
    num_workers: int = 2,
    pad_id: int,
    patch_dim: int = DEFAULT_CONFIG.patch_dim,
    timeout: float = 0.0,
) -> Iterator[Batch]:
    """Micro-batches for one data-parallel rank, starting after ``consumed_samples`` global samples.

    ``num_workers`` processes (started now) read, decode and collate ahead; 0 does it in this process; the
    batches do not depend on it. Pinned memory where CUDA is available. Ends when the dataset is exhausted
    (a last incomplete global batch is dropped). ``timeout``: seconds to wait for a worker's batch (0: for
    ever; ignored without workers). A bad pack raises :class:`BadPackError` naming its prefix and pack index.
    """
    _check_loader_args(
        dataset,
        seq_length,
        micro_batch_size,
        data_parallel_rank,
        data_parallel_size,
        consumed_samples,
        num_workers,
        patch_dim,
    )
    sampler = PretrainingBatchSampler(
        len(dataset), consumed_samples, micro_batch_size, data_parallel_rank, data_parallel_size
    )
    loader = DataLoader(
        _Named(dataset),
        batch_sampler=sampler,
        collate_fn=_Collate(seq_length, pad_id, patch_dim),
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=num_workers > 0,
        prefetch_factor=2 if num_workers > 0 else None,
        timeout=timeout if num_workers > 0 else 0,
    )
    return iter(loader)  # now: the workers start prefetching while the caller sets up


__all__ = [
    "BadPackError",
    "BlendedPackDataset",
    "PretrainingBatchSampler",
    "blend_order",
    "build_train_loader",
    "epoch_order",
    "parse_data_path",
]
