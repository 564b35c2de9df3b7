"""The data of the local lmms-eval task ``solo_shapes`` (examples/solo/lmms_tasks/solo_shapes/).

``write_task_data(root)`` writes, deterministically::

    root/labels.jsonl     {"image", "label"}: the demo's held-out label images (the same seeds as
                          ``data.write_demo_data``'s ``labels/heldout``, so the same pictures), image k of
                          every class before image k+1 of any: ``--limit 15·n`` is the set of
                          ``heldout_per_class=n`` (the smoke run's is n=1)
    root/questions.jsonl  {"image", "kind", "question", "answer", "choices"}: short-answer questions about the
                          demo's held-out caption scenes, each with the closed set of answers of its kind
    root/images/*.png

No image is in the demo's training data (train and held-out images come from independent seeds).
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

from megatron.solo.demo import scenes
from megatron.solo.demo.data import _render_one, _scene


def choices(kind: str) -> list[str]:
    """Every answer a question of ``kind`` can have (a scene holds at most two groups of three)."""
    return list(scenes.CANDIDATES[kind])


def write_task_data(
    root: str | os.PathLike, *, labels_per_class: int = 8, n_scenes: int = 30, seed: int = 0
) -> dict[str, int]:
    """Write the task's data into ``root`` (replaced); returns the number of labels and questions."""
    root = Path(root)
    tmp = root.with_name(root.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "images" / "heldout").mkdir(parents=True)
    labels = []
    for k in range(labels_per_class):  # k-major: the first 15·n rows are the held-out set of heldout_per_class=n
        for i in range(len(scenes.classes())):
            rel, truth = _render_one(("label", "heldout", tmp / "images", i, k, seed))
            labels.append({"image": f"images/{rel}", "label": truth})
    rng = random.Random(f"{seed}/lmms-task")
    questions = []
    for k in range(n_scenes):
        rel, _ = _render_one(("scene", "heldout", tmp / "images", 0, k, seed))
        for kind, question, answer in scenes.questions(_scene(seed, "heldout", k), rng):
            options = choices(kind)
            assert answer in options, (kind, answer)
            questions.append(
                {"image": f"images/{rel}", "kind": kind, "question": question, "answer": answer, "choices": options}
            )
    for name, rows in (("labels", labels), ("questions", questions)):
        (tmp / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    shutil.rmtree(root, ignore_errors=True)
    os.replace(tmp, root)
    return {"labels": len(labels), "questions": len(questions)}


__all__ = ["choices", "write_task_data"]
