"""HaploVL's packed mask against the released rule built naively, O(s²) by loops (spec §2.9)."""

import numpy as np
import pytest
import torch
from haplo_reference import naive_allowed
from hypothesis import given
from hypothesis import strategies as st

from megatron.solo.batch import PackedExample, collate
from megatron.solo.haplo.mask import haplo_attention_mask


@st.composite
def packs(draw):
    """1–2 packs of ≤ 3 documents, each with ≤ 2 images somewhere inside, then padding."""
    seq = draw(st.integers(8, 24))
    examples = []
    for _ in range(draw(st.integers(1, 2))):
        lengths, spans, start = [], [], 0
        for _ in range(draw(st.integers(1, 3))):
            room = seq - start
            if room < 1:
                break
            n = draw(st.integers(1, room))
            cursor = start
            for _ in range(draw(st.integers(0, 2))):
                if cursor >= start + n:
                    break
                a = draw(st.integers(cursor, start + n - 1))
                b = draw(st.integers(a + 1, start + n))
                spans.append((a, b))
                cursor = b
            lengths.append(n)
            start += n
        total = sum(lengths)
        examples.append(
            PackedExample(
                tokens=np.zeros(total, np.int64),
                targets=np.zeros(total, bool),
                doc_offsets=np.concatenate([[0], np.cumsum(lengths)]),
                patches=None,
                patch_positions=np.zeros(0, np.int64),
                image_spans=np.asarray(spans, np.int64).reshape(-1, 2),
            )
        )
    return collate(examples, seq, pad_id=0, patch_dim=4)


@given(packs())
def test_mask_equals_the_released_rule_with_documents_apart(batch):
    mask = haplo_attention_mask(batch.cu_seqlens, batch.image_block_ids)
    assert torch.equal(~mask[:, 0], naive_allowed(batch.cu_seqlens, batch.image_block_ids))


def test_hand_checked_pack():
    """doc 0 = text, image (2..4), text; doc 1 = image (6..7), text; then padding (9)."""
    ex = PackedExample(
        tokens=np.zeros(9, np.int64),
        targets=np.zeros(9, bool),
        doc_offsets=np.array([0, 6, 9]),
        patches=None,
        patch_positions=np.zeros(0, np.int64),
        image_spans=np.array([[2, 5], [6, 8]]),
    )
    batch = collate([ex], 10, pad_id=0, patch_dim=4)
    allowed = ~haplo_attention_mask(batch.cu_seqlens, batch.image_block_ids)[0, 0]
    assert allowed[2, 4] and allowed[4, 2] and allowed[3, 3]  # inside the image: both ways
    assert not allowed[1, 2] and allowed[5, 2] and not allowed[4, 5]  # text: causal around it
    assert allowed[6, 7] and not allowed[6, 5] and not allowed[7, 0]  # doc 1 apart from doc 0
    assert allowed[9].tolist() == [False] * 9 + [True]  # padding sees itself only


def test_collate_rejects_image_spans_that_cross_documents_or_overlap():
    def make(spans):
        return PackedExample(
            tokens=np.zeros(8, np.int64),
            targets=np.zeros(8, bool),
            doc_offsets=np.array([0, 4, 8]),
            patches=None,
            patch_positions=np.zeros(0, np.int64),
            image_spans=np.asarray(spans),
        )

    with pytest.raises(ValueError, match="crosses a document boundary"):
        collate([make([[3, 5]])], 8, pad_id=0, patch_dim=4)
    with pytest.raises(ValueError, match="ordered, disjoint"):
        collate([make([[0, 3], [2, 4]])], 8, pad_id=0, patch_dim=4)
