"""Synthetic scenes of coloured shapes, rendered and described deterministically from a seed.

Two kinds, matching the paper's first two stages in miniature:

* a **label** scene: one shape on a plain background; its class is ``"<colour> <shape>"`` ("red triangle");
* a **caption** scene: one group of 1-3 equal shapes ("two blue circles"), or two groups in a spatial
  relation ("two blue circles left of a green square", "a red triangle above three yellow squares").

Image sizes vary (wide, tall and square, not multiples of 32), so the size rule, row separators and
packing see what real data gives them. Shapes sit on the patch grid the size rule will give the image (a
1×1 or 2×2 block of 32-px patches, inset and jittered by a few pixels): SOLO's only visual encoder is one
linear map per patch, and a 2-layer, 64-wide decoder learns grid-aligned shapes on 2 CPU cores in minutes;
shapes at arbitrary offsets need a larger model and far longer training (measured: ~50 % shape accuracy
after the same budget). Everything is a pure function of ``random.Random`` state.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFilter

from megatron.solo.image import PATCH_SIZE, target_size

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 205, 40),
    "purple": (150, 60, 190),
}
SHAPES = ("circle", "square", "triangle")
COUNT_WORDS = {1: "a", 2: "two", 3: "three"}
RELATIONS = ("left of", "above")
BACKGROUNDS = ((245, 245, 245), (200, 200, 200), (120, 120, 120), (40, 40, 40))
SUPERSAMPLE = 3  # draw at 3x, then downsample: anti-aliased edges like a real photo's


def classes() -> list[str]:
    """Every label class, in a fixed order: ``"red circle"``, ``"red square"``, …"""
    return [f"{c} {s}" for c in COLOURS for s in SHAPES]


@dataclass(frozen=True)
class Group:
    """``count`` shapes of one colour and kind."""

    count: int
    colour: str
    shape: str

    def phrase(self) -> str:
        """ "a green square", "two blue circles"."""
        noun = self.shape + ("s" if self.count > 1 else "")
        return f"{COUNT_WORDS[self.count]} {self.colour} {noun}"


@dataclass(frozen=True)
class Scene:
    """What an image shows: one group, or two groups with ``relation`` (first relative to second)."""

    groups: tuple[Group, ...]
    relation: str | None = None

    def caption(self) -> str:
        if len(self.groups) == 1:
            return self.groups[0].phrase()
        return f"{self.groups[0].phrase()} {self.relation} {self.groups[1].phrase()}"

    def attributes(self) -> dict[str, str]:
        """Slot → value, for per-attribute accuracy: count_1, colour_1, shape_1[, relation, count_2, …]."""
        out = {}
        for i, g in enumerate(self.groups, 1):
            out.update({f"count_{i}": COUNT_WORDS[g.count], f"colour_{i}": g.colour, f"shape_{i}": g.shape})
        if self.relation:
            out["relation"] = self.relation
        return out


def parse_caption(text: str) -> dict[str, str]:
    """The attributes a (generated) caption states; slots it cannot fill are missing. Inverse of
    :meth:`Scene.caption` on well-formed captions."""
    words = text.strip().rstrip(".").split()
    out: dict[str, str] = {}
    found = [(i, rel) for i in range(len(words)) for rel in RELATIONS if words[i : i + len(rel.split())] == rel.split()]
    parts = [words]
    if found:
        at, relation = found[0]
        parts = [words[:at], words[at + len(relation.split()) :]]
        out["relation"] = relation
    for i, part in enumerate(parts, 1):
        if len(part) != 3:
            continue
        count, colour, noun = part
        out[f"count_{i}"], out[f"colour_{i}"] = count, colour
        out[f"shape_{i}"] = noun[:-1] if noun.endswith("s") and noun[:-1] in SHAPES else noun
    return out


QUESTION_KINDS = ("count", "colour", "shape", "relation")
NUMBERS = ("zero", "one", "two", "three", "four", "five", "six")


def questions(scene: Scene, rng: random.Random) -> list[tuple[str, str, str]]:
    """(kind, question, one-word answer) about ``scene``, one per kind that has an unambiguous question:
    how many of a shape; the colour of a shape that only one group has; the shape of a colour that only
    one group has; whether the first group is left of / above the second (asked either way round)."""
    groups = scene.groups
    out = []
    g = rng.choice(groups)
    total = sum(x.count for x in groups if x.shape == g.shape)
    out.append(("count", f"How many {g.shape}s are there?", NUMBERS[total]))
    unique_shape = [x for x in groups if sum(y.shape == x.shape for y in groups) == 1]
    if unique_shape:
        g = rng.choice(unique_shape)
        verb, noun = ("are", g.shape + "s") if g.count > 1 else ("is", g.shape)
        out.append(("colour", f"What colour {verb} the {noun}?", g.colour))
    unique_colour = [x for x in groups if sum(y.colour == x.colour for y in groups) == 1]
    if unique_colour:
        g = rng.choice(unique_colour)
        verb, noun = ("are", "ones") if g.count > 1 else ("is", "one")
        out.append(("shape", f"What shape {verb} the {g.colour} {noun}?", g.shape))
    if scene.relation:
        first, second = groups if rng.random() < 0.5 else groups[::-1]
        relation = rng.choice(RELATIONS)
        right = first is groups[0] and relation == scene.relation
        verb = "Are" if first.count > 1 else "Is"
        out.append(("relation", f"{verb} the {_name(first)} {relation} the {_name(second)}?", "yes" if right else "no"))
    return out


def _name(group: Group) -> str:
    """ "red circle" / "red circles": a group named without its count."""
    return f"{group.colour} {group.shape}{'s' if group.count > 1 else ''}"


def _size(rng: random.Random, low: int, high: int) -> tuple[int, int]:
    """(width, height): a third each wide, tall and near-square."""
    long_side = rng.randint((low + high) // 2, high)
    aspect = rng.choice((rng.uniform(1.6, 2.6), 1 / rng.uniform(1.6, 2.6), rng.uniform(0.8, 1.25)))
    w, h = (long_side, round(long_side / aspect)) if aspect >= 1 else (round(long_side * aspect), long_side)
    return max(w, low), max(h, low)


def _canvas(rng: random.Random, size: tuple[int, int]) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    base = rng.choice(BACKGROUNDS)
    shift = rng.randint(-12, 12)  # neutral: the shapes' colours stay the only chroma in the image
    tint = tuple(max(0, min(255, v + shift)) for v in base)
    img = Image.new("RGB", (size[0] * SUPERSAMPLE, size[1] * SUPERSAMPLE), tint)
    return img, ImageDraw.Draw(img)


def _draw(
    draw: ImageDraw.ImageDraw, shape: str, colour: str, box: tuple[float, float, float, float], rng: random.Random
) -> None:
    x0, y0, x1, y1 = (v * SUPERSAMPLE for v in box)
    rgb = tuple(max(0, min(255, v + rng.randint(-15, 15))) for v in COLOURS[colour])
    if shape == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=rgb)
    elif shape == "square":
        draw.rectangle((x0, y0, x1, y1), fill=rgb)
    else:
        draw.polygon(((x0 + x1) / 2, y0, x1, y1, x0, y1), fill=rgb)


def _finish(img: Image.Image, size: tuple[int, int]) -> Image.Image:
    return img.resize(size, Image.Resampling.LANCZOS).filter(ImageFilter.GaussianBlur(0.4))


class Grid:
    """The patch grid (``rows`` × ``cols``) that the size rule gives an image of original ``size``; ``box``
    maps a box on the resized image back to original pixels, so a shape drawn there lands on patches."""

    def __init__(self, size: tuple[int, int]):
        self.size = size
        width, height = target_size(*size)
        self.rows, self.cols = height // PATCH_SIZE, width // PATCH_SIZE
        self.sx, self.sy = size[0] / width, size[1] / height

    def box(self, x0: float, y0: float, x1: float, y1: float) -> tuple[float, float, float, float]:
        """Resized-image coordinates → original ones."""
        return x0 * self.sx, y0 * self.sy, x1 * self.sx, y1 * self.sy


def _shape_in_cell(rng: random.Random, grid: Grid, row: int, col: int, k: int) -> tuple[float, float, float, float]:
    """A box filling most of the k×k patch cell at (row, col), jittered by a few pixels."""
    side = k * PATCH_SIZE
    inset = rng.uniform(0.06, 0.16) * side
    dx, dy = rng.uniform(-0.05, 0.05) * side, rng.uniform(-0.05, 0.05) * side
    x0, y0 = col * PATCH_SIZE + inset + dx, row * PATCH_SIZE + inset + dy
    return grid.box(x0, y0, x0 + side - 2 * inset, y0 + side - 2 * inset)


def render_label(rng: random.Random, colour: str, shape: str) -> Image.Image:
    """One shape filling a 1×1 or 2×2 block of patches, anywhere on the grid of a 40-128 px image."""
    size = _size(rng, 40, 128)
    grid = Grid(size)
    k = rng.choice([1, 2]) if min(grid.rows, grid.cols) >= 2 else 1
    img, draw = _canvas(rng, size)
    row, col = rng.randint(0, grid.rows - k), rng.randint(0, grid.cols - k)
    _draw(draw, shape, colour, _shape_in_cell(rng, grid, row, col, k), rng)
    return _finish(img, size)


def random_scene(rng: random.Random, two_groups: float = 0.6) -> Scene:
    """A caption scene; two groups never share both colour and shape."""

    def group() -> Group:
        return Group(rng.randint(1, 3), rng.choice(list(COLOURS)), rng.choice(SHAPES))

    first = group()
    if rng.random() >= two_groups:
        return Scene((first,))
    second = group()
    while (second.colour, second.shape) == (first.colour, first.shape):
        second = group()
    return Scene((first, second), rng.choice(RELATIONS))


def render_scene(rng: random.Random, scene: Scene) -> Image.Image:
    """The scene in a 64-160 px image, one shape per patch cell. With a relation the first group lies in
    the left (or top) part of the grid and the second in the other, with the middle column (row) left
    empty when the grid is odd."""
    while True:
        w, h = _size(rng, 64, 160)
        size = {"left of": (max(w, h), min(w, h)), "above": (min(w, h), max(w, h))}.get(scene.relation, (w, h))
        grid = Grid(size)
        regions = _regions(grid, scene.relation)
        if all(len(cells) >= g.count for g, cells in zip(scene.groups, regions)):
            break
    img, draw = _canvas(rng, size)
    for group, cells in zip(scene.groups, regions):
        for row, col in rng.sample(cells, group.count):
            _draw(draw, group.shape, group.colour, _shape_in_cell(rng, grid, row, col, 1), rng)
    return _finish(img, size)


def _regions(grid: Grid, relation: str | None) -> list[list[tuple[int, int]]]:
    """Cells (row, col) open to each group."""
    cells = [(r, c) for r in range(grid.rows) for c in range(grid.cols)]
    if relation == "left of":
        half = grid.cols // 2
        return [[(r, c) for r, c in cells if c < half], [(r, c) for r, c in cells if c >= grid.cols - half]]
    if relation == "above":
        half = grid.rows // 2
        return [[(r, c) for r, c in cells if r < half], [(r, c) for r, c in cells if r >= grid.rows - half]]
    return [cells]


CANDIDATES: dict[str, tuple[str, ...]] = {
    "count": NUMBERS[1:],  # at most two groups of three
    "colour": tuple(COLOURS),
    "shape": SHAPES,
    "relation": ("yes", "no"),
}
"""The demo's held-out question kinds → every answer a question of that kind can have."""


__all__ = [
    "CANDIDATES",
    "COLOURS",
    "QUESTION_KINDS",
    "RELATIONS",
    "SHAPES",
    "Group",
    "Scene",
    "classes",
    "parse_caption",
    "questions",
    "random_scene",
    "render_label",
    "render_scene",
]
