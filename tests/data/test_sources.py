"""Input formats: discovery, detection, record cutting (with resume positions), parsing into turns."""

import base64
import gzip
import io
import json

import pytest
import zstandard
from data_helpers import write_jsonl, write_tar

from megatron.solo.data import samples, sources
from megatron.solo.data.errors import Origin, SampleError
from megatron.solo.data.samples import ImageRef, Turn
from megatron.solo.data.sources import RawRecord


def parse(fmt, payload, image_root="/imgs", origin=Origin("in.jsonl", line=1)):  # noqa: B008 (frozen)
    if isinstance(payload, (dict, list)):
        payload = json.dumps(payload).encode()
    return samples.parse_record(RawRecord(origin, payload), fmt, image_root)


def reason_of(fmt, payload, **kw) -> str:
    with pytest.raises(SampleError) as e:
        parse(fmt, payload, **kw)
    assert str(e.value.origin) in str(e.value)  # the message names where the sample is
    return e.value.reason


# --- inputs and detection -------------------------------------------------------------------------


def test_resolve_inputs_globs_sorted_in_argument_order_without_repeats(tmp_path):
    for name in ("b.jsonl", "a.jsonl", "c.txt"):
        (tmp_path / name).write_text("{}\n")
    got = sources.resolve_inputs([str(tmp_path / "c.txt"), str(tmp_path / "*.jsonl"), str(tmp_path / "a.jsonl")])
    assert got == [str(tmp_path / n) for n in ("c.txt", "a.jsonl", "b.jsonl")]
    with pytest.raises(FileNotFoundError, match="no file matches"):
        sources.resolve_inputs([str(tmp_path / "*.parquet")])
    with pytest.raises(FileNotFoundError, match="no such file"):
        sources.resolve_inputs([str(tmp_path / "nope.jsonl")])


@pytest.mark.parametrize(
    "record, fmt",
    [
        ([{"role": "user", "content": "hi"}], "chat"),
        ({"role": "assistant", "content": "hi"}, "chat"),
        ({"id": 1, "conversations": [{"role": "user", "content": "hi"}]}, "chat"),
        ({"messages": [{"role": "user", "content": "hi"}]}, "chat"),
        ({"image": "a.jpg", "conversations": [{"from": "human", "value": "<image>\nhi"}]}, "llava"),
        ({"image": "a.jpg", "caption": "a cat"}, "caption"),
        ({"image_path": "a.jpg", "text": "a cat"}, "caption"),
        ({"text": "plain text", "meta": {}}, "text"),
        ({"foo": 1}, None),
        ({"conversations": []}, None),
        (3, None),
    ],
)
def test_classify(record, fmt):
    assert sources.classify(record) == fmt


def test_detect_format_per_file_kind(tmp_path):
    jsonl = write_jsonl(tmp_path / "a.jsonl", [{"text": "x"}])
    gz = tmp_path / "b.jsonl.gz"
    gz.write_bytes(gzip.compress(b"\n" + json.dumps({"text": "y"}).encode() + b"\n"))
    array = tmp_path / "c.json"
    array.write_text(json.dumps([{"image": "a.jpg", "conversations": [{"from": "human", "value": "hi"}]}]))
    tar = write_tar(tmp_path / "d.tar", [("k.txt", b"x")])
    (tmp_path / "root").mkdir()
    assert sources.detect_format([str(jsonl), str(gz)]) == "text"
    assert sources.detect_format([str(array)]) == "llava"
    assert sources.detect_format([str(tar)]) == "webdataset"
    assert sources.detect_format([str(tmp_path / "root")]) == "imagenet"
    with pytest.raises(ValueError, match="different formats"):
        sources.detect_format([str(jsonl), str(array)])
    odd = write_jsonl(tmp_path / "odd.jsonl", [{"foo": 1}])
    with pytest.raises(ValueError, match=r"odd.jsonl: cannot tell .* --input-format"):
        sources.detect_format([str(odd)])


# --- cutting records and resuming mid-file ------------------------------------------------------------


def _all(paths, fmt, start=(0, 0), **kw):
    return list(sources.iter_records([str(p) for p in paths], fmt, start=start, **kw))


def _assert_resumable(paths, fmt, **kw):
    """From every position, iteration yields exactly the tail of the full iteration."""
    full = _all(paths, fmt, **kw)
    for n, ((i, k), _) in enumerate(full):
        tail = _all(paths, fmt, start=(i, k), **kw)
        assert [(pos, _key(r)) for pos, r in tail] == [(pos, _key(r)) for pos, r in full[n:]]
    last_file, last_k = full[-1][0]
    assert _all(paths, fmt, start=(last_file, last_k + 1), **kw) == []
    return full


def _key(record):
    return (record.origin, record.payload) if isinstance(record, RawRecord) else record.to_json()


def test_jsonl_records_compressed_blank_lines_and_resume(tmp_path):
    lines = [json.dumps({"text": f"doc {i}"}).encode() for i in range(5)]
    plain = tmp_path / "a.jsonl"
    plain.write_bytes(b"\n".join(lines[:2]) + b"\n\n   \n" + lines[2] + b"\n")
    zst = tmp_path / "b.jsonl.zst"
    zst.write_bytes(zstandard.ZstdCompressor().compress(b"\n".join(lines[3:]) + b"\n"))
    full = _assert_resumable([plain, zst], "text")
    assert [(pos, r.origin.line) for pos, r in full] == [
        ((0, 0), 1),
        ((0, 1), 2),
        ((0, 2), 5),
        ((1, 0), 1),
        ((1, 1), 2),
    ]
    assert [r.payload.strip() for _, r in full] == lines


def test_corrupt_gzip_yields_one_unreadable_input_then_next_file(tmp_path):
    data = gzip.compress(b"".join(json.dumps({"text": f"doc {i} " * 50}).encode() + b"\n" for i in range(200)))
    broken = tmp_path / "a.jsonl.gz"
    broken.write_bytes(data[: len(data) // 2])
    ok = write_jsonl(tmp_path / "b.jsonl", [{"text": "fine"}])
    full = _all([broken, ok], "text")
    errors = [r for _, r in full if isinstance(r, SampleError)]
    assert len(errors) == 1 and errors[0].reason == "unreadable_input"
    assert errors[0].origin.file == str(broken) and errors[0].origin.line > 1
    assert isinstance(full[-1][1], RawRecord) and full[-1][1].origin.file == str(ok)


def test_json_array_records_and_a_malformed_file(tmp_path):
    good = tmp_path / "a.json"
    good.write_text(json.dumps([{"text": str(i)} for i in range(3)]))
    bad = tmp_path / "b.json"
    bad.write_text('[{"text": "fine"}, {"text": oops}]')
    full = _assert_resumable([good, bad], "text")
    assert [r.origin.key for _, r in full[:4]] == ["item 0", "item 1", "item 2", "item 0"]
    assert full[4][1].reason == "malformed_json" and full[4][1].origin == Origin(str(bad), key="item 1")


@pytest.mark.parametrize("chunk", [1, 3, 7, 1 << 20])
def test_json_items_stream_across_chunk_boundaries(chunk):
    items = [
        {"t": "a [tricky], {string}", "n": 12345678901234, "u": "é€😀"},
        3.25e10,
        [1, [2, []]],
        "x",
        None,
        {"nested": {"deep": [{"k": "v"}] * 3}},
        987654321,
    ]
    data = (" \n[ " + " ,\n ".join(json.dumps(i, ensure_ascii=False) for i in items) + " ]\n").encode()
    assert list(sources._json_items(io.BytesIO(data), chunk)) == items
    assert list(sources._json_items(io.BytesIO(b'{"a": [1, 2]}'), chunk)) == [{"a": [1, 2]}]
    assert list(sources._json_items(io.BytesIO(b" [ ] "), chunk)) == []

    def read(data):  # a malformed item is stepped over, as one BrokenItem
        items = sources._json_items(io.BytesIO(data), chunk)
        return ["broken" if isinstance(x, sources.BrokenItem) else x for x in items]

    assert read(b"[1, 2") == [1, 2, "broken"]  # truncated
    assert read(b"[1 2]") == ["broken"]
    assert read(b'[{"a": 1}, ]') == [{"a": 1}, "broken"]
    assert read(b'[1, {"a": x, "b": [1, "]"]}, 3]') == [1, "broken", 3]
    with pytest.raises(json.JSONDecodeError):
        list(sources._json_items(io.BytesIO(b"[1, 2] 3"), chunk))
    assert read(b'\xef\xbb\xbf["caf\xe9", "ok"]') == ["caf\udce9", "ok"]  # the item's parser rejects it (non_utf8)


def test_detection_reads_a_whole_first_line_however_long(tmp_path):
    url = "data:image/png;base64," + "A" * (3 << 20)  # a 3 MB first line
    path = write_jsonl(
        tmp_path / "big.jsonl", [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}]
    )
    assert sources.detect_format([str(path)]) == "chat"


def test_tar_records_grouped_by_key_and_resume(tmp_path):
    members = [
        ("a/000.jpg", b"J0"),
        ("a/000.txt", b"cap 0"),
        ("a/001.png", b"P1"),
        ("a/001.json", b"{}"),
        ("a/002.seg.webp", b"W2"),
        ("a/002.txt", b"cap 2"),
    ]
    shard = write_tar(tmp_path / "s.tar", members)
    full = _assert_resumable([shard], "webdataset")
    assert [(r.origin.key, r.payload) for _, r in full] == [
        ("a/000", {"jpg": b"J0", "txt": b"cap 0"}),
        ("a/001", {"png": b"P1", "json": b"{}"}),
        ("a/002", {"seg.webp": b"W2", "txt": b"cap 2"}),
    ]


def test_truncated_tar_yields_unreadable_input(tmp_path):
    shard = write_tar(tmp_path / "s.tar", [(f"{i:03d}.jpg", bytes(3000)) for i in range(4)])
    data = shard.read_bytes()
    shard.write_bytes(data[:4000])  # cut inside the second member's data
    full = _all([shard], "webdataset")
    assert isinstance(full[-1][1], SampleError) and full[-1][1].reason == "unreadable_input"


def test_imagenet_records_sorted_with_class_names_and_resume(tmp_path):
    root = tmp_path / "train"
    for wnid, files in {"n02": ["b.JPEG", "a.JPEG", "notes.txt"], "n01": ["x.jpg"], "n03": ["y.png"]}.items():
        (root / wnid).mkdir(parents=True)
        for f in files:
            (root / wnid / f).write_bytes(b"")
    names = {"n01": "tench", "n02": "great_white-shark"}
    full = _assert_resumable([root], "imagenet", class_names=names, shuffle_seed=None)
    assert [r.origin.key for _, r in full] == ["n01/x.jpg", "n02/a.JPEG", "n02/b.JPEG", "n03/y.png"]
    sample = samples.parse_record(full[1][1], "imagenet")
    assert sample.turns == (Turn("assistant", (ImageRef(str(root / "n02" / "a.JPEG")), "great white shark")),)
    with pytest.raises(SampleError, match="n03") as e:
        samples.parse_record(full[3][1], "imagenet")
    assert e.value.reason == "unknown_class"


def test_imagenet_records_are_read_in_a_seeded_order_that_mixes_classes(tmp_path):
    root = tmp_path / "train"
    for c in range(6):
        (root / f"n{c:02d}").mkdir(parents=True)
        for k in range(20):
            (root / f"n{c:02d}" / f"{k:02d}.JPEG").write_bytes(b"")
    names = {f"n{c:02d}": f"class {c}" for c in range(6)}
    ordered = [r.origin.key for _, r in _all([root], "imagenet", class_names=names, shuffle_seed=None)]
    shuffled = _assert_resumable([root], "imagenet", class_names=names, shuffle_seed=7)
    keys = [r.origin.key for _, r in shuffled]
    assert sorted(keys) == ordered and keys != ordered
    assert keys == [r.origin.key for _, r in _all([root], "imagenet", class_names=names, shuffle_seed=7)]
    assert keys != [r.origin.key for _, r in _all([root], "imagenet", class_names=names, shuffle_seed=8)]
    assert all(len({k.split("/")[0] for k in keys[i : i + 12]}) >= 4 for i in range(0, 120, 12))  # classes mix
    assert {(r.origin.key, r.payload[1]) for _, r in shuffled} == {(k, names[k[:3]]) for k in ordered}


def test_load_class_names_formats(tmp_path):
    (tmp_path / "LOC_synset_mapping.txt").write_text("n01440764 tench, Tinca tinca\nn01443537 goldfish\n")
    (tmp_path / "words.txt").write_text("n00001740\tentity\n\n")
    (tmp_path / "names.json").write_text(json.dumps({"n01": "tench"}))
    (tmp_path / "keras.json").write_text(json.dumps({"0": ["n01440764", "tench"]}))
    (tmp_path / "bad.txt").write_text("n01440764\n")
    assert sources.load_class_names(str(tmp_path / "LOC_synset_mapping.txt")) == {
        "n01440764": "tench, Tinca tinca",
        "n01443537": "goldfish",
    }
    assert sources.load_class_names(str(tmp_path / "words.txt")) == {"n00001740": "entity"}
    assert sources.load_class_names(str(tmp_path / "names.json")) == {"n01": "tench"}
    assert sources.load_class_names(str(tmp_path / "keras.json")) == {"n01440764": "tench"}
    with pytest.raises(ValueError, match="bad.txt:1"):
        sources.load_class_names(str(tmp_path / "bad.txt"))


# --- parsing ---------------------------------------------------------------------------------------


def test_chat_shapes_parts_and_image_urls():
    url = "data:image/png;base64," + base64.b64encode(b"png bytes").decode()
    turns = [
        {"role": "system", "content": " Be brief. "},
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": "cats/1.jpg"}},
                {"type": "text", "text": "What is it?\n"},
            ],
        },
        {
            "role": "assistant",
            "content": [
                {"type": "text", "text": "A cat."},
                {"type": "image_url", "image_url": url},
                {"type": "text", "text": "  "},
            ],
        },
    ]
    expected = (
        Turn("system", ("Be brief.",)),
        Turn("user", (ImageRef("/imgs/cats/1.jpg"), "What is it?")),
        Turn("assistant", ("A cat.", ImageRef(url))),
    )
    for shape in (turns, {"id": 7, "conversations": turns}, {"messages": turns}):
        assert parse("chat", shape).turns == expected
    assert parse("chat", {"role": "assistant", "content": "Only text"}).turns == (Turn("assistant", ("Only text",)),)
    url = {"url": "file:///imgs/y.png"}  # a path like any other, inside the root
    absolute = parse("chat", [{"role": "user", "content": [{"type": "image_url", "image_url": url}]}])
    assert absolute.turns[0].parts == (ImageRef("/imgs/y.png"),)


def test_relative_images_default_to_the_input_files_directory():
    sample = parse(
        "caption", {"image": "a.jpg", "caption": "c"}, image_root=None, origin=Origin("/data/set/caps.jsonl", line=3)
    )
    assert sample.turns[0].parts[0] == ImageRef("/data/set/a.jpg")


def test_llava_tags_place_images_and_roles_map():
    record = {
        "image": "coco/1.jpg",
        "conversations": [
            {"from": "human", "value": "<image>\nDescribe it."},
            {"from": "gpt", "value": "A dog."},
            {"from": "human", "value": "Colour?"},
            {"from": "gpt", "value": "Brown."},
        ],
    }
    assert parse("llava", record).turns == (
        Turn("user", (ImageRef("/imgs/coco/1.jpg"), "Describe it.")),
        Turn("assistant", ("A dog.",)),
        Turn("user", ("Colour?",)),
        Turn("assistant", ("Brown.",)),
    )
    untagged = {"image": "a.jpg", "conversations": [{"from": "gpt", "value": "x"}, {"from": "human", "value": "q"}]}
    assert parse("llava", untagged).turns[1] == Turn("user", (ImageRef("/imgs/a.jpg"), "q"))
    middle = {"image": ["a.jpg", "b.jpg"], "conversations": [{"from": "human", "value": "Left <image> right\n<image>"}]}
    assert parse("llava", middle).turns[0].parts == ("Left", ImageRef("/imgs/a.jpg"), "right", ImageRef("/imgs/b.jpg"))
    text_only = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}
    assert parse("llava", text_only).turns == (Turn("user", ("hi",)), Turn("assistant", ("hello",)))


def test_caption_text_webdataset_parsing():
    assert parse("caption", {"image": "a.jpg", "caption": " A cat. ", "text": "ignored"}).turns == (
        Turn("assistant", (ImageRef("/imgs/a.jpg"), "A cat.")),
    )
    assert parse("text", {"text": "  keep\nverbatim \n"}).turns == (Turn("assistant", ("  keep\nverbatim \n",)),)
    origin = Origin("s.tar", key="000")
    wds = samples.parse_record(RawRecord(origin, {"jpg": b"JJ", "png": b"PP", "txt": b"cap"}), "webdataset")
    assert wds.turns == (Turn("assistant", (ImageRef(b"JJ"), "cap")),)
    meta = samples.parse_record(
        RawRecord(origin, {"webp": b"W", "json": b'{"caption": "from json", "url": "u"}'}), "webdataset"
    )
    assert meta.turns[0].parts == (ImageRef(b"W"), "from json")


@pytest.mark.parametrize(
    "fmt, payload, reason",
    [
        ("chat", b"{not json", "malformed_json"),
        ("chat", b"[" * 100_000 + b"]" * 100_000, "malformed_json"),
        ("text", b'{"text": 1' + b"1" * 5000 + b"}", "malformed_json"),
        ("text", b'{"text": "caf\xe9"}', "non_utf8"),
        ("chat", [{"role": "human", "content": "hi"}], "unknown_role"),
        ("chat", [{"role": "user"}], "missing_field"),
        ("chat", [{"role": "user", "content": 3}], "bad_field"),
        ("chat", [{"role": "user", "content": [{"type": "audio"}]}], "bad_field"),
        ("chat", [], "bad_field"),
        ("chat", [{"role": "user", "content": "  "}], "empty_text"),
        (
            "chat",
            [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x/a.jpg"}}]}],
            "remote_url",
        ),
        ("llava", {"conversations": [{"from": "bot", "value": "x"}]}, "unknown_role"),
        (
            "llava",
            {"image": "a.jpg", "conversations": [{"from": "human", "value": "<image><image>"}]},
            "image_tag_mismatch",
        ),
        ("llava", {"conversations": [{"from": "human", "value": "<image> hi"}]}, "image_tag_mismatch"),
        ("llava", {"image": "a.jpg"}, "missing_field"),
        ("llava", {"image": 5, "conversations": [{"from": "human", "value": "x"}]}, "bad_field"),
        ("caption", {"image": "a.jpg"}, "missing_field"),
        ("caption", {"caption": "no image"}, "missing_field"),
        ("caption", {"image": "a.jpg", "caption": " \n"}, "empty_text"),
        ("caption", {"image": "a.jpg", "caption": ["list"]}, "bad_field"),
        ("text", {"text": "   "}, "empty_text"),
        ("text", {"content": "x"}, "missing_field"),
        ("text", ["not", "an", "object"], "bad_field"),
    ],
)
def test_bad_records_have_named_reasons(fmt, payload, reason):
    assert reason_of(fmt, payload) == reason


@pytest.mark.parametrize(
    "group, reason",
    [
        ({"txt": b"caption only"}, "missing_field"),
        ({"jpg": b"J"}, "missing_field"),
        ({"jpg": b"J", "txt": b"\xff\xfe"}, "non_utf8"),
        ({"jpg": b"J", "json": b"{oops"}, "malformed_json"),
        ({"jpg": b"J", "json": b'{"url": "u"}'}, "missing_field"),
        ({"jpg": b"J", "txt": b"  "}, "empty_text"),
    ],
)
def test_bad_webdataset_keys(group, reason):
    with pytest.raises(SampleError) as e:
        samples.parse_record(RawRecord(Origin("s.tar", key="k"), group), "webdataset")
    assert e.value.reason == reason and "s.tar[k]" in str(e.value)


def test_sample_error_pickles_and_serialises():
    import pickle

    e = SampleError("sliver", Origin("a.jsonl", line=4), "5000x4")
    back = pickle.loads(pickle.dumps(e))
    assert (back.reason, back.origin, back.detail, str(back)) == (e.reason, e.origin, e.detail, str(e))
    assert e.to_json() == {"file": "a.jsonl", "line": 4, "reason": "sliver", "detail": "5000x4"}
    assert SampleError("too_long", Origin("s.tar", key="k"), "d").to_json()["key"] == "k"
