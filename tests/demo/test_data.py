"""The demo's raw datasets: the formats preprocessing reads, deterministic, held-out images unseen."""

import hashlib
import json

import numpy as np
import pytest
from PIL import Image

from megatron.solo.data import sources
from megatron.solo.demo import scenes
from megatron.solo.demo.data import DemoDataConfig, write_demo_data

SMALL = DemoDataConfig(per_class=3, heldout_per_class=2, captions=12, heldout_captions=5, text_documents=7, seed=3)


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo") / "raw"
    counts = write_demo_data(root, SMALL, workers=1)
    return root, counts


def pixels_digest(path) -> str:
    return hashlib.sha256(np.asarray(Image.open(path)).tobytes()).hexdigest()


def test_counts_and_layout(tree):
    root, counts = tree
    n_classes = len(scenes.classes())
    asked = counts.pop("sft_heldout_questions")
    assert counts == {
        "label_train": 3 * n_classes,
        "label_heldout": 2 * n_classes,
        "caption_train": 12,
        "caption_heldout": 5,
        "text_documents": 7,
        "sft_chats": 12,
    }  # chats: one per caption image
    assert len((root / "sft" / "heldout.jsonl").read_text().splitlines()) == asked >= 5  # ≥ 1 per held-out scene
    assert not root.with_name("raw.partial").exists()
    assert len(list((root / "labels" / "train").glob("*/*.png"))) == 3 * n_classes
    assert len((root / "text" / "corpus.jsonl").read_text().splitlines()) == 7


def test_sft_chats_are_in_the_released_layout_and_ask_about_their_own_image(tree):
    root, _ = tree
    captions = [json.loads(line) for line in (root / "captions" / "train.jsonl").read_text().splitlines()]
    chats = [json.loads(line) for line in (root / "sft" / "train.jsonl").read_text().splitlines()]
    assert sources.classify(chats[0]) == "llava"  # dict turns only: preprocess with --input-format sft
    for chat, caption in zip(chats, captions):
        assert chat["image"] == caption["image"]
        turns = chat["conversations"]
        assert turns[0]["value"].startswith("<image>\n") and len(turns) % 2 == 0
        assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2)
        for question, answer in zip(turns[0::2], turns[1::2]):
            if question["value"].startswith(("<image>\nWhat colour", "What colour")):
                assert answer["value"] in caption["caption"]


def test_label_tree_reads_as_imagenet_with_its_class_names(tree):
    root, _ = tree
    train = str(root / "labels" / "train")
    assert sources.detect_format([train]) == "imagenet"
    names = sources.load_class_names(str(root / "labels" / "classes.txt"))
    assert sorted(names.values()) == sorted(scenes.classes())
    records = [r for _, r in sources.iter_records([train], "imagenet", class_names=names)]
    assert len(records) == 3 * len(names)
    for record in records:
        path, name = record.payload
        assert name == names[record.origin.key.split("/")[0]] and Image.open(path).size


def test_captions_and_text_are_detected_as_their_formats(tree):
    root, _ = tree
    assert sources.detect_format([str(root / "captions" / "train.jsonl")]) == "caption"
    assert sources.detect_format([str(root / "text" / "corpus.jsonl")]) == "text"
    for line in (root / "captions" / "train.jsonl").read_text().splitlines():
        obj = json.loads(line)
        assert (root / "captions" / obj["image"]).is_file()
        assert scenes.parse_caption(obj["caption"])  # well-formed


def test_heldout_images_are_not_training_images(tree):
    root, _ = tree
    train = {pixels_digest(p) for p in (root / "labels" / "train").glob("*/*.png")}
    train |= {pixels_digest(p) for p in (root / "captions" / "train").glob("*.png")}
    heldout = [json.loads(line) for line in (root / "labels" / "heldout.jsonl").read_text().splitlines()]
    heldout_caps = [json.loads(line) for line in (root / "captions" / "heldout.jsonl").read_text().splitlines()]
    assert {o["label"] for o in heldout} == set(scenes.classes())
    for obj, base in [(o, "labels") for o in heldout] + [(o, "captions") for o in heldout_caps]:
        assert pixels_digest(root / base / obj["image"]) not in train


def test_same_seed_same_bytes_other_seed_other_data(tree, tmp_path):
    root, _ = tree
    again = tmp_path / "again"
    write_demo_data(again, SMALL, workers=2)  # the tree fixture used one process
    for rel in ["captions/train.jsonl", "text/corpus.jsonl", "labels/classes.txt", "labels/heldout.jsonl"]:
        assert (again / rel).read_bytes() == (root / rel).read_bytes(), rel
    for path in (
        sorted((root / "labels" / "train").glob("*/*.png"))[:5] + sorted((root / "captions").glob("*/*.png"))[:5]
    ):
        assert pixels_digest(path) == pixels_digest(again / path.relative_to(root))
    other = tmp_path / "other"
    write_demo_data(other, DemoDataConfig(**{**SMALL.__dict__, "seed": 4}))
    assert (other / "captions/train.jsonl").read_bytes() != (root / "captions/train.jsonl").read_bytes()


def test_rewriting_replaces_a_demo_tree_but_never_other_directories(tmp_path):
    root = tmp_path / "raw"
    tiny = DemoDataConfig(per_class=1, heldout_per_class=1, captions=1, heldout_captions=1, text_documents=1)
    write_demo_data(root, tiny)
    (root / "stale").mkdir()
    write_demo_data(root, tiny)
    assert not (root / "stale").exists() and (root / "labels" / "classes.txt").is_file()
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.tex").write_text("keep me")
    with pytest.raises(ValueError, match="not a demo data tree"):
        write_demo_data(precious, tiny)
    assert (precious / "thesis.tex").read_text() == "keep me"


@pytest.mark.parametrize("field, value", [("per_class", 0), ("captions", -1), ("text_documents", 1.5)])
def test_bad_sizes_name_the_field(field, value):
    with pytest.raises(ValueError, match=f"DemoDataConfig.{field}"):
        DemoDataConfig(**{field: value})
