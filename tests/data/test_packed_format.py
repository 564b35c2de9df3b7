"""The on-disk format: writer ↔ reader round trip, megatron-core compatibility, resumable appends."""

import ast
import gc
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset
from PIL import Image

from megatron.solo import image as im
from megatron.solo.data import codec
from megatron.solo.data.encode import Document, EncodedImage
from megatron.solo.data.errors import Origin
from megatron.solo.data.packed_format import (
    PackedDataset,
    PackWriter,
    encode_pack,
    make_header,
    output_files,
    view_pack_record,
)
from megatron.solo.data.packing import Pack


def image_doc(tokenizer, photos, text_ids=(400, 401, 402), fmt="png", index=0) -> Document:
    """BOS, then each photo's layout, then text: built by hand from the front end."""
    tokens, targets, images = [1], [False], []
    for photo in photos:
        resized, _ = im.load_and_resize(photo)
        rows, cols = resized.height // 32, resized.width // 32
        images.append(EncodedImage(len(tokens), rows, cols, codec.CODECS[fmt], codec.encode_image(resized, fmt)))
        layout = tokenizer.image_layout_ids(rows, cols)
        tokens += layout
        targets += [False] * len(layout)
    tokens += list(text_ids) + [2]
    targets += [True] * (len(text_ids) + 1)
    return Document(np.array(tokens, np.int32), np.array(targets), tuple(images), Origin("f", line=index))


def test_record_round_trip_and_patch_positions(tokenizer, small_photos):
    docs = (
        image_doc(tokenizer, small_photos[:2]),
        image_doc(tokenizer, [], index=1),
        image_doc(tokenizer, small_photos[2:3], index=2),
    )
    tokens, record = encode_pack(Pack(docs), np.uint16)
    view = view_pack_record(tokens, record)
    assert view.tokens.tolist() == np.concatenate([d.tokens for d in docs]).tolist()
    assert view.targets.tolist() == np.concatenate([d.targets for d in docs]).tolist()
    assert view.doc_offsets.tolist() == np.cumsum([0] + [len(d) for d in docs]).tolist()
    assert [(i.position, i.n_rows, i.n_cols) for i in view.images] == [
        (docs[0].images[0].position, docs[0].images[0].n_rows, docs[0].images[0].n_cols),
        (docs[0].images[1].position, docs[0].images[1].n_rows, docs[0].images[1].n_cols),
        (view.doc_offsets[2] + 1, docs[2].images[0].n_rows, docs[2].images[0].n_cols),
    ]
    positions = view.patch_positions
    assert positions.dtype == np.int64 and len(positions) == view.n_patches
    assert (view.tokens[positions] == tokenizer.vision_patch_id).all()
    assert (view.tokens == tokenizer.vision_patch_id).sum() == view.n_patches  # and no patch token is missed
    expected = np.concatenate([im.process_image(p).patches for p in small_photos[:3]])
    np.testing.assert_array_equal(view.patches(), expected)  # png storage: bit-exact to the front end


def test_text_only_pack_has_no_patches(tokenizer):
    view = view_pack_record(*encode_pack(Pack((image_doc(tokenizer, []),)), np.uint16))
    assert view.patches().shape == (0, 3072) and view.patch_positions.shape == (0,)


def write(prefix: Path, packs, resume=None) -> PackWriter:
    writer = PackWriter(str(prefix), np.uint16, resume)
    for pack in packs:
        writer.write(pack)
    return writer


def test_writer_reader_and_megatron_core_compatibility(tmp_path, tokenizer, small_photos):
    packs = [Pack((image_doc(tokenizer, small_photos[i : i + 1], index=i),)) for i in range(3)]
    write(tmp_path / "d", packs).finalize()
    ds = PackedDataset(str(tmp_path / "d"))
    assert len(ds) == 3 and ds.sequence_lengths.tolist() == [p.length for p in packs]
    for pack, view in zip(packs, ds):
        assert view.tokens.dtype == np.uint16 and view.tokens.tolist() == pack.documents[0].tokens.tolist()
    assert ds[-1].tokens.tolist() == ds[2].tokens.tolist()
    with pytest.raises(IndexError):
        ds[3]
    plain = IndexedDataset(str(tmp_path / "d"))  # a plain megatron token dataset
    assert plain.index.dtype == np.uint16 and plain[1].tolist() == packs[1].documents[0].tokens.tolist()
    assert plain.document_indices.tolist() == [0, 1, 2, 3]


def test_views_outlive_their_dataset(tmp_path, tokenizer, small_photos):
    """megatron-core unmaps its files when an IndexedDataset is collected: views must not depend on it."""
    write(tmp_path / "d", [Pack((image_doc(tokenizer, small_photos[:2]),))]).finalize()
    view = PackedDataset(str(tmp_path / "d"))[0]
    lengths = PackedDataset(str(tmp_path / "d")).sequence_lengths
    image = view.images[1]
    gc.collect()
    assert int(view.tokens.sum()) > 0 and lengths.tolist() == [len(view.tokens)]
    expected = im.process_image(small_photos[1]).patches
    del view
    gc.collect()
    np.testing.assert_array_equal(im.normalize_patches(im.patchify_uint8(image.pixels())), expected)


def test_arrays_taken_from_a_view_outlive_the_view_and_the_dataset(tmp_path, tokenizer, small_photos):
    """``PackedDataset(p)[0].tokens`` in one expression: the dataset and the view are collected at once, and the
    arrays must not point into the unmapped file (this crashed the interpreter when they were views of it)."""
    write(tmp_path / "d", [Pack((image_doc(tokenizer, small_photos[:2]),))]).finalize()
    want = PackedDataset(str(tmp_path / "d"))[0]
    want = (want.tokens.tolist(), want.doc_offsets.tolist(), bytes(want.images[1].data))
    script = (
        "import gc, sys; from megatron.solo.data.packed_format import PackedDataset as D; p = sys.argv[1]; "
        "t = D(p)[0].tokens; o = D(p)[0].doc_offsets; b = D(p)[0].images[1].data; gc.collect(); "
        "[D(p).sequence_lengths for _ in range(50)]; gc.collect(); "
        "print(repr((t.tolist(), o.tolist(), bytes(b))))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "d")], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-2000:])
    assert ast.literal_eval(proc.stdout) == want


def test_resumed_writer_truncates_and_matches_an_uninterrupted_one(tmp_path, tokenizer, small_photos):
    packs = [Pack((image_doc(tokenizer, small_photos[i % 3 : i % 3 + 1], index=i),)) for i in range(5)]
    write(tmp_path / "straight", packs).finalize()
    first = write(tmp_path / "resumed", packs[:2])
    state = first.checkpoint()
    first.write(packs[4])  # written after the checkpoint, then "killed": must disappear
    write(tmp_path / "resumed", packs[2:], resume=state).finalize()
    for a, b in zip(output_files(str(tmp_path / "straight")), output_files(str(tmp_path / "resumed"))):
        assert Path(a).read_bytes() == Path(b).read_bytes(), a


def test_a_resumed_builder_has_the_stock_builders_state(tmp_path):
    """The resume path sets the library's fields through its own __init__: none is missing or extra."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    from megatron.solo.data.packed_format import _Builder

    stock = IndexedDatasetBuilder(str(tmp_path / "a.bin"), dtype=np.uint8)
    (tmp_path / "b.bin").write_bytes(b"xyz!")
    resumed = _Builder(str(tmp_path / "b.bin"), np.uint8, {"nbytes": 3, "sequence_lengths": [1, 2]})
    assert vars(resumed).keys() == vars(stock).keys()
    assert resumed.document_indices == [0, 1, 2] and resumed.data_file.tell() == 3
    stock.data_file.close()
    resumed.finalize(str(tmp_path / "b.idx"))
    assert (tmp_path / "b.bin").read_bytes() == b"xyz"


def test_reader_rejects_missing_and_corrupt_files(tmp_path, tokenizer):
    with pytest.raises(FileNotFoundError, match="missing"):
        PackedDataset(str(tmp_path / "nothing"))
    tokens, record = encode_pack(Pack((image_doc(tokenizer, []),)), np.uint16)
    bad = record.copy()
    bad[:4] = np.frombuffer(b"XXXX", np.uint8)
    with pytest.raises(ValueError, match="corrupt record"):
        view_pack_record(tokens, bad)
    with pytest.raises(ValueError, match="corrupt record"):
        view_pack_record(tokens[:-1], record)


def test_lossy_storage_patches_are_close(tokenizer, small_photos):
    """jpeg q92: tokens exact, patches within the measured tolerance of the front end's."""
    view = view_pack_record(*encode_pack(Pack((image_doc(tokenizer, small_photos, fmt="jpeg"),)), np.uint16))
    exact = np.concatenate([im.process_image(p).patches for p in small_photos])
    diff = np.abs(view.patches() - exact)
    # normalised units, 1/255/0.225 ≈ 0.0174 per grey level. Measured on these photos: mean 0.020 (1.2
    # levels), max 0.31 (18 levels); bounds: mean < 1.7 levels, max < 43 levels
    assert diff.mean() < 0.03 and diff.max() < 0.75, (diff.mean(), diff.max())


def test_pixels_can_be_saved_back(tokenizer, small_photos):
    view = view_pack_record(*encode_pack(Pack((image_doc(tokenizer, small_photos[:1]),)), np.uint16))
    buf = io.BytesIO()
    Image.fromarray(view.images[0].pixels()).save(buf, "PNG")
    resized, _ = im.load_and_resize(small_photos[0])
    np.testing.assert_array_equal(np.asarray(Image.open(buf)), np.asarray(resized))


# ---------------------------------------------------------------------------------------------
# The exact bytes, and the header


def test_golden_bytes_of_one_record():
    """One pack hand-encoded from the layout in packed_format.py's docstring."""
    tokens = np.array([1, 32000, 32001, 32001, 32004, 400, 2], np.int32)
    targets = np.array([0, 0, 0, 0, 0, 1, 1], bool)
    image = EncodedImage(1, 1, 2, codec.CODECS["raw"], b"\x0a\x0b\x0c")
    ids, record = encode_pack(Pack((Document(tokens, targets, (image,), Origin("f", line=1)),)), np.uint16)
    u32 = lambda *v: b"".join(x.to_bytes(4, "little") for x in v)  # noqa: E731
    expected = (
        b"SPK1"
        + u32(7, 1, 1)  # magic, n_tokens, n_docs, n_images
        + u32(0, 7)  # doc_offsets
        + u32(1, 1, 2, 0, 3)  # image: position, n_rows, n_cols, codec raw, nbytes
        + bytes([0b01100000])  # targets: tokens 5 and 6, little bit order
        + b"\x0a\x0b\x0c"
    )  # the image's stored bytes
    assert record.tobytes() == expected
    assert ids.dtype == np.uint16 and ids.tobytes() == tokens.astype("<u2").tobytes()


def test_header_is_written_and_describes_the_prefix(run_preprocess, small_photos, tmp_path, tokenizer):
    source = tmp_path / "c.jsonl"
    source.write_text(json.dumps({"image": str(small_photos[0]), "caption": "a cat"}) + "\n")
    prefix, _ = run_preprocess([source], image_format="jpeg", allow_outside_root=True)
    header = json.loads(Path(prefix + ".pack.json").read_text())
    assert header == {
        "format": "solo-packed",
        "format_version": 1,
        "token_dtype": "uint16",
        "patch_size": 32,
        "max_size": 1024,
        "mean": list(im.IMAGENET_MEAN),
        "std": list(im.IMAGENET_STD),
        "image_codec": "jpeg",
        "image_quality": 92,
        "tokenizer": tokenizer.fingerprint(),
        "layout": "solo",
    }
    assert PackedDataset(prefix).image_config == im.DEFAULT_CONFIG


def write_prefix(prefix: Path, header: dict | None = None, patch_size: int = 32, seed: int = 0) -> str:
    """One pack of one raw-stored 2×3-patch image at ``patch_size`` px, with ``header`` (default: the default)."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (2 * patch_size, 3 * patch_size, 3), dtype=np.uint8)
    image = EncodedImage(1, 2, 3, codec.CODECS["raw"], pixels.tobytes())
    layout = [32000] + [32001] * 3 + [32002] + [32001] * 3 + [32004]
    tokens = np.array([1] + layout + [400, 2], np.int32)
    targets = np.array([False] * (1 + len(layout)) + [True, True])
    writer = PackWriter(str(prefix), np.uint16, header=header)
    writer.write(Pack((Document(tokens, targets, (image,), Origin("f", line=0)),)))
    writer.finalize()
    return str(prefix)


def test_patch_size_and_normalisation_come_from_the_header(tmp_path):
    config = im.ImageConfig(patch_size=14, max_size=1022, mean=(0.5, 0.5, 0.5), std=(0.25, 0.5, 1.0))
    prefix = write_prefix(tmp_path / "p14", make_header(np.uint16, config, image_codec="raw"), patch_size=14)
    ds = PackedDataset(prefix)
    assert ds.image_config == config
    raw = ds[0].patches_uint8()
    assert raw.shape == (6, 3 * 14 * 14) and raw.dtype == np.uint8
    np.testing.assert_array_equal(ds[0].patches(), im.normalize_patches(raw, config))


def test_a_prefix_without_header_reads_with_the_defaults_and_a_warning(tmp_path):
    prefix = write_prefix(tmp_path / "old")
    os.unlink(prefix + ".pack.json")
    with pytest.warns(UserWarning, match=f"{prefix}: no old.pack.json .*defaults, patch_size 32.*rerun"):
        ds = PackedDataset(prefix)
    assert ds.image_config == im.DEFAULT_CONFIG and ds.header["tokenizer"] is None
    assert ds[0].patches_uint8().shape == (6, 3072)


@pytest.mark.parametrize(
    "change, match",
    [
        ({"format_version": 2}, r"p\.pack\.json: format_version is 2, this reader reads 1: preprocess"),
        ({"format": "other"}, r"p\.pack\.json: format is 'other', expected 'solo-packed'"),
        ({"token_dtype": "int32"}, r"p\.pack\.json: token_dtype is 'int32', but .*p\.idx holds uint16"),
        ({"patch_size": 0}, r"p\.pack\.json: ImageConfig\.patch_size must be a positive int"),
    ],
)
def test_a_bad_header_is_refused_naming_file_and_field(tmp_path, change, match):
    prefix = write_prefix(tmp_path / "p")
    header = json.loads(Path(prefix + ".pack.json").read_text())
    Path(prefix + ".pack.json").write_text(json.dumps({**header, **change}))
    with pytest.raises(ValueError, match=match):
        PackedDataset(prefix)


def test_a_prefix_made_with_another_tokenizer_is_named(tmp_path, tokenizer):
    prefix = write_prefix(tmp_path / "p", make_header(np.uint16, tokenizer=tokenizer.fingerprint()))
    ds = PackedDataset(prefix)
    ds.check_tokenizer(tokenizer.fingerprint())
    other = {**tokenizer.fingerprint(), "vocab_size": 32000}
    with pytest.raises(ValueError, match=r"p\.pack\.json: tokenizer\.vocab_size is 33029, but the tokenizer has 32000"):
        ds.check_tokenizer(other)
