"""Packing: never above seq_length, documents kept whole (or split/truncated by the rules), deterministic."""

import random

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from megatron.solo.data.encode import Document, EncodedImage
from megatron.solo.data.errors import Origin, SampleError
from megatron.solo.data.packing import PackConfig, Packer
from megatron.solo.image import layout_length

VISION_START, VPATCH = 32000, 32001


def make_doc(index: int, segments, targets_seed: int = 0) -> Document:
    """Segments: ("text", n) or ("image", rows, cols). Text token ids encode (document, position)."""
    tokens, images = [1], []
    for seg in segments:
        if seg[0] == "text":
            tokens += [1000 + (index * 7919 + len(tokens)) % 30000 for _ in range(seg[1])]
        else:
            images.append(EncodedImage(len(tokens), seg[1], seg[2], 2, b""))
            tokens += [VISION_START] + [VPATCH] * (layout_length(seg[1], seg[2]) - 1)
    rng = np.random.default_rng(targets_seed)
    targets = rng.random(len(tokens)) < 0.7
    targets[0] = False
    for img in images:
        targets[img.position : img.position + img.num_tokens] = False
    return Document(np.array(tokens, np.int32), targets, tuple(images), Origin("f", line=index + 1))


segment = st.one_of(
    st.tuples(st.just("text"), st.integers(1, 300)),
    st.tuples(st.just("image"), st.integers(1, 6), st.integers(1, 6)),
)
doc_specs = st.lists(st.lists(segment, min_size=1, max_size=4), max_size=30)


def run(packer: Packer, docs):
    """Feed docs; returns (packs, refused indices), checking the buffer bound as it goes."""
    packs, refused = [], []
    for i, doc in enumerate(docs):
        try:
            packs += packer.add(doc)
        except SampleError as e:
            assert e.reason == "too_long" and e.origin == doc.origin
            refused.append(i)
        assert packer.open_packs <= packer.config.buffer_size
    return packs + packer.flush(), refused


@given(doc_specs, st.integers(40, 400), st.integers(1, 8), st.integers(0, 3))
def test_packing_invariants(specs, seq_length, buffer_size, seed):
    docs = [make_doc(i, s, seed) for i, s in enumerate(specs)]
    packer = Packer(PackConfig(seq_length=seq_length, buffer_size=buffer_size))
    packs, refused = run(packer, docs)
    pieces: dict[int, list[Document]] = {}
    for pack in packs:
        assert 0 < pack.length <= seq_length
        for piece in pack.documents:
            pieces.setdefault(piece.origin.line - 1, []).append(piece)
            for img in piece.images:  # every image whole, where its tokens are
                assert img.position + img.num_tokens <= len(piece)
                assert (
                    piece.tokens[img.position] == VISION_START
                    and not piece.targets[img.position : img.position + img.num_tokens].any()
                )
    truncated = 0
    for i, doc in enumerate(docs):
        if i in refused:
            assert i not in pieces and doc.images and len(doc) > seq_length
            continue
        got = pieces[i]
        tokens = np.concatenate([p.tokens for p in got])
        targets = np.concatenate([p.targets for p in got])
        assert [p.continuation for p in got] == [False] + [True] * (len(got) - 1)
        if doc.images:  # never split; truncated at seq_length or just before the image the cut would split
            assert len(got) == 1
            if len(doc) <= seq_length:
                assert len(tokens) == len(doc)
            else:
                assert seq_length - layout_length(6, 6) < len(tokens) <= seq_length
            truncated += len(doc) - len(tokens)
        else:
            assert all(len(p) == seq_length for p in got[:-1])  # chunks are whole packs, then the remainder
        np.testing.assert_array_equal(tokens, doc.tokens[: len(tokens)])
        np.testing.assert_array_equal(targets, doc.targets[: len(tokens)])
    assert packer.truncated_tokens == truncated
    assert packer.continuation_chunks == sum(len(v) - 1 for v in pieces.values())
    # deterministic: the same input gives the same packs
    again, _ = run(Packer(packer.config), docs)
    assert [[(p.origin, len(p)) for p in pack.documents] for pack in again] == [
        [(p.origin, len(p)) for p in pack.documents] for pack in packs
    ]


@given(st.lists(st.integers(1, 150), max_size=80), st.integers(1, 16))
def test_flush_leaves_no_two_packs_that_could_be_one(lengths, buffer_size):
    packer = Packer(PackConfig(seq_length=200, buffer_size=buffer_size))
    for i, n in enumerate(lengths):
        packer.add(make_doc(i, [("text", n)]))
    flushed = packer.flush()
    assert packer.open_packs == 0 and all(0 < p.length <= 200 for p in flushed)
    sizes = sorted(p.length for p in flushed)
    assert len(sizes) < 2 or sizes[0] + sizes[1] > 200  # first-fit decreasing: at most one half-empty pack


def reference_greedy(lengths, seq_length):
    """The reference's sequential packer, without its overflow: close the pack when the next doc won't fit."""
    packs, current = [], 0
    for n in lengths:
        if current + n > seq_length:
            packs.append(current)
            current = 0
        current += n
    return packs + ([current] if current else [])


@given(st.lists(st.integers(1, 199), max_size=60), st.integers(200, 600))
def test_buffer_of_one_is_the_reference_greedy_packer(lengths, seq_length):
    docs = [make_doc(i, [("text", n)]) for i, n in enumerate(lengths)]
    packs, _ = run(Packer(PackConfig(seq_length=seq_length, buffer_size=1)), docs)
    assert [p.length for p in packs] == reference_greedy([len(d) for d in docs], seq_length)


def test_best_fit_wastes_much_less_than_greedy():
    rng = random.Random(0)
    # image-caption-like documents (an image of 50-1057 tokens + a caption) and some text, 4096-token packs
    specs = [
        [("image", rng.randint(4, 32), rng.randint(4, 32)), ("text", rng.randint(5, 80))]
        if rng.random() < 0.7
        else [("text", int(rng.lognormvariate(6, 1)))]
        for _ in range(3000)
    ]
    docs = [make_doc(i, s) for i, s in enumerate(specs)]
    padding = {}
    for buffer_size in (1, 16):
        packs, _ = run(Packer(PackConfig(seq_length=4096, buffer_size=buffer_size)), docs)
        padding[buffer_size] = 1 - sum(p.length for p in packs) / (len(packs) * 4096)
    assert padding[16] < padding[1] / 5, padding


def test_truncation_after_the_image_and_too_long():
    packer = Packer(PackConfig(seq_length=100))
    doc = make_doc(0, [("image", 3, 3), ("text", 200)])  # BOS + 13 image tokens + 200 text
    (pack,) = packer.add(doc) + packer.flush()
    assert len(pack.documents[0]) == 100 and packer.truncated_documents == 1 and packer.truncated_tokens == 114
    # the cut would split the second image: it goes, the first stays
    cut = make_doc(1, [("text", 10), ("image", 2, 2), ("text", 70), ("image", 5, 5)])  # 119 tokens
    packer = Packer(PackConfig(seq_length=100))
    (pack,) = packer.add(cut) + packer.flush()
    (piece,) = pack.documents
    assert len(piece.images) == 1 and len(piece) == 1 + 10 + 7 + 70 and packer.truncated_tokens == 31


def test_too_long_when_nothing_learnable_fits():
    packer = Packer(PackConfig(seq_length=20))
    with pytest.raises(SampleError, match=r"f:1: too long: .*before the image at token 1") as e:
        packer.add(make_doc(0, [("image", 5, 5), ("text", 5)]))
    assert e.value.reason == "too_long" and packer.open_packs == 0 and packer.truncated_documents == 0


def test_long_text_is_split_into_whole_packs_plus_remainder():
    packer = Packer(PackConfig(seq_length=50, buffer_size=4))
    assert packer.add(make_doc(0, [("text", 19)])) == []  # 20 tokens with BOS
    closed = packer.add(make_doc(1, [("text", 129)]))  # 130 tokens: two whole-pack chunks, 30 fill the open pack
    assert [[len(d) for d in p.documents] for p in closed] == [[50], [50], [20, 30]]
    assert [d.continuation for p in closed for d in p.documents] == [False, True, False, True]
    assert packer.split_documents == 1 and packer.continuation_chunks == 2 and packer.flush() == []


@pytest.mark.parametrize("kwargs, field", [({"seq_length": 4}, "seq_length"), ({"buffer_size": 0}, "buffer_size")])
def test_pack_config_validation(kwargs, field):
    with pytest.raises(ValueError, match=f"PackConfig.{field}"):
        PackConfig(**kwargs)
