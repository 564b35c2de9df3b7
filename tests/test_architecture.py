"""The parts of megatron.solo import each other only in the directions docs/architecture.md draws."""

import ast
from collections import defaultdict
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "megatron" / "solo"

# part → the parts it may import (docs/architecture.md, "Parts and import directions"). A part is a top-level
# module or subpackage of megatron.solo; "solo" is the package's own __init__.
FOUNDATION = {"solo", "image", "tokenizer", "tokenizer_json", "config", "batch", "io", "checksums"}
ALLOWED = {
    "solo": set(),
    "image": set(),
    "io": set(),
    "checksums": {"io"},
    "batch": {"image"},
    "backend": set(),
    "tokenizer": {"image", "io", "tokenizer_json"},
    "tokenizer_json": {"io"},
    "config": {"image", "tokenizer"},
    "data": FOUNDATION | {"faults", "haplo"},  # haplo.anyres only: HaploVL's tiling (numpy/PIL)
    "model": {"config", "batch"},
    "haplo": {"config", "batch", "image", "model"},
    "families": {"config", "model", "haplo"},
    "parallel": {"backend"},
    "checkpointing": {"checksums", "config", "families", "model", "parallel", "io"},
    "convert": {"checkpointing", "config", "families", "haplo", "image", "model", "parallel", "tokenizer", "io"},
    "inference": FOUNDATION | {"checkpointing", "data"},
    "training": FOUNDATION | {"backend", "checkpointing", "data", "families", "haplo", "model", "parallel", "faults"},
    "demo": FOUNDATION | {"data", "haplo"},  # haplo.anyres: the HaploVL miniature's teacher sees tiles
    "evaluation": {"backend", "checkpointing", "convert"},  # checkpointing: which iteration is scored
    "faults": set(),
}


def _part(module: str) -> str:
    parts = module.split(".")
    return parts[2] if len(parts) > 2 else "solo"


def imports_between_parts() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = defaultdict(set)
    for path in PACKAGE.rglob("*.py"):
        source = _part(".".join(("megatron", "solo", *path.relative_to(PACKAGE).with_suffix("").parts)))
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("megatron.solo"):
                targets = (
                    [f"megatron.solo.{a.name}" for a in node.names] if node.module == "megatron.solo" else [node.module]
                )
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names if a.name.startswith("megatron.solo")]
            else:
                continue
            edges[source] |= {_part(t) for t in targets} - {source}
    return edges


def test_parts_import_each_other_only_downwards():
    edges = imports_between_parts()
    assert set(edges) <= set(ALLOWED), f"parts missing from the table: {set(edges) - set(ALLOWED)}"
    wrong = {part: sorted(targets - ALLOWED[part]) for part, targets in edges.items() if targets - ALLOWED[part]}
    assert not wrong, f"imports against docs/architecture.md's directions: {wrong}"


def test_the_rule_sees_a_wrong_import(tmp_path, monkeypatch):
    """A control: the scanner finds an import of training/ from model/ (so the rule can fail)."""
    fake = tmp_path / "megatron" / "solo"
    (fake / "model").mkdir(parents=True)
    (fake / "model" / "x.py").write_text("from megatron.solo.training.loop import Trainer\n")
    monkeypatch.setattr(__import__(__name__), "PACKAGE", fake)
    assert imports_between_parts() == {"model": {"training"}}
