"""The synthetic scenes: deterministic, described truthfully, at varied sizes."""

import random

import numpy as np
import pytest
from skimage.measure import label as connected_components

from megatron.solo.demo import scenes
from megatron.solo.demo.scenes import COLOURS, Group, Scene, parse_caption, random_scene, render_label, render_scene


def colour_mask(img, colour: str, tol: int = 45) -> np.ndarray:
    """Pixels within ``tol`` of the colour (the renderer jitters colours by ±20 and blurs edges)."""
    diff = np.abs(np.asarray(img, dtype=np.int32) - np.asarray(COLOURS[colour]))
    return diff.max(axis=2) <= tol


def test_rendering_is_deterministic_by_seed():
    a = render_scene(random.Random(3), random_scene(random.Random(4)))
    b = render_scene(random.Random(3), random_scene(random.Random(4)))
    c = render_scene(random.Random(5), random_scene(random.Random(4)))
    assert np.array_equal(np.asarray(a), np.asarray(b))
    assert a.size != c.size or not np.array_equal(np.asarray(a), np.asarray(c))


def test_captions_parse_back_to_their_attributes():
    rng = random.Random(0)
    for _ in range(500):
        scene = random_scene(rng)
        assert parse_caption(scene.caption()) == scene.attributes(), scene.caption()
    assert (
        Scene((Group(2, "blue", "circle"), Group(1, "green", "square")), "left of").caption()
        == "two blue circles left of a green square"
    )


def test_parse_caption_leaves_unreadable_slots_out():
    assert parse_caption("two blue") == {}
    assert parse_caption("a red blob above two green squares") == {
        "relation": "above",
        "count_1": "a",
        "colour_1": "red",
        "shape_1": "blob",
        "count_2": "two",
        "colour_2": "green",
        "shape_2": "square",
    }


def test_sizes_include_wide_tall_and_square_images():
    rng = random.Random(1)
    sizes = [render_label(rng, "red", "circle").size for _ in range(60)]
    ratios = [w / h for w, h in sizes]
    assert min(ratios) < 0.6 and max(ratios) > 1.6 and any(0.8 <= r <= 1.25 for r in ratios)
    assert all(40 <= min(s) and max(s) <= 128 for s in sizes)
    assert any(w % 32 or h % 32 for w, h in sizes)  # the size rule has work to do


@pytest.mark.parametrize("seed", range(40))
def test_scene_images_show_what_the_caption_says(seed):
    """Each group's colour appears as `count` blobs, on the stated side of the other group."""
    rng = random.Random(seed)
    scene = random_scene(rng, two_groups=0.7)
    img = render_scene(rng, scene)
    centres = []
    for group in scene.groups:
        same = [g for g in scene.groups if g.colour == group.colour]
        mask = colour_mask(img, group.colour)
        expected = sum(g.count for g in same)
        assert connected_components(mask).max() == expected, (scene.caption(), img.size)
        ys, xs = np.nonzero(mask)
        centres.append((xs.mean(), ys.mean()))
    if scene.relation and scene.groups[0].colour != scene.groups[1].colour:
        (x1, y1), (x2, y2) = centres
        assert (x1 < x2) if scene.relation == "left of" else (y1 < y2), scene.caption()


def test_label_images_hold_one_shape_of_their_class():
    rng = random.Random(2)
    for name in scenes.classes():
        colour, shape = name.split()
        img = render_label(rng, colour, shape)
        mask = colour_mask(img, colour)
        assert connected_components(mask).max() == 1, name
        ys, xs = np.nonzero(mask)
        fill = mask.sum() / ((np.ptp(xs) + 1) * (np.ptp(ys) + 1))  # of the bounding box
        expected = {"square": 1.0, "circle": np.pi / 4, "triangle": 0.5}[shape]
        assert abs(fill - expected) < 0.12, (name, fill)


def test_questions_are_answered_by_the_scene():
    scene = Scene((Group(2, "blue", "circle"), Group(1, "green", "circle")), "left of")
    qa = {kind: (q, a) for kind, q, a in scenes.questions(scene, random.Random(0))}
    assert qa["count"] == ("How many circles are there?", "three")  # both groups are circles
    assert "colour" not in qa  # "the circle" would be ambiguous
    assert qa["shape"][1] == "circle"
    rng = random.Random(1)
    answers = set()
    for _ in range(200):
        scene = random_scene(rng)
        for kind, question, answer in scenes.questions(scene, rng):
            if kind == "relation":
                first, second = (g for g in scene.groups)
                where = [question.index(f"{g.colour} {g.shape}") for g in (first, second)]
                asked_in_order = where[0] < where[1]
                assert (answer == "yes") == (asked_in_order and scene.relation in question), (scene, question)
                answers.add(answer)
            elif kind == "colour":
                assert answer in COLOURS and answer in scene.caption()
    assert answers == {"yes", "no"}
