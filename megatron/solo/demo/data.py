"""The demo's raw datasets, in the formats a real run feeds ``tools/preprocess_mm_data.py``.

``write_demo_data(root, …)`` writes::

    root/labels/train/<wnid>/<k>.png + root/labels/classes.txt    stage 1, ImageNet-style class folders
    root/labels/heldout.jsonl (+ heldout/*.png)                    {"image", "label"}: held-out images
    root/captions/train.jsonl (+ train/*.png)                      stage 2, caption JSONL {"image", "caption"}
    root/captions/heldout.jsonl (+ heldout/*.png)                  {"image", "caption"}: held-out scenes
    root/text/corpus.jsonl                                          text-only documents {"text"}
    root/sft/train.jsonl                                            SFT chats about the caption training
                                                                    images, in SOLO's released SFT layout
    root/sft/heldout.jsonl                                          {"image", "kind", "question", "answer"}:
                                                                    questions about held-out scenes
                                                                    (images relative to root/captions)

Train and held-out images come from independent seeds: no held-out image is in the training data.
Files are written to ``root.partial`` and renamed into place, so an interrupted run leaves no half tree.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from megatron.solo.demo import scenes

NUMBER_WORDS = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
    "fifteen sixteen seventeen eighteen nineteen twenty"
).split()
SIDES = {"circle": "no corners", "square": "four equal sides", "triangle": "three sides"}


@dataclass(frozen=True, kw_only=True)
class DemoDataConfig:
    """Sizes of the demo's datasets."""

    per_class: int = 300
    """Stage-1 training images per label class (15 classes)."""
    heldout_per_class: int = 8
    captions: int = 3000
    heldout_captions: int = 150
    text_documents: int = 600
    sft_chats: int = 3000
    """SFT chats (1-3 questions each), one per caption training image (at most ``captions``)."""
    sft_heldout: int = 60
    """Held-out scenes asked one question of each kind they allow (at most ``heldout_captions``)."""
    seed: int = 0

    def __post_init__(self):
        for name in (
            "per_class",
            "heldout_per_class",
            "captions",
            "heldout_captions",
            "text_documents",
            "sft_chats",
            "sft_heldout",
        ):
            if not (isinstance(getattr(self, name), int) and getattr(self, name) >= 1):
                raise ValueError(f"DemoDataConfig.{name} must be a positive int, got {getattr(self, name)!r}")


def wnid(index: int) -> str:
    """An ImageNet-style folder name for class ``index``."""
    return f"n{90000000 + index:08d}"


def write_demo_data(
    root: str | os.PathLike, config: DemoDataConfig = DemoDataConfig(), workers: int | None = None
) -> dict[str, int]:
    """Write the whole tree (replacing ``root``) with ``workers`` processes (default: all CPUs; the bytes
    do not depend on it: every image draws from its own seeded generator). Returns counts per part.
    A non-empty ``root`` that is not a previous demo tree is refused (ValueError), never deleted."""
    root = Path(root)
    if root.exists() and any(root.iterdir()) and not (root / "labels" / "classes.txt").is_file():
        raise ValueError(f"{root} exists and is not a demo data tree (no labels/classes.txt): refusing to replace it")
    tmp = root.with_name(root.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    names = scenes.classes()
    labels = {
        split: [(i, k) for i in range(len(names)) for k in range(n)]
        for split, n in (("train", config.per_class), ("heldout", config.heldout_per_class))
    }
    jobs = [("label", split, tmp / "labels", i, k, config.seed) for split, items in labels.items() for i, k in items]
    jobs += [
        ("scene", split, tmp / "captions", 0, k, config.seed)
        for split, n in (("train", config.captions), ("heldout", config.heldout_captions))
        for k in range(n)
    ]
    for folder in [tmp / "labels" / "train" / wnid(i) for i in range(len(names))] + [
        tmp / "labels" / "heldout",
        tmp / "captions" / "train",
        tmp / "captions" / "heldout",
        tmp / "text",
        tmp / "sft",
    ]:
        folder.mkdir(parents=True)
    workers = workers if workers is not None else (os.cpu_count() or 1)
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            truths = list(pool.map(_render_one, jobs, chunksize=64))
    else:
        truths = [_render_one(job) for job in jobs]
    label_lines = [
        json.dumps({"image": rel, "label": truth}) + "\n"
        for (kind, split, *_), (rel, truth) in zip(jobs, truths)
        if kind == "label" and split == "heldout"
    ]
    (tmp / "labels" / "heldout.jsonl").write_text("".join(label_lines), encoding="utf-8")
    (tmp / "labels" / "classes.txt").write_text(
        "".join(f"{wnid(i)} {n}\n" for i, n in enumerate(names)), encoding="utf-8"
    )
    for split in ("train", "heldout"):
        lines = [
            json.dumps({"image": rel, "caption": truth}) + "\n"
            for (kind, s, *_), (rel, truth) in zip(jobs, truths)
            if kind == "scene" and s == split
        ]
        (tmp / "captions" / f"{split}.jsonl").write_text("".join(lines), encoding="utf-8")
    rng = random.Random(f"{config.seed}/text")
    (tmp / "text" / "corpus.jsonl").write_text(
        "".join(json.dumps({"text": text_document(rng)}) + "\n" for _ in range(config.text_documents)), encoding="utf-8"
    )
    chats, asked = _write_sft(tmp / "sft", config)
    shutil.rmtree(root, ignore_errors=True)
    os.replace(tmp, root)
    return {
        "label_train": len(labels["train"]),
        "label_heldout": len(labels["heldout"]),
        "caption_train": config.captions,
        "caption_heldout": config.heldout_captions,
        "text_documents": config.text_documents,
        "sft_chats": chats,
        "sft_heldout_questions": asked,
    }


def _scene(seed: int, split: str, k: int) -> scenes.Scene:
    """The scene of caption image ``k`` (the first draw of its generator, as :func:`_render_one` makes it)."""
    return scenes.random_scene(random.Random(f"{seed}/scene/{split}/0/{k}"))


def _write_sft(folder: Path, config: DemoDataConfig) -> tuple[int, int]:
    """SFT chats about the caption training images (released SFT layout: ``<image>`` tag in the first
    question, ``from``/``value`` turns) and held-out questions; returns (chats, held-out questions)."""
    rng = random.Random(f"{config.seed}/sft")
    rows = []
    for k in range(min(config.sft_chats, config.captions)):
        qa = scenes.questions(_scene(config.seed, "train", k), rng)
        rng.shuffle(qa)
        turns = []
        for _, question, answer in qa[: rng.randint(1, 3)]:
            turns += [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
        turns[0]["value"] = "<image>\n" + turns[0]["value"]
        rows.append({"id": f"shapes-{k}", "image": f"train/{k:05d}.png", "conversations": turns})
    heldout = []
    for k in range(min(config.sft_heldout, config.heldout_captions)):
        for kind, question, answer in scenes.questions(_scene(config.seed, "heldout", k), rng):
            heldout.append({"image": f"heldout/{k:05d}.png", "kind": kind, "question": question, "answer": answer})
    for name, items in (("train", rows), ("heldout", heldout)):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in items), encoding="utf-8")
    return len(rows), len(heldout)


def _render_one(job) -> tuple[str, str]:
    """Render and save one image; returns (path relative to its dataset root, truth)."""
    kind, split, base, i, k, seed = job
    rng = random.Random(f"{seed}/{kind}/{split}/{i}/{k}")  # str seeds are hashed deterministically (sha512)
    if kind == "label":
        name = scenes.classes()[i]
        rel = f"train/{wnid(i)}/{k:05d}.png" if split == "train" else f"heldout/{i:02d}_{k:04d}.png"
        scenes.render_label(rng, *name.split()).save(base / rel)
        return rel, name
    scene = scenes.random_scene(rng)
    rel = f"{split}/{k:05d}.png"
    scenes.render_scene(rng, scene).save(base / rel)
    return rel, scene.caption()


def text_document(rng: random.Random) -> str:
    """A short paragraph of simple facts (sums, counting, shapes and colours)."""
    sentences = []
    for _ in range(rng.randint(3, 8)):
        kind = rng.randrange(4)
        if kind == 0:
            a, b = rng.randint(0, 10), rng.randint(0, 10)
            sentences.append(f"{NUMBER_WORDS[a].capitalize()} plus {NUMBER_WORDS[b]} is {NUMBER_WORDS[a + b]}.")
        elif kind == 1:
            start = rng.randint(0, 14)
            sentences.append(", ".join(NUMBER_WORDS[start : start + 5]).capitalize() + ".")
        elif kind == 2:
            shape = rng.choice(scenes.SHAPES)
            sentences.append(f"A {shape} has {SIDES[shape]}.")
        else:
            colour, shape = rng.choice(list(scenes.COLOURS)), rng.choice(scenes.SHAPES)
            count = rng.randint(2, 9)
            sentences.append(f"There are {NUMBER_WORDS[count]} {colour} {shape}s on the table.")
    return " ".join(sentences)


__all__ = ["DemoDataConfig", "text_document", "wnid", "write_demo_data"]
