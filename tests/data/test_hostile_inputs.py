"""Hostile input and broken storage: nothing outside the image root is read, no single record stops a
run, nothing vanishes silently, ``errors.jsonl`` is reproducible."""

import errno
import gzip
import io
import json
import os
import pathlib
import shutil
import struct
from pathlib import Path

import pytest
import zstandard
from data_helpers import write_jsonl, write_tar
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from megatron.solo import image as im
from megatron.solo.data import samples, sources
from megatron.solo.data.errors import REASONS, InputError, Origin, SampleError
from megatron.solo.data.packed_format import PackedDataset
from megatron.solo.data.sources import RawRecord


def parse(fmt, payload, image_root, origin=Origin("in.jsonl", line=1), **kw):  # noqa: B008 (frozen)
    if isinstance(payload, (dict, list)):
        payload = json.dumps(payload).encode()
    return samples.parse_record(RawRecord(origin, payload), fmt, image_root, **kw)


def reason_of(fmt, payload, image_root, **kw) -> str:
    with pytest.raises(SampleError) as e:
        parse(fmt, payload, image_root, **kw)
    return e.value.reason


def records_with(ref, fmt):
    """A valid record of ``fmt`` whose one image reference is ``ref``."""
    if fmt == "caption":
        return {"image": ref, "caption": "c"}
    if fmt == "llava":
        return {"image": ref, "conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "c"}]}
    return [
        {
            "role": "assistant",
            "content": [{"type": "image_url", "image_url": {"url": ref}}, {"type": "text", "text": "c"}],
        }
    ]


def errors_of(prefix) -> list[dict]:
    return [json.loads(line) for line in Path(prefix + ".errors.jsonl").read_text().splitlines()]


@pytest.fixture
def tree(tmp_path, small_photos):
    """root/in.jpg, root/link.jpg → ../outside.jpg, root/up → tmp_path, root/inlink.jpg → in.jpg."""
    root = tmp_path / "root"
    root.mkdir()
    shutil.copy(small_photos[0], root / "in.jpg")
    shutil.copy(small_photos[1], tmp_path / "outside.jpg")
    (root / "link.jpg").symlink_to(tmp_path / "outside.jpg")
    (root / "up").symlink_to(tmp_path)
    (root / "inlink.jpg").symlink_to(root / "in.jpg")
    (root / "loop.jpg").symlink_to(root / "loop.jpg")
    return root


# --- 1. nothing outside the image root is read ---------------------------------------------------------


OUTSIDE = [
    "../outside.jpg",
    "{tmp}/outside.jpg",
    "file://{tmp}/outside.jpg",
    "link.jpg",
    "up/outside.jpg",
    "up/root/../outside.jpg",
    "/etc/passwd",
    "file:///etc/passwd",
]


@pytest.mark.parametrize("fmt", ["caption", "llava", "chat"])
def test_image_references_must_resolve_inside_the_root(fmt, tree):
    tmp = str(tree.parent)
    for ref in OUTSIDE:
        ref = ref.format(tmp=tmp)
        assert reason_of(fmt, records_with(ref, fmt), str(tree)) == "outside_root", ref
        assert parse(fmt, records_with(ref, fmt), str(tree), allow_outside_root=True)  # the user's choice
    for ref in ["in.jpg", "inlink.jpg", f"file://{tree}/in.jpg", "up/root/in.jpg", "./x/../in.jpg", "gone.jpg"]:
        assert parse(fmt, records_with(ref, fmt), str(tree))  # inside (a missing file fails later, as missing_file)
    assert reason_of(fmt, records_with("loop.jpg", fmt), str(tree)) == "symlink_loop"
    # no --image-root: the input file's own directory is the root
    origin = Origin(str(tree / "in.jsonl"), line=1)
    assert reason_of(fmt, records_with("../outside.jpg", fmt), None, origin=origin) == "outside_root"
    assert parse(fmt, records_with("in.jpg", fmt), None, origin=origin)


def test_images_outside_the_root_never_reach_the_packs(tree, run_preprocess):
    lines = [{"image": ref.format(tmp=tree.parent), "caption": "c"} for ref in ["in.jpg"] + OUTSIDE]
    path = write_jsonl(tree / "caps.jsonl", lines)
    _, stats = run_preprocess([path])
    assert stats["documents"] == 1 and stats["skipped"] == {"outside_root": len(OUTSIDE)}
    _, stats = run_preprocess([path], "allowed", allow_outside_root=True)
    assert stats["documents"] == 7 and stats["skipped"] == {"corrupt_image": 2}  # /etc/passwd: read, not an image


def test_imagenet_links_that_leave_the_root_and_loops_are_skipped_never_followed(tmp_path, small_photos):
    root, elsewhere = tmp_path / "train", tmp_path / "elsewhere"
    for d in (root / "n01", elsewhere):
        d.mkdir(parents=True)
    shutil.copy(small_photos[0], root / "n01" / "a.JPEG")
    shutil.copy(small_photos[1], elsewhere / "b.JPEG")
    (root / "n01" / "in.JPEG").symlink_to(root / "n01" / "a.JPEG")
    (root / "n01" / "out.JPEG").symlink_to(elsewhere / "b.JPEG")
    (root / "n01" / "loop.JPEG").symlink_to(root / "n01" / "loop.JPEG")
    (root / "n01" / "gone.JPEG").symlink_to(root / "n01" / "nothing.JPEG")
    (root / "n02").symlink_to(elsewhere)
    (root / "n03").symlink_to(root / "n03")
    (root / "n04").symlink_to(root / "n01")  # inside: read
    names = {f"n0{i}": f"class {i}" for i in range(1, 5)}
    got = [r for _, r in sources.iter_records([str(root)], "imagenet", class_names=names, shuffle_seed=None)]
    errors = {r.origin.key: r.reason for r in got if isinstance(r, SampleError)}
    assert errors == {
        "n01/out.JPEG": "outside_root",
        "n01/loop.JPEG": "symlink_loop",
        "n01/gone.JPEG": "missing_file",
        "n02": "outside_root",
        "n03": "symlink_loop",
        "n04/out.JPEG": "outside_root",
        "n04/loop.JPEG": "symlink_loop",
        "n04/gone.JPEG": "missing_file",
    }
    assert sorted(r.origin.key for r in got if isinstance(r, RawRecord)) == [
        "n01/a.JPEG",
        "n01/in.JPEG",
        "n04/a.JPEG",
        "n04/in.JPEG",
    ]
    allowed = sources.iter_records(
        [str(root)], "imagenet", class_names=names, shuffle_seed=None, allow_outside_root=True
    )
    assert {r.origin.key for _, r in allowed if isinstance(r, RawRecord)} >= {"n01/out.JPEG", "n02/b.JPEG"}


# --- 2. no single record stops a run ----------------------------------------------------------------------


def bad_records(fmt):
    """(line, reason) of records that used to stop a whole run."""
    sur = "\ud800"
    if fmt == "caption":
        return [
            ({"image": "in.jpg", "caption": f"a {sur} cat"}, "non_utf8"),
            ({"image": f"gone{sur}.jpg", "caption": "c"}, "non_utf8"),
            ({"image": "in.jpg", "caption": {"nested": ["x"]}}, "bad_field"),
            ({"image": "in.jpg", "caption": "c", "meta": {sur: 1}}, "non_utf8"),
        ]
    if fmt == "chat":
        return [
            ([{"role": "user", "content": "q"}, {"role": "assistant", "content": f"x{sur}"}], "non_utf8"),
            ([{"role": ["assistant"], "content": "x"}], "bad_field"),
            ([{"role": "assistant", "content": [{"type": {"t": 1}}]}], "bad_field"),
        ]
    if fmt == "llava":
        return [
            ({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": sur}]}, "non_utf8"),
            ({"conversations": [{"from": ["human"], "value": "q"}]}, "bad_field"),
            ({"conversations": [{"from": {"who": "gpt"}, "value": "q"}]}, "bad_field"),
            ({"image": [["in.jpg"]], "conversations": [{"from": "gpt", "value": "q"}]}, "bad_field"),
        ]
    return [({"text": f"doc {sur} doc"}, "non_utf8"), ({"text": ["a", "b"]}, "bad_field")]


def good_record(fmt):
    return {
        "caption": {"image": "in.jpg", "caption": "good"},
        "chat": {"role": "assistant", "content": "good"},
        "llava": {"conversations": [{"from": "gpt", "value": "good"}]},
        "text": {"text": "good"},
    }[fmt]


@pytest.mark.parametrize("fmt", ["caption", "chat", "llava", "text"])
def test_no_single_record_stops_a_run(fmt, tree, run_preprocess):
    bad = bad_records(fmt)
    path = write_jsonl(tree / f"{fmt}.jsonl", [good_record(fmt)] + [r for r, _ in bad] + [good_record(fmt)])
    prefix, stats = run_preprocess([path], input_format=fmt)
    assert [(e["line"], e["reason"]) for e in errors_of(prefix)] == [(i + 2, r) for i, (_, r) in enumerate(bad)]
    assert stats["documents"] == 2 and stats["samples"] == len(bad) + 2


def test_imagenet_loops_and_undecodable_names_do_not_stop_a_run(tmp_path, small_photos, run_preprocess):
    root = tmp_path / "train"
    (root / "n01").mkdir(parents=True)
    shutil.copy(small_photos[0], root / "n01" / "a.JPEG")
    (root / "n02").symlink_to(root / "n02")
    odd = os.path.join(os.fsencode(root / "n01"), b"\xff\xfe.JPEG")
    open(odd, "wb").close()  # zero bytes, a name that is not UTF-8
    names = tmp_path / "names.txt"
    names.write_text("n01 one\nn02 two\n")
    prefix, stats = run_preprocess([root], class_names=str(names))
    assert stats["documents"] == 1 and stats["skipped"] == {"empty_file": 1, "symlink_loop": 1}
    assert {e["key"] for e in errors_of(prefix)} == {"n02", "n01/\\udcff\\udcfe.JPEG"}


def test_a_disk_error_stops_the_run_naming_the_input(tree, run_preprocess, monkeypatch):
    path = write_jsonl(tree / "caps.jsonl", [good_record("caption")] * 3)
    real = pathlib.Path.read_bytes

    def failing_read(self):
        if self.name == "in.jpg":
            raise OSError(errno.EIO, "Input/output error", str(self))
        return real(self)

    monkeypatch.setattr(pathlib.Path, "read_bytes", failing_read)
    with pytest.raises(InputError, match=rf"{path}:1: .*Input/output error"):
        run_preprocess([path], "image")
    monkeypatch.undo()

    real_open = sources.open_binary

    class Failing(io.BufferedReader):
        def __next__(self):
            raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(sources, "open_binary", lambda p: Failing(io.BytesIO(b"x")) if p == str(path) else real_open(p))
    with pytest.raises(InputError, match=rf"{path}.*Input/output error"):
        list(sources.iter_records([str(path)], "caption"))


# --- 3. nothing vanishes ------------------------------------------------------------------------------------


def test_a_broken_json_array_resynchronises_at_the_next_item(tmp_path):
    path = tmp_path / "a.json"
    path.write_text(
        '[{"text": "a"}, {"text": oops}, {"text": "c"}, {"text": "d" "e"}, {"text": "f"}}, '
        '{"text": "g}, {"text": "h"}, {"text": "i"}, {"text": "j"'
    )
    got = [
        (r.origin.key, r.payload if isinstance(r, RawRecord) else r.reason)
        for _, r in sources.iter_records([str(path)], "text")
    ]
    assert got == [
        ("item 0", {"text": "a"}),
        ("item 1", "malformed_json"),
        ("item 2", {"text": "c"}),
        ("item 3", "malformed_json"),
        ("item 4", "malformed_json"),
        ("item 5", "malformed_json"),
        ("item 6", {"text": "h"}),
        ("item 7", {"text": "i"}),
        ("item 8", "malformed_json"),
    ]
    full = list(sources.iter_records([str(path)], "text"))
    for n, ((i, k), _) in enumerate(full):  # resumable from every item
        assert [p for p, _ in sources.iter_records([str(path)], "text", start=(i, k))] == [p for p, _ in full[n:]]


def shard(tmp_path, n=3) -> Path:
    return write_tar(
        tmp_path / "s.tar",
        [m for i in range(n) for m in ((f"{i:03d}.jpg", bytes([i]) * 3000), (f"{i:03d}.txt", b"caption"))],
    )


def test_a_truncated_tar_names_the_members_lost(tmp_path):
    path = shard(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: 2 * 4608])  # keys 000 and 001 whole, 002 missing, no end block
    got = [r for _, r in sources.iter_records([str(path)], "webdataset")]
    assert [r.origin.key for r in got[:2] if isinstance(r, RawRecord)] == ["000", "001"]
    assert got[-1].reason == "unreadable_input" and "001.txt" in got[-1].detail
    path.write_bytes(data[: 4608 + 512 + 1000])  # cut inside 001.jpg
    got = [r for _, r in sources.iter_records([str(path)], "webdataset")]
    assert isinstance(got[0], RawRecord) and got[0].origin.key == "000"
    assert got[-1].origin.key == "001" and "001.jpg" in got[-1].detail and "cut" in got[-1].detail


def flip_crc(data: bytes) -> bytes:
    """A gzip stream whose CRC-32 trailer is wrong (the data inflates fine)."""
    return data[:-8] + bytes([data[-8] ^ 0xFF]) + data[-7:]


def test_compressed_inputs_are_read_to_their_end_and_checksum_failures_mark_their_samples(tmp_path):
    tar_gz = tmp_path / "s.tar.gz"
    tar_gz.write_bytes(flip_crc(gzip.compress(shard(tmp_path).read_bytes())))
    jsonl_gz = tmp_path / "t.jsonl.gz"
    jsonl_gz.write_bytes(flip_crc(gzip.compress(b'{"text": "a"}\n{"text": "b"}\n')))
    zst = tmp_path / "t.jsonl.zst"
    lines = b"".join(b'{"text": "%s"}\n' % os.urandom(1000).hex().encode() for _ in range(300))
    good = zstandard.ZstdCompressor(write_checksum=True).compress(lines)  # > 128 KiB: read in several chunks
    zst.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))
    for path, fmt in ((tar_gz, "webdataset"), (jsonl_gz, "text"), (zst, "text")):
        got = [r for _, r in sources.iter_records([str(path)], fmt)]
        reasons = [r.reason for r in got if isinstance(r, SampleError)]
        assert len(reasons) == len(got) and reasons.count("corrupt_input") >= 2, path
        assert set(reasons[-1:]) <= {"corrupt_input", "unreadable_input"}  # reading itself fails at the end too
    truncated = tmp_path / "cut.jsonl.zst"
    truncated.write_bytes(zstandard.ZstdCompressor().compress(b'{"text": "a"}\n' * 1000)[:-20])
    got = [r for _, r in sources.iter_records([str(truncated)], "text")]
    assert got and got[-1].reason == "unreadable_input"


def test_a_byte_order_mark_is_accepted(tmp_path):
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_bytes(b'\xef\xbb\xbf{"text": "first"}\n{"text": "second"}\n')
    array = tmp_path / "b.json"
    array.write_bytes(b'\xef\xbb\xbf[{"text": "third"}]')
    assert sources.detect_format([str(jsonl), str(array)]) == "text"
    got = [samples.parse_record(r, "text") for _, r in sources.iter_records([str(jsonl), str(array)], "text")]
    assert [s.turns[0].parts for s in got] == [("first",), ("second",), ("third",)]


def png_with_bad_idat_crc() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (40, 40), "red").save(buf, "PNG")
    data = bytearray(buf.getvalue())
    at = data.find(b"IDAT")
    end = at + 4 + struct.unpack(">I", data[at - 4 : at])[0]
    data[end] ^= 0xFF  # the CRC's first byte
    return bytes(data)


def test_a_png_whose_idat_fails_its_crc_is_rejected():
    with pytest.raises(im.ImageError) as e:
        im.load_image(png_with_bad_idat_crc())
    assert e.value.reason == "corrupt_image" and "IDAT" in str(e.value)


# --- 4. errors.jsonl is reproducible -------------------------------------------------------------------------


def test_errors_jsonl_is_byte_identical_across_runs_and_worker_counts(tmp_path, small_photos, run_preprocess):
    members = [
        ("000.jpg", b"not an image at all" * 3),
        ("000.txt", b"a"),
        ("001.png", png_with_bad_idat_crc()),
        ("001.txt", b"b"),
        ("002.jpg", small_photos[0].read_bytes()),
        ("002.txt", b"c"),
    ]
    path = write_tar(tmp_path / "s.tar", members)
    errors = [Path(run_preprocess([path], f"w{w}", workers=w)[0] + ".errors.jsonl").read_bytes() for w in (0, 1)]
    assert errors[0] == errors[1] and b"0x" not in errors[0]
    assert [e["reason"] for e in map(json.loads, errors[0].splitlines())] == ["corrupt_image", "corrupt_image"]
    assert len(PackedDataset(str(tmp_path / "w0"))) == 1


# --- 6. random mutations never stop a run, nor change the other records ---------------------------------------


def llava_lines(root: Path) -> list[bytes]:
    records = [
        {
            "id": "a",
            "image": "in.png",
            "conversations": [
                {"from": "human", "value": "<image>\nWhat is it?"},
                {"from": "gpt", "value": "A red square."},
            ],
        },
        {
            "id": "b",
            "conversations": [
                {"from": "system", "value": "Be brief."},
                {"from": "human", "value": "Hi"},
                {"from": "gpt", "value": "Hello."},
            ],
        },
        {
            "id": "c",
            "image": ["in.png", "in.png"],
            "conversations": [
                {"from": "human", "value": "Left <image> right <image>"},
                {"from": "gpt", "value": "Two squares é€😀."},
            ],
        },
        {"id": "d", "image": "in.png", "conversations": [{"from": "gpt", "value": "Untagged."}]},
    ]
    return [json.dumps(r).encode() for r in records]


def nodes(obj, path=()):
    """Every (path, value) of a JSON tree, the root included."""
    yield path, obj
    children = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    for key, value in children:
        yield from nodes(value, path + (key,))


def mutate(line: bytes, mutation) -> bytes:
    kind, at, arg = mutation
    if kind == "flip":  # any byte but a newline (a newline would make two records of one)
        i = at % len(line)
        return line[:i] + bytes([(line[i] ^ arg) if (line[i] ^ arg) != 10 else 11]) + line[i + 1 :]
    if kind == "truncate":
        return line[: at % len(line)]
    obj = json.loads(line)
    path, value = list(nodes(obj))[at % len(list(nodes(obj)))]
    if not path:
        return json.dumps(arg if kind == "retype" else [obj]).encode()
    parent = obj
    for key in path[:-1]:
        parent = parent[key]
    if kind == "delete":
        del parent[path[-1]]
    elif kind == "retype":
        parent[path[-1]] = arg
    else:  # unicode junk, lone surrogates included, into a string (or in place of anything else)
        parent[path[-1]] = value[: len(value) // 2] + arg + value[len(value) // 2 :] if isinstance(value, str) else arg
    return json.dumps(obj).encode()  # ensure_ascii: surrogates travel as \ud800 escapes, as on the web


JUNK = st.text(st.characters(codec=None, exclude_categories=()), max_size=6)
MUTATIONS = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 10**6), st.integers(1, 255)),
    st.tuples(st.just("truncate"), st.integers(0, 10**6), st.none()),
    st.tuples(st.just("delete"), st.integers(0, 10**6), st.none()),
    st.tuples(
        st.just("retype"),
        st.integers(0, 10**6),
        st.sampled_from([None, 0, -1, 2.5, True, "", "\ud800", [], {}, [["x"]], {"from": ["human"]}, 10**30]),
    ),
    st.tuples(st.just("junk"), st.integers(0, 10**6), JUNK),
)


@pytest.fixture(scope="module")
def mutation_env(tmp_path_factory):
    from megatron.solo.data.encode import EncodeConfig
    from megatron.solo.data.worker import WorkerConfig, init_worker, process_batch

    root = tmp_path_factory.mktemp("mutations")
    Image.new("RGB", (40, 24), "red").save(root / "in.png")
    init_worker(WorkerConfig("llava", None, False, None, EncodeConfig(image_format="png"), parent_pid=os.getpid()))
    lines = llava_lines(root)

    def run(lines):
        path = root / "data.jsonl"
        path.write_bytes(b"\n".join(lines) + b"\n")
        records = [r for _, r in sources.iter_records([str(path)], "llava")]
        return {r.origin.line: r for r in process_batch(records)}

    baseline = run(lines)
    assert all(not isinstance(r, SampleError) for r in baseline.values())
    return lines, run, baseline


def same(a, b) -> bool:
    if isinstance(a, SampleError) or isinstance(b, SampleError):
        return isinstance(a, SampleError) and isinstance(b, SampleError) and a.to_json() == b.to_json()
    return (a.tokens.tolist(), a.targets.tolist(), a.images, a.origin) == (
        b.tokens.tolist(),
        b.targets.tolist(),
        b.images,
        b.origin,
    )


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(which=st.integers(0, 3), mutation=MUTATIONS)
def test_random_mutations_never_stop_a_run_nor_change_the_other_records(mutation_env, which, mutation):
    lines, run, baseline = mutation_env
    mutated = list(lines)
    mutated[which] = mutate(lines[which], mutation)
    got = run(mutated)  # never raises
    for line, result in got.items():
        if line != which + 1:
            assert same(result, baseline[line]), line
        elif isinstance(result, SampleError):  # named, and writable to errors.jsonl
            assert result.origin.line == line and result.reason in REASONS
            json.dumps(result.to_json(), ensure_ascii=False).encode("utf-8")
    assert set(got) == set(baseline) - ({which + 1} if not mutated[which].strip() else set())
