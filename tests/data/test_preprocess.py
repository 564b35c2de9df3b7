"""End to end: every input format → packed prefix → reader gives the front end's tokens and patches;
determinism across worker counts; bad samples; stats; strict; resume after a real kill."""

import base64
import dataclasses
import io
import json
import os
import pickle
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import zstandard
from data_helpers import output_bytes, write_jsonl, write_tar
from PIL import Image

from megatron.solo import faults
from megatron.solo import image as im
from megatron.solo.data.encode import EncodeConfig
from megatron.solo.data.errors import SampleError
from megatron.solo.data.packed_format import PackedDataset
from megatron.solo.data.packing import PackConfig
from megatron.solo.data.pipeline import PreprocessConfig, preprocess

ROOT = Path(__file__).resolve().parents[2]
TOOL = ROOT / "tools" / "preprocess_mm_data.py"


# --- expected documents, built from the front end and the documented layout -----------------------


class Expect:
    """Builds the expected (tokens, targets) of one document and collects its images' patches."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.tokens, self.targets, self.patches = [1], [False], []

    def text(self, text, target=False):
        ids = self.tok.encode(text)
        self.tokens += ids
        self.targets += [target] * len(ids)
        return self

    def image(self, source):
        processed = im.process_image(source)
        ids = self.tok.image_token_ids(*processed.original_size)
        self.tokens += ids
        self.targets += [False] * len(ids)
        self.patches.append(processed.patches)
        return self

    def eos(self, target=True):
        self.tokens.append(2)
        self.targets.append(target)
        return self


def read_documents(prefix):
    """[(tokens, targets)] per document in pack order, and all patches, from the reader."""
    docs, patches = [], []
    for view in PackedDataset(prefix):
        bounds = view.doc_offsets.tolist()
        docs += [(view.tokens[a:b].tolist(), view.targets[a:b].tolist()) for a, b in zip(bounds, bounds[1:])]
        patches.append(view.patches())
    return docs, np.concatenate(patches)


def png_bytes(path) -> bytes:
    buf = io.BytesIO()
    Image.open(path).save(buf, "PNG")
    return buf.getvalue()


def make_dataset(fmt, tmp_path, photos, tokenizer):
    """(inputs, extra config, expected documents) for one input format."""
    T = lambda: Expect(tokenizer)  # noqa: E731
    root = str(photos[0].parent)
    if fmt == "caption":
        path = write_jsonl(
            tmp_path / "caps.jsonl", [{"image": p.name, "caption": f"Caption {i}."} for i, p in enumerate(photos[:3])]
        )
        expected = [T().image(p).text(f"Caption {i}.", True).eos() for i, p in enumerate(photos[:3])]
        return [path], {"image_root": root}, expected
    if fmt == "chat":
        url = "data:image/jpeg;base64," + base64.b64encode(photos[4].read_bytes()).decode()
        path = write_jsonl(
            tmp_path / "chat.jsonl",
            [
                [
                    {
                        "role": "user",
                        "content": [
                            {"type": "image_url", "image_url": {"url": str(photos[3])}},
                            {"type": "text", "text": "What is this?"},
                        ],
                    },
                    {"role": "assistant", "content": "A photo."},
                ],
                {
                    "role": "assistant",
                    "content": [
                        {"type": "image_url", "image_url": {"url": url}},
                        {"type": "text", "text": "Described."},
                    ],
                },
            ],
        )
        expected = [
            T().text("[INST]").image(photos[3]).text("What is this?").text("[/INST]").text("A photo.", True).eos(),
            T().image(photos[4].read_bytes()).text("Described.", True).eos(),
        ]
        return [path], {"image_root": root}, expected
    if fmt == "llava":
        path = tmp_path / "llava.json"
        path.write_text(
            json.dumps(
                [
                    {
                        "id": "a",
                        "image": photos[1].name,
                        "conversations": [
                            {"from": "human", "value": "<image>\nDescribe."},
                            {"from": "gpt", "value": "Tall photo."},
                            {"from": "human", "value": "Sure?"},
                            {"from": "gpt", "value": "Yes."},
                        ],
                    },
                    {
                        "id": "b",
                        "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}],
                    },
                ]
            )
        )
        expected = [
            T()
            .text("[INST]")
            .image(photos[1])
            .text("Describe.")
            .text("[/INST]")
            .text("Tall photo.", True)
            .eos()
            .text("[INST]")
            .text("Sure?")
            .text("[/INST]")
            .text("Yes.", True)
            .eos(),
            T().text("[INST]").text("Hi").text("[/INST]").text("Hello.", True).eos(),
        ]
        return [path], {"image_root": root}, expected
    if fmt == "webdataset":
        path = write_tar(
            tmp_path / "shard-000.tar",
            [
                ("000.jpg", photos[0].read_bytes()),
                ("000.txt", b"Web caption."),
                ("001.png", png_bytes(photos[2])),
                ("001.json", json.dumps({"caption": "From json.", "url": "u"}).encode()),
            ],
        )
        expected = [
            T().image(photos[0]).text("Web caption.", True).eos(),
            T().image(png_bytes(photos[2])).text("From json.", True).eos(),
        ]
        return [path], {}, expected
    if fmt == "imagenet":
        train = tmp_path / "train"
        for wnid, photo in (("n01", photos[5]), ("n02", photos[0])):
            (train / wnid).mkdir(parents=True)
            (train / wnid / f"{wnid}_1.JPEG").write_bytes(photo.read_bytes())
        names = tmp_path / "LOC_synset_mapping.txt"
        names.write_text("n01 tench_fish\nn02 great-white shark\n")
        expected = [
            T().image(photos[5]).text("tench fish", True).eos(),
            T().image(photos[0]).text("great white shark", True).eos(),
        ]
        return [train], {"class_names": str(names), "shuffle_seed": None}, expected  # sorted: n01, n02
    if fmt == "text":
        texts = ["First document.", "Second one,\nwith two lines and   spaces.\n"]
        path = tmp_path / "slim.jsonl.zst"
        path.write_bytes(
            zstandard.ZstdCompressor().compress(
                b"".join(json.dumps({"text": t, "meta": {}}).encode() + b"\n" for t in texts)
            )
        )
        expected = []
        for t in texts:
            e = T()
            e.tokens += tokenizer.encode(t, eos=True)
            e.targets += [True] * (len(e.tokens) - 1)
            expected.append(e)
        return [path], {}, expected
    raise AssertionError(fmt)


@pytest.mark.parametrize("fmt", ["caption", "chat", "llava", "webdataset", "imagenet", "text"])
def test_each_format_round_trips_to_the_front_end(fmt, tmp_path, small_photos, tokenizer, run_preprocess):
    inputs, extra, expected = make_dataset(fmt, tmp_path, small_photos, tokenizer)
    prefix, stats = run_preprocess(inputs, **extra)  # input format auto-detected
    assert stats["input_format"] == fmt and stats["skipped"] == {}
    docs, patches = read_documents(prefix)
    assert [d[0] for d in docs] == [e.tokens for e in expected]
    assert [d[1] for d in docs] == [e.targets for e in expected]
    want = [p for e in expected for p in e.patches]
    np.testing.assert_array_equal(patches, np.concatenate(want) if want else np.zeros((0, 3072), np.float32))


def test_imagenet_packs_mix_classes_unless_read_sorted(tmp_path, small_photos, tokenizer, run_preprocess):
    train = tmp_path / "train"
    for c in range(3):
        (train / f"n0{c}").mkdir(parents=True)
        for k in range(8):
            (train / f"n0{c}" / f"{k}.JPEG").write_bytes(small_photos[0].read_bytes())
    names = tmp_path / "names.txt"
    names.write_text("n00 zero\nn01 one\nn02 two\n")
    class_ids = {tokenizer.encode(n)[0]: n for n in ("zero", "one", "two")}

    def classes_per_pack(name, **kw):
        prefix, stats = run_preprocess([train], name, class_names=str(names), seq_length=56, **kw)
        packs = []
        for view in PackedDataset(prefix):
            first_targets = [
                view.tokens[i] for i in range(1, len(view.tokens)) if view.targets[i] and not view.targets[i - 1]
            ]
            packs.append({class_ids[t] for t in first_targets})
        return packs, stats

    mixed, stats = classes_per_pack("shuffled")
    assert stats["shuffle_seed"] == 0 and stats["documents"] == 24 and len(mixed) >= 5
    assert sum(len(p) > 1 for p in mixed) >= len(mixed) / 2
    sorted_packs, stats = classes_per_pack("sorted", shuffle_seed=None)
    assert stats["shuffle_seed"] is None and sum(len(p) > 1 for p in sorted_packs) <= 2  # at the class borders


def test_default_jpeg_storage_exact_tokens_close_patches(tmp_path, small_photos, tokenizer, run_preprocess):
    inputs, extra, expected = make_dataset("caption", tmp_path, small_photos, tokenizer)
    prefix, stats = run_preprocess(inputs, image_format="jpeg", **extra)
    docs, patches = read_documents(prefix)
    assert [d[0] for d in docs] == [e.tokens for e in expected]
    diff = np.abs(patches - np.concatenate([p for e in expected for p in e.patches]))
    assert diff.mean() < 0.03 and diff.max() < 0.75  # measured 0.02 / 0.3 (see test_packed_format)
    # tiny test images carry a ~600-byte JPEG header over 2-35 patches; realistic sizes: benchmarks/bench_preprocess.py
    assert stats["image_format"] == "jpeg" and 0 < stats["bytes_per_vision_token"] < 3072 / 4


# --- bad samples, stats, strict ----------------------------------------------------------------


def png_claiming(width, height) -> bytes:
    """A PNG header claiming a huge image (a decompression bomb), without pixel data."""

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"") + chunk(b"IEND", b"")


def bad_inputs(tmp_path, photos):
    """A chat JSONL with one good sample between every kind of bad one; returns (path, expected reasons by line)."""
    d = tmp_path / "imgs"
    d.mkdir()
    (d / "empty.jpg").write_bytes(b"")
    (d / "corrupt.jpg").write_bytes(b"definitely not an image" * 4)
    (d / "truncated.jpg").write_bytes(photos[5].read_bytes()[:600])
    (d / "bomb.png").write_bytes(png_claiming(20000, 20000))
    Image.new("RGB", (600, 4), "red").save(d / "sliver.png")

    def chat(url, text="Caption."):
        return json.dumps(
            {
                "role": "assistant",
                "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": text}],
            }
        ).encode()

    good = chat(str(shutil.copy(photos[0], d / "good.jpg")))  # inside the image root (the input's directory)
    lines = [
        (good, None),
        (b"{broken json", "malformed_json"),
        (b'{"role": "assistant", "content": "caf\xe9"}', "non_utf8"),
        (json.dumps([{"role": "human", "content": "hi"}]).encode(), "unknown_role"),
        (json.dumps({"role": "assistant", "content": "   "}).encode(), "empty_text"),
        (json.dumps({"messages": [{"content": "no role"}]}).encode(), "missing_field"),
        (json.dumps({"role": "assistant", "content": 42}).encode(), "bad_field"),
        (chat(str(d / "gone.jpg")), "missing_file"),
        (chat(str(d / "empty.jpg")), "empty_file"),
        (chat(str(d / "corrupt.jpg")), "corrupt_image"),
        (chat(str(d / "truncated.jpg")), "truncated_image"),
        (chat(str(d / "bomb.png")), "decompression_bomb"),
        (chat("data:image/png;base64,%%%%"), "bad_data_url"),
        (chat(str(d / "sliver.png")), "sliver"),
        (chat("https://example.com/a.jpg"), "remote_url"),
        (json.dumps([{"role": "user", "content": "question only"}]).encode(), "no_targets"),
        (good, None),
    ]
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(b"\n".join(line for line, _ in lines) + b"\n")
    return path, {i + 1: reason for i, (_, reason) in enumerate(lines) if reason}


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_every_bad_sample_kind_is_skipped_named_and_counted(tmp_path, small_photos, run_preprocess):
    path, reasons = bad_inputs(tmp_path, small_photos)
    prefix, stats = run_preprocess([path], input_format="chat")
    errors = [json.loads(line) for line in Path(prefix + ".errors.jsonl").read_text().splitlines()]
    assert [(e["file"], e["line"], e["reason"]) for e in errors] == [(str(path), n, r) for n, r in reasons.items()]
    assert all(e["detail"] for e in errors)
    assert stats["skipped"] == {r: 1 for r in sorted(reasons.values())}
    assert stats["samples"] == 17 and stats["documents"] == 2 and stats["images"] == 2
    assert len(read_documents(prefix)[0]) == 2


def test_strict_fails_on_the_first_bad_sample_and_leaves_nothing(tmp_path, small_photos, run_preprocess):
    path, _ = bad_inputs(tmp_path, small_photos)
    with pytest.raises(SampleError, match=rf"{path}:2: malformed json") as e:
        run_preprocess([path], input_format="chat", strict=True)
    assert e.value.reason == "malformed_json"
    assert sorted(os.listdir(tmp_path)) == ["imgs", "mixed.jsonl"]  # no outputs, no work directory


def mixed_corpus(tmp_path, photos, n_captions=30, n_texts=12, seed=0):
    """Captions of every photo (one far longer than a pack) and text documents of varied lengths (some
    longer than a pack)."""
    rng = np.random.default_rng(seed)
    (tmp_path / "photos").mkdir(exist_ok=True)  # inside the image root (the inputs' directory)
    photos = [shutil.copy(p, tmp_path / "photos" / p.name) for p in photos]
    words = "the a photo of cat dog sky red blue small large street near house tree over under".split()
    caps = [
        {
            "image": str(photos[i % len(photos)]),
            "caption": " ".join(rng.choice(words, 2000 if i == 7 else rng.integers(2, 30))),
        }
        for i in range(n_captions)
    ]
    texts = [{"text": " ".join(rng.choice(words, int(rng.integers(5, 900))))} for _ in range(n_texts)]
    return [
        write_jsonl(tmp_path / "caps.jsonl", caps, raw_lines=[b"not json"]),
        write_jsonl(tmp_path / "texts.jsonl", texts),
    ], "caption"


def test_stats_add_up(tmp_path, small_photos, run_preprocess):
    inputs, _ = mixed_corpus(tmp_path, small_photos)
    captions = run_preprocess([inputs[0]], "captions", seq_length=512)
    texts = run_preprocess([inputs[1]], "texts", seq_length=512)
    assert captions[1]["skipped"] == {"malformed_json": 1} and texts[1]["skipped"] == {}
    assert captions[1]["truncated_documents"] == 1 and captions[1]["truncated_tokens"] > 1000
    assert texts[1]["split_documents"] > 0 and texts[1]["continuation_chunks"] >= texts[1]["split_documents"]
    for prefix, stats in (captions, texts):
        ds = PackedDataset(prefix)
        seq = stats["seq_length"]
        lengths = [len(v.tokens) for v in ds]
        assert max(lengths) <= seq and stats["packs"] == len(ds)
        assert stats["text_tokens"] + stats["vision_tokens"] + stats["padding_tokens"] == stats["packs"] * seq
        assert stats["padding_fraction"] == pytest.approx(stats["padding_tokens"] / (stats["packs"] * seq))
        assert stats["samples"] == stats["documents"] + sum(stats["skipped"].values())
        views = list(ds)
        assert sum(v.n_docs for v in views) == stats["documents"] + stats["continuation_chunks"]
        assert sum(len(v.images) for v in views) == stats["images"]
        assert sum(v.n_patches for v in views) == stats["patch_tokens"]
        assert sum(i.num_tokens for v in views for i in v.images) == stats["vision_tokens"]
        image_bytes = sum(len(i.data) for v in views for i in v.images)
        assert image_bytes == stats["image_bytes"]
        assert stats["bytes_per_vision_token"] == pytest.approx(image_bytes / max(stats["vision_tokens"], 1))
        loss = sum(int(v.targets[a + 1 : b].sum()) for v in views for a, b in zip(v.doc_offsets, v.doc_offsets[1:]))
        assert loss == stats["loss_tokens"]
        assert sum(1 for _ in open(prefix + ".errors.jsonl")) == sum(stats["skipped"].values())


def test_output_is_byte_identical_for_any_worker_count(tmp_path, small_photos, run_preprocess):
    inputs, fmt = mixed_corpus(tmp_path, small_photos, n_captions=40, n_texts=0)
    lines = inputs[0].read_bytes().splitlines(keepends=True)
    (tmp_path / "caps-1.jsonl").write_bytes(b"".join(lines[:25]))
    (tmp_path / "caps-2.jsonl").write_bytes(b"".join(lines[25:]))
    outputs = {}
    for workers in (0, 1, 2):
        prefix, stats = run_preprocess(
            [tmp_path / "caps-*.jsonl"],
            f"w{workers}",
            seq_length=256,
            workers=workers,
            pack=PackConfig(seq_length=256, buffer_size=4),
        )
        outputs[workers] = output_bytes(prefix)
        assert stats["input_files"] == 2 and stats["samples"] == 41
    assert outputs[0][".errors.jsonl"] and len(PackedDataset(str(tmp_path / "w0"))) > 3
    assert outputs[1] == outputs[0] and outputs[2] == outputs[0]


# --- work directory, resume, kill ---------------------------------------------------------------


def test_leftover_run_needs_resume_settings_must_match_and_complete_runs_are_kept(
    tmp_path, small_photos, run_preprocess
):
    inputs, _ = mixed_corpus(tmp_path, small_photos, n_captions=5, n_texts=0)
    prefix, stats = run_preprocess([inputs[0]])
    again, stats_again = run_preprocess([inputs[0]], resume=True)  # complete: nothing to do
    assert stats_again == stats
    os.makedirs(prefix + ".partial")
    with pytest.raises(RuntimeError, match="--resume"):
        run_preprocess([inputs[0]])
    _, stats_fresh = run_preprocess([inputs[0]], resume=True)  # an empty leftover (killed at once): starts over
    assert stats_fresh == stats and not os.path.exists(prefix + ".partial")


def run_tool(args, env_extra=None, timeout=240):
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run([sys.executable, str(TOOL), *args], capture_output=True, text=True, env=env, timeout=timeout)


def tool_args(inputs, prefix, *extra):
    return [
        "--input",
        *map(str, inputs),
        "--output-prefix",
        prefix,
        "--seq-length",
        "256",
        "--pack-buffer-size",
        "4",
        "--image-format",
        "png",
        *extra,
    ]


def resumed_config(inputs, prefix, workers=0):
    return PreprocessConfig(
        inputs=tuple(map(str, inputs)),
        output_prefix=prefix,
        encode=EncodeConfig(image_format="png"),
        pack=PackConfig(seq_length=256, buffer_size=4),
        workers=workers,
        resume=True,
        progress=False,
    )


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_kill_then_resume_equals_an_uninterrupted_run(tmp_path, small_photos):
    inputs, _ = mixed_corpus(tmp_path, small_photos, n_captions=100, n_texts=0)
    straight = str(tmp_path / "straight")
    preprocess(dataclasses.replace(resumed_config(inputs[:1], straight), resume=False), stream=io.StringIO())
    killed = str(tmp_path / "killed")
    proc = run_tool(
        tool_args(inputs[:1], killed, "--workers", "0", "--checkpoint-interval", "0"),
        faults.env("preprocess.kill_after_packs", 5),
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert not os.path.exists(killed + ".stats.json")
    with open(killed + ".partial/checkpoint.pkl", "rb") as f:  # killed after pack 5, before its checkpoint:
        state = pickle.load(f)  # the files hold a pack the checkpoint does not, which resume must drop
    written = os.path.getsize(killed + ".partial/data.pack.bin")  # (the small token file is still in a buffer)
    assert state.position < (0, 100) and state.stats.packs == 4 and written > state.writer["records"]["nbytes"]
    changed = dataclasses.replace(resumed_config(inputs[:1], killed), pack=PackConfig(seq_length=512, buffer_size=4))
    with pytest.raises(RuntimeError, match="other inputs or settings"):
        preprocess(changed, stream=io.StringIO())
    with pytest.raises(RuntimeError, match="pass --resume"):
        preprocess(dataclasses.replace(resumed_config(inputs[:1], killed), resume=False), stream=io.StringIO())
    stats = preprocess(resumed_config(inputs[:1], killed), stream=io.StringIO())
    assert stats["packs"] > 5
    assert output_bytes(killed) == output_bytes(straight)
    assert not os.path.exists(killed + ".partial")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_external_sigkill_mid_run_then_resume(tmp_path):
    rng = np.random.default_rng(1)
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa".split()
    path = write_jsonl(
        tmp_path / "t.jsonl", [{"text": " ".join(rng.choice(words, int(rng.integers(3, 200))))} for _ in range(2000)]
    )
    straight = str(tmp_path / "straight")
    preprocess(
        PreprocessConfig(
            inputs=(str(path),),
            output_prefix=straight,
            pack=PackConfig(seq_length=256, buffer_size=4),
            workers=0,
            progress=False,
        ),
        stream=io.StringIO(),
    )
    killed = str(tmp_path / "killed")
    args = [
        "--input",
        str(path),
        "--output-prefix",
        killed,
        "--seq-length",
        "256",
        "--pack-buffer-size",
        "4",
        "--workers",
        "2",
        "--checkpoint-interval",
        "0",
    ]
    proc = subprocess.Popen([sys.executable, str(TOOL), *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    checkpoint = Path(killed + ".partial") / "checkpoint.pkl"
    deadline = time.monotonic() + 200
    while not checkpoint.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)  # well inside the run: checkpoints and packs keep being written
    assert proc.poll() is None, "the run finished before it could be killed"
    workers = _children(proc.pid)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    proc.stderr.close()
    deadline = time.monotonic() + 20  # the orphaned pool (forkserver and workers) exits by itself
    while any(_alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert workers and not any(_alive(pid) for pid in workers)
    assert not os.path.exists(killed + ".stats.json")
    stats = preprocess(
        PreprocessConfig(
            inputs=(str(path),),
            output_prefix=killed,
            workers=0,
            progress=False,
            pack=PackConfig(seq_length=256, buffer_size=4),
            resume=True,
        ),
        stream=io.StringIO(),
    )
    assert stats["samples"] == 2000
    assert output_bytes(killed) == output_bytes(straight)


def _children(pid: int) -> list[int]:
    """Every process whose parent chain leads to pid: the pool's forkserver and workers (Linux /proc)."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, frontier = [], [pid]
    while frontier:
        kids = [p for p, pp in parents.items() if pp in frontier]
        found += kids
        frontier = kids
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has exited (its orphaned parent may just not reap it)


def test_a_second_run_on_the_same_prefix_is_refused(tmp_path, small_photos):
    import fcntl

    inputs, _ = mixed_corpus(tmp_path, small_photos, n_captions=3, n_texts=0)
    prefix = str(tmp_path / "busy")
    os.makedirs(prefix + ".partial")
    with open(prefix + ".partial/lock", "a") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        with pytest.raises(RuntimeError, match="another preprocessing run"):
            preprocess(resumed_config(inputs[:1], prefix), stream=io.StringIO())


# --- the command line ------------------------------------------------------------------------------


def test_cli_main_progress_and_errors(tmp_path, small_photos, capsys):
    sys.path.insert(0, str(TOOL.parent))
    try:
        import preprocess_mm_data as tool
    finally:
        sys.path.pop(0)
    path, _ = bad_inputs(tmp_path, small_photos)
    prefix = str(tmp_path / "cli")
    assert tool.main(["--input", str(path), "--output-prefix", prefix, "--workers", "0", "--log-interval", "0"]) == 0
    err = capsys.readouterr().err
    assert "samples (" in err and "/s) |" in err and "tokens (" in err and "15 samples skipped" in err
    assert Path(prefix + ".stats.json").exists()
    assert tool.main(["--input", str(path), "--output-prefix", str(tmp_path / "s"), "--workers", "0", "--strict"]) == 1
    assert f"{path}:2: malformed json" in capsys.readouterr().err
    assert tool.main(["--input", str(tmp_path / "none*.jsonl"), "--output-prefix", prefix]) == 1
    assert "no file matches" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        tool.main(["--input", str(path), "--output-prefix", prefix, "--seq-length", "4"])
    assert e.value.code == 2 and "PackConfig.seq_length" in capsys.readouterr().err


def test_ordered_map_keeps_input_order_whatever_the_timing():
    from data_helpers import no_setup, sleepy_identity

    from megatron.solo.data.progress import ordered_map

    items = list(range(60))
    for workers in (0, 2):
        got = list(ordered_map(sleepy_identity, items, workers=workers, initializer=no_setup, initargs=(), window=8))
        assert got == items


def test_progress_line_on_a_terminal_and_in_logs():
    from megatron.solo.data.progress import Progress

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    tty, log = Terminal(), io.StringIO()
    for stream in (tty, log):
        progress = Progress(stream, interval=0)
        progress.update(0, 0, 0, 0)
        time.sleep(0.25)
        progress.update(10, 5000, 1, 2, final=True)
    assert tty.getvalue().startswith("\r\x1b[K") and tty.getvalue().endswith("\n")
    assert "\r" not in log.getvalue() and len(log.getvalue().splitlines()) == 2
    last = log.getvalue().splitlines()[-1]
    assert "10 samples (" in last and "5.00k tokens (" in last and "1 packs" in last and "2 skipped" in last
