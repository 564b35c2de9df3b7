"""``--loss-averaging sample``: the loss megatron-core's schedule forms from the loss function's (sum, count)
pairs is the mean over samples of each sample's mean over its answer tokens, whatever the packing, the
micro-batches and the parallel layout. The reference is computed directly, document by document from the
packs' own document offsets, never through ``cu_seqlens``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron.solo.batch import PackedExample, collate
from megatron.solo.model import sample_weights
from megatron.solo.training.metrics import loss_with_breakdown

SEQ = 48


def documents(rng, n):
    """n documents (tokens, targets): some with no target at all, one with a single target."""
    docs = []
    for i in range(n):
        length = int(rng.integers(3, 9))
        targets = rng.random(length) < 0.6
        if i % 5 == 3:
            targets[:] = False
        if i % 5 == 4:
            targets[:] = False
            targets[-1] = True
        docs.append((rng.integers(3, 100, length), targets))
    return docs


def pack(docs, groups):
    """Packs (PackedExample) holding the documents of each group, in order."""
    out = []
    for group in groups:
        chosen = [docs[i] for i in group]
        lengths = [len(t) for t, _ in chosen]
        out.append(
            PackedExample(
                np.concatenate([t for t, _ in chosen]),
                np.concatenate([g for _, g in chosen]),
                np.concatenate([[0], np.cumsum(lengths)]),
                np.zeros((0, 3072), np.float32),
                np.zeros(0, np.int64),
            )
        )
    return out


def direct_mean(docs, per_doc_losses):
    """Mean over documents with a target of each one's mean loss; target i is predicted at slot i - 1."""
    means = [losses[:-1][targets[1:]].mean() for (_, targets), losses in zip(docs, per_doc_losses) if targets[1:].any()]
    return float(np.mean(means)), len(means)


def schedule_loss(micro_batches, per_token, averaging):
    """Σ sums / Σ counts over micro-batches, as megatron-core's calculate_per_token_loss forms the step's loss."""
    total = count = 0.0
    for batch, loss in zip(micro_batches, per_token):
        weights, samples = sample_weights(batch.loss_mask, batch.cu_seqlens)
        s, c, logs = loss_with_breakdown(
            batch.loss_mask,
            torch.zeros(len(batch.tokens), dtype=torch.bool),
            torch.zeros(2),
            samples,
            loss,
            weights=weights if averaging == "sample" else None,
        )
        assert torch.equal(logs["lm loss"], torch.stack([s, c.float()]))
        total, count = total + s.item(), count + c.item()
    return total / count, count


@pytest.mark.parametrize("layout", ["one pack", "a document per pack", "three micro-batches"])
def test_sample_averaging_is_the_direct_per_sample_mean_under_any_packing(layout):
    rng = np.random.default_rng(0)
    docs = documents(rng, 10)
    per_doc_losses = [rng.random(len(t)) * 5 for t, _ in docs]  # the loss at each slot of each document
    groups = {
        "one pack": [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]],
        "a document per pack": [[i] for i in range(10)],
        "three micro-batches": [[9, 0, 4], [2, 3], [1, 5, 6, 7, 8]],
    }[layout]
    chunks = [[g] for g in groups] if layout == "three micro-batches" else [groups]  # groups per micro-batch
    micro, losses = [], []
    for chunk in chunks:
        batch = collate(pack(docs, chunk), SEQ, pad_id=2)
        loss = torch.full(batch.tokens.shape, 1e3)  # padding and non-targets: must weigh nothing
        for row, group in enumerate(chunk):  # each document's losses where collate laid the document
            start = 0
            for i in group:
                loss[row, start : start + len(docs[i][0])] = torch.from_numpy(per_doc_losses[i]).float()
                start += len(docs[i][0])
        micro.append(batch)
        losses.append(loss)
    expected, n_samples = direct_mean(docs, per_doc_losses)
    got, count = schedule_loss(micro, losses, "sample")
    assert count == n_samples == 8  # the two target-less documents do not count
    assert got == pytest.approx(expected, rel=1e-6)
    tokens, _ = schedule_loss(micro, losses, "token")
    every = np.concatenate([loss[:-1][t[1:]] for (_, t), loss in zip(docs, per_doc_losses)])
    assert tokens == pytest.approx(every.mean(), rel=1e-6)
    assert abs(tokens - got) > 1e-3  # the two averagings differ on these documents: the check can fail


def test_sample_weights_sum_to_one_per_sample_and_split_image_and_text_rows():
    rng = np.random.default_rng(1)
    docs = documents(rng, 6)
    batch = collate(pack(docs, [[0, 1, 2], [3, 4, 5]]), SEQ, pad_id=2)
    weights, samples = sample_weights(batch.loss_mask, batch.cu_seqlens)
    assert samples.item() == sum(t[1:].any() for _, t in docs)
    assert weights.sum().item() == pytest.approx(samples.item())
    assert torch.all(weights[batch.loss_mask == 0] == 0)
    per_token = torch.rand(batch.tokens.shape)
    image_rows = torch.tensor([True, False])
    _, _, logs = loss_with_breakdown(batch.loss_mask, image_rows, torch.zeros(2), samples, per_token, weights=weights)
    row_samples = [sum(docs[i][1][1:].any() for i in g) for g in ([0, 1, 2], [3, 4, 5])]
    assert logs["img lm loss"][1].item() == pytest.approx(row_samples[0])  # counts are samples, not tokens
    assert logs["txt lm loss"][1].item() == pytest.approx(row_samples[1])
    assert logs["targets"].tolist() == [batch.loss_mask.sum().item(), samples.item()]


@pytest.mark.timeout(400)
def test_sample_averaging_at_tp2_sp_and_dp2_equals_the_direct_per_sample_mean(tmp_path):
    """2 gloo ranks: TP=2, TP=2+SP and DP=2 through megatron-core's schedule; loss and gradients against the
    TP=1 model's direct per-sample mean (autograd through a document-by-document computation)."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "model"))
    from model_helpers import run_torchrun

    run_torchrun(Path(__file__).with_name("loss_averaging_checks.py"), 2, "--out", str(tmp_path), timeout=360)
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["samples"] >= 6 and abs(results["token_mean"] - results["direct"]) > 1e-3
    for layout in ("tp2", "tp2_sp", "dp2"):
        for name, diff in results[layout].items():
            assert diff < 1e-5, (layout, name, diff)
