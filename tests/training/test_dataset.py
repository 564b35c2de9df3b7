"""The training loader: --data-path, blend order, per-epoch shuffles, DP split, resume, collation, errors."""

import pickle
import shutil
import tracemalloc

import numpy as np
import pytest
import torch
from loader_helpers import SEQ_LENGTH
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megatron.solo.batch import Batch, PackedExample
from megatron.solo.data.packed_format import RECORD_SUFFIX, PackedDataset, header_file, output_files
from megatron.solo.image import normalize_patches
from megatron.solo.training.dataset import (
    BadPackError,
    BlendedPackDataset,
    _Collate,
    blend_order,
    build_train_loader,
    epoch_order,
    parse_data_path,
)

VPATCH = 32001


def loader(ds, **kw):
    args = dict(
        seq_length=SEQ_LENGTH,
        micro_batch_size=2,
        data_parallel_rank=0,
        data_parallel_size=1,
        num_workers=0,
        pad_id=0,
        timeout=60 if kw.get("num_workers") else 0,
    )
    return build_train_loader(ds, **{**args, **kw})


def flat_tokens(batches) -> list[list[int]]:
    return [row for b in batches for row in b.tokens.tolist()]


# ---------------------------------------------------------------------------------------------
# --data-path


@pytest.mark.parametrize(
    "values, expected",
    [
        (["/d/a"], [(1.0, "/d/a")]),
        (["3", "/d/a", "1", "/d/b"], [(0.75, "/d/a"), (0.25, "/d/b")]),
        (["0.7", "a", "0.3", "b", "1", "c"], [(0.35, "a"), (0.15, "b"), (0.5, "c")]),
        (["1e-3", "a"], [(1.0, "a")]),
    ],
)
def test_parse_data_path(values, expected):
    got = parse_data_path(values)
    assert [p for _, p in got] == [p for _, p in expected]
    np.testing.assert_allclose([w for w, _ in got], [w for w, _ in expected])


@pytest.mark.parametrize(
    "values, match",
    [
        ([], "no prefix"),
        (["1", "a", "b"], "3 values"),
        (["x", "a", "1", "b"], "'x'.*not a number"),
        (["0", "a", "1", "b"], "'0' of 'a' must be a positive"),
        (["-1", "a", "1", "b"], "must be a positive"),
        (["nan", "a", "1", "b"], "must be a positive"),
        (["1", "a", "2", "a"], "'a' is given twice"),
    ],
)
def test_parse_data_path_errors(values, match):
    with pytest.raises(ValueError, match="^--data-path: .*" + match):
        parse_data_path(values)


# ---------------------------------------------------------------------------------------------
# Order


@pytest.mark.parametrize("weights", [[0.7, 0.3], [0.5, 0.25, 0.25], [0.6, 0.3, 0.05, 0.05]])
def test_blend_order_tracks_weights_at_every_prefix(weights):
    order = blend_order(weights, 10000)
    counts = np.cumsum(order[:, None] == np.arange(len(weights)), axis=0)
    target = np.arange(1, 10001)[:, None] * np.array(weights)
    assert np.abs(counts - target).max() <= 1.0
    assert order.dtype == np.int16


def test_blend_order_is_prefix_stable_and_fast():
    order = blend_order([0.7, 0.3], 1_000_000)
    np.testing.assert_array_equal(blend_order([0.7, 0.3], 1000), order[:1000])


def test_epoch_order_visits_every_pack_once_per_epoch():
    n, epochs = 7, 5
    order = epoch_order(n, n * epochs, seed=3, position=1).reshape(epochs, n)
    for row in order:
        assert sorted(row.tolist()) == list(range(n))
    assert len({tuple(row) for row in order.tolist()}) == epochs  # a new permutation each epoch
    np.testing.assert_array_equal(epoch_order(n, 12, seed=3, position=1), order.reshape(-1)[:12])
    assert not np.array_equal(epoch_order(n, n * epochs, seed=4, position=1), order.reshape(-1))
    assert not np.array_equal(epoch_order(n, n * epochs, seed=3, position=0), order.reshape(-1))


def test_blend_draws_from_the_right_prefix(text_prefix, caption_prefix, tokenizer):
    ds = BlendedPackDataset([(0.7, text_prefix), (0.3, caption_prefix)], 10000, seed=1, decode_patches=False)
    counts = np.cumsum(ds.dataset_index[:, None] == np.arange(2), axis=0)
    assert np.abs(counts - np.arange(1, 10001)[:, None] * np.array([0.7, 0.3])).max() <= 1
    raw = [PackedDataset(text_prefix), PackedDataset(caption_prefix)]
    for i in range(0, 10000, 97):
        d, k = int(ds.dataset_index[i]), int(ds.sample_index[i])
        assert ds.source(i) == ((text_prefix, caption_prefix)[d], k)
        np.testing.assert_array_equal(ds[i].tokens, raw[d][k].tokens)
        text = tokenizer.decode(ds[i].tokens.tolist())
        assert ("alpha" in text and "beta" not in text) if d == 0 else ("beta" in text and "alpha" not in text)


def test_each_epoch_visits_every_pack_in_a_new_seeded_order(text_prefix, caption_prefix):
    blend = [(0.5, text_prefix), (0.5, caption_prefix)]
    ds = BlendedPackDataset(blend, 400, seed=7)
    for d, prefix in enumerate((text_prefix, caption_prefix)):
        n = len(PackedDataset(prefix))
        packs = ds.sample_index[ds.dataset_index == d]
        epochs = packs[: len(packs) // n * n].reshape(-1, n)
        assert len(epochs) >= 3
        assert all(sorted(e.tolist()) == list(range(n)) for e in epochs)
        assert len({tuple(e) for e in epochs.tolist()}) == len(epochs)
    again = BlendedPackDataset(blend, 400, seed=7)
    np.testing.assert_array_equal(again.sample_index, ds.sample_index)
    assert not np.array_equal(BlendedPackDataset(blend, 400, seed=8).sample_index, ds.sample_index)
    longer = BlendedPackDataset(blend, 1000, seed=7)  # more samples: the first 400 stay
    np.testing.assert_array_equal(longer.sample_index[:400], ds.sample_index)
    lines = ds.describe()
    assert len(lines) == 2 and "weight 0.5000" in lines[0] and "200 samples drawn" in lines[1]


def test_dataset_pickles(text_prefix, caption_prefix):
    ds = BlendedPackDataset([(0.5, text_prefix), (0.5, caption_prefix)], 20, seed=3)
    copy = pickle.loads(pickle.dumps(ds))  # what a spawned DataLoader worker gets
    np.testing.assert_array_equal(copy.sample_index, ds.sample_index)
    for i in (0, 1, 19):
        np.testing.assert_array_equal(copy[i].tokens, ds[i].tokens)
        np.testing.assert_array_equal(copy[i].patches, ds[i].patches)


def test_decode_patches(caption_prefix):
    full = BlendedPackDataset([(1.0, caption_prefix)], 4, seed=0)
    lean = BlendedPackDataset([(1.0, caption_prefix)], 4, seed=0, decode_patches=False)
    view = PackedDataset(caption_prefix)[full.source(0)[1]]
    assert full[0].patches.dtype == np.uint8  # the stored pixels: normalised on the device
    np.testing.assert_array_equal(normalize_patches(full[0].patches), view.patches())
    np.testing.assert_array_equal(full[0].patch_positions, view.patch_positions)
    assert full[0].tokens.dtype == np.int64 and len(full[0].patches) > 0
    assert lean[0].patches is None  # not decoded; the positions are still there (image rows come from them)
    np.testing.assert_array_equal(lean[0].patch_positions, full[0].patch_positions)
    np.testing.assert_array_equal(lean[0].tokens, full[0].tokens)
    batch = _Collate(SEQ_LENGTH, 0, 3072)([("lean", lean[0])])
    assert batch.patches.shape == (0, 3072) and len(batch.patch_index) == len(full[0].patches)


# ---------------------------------------------------------------------------------------------
# Loader


@pytest.fixture(scope="module")
def blended(text_prefix, caption_prefix):
    return BlendedPackDataset([(0.5, text_prefix), (0.5, caption_prefix)], 48, seed=5)


@pytest.mark.timeout(120)
def test_workers_do_not_change_the_batches(blended):
    in_process = list(loader(blended, num_workers=0))
    with_workers = list(loader(blended, num_workers=2))
    assert len(in_process) == len(with_workers) == 24
    assert all(b.patches.is_shared() for b in with_workers if len(b.patches))  # gathered in shared memory
    for a, b in zip(in_process, with_workers):
        for name in ("tokens", "labels", "loss_mask", "position_ids", "cu_seqlens", "patches", "patch_index"):
            torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=0, atol=0)
        assert a.max_seqlen == b.max_seqlen


def test_dp_ranks_split_each_global_batch(blended):
    whole = flat_tokens(loader(blended, micro_batch_size=4))
    ranks = [
        flat_tokens(loader(blended, micro_batch_size=2, data_parallel_size=2, data_parallel_rank=r)) for r in range(2)
    ]
    assert len(whole) == 48
    for step in range(12):  # global batch of 4: rank 0 holds its first two samples, rank 1 the last two
        assert ranks[0][2 * step : 2 * step + 2] + ranks[1][2 * step : 2 * step + 2] == whole[4 * step : 4 * step + 4]


def test_resume_gives_the_tail_of_the_stream(blended):
    whole = flat_tokens(loader(blended))
    assert flat_tokens(loader(blended, consumed_samples=20)) == whole[20:]
    assert flat_tokens(loader(blended, consumed_samples=48)) == []
    with pytest.raises(ValueError, match="consumed_samples=6 is not a multiple of .* = 4"):
        loader(blended, data_parallel_size=2, consumed_samples=6)
    with pytest.raises(ValueError, match="consumed_samples=50 exceeds"):
        loader(blended, consumed_samples=50)


def test_incomplete_last_global_batch_is_dropped(caption_prefix):
    ds = BlendedPackDataset([(1.0, caption_prefix)], 7, seed=0)
    assert len(flat_tokens(loader(ds, micro_batch_size=3))) == 6


def test_patches_land_on_their_rows_vpatch_tokens(caption_prefix):
    ds = BlendedPackDataset([(1.0, caption_prefix)], 8, seed=2)
    s = SEQ_LENGTH
    for step, batch in enumerate(loader(ds)):
        views = [PackedDataset(caption_prefix)[ds.source(2 * step + r)[1]] for r in range(2)]
        counts = [v.n_patches for v in views]
        assert min(counts) > 0  # images in both rows
        assert batch.patches.shape == (sum(counts), 3072) and batch.patches.dtype == torch.uint8
        row1 = batch.patch_index[counts[0] :]
        assert ((row1 >= s) & (row1 < 2 * s)).all() and (batch.patch_index[: counts[0]] < s).all()
        assert (batch.tokens.reshape(-1)[batch.patch_index] == VPATCH).all()
        assert (batch.tokens == VPATCH).sum() == len(batch.patch_index)
        torch.testing.assert_close(
            batch.normalized(ds.image_config).patches,
            torch.from_numpy(np.concatenate([v.patches() for v in views])),
            rtol=0,
            atol=0,
        )


def test_batch_fields_come_from_collate(blended):
    batch = next(iter(loader(blended)))
    b, s = 2, SEQ_LENGTH
    for name in ("tokens", "labels", "loss_mask", "position_ids"):
        assert getattr(batch, name).shape == (b, s)
    ex = blended[0]
    n, start, end = len(ex.tokens), int(ex.doc_offsets[0]), int(ex.doc_offsets[1])
    assert batch.tokens[0, :n].tolist() == ex.tokens.tolist()
    assert batch.labels[0, start : end - 1].tolist() == ex.tokens[start + 1 : end].tolist()
    assert batch.loss_mask[0, start : end - 1].tolist() == ex.targets[start + 1 : end].astype(float).tolist()
    assert batch.position_ids[0, start:end].tolist() == list(range(end - start))
    assert batch.cu_seqlens[0] == 0 and batch.cu_seqlens[-1] == b * s and batch.cu_seqlens.dtype == torch.int32


def test_nothing_sequence_squared_at_32k():
    """One full 32K pack with 1,024 patches: every tensor is O(b·s) and the peak stays megabytes, not 1 GiB."""
    s, rng = 32768, np.random.default_rng(0)
    ex = PackedExample(
        tokens=rng.integers(3, 30000, s),
        targets=np.ones(s, bool),
        doc_offsets=np.array([0, 5000, 20000, s]),
        patches=np.zeros((1024, 3072), np.float32),
        patch_positions=np.arange(100, 1124),
    )
    tracemalloc.start()
    batch = _Collate(s, 0, 3072)([("synthetic", ex)])
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    fields = vars(batch)
    assert all(v.numel() <= s * 3072 for v in fields.values() if isinstance(v, torch.Tensor))
    assert all(v.numel() <= s for k, v in fields.items() if isinstance(v, torch.Tensor) and k != "patches")
    assert peak < 40 * 2**20  # patches alone are 12 MiB; an s×s bool mask would be 1 GiB


# ---------------------------------------------------------------------------------------------
# Errors


def test_bad_prefixes_are_named(tmp_path, text_prefix):
    with pytest.raises(FileNotFoundError, match=f"--data-path prefix '{tmp_path}/nope'.*missing"):
        BlendedPackDataset([(1.0, str(tmp_path / "nope"))], 10, seed=0)
    ds = BlendedPackDataset([(1.0, text_prefix)], 4, seed=0)
    with pytest.raises(
        ValueError, match=f"--data-path prefix '{text_prefix}' has packs of 128 tokens, more than seq_length=64"
    ):
        loader(ds, seq_length=64)
    with pytest.raises(ValueError, match="data_parallel_rank 2 outside 0..1"):
        loader(ds, data_parallel_rank=2, data_parallel_size=2)


def test_empty_prefix_is_refused(tmp_path):
    from megatron.solo.data.packed_format import PackWriter

    writer = PackWriter(str(tmp_path / "empty"), np.uint16)
    writer.finalize()
    with pytest.raises(ValueError, match="'.*empty' holds no packs"):
        BlendedPackDataset([(0.5, str(tmp_path / "empty"))], 10, seed=0)


def corrupt_first_image(prefix: str, out: str) -> int:
    """Copy ``prefix`` to ``out`` with the first image of the first pack holding images zeroed; its index."""
    for src, dst in zip(output_files(prefix) + [header_file(prefix)], output_files(out) + [header_file(out)]):
        shutil.copy(src, dst)
    view_pack = next(k for k, v in enumerate(PackedDataset(out)) if v.images)
    view = PackedDataset(out)[view_pack]
    record = IndexedDataset(out + RECORD_SUFFIX)
    image_bytes = sum(len(im.data) for im in view.images)
    start = int(record.index.sequence_pointers[view_pack]) + int(record.index.sequence_lengths[view_pack]) - image_bytes
    with open(out + RECORD_SUFFIX + ".bin", "r+b") as f:
        f.seek(start)
        f.write(bytes(len(view.images[0].data)))
    return view_pack


@pytest.mark.timeout(120)
@pytest.mark.parametrize("num_workers", [0, 1])
def test_a_bad_pack_is_named(tmp_path, caption_prefix, num_workers):
    bad = str(tmp_path / "bad")
    pack = corrupt_first_image(caption_prefix, bad)
    ds = BlendedPackDataset([(1.0, bad)], len(PackedDataset(bad)), seed=0)
    with pytest.raises(BadPackError, match=f"{bad} pack {pack} \\(global sample \\d+, from --data-path\\)"):
        list(loader(ds, num_workers=num_workers, micro_batch_size=1))


def test_a_pack_collate_refuses_is_named():
    good = PackedExample(
        np.arange(4), np.ones(4, bool), np.array([0, 4]), np.zeros((0, 3072), np.float32), np.zeros(0, np.int64)
    )
    bad = PackedExample(
        np.arange(4), np.ones(3, bool), np.array([0, 4]), np.zeros((0, 3072), np.float32), np.zeros(0, np.int64)
    )
    with pytest.raises(BadPackError, match="^p/b pack 9 .*: pack 0 of the micro-batch: targets has 3 entries"):
        _Collate(8, 0, 3072)([("p/a pack 1 (global sample 0)", good), ("p/b pack 9 (global sample 1)", bad)])


# ---------------------------------------------------------------------------------------------
# Headers: what the blend's prefixes were made with


def copy_prefix(prefix: str, out: str, **header_changes) -> str:
    """``prefix`` copied to ``out`` with its header's fields changed."""
    import json

    for src, dst in zip(output_files(prefix), output_files(out)):
        shutil.copy(src, dst)
    header = json.loads(open(header_file(prefix)).read())
    with open(header_file(out), "w") as f:
        json.dump({**header, **header_changes}, f)
    return out


def test_a_prefix_of_other_patch_size_is_named(tmp_path, caption_prefix):
    p14 = copy_prefix(caption_prefix, str(tmp_path / "p14"), patch_size=14, max_size=1022)
    ds = BlendedPackDataset([(1.0, p14)], 4, seed=0)
    assert ds.patch_dim == 3 * 14 * 14
    with pytest.raises(
        ValueError, match=f"--data-path prefix '{p14}': patch_size is 14 .*but the model takes patches of 3072 values"
    ):
        loader(ds, patch_dim=3072)


@pytest.mark.parametrize(
    "change, field",
    [
        ({"std": [0.5, 0.5, 0.5]}, "std"),
        ({"patch_size": 16}, "patch_size"),
        ({"tokenizer": {"vocab_size": 1}}, "tokenizer.bos_id"),
    ],
)
def test_prefixes_of_one_blend_must_agree(tmp_path, text_prefix, caption_prefix, change, field):
    other = copy_prefix(caption_prefix, str(tmp_path / "other"), **change)
    with pytest.raises(
        ValueError,
        match=f"--data-path prefix '{other}' .*: {field} is .*, but --data-path prefix "
        f"'{text_prefix}' of the same blend has",
    ):
        BlendedPackDataset([(0.5, text_prefix), (0.5, other)], 10, seed=0)


def test_the_runs_tokenizer_is_checked_against_the_data(text_prefix, tokenizer):
    BlendedPackDataset([(1.0, text_prefix)], 4, seed=0, tokenizer=tokenizer.fingerprint())
    other = {**tokenizer.fingerprint(), "encoder_sha256": "0" * 64}
    with pytest.raises(ValueError, match="tokenizer.encoder_sha256 is '[0-9a-f]{64}', but the run's tokenizer"):
        BlendedPackDataset([(1.0, text_prefix)], 4, seed=0, tokenizer=other)


def test_an_old_prefix_without_header_blends_with_a_warning(tmp_path, text_prefix, caption_prefix):
    old = str(tmp_path / "old")
    for src, dst in zip(output_files(caption_prefix), output_files(old)):
        shutil.copy(src, dst)
    with pytest.warns(UserWarning, match="no old.pack.json"):
        ds = BlendedPackDataset([(0.5, text_prefix), (0.5, old)], 10, seed=0)
    assert ds.image_config == PackedDataset(caption_prefix).image_config


# ---------------------------------------------------------------------------------------------
# The data path: Batch end to end, pinned by its own method; image rows from patch_index


def test_loader_yields_batches_pinned_by_their_own_method(blended, monkeypatch):
    from torch.utils.data._utils.pin_memory import pin_memory

    batch = next(iter(loader(blended)))
    assert type(batch) is Batch and batch.patches.dtype == torch.uint8
    pinned = []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda t, *a, **k: pinned.append(t) or t.clone())  # no CUDA here
    out = pin_memory(batch)  # what the DataLoader's pinning thread calls
    assert type(out) is Batch and len(pinned) == sum(isinstance(v, torch.Tensor) for v in vars(batch).values())
    for name, value in vars(batch).items():
        assert (
            torch.equal(getattr(out, name), value) if isinstance(value, torch.Tensor) else getattr(out, name) == value
        )


def test_image_rows_come_from_patch_index_not_a_token_id():
    """A vocabulary whose <vpatch> is not 32001: the rows with patches are still found."""
    vpatch = 7
    with_image = PackedExample(
        np.array([1, 6, vpatch, vpatch, 8, 9]),
        np.ones(6, bool),
        np.array([0, 6]),
        np.zeros((2, 3072), np.uint8),
        np.array([2, 3]),
    )
    text = PackedExample(
        np.array([1, 32001, 5]),
        np.ones(3, bool),
        np.array([0, 3]),
        np.zeros((0, 3072), np.uint8),
        np.zeros(0, np.int64),
    )  # 32001 is text here
    batch = _Collate(8, 0, 3072)([("t", text), ("i", with_image), ("t2", text)])
    assert batch.image_rows().tolist() == [False, True, False]
