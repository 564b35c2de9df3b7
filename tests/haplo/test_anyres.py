"""anyres tiling: the spec's worked table, the best fit against transformers' own function, the per-token layout
against a naive reassembly of the tiles (the released model's view/permute/unpad steps), and the pixels."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image
from transformers.image_processing_utils import select_best_resolution as hf_select_best_resolution

from megatron.solo.haplo.anyres import (
    DEFAULT_ANYRES,
    DEFAULT_PINPOINTS,
    AnyresConfig,
    anyres_grid,
    image_layout,
    image_tiles,
    normalize_tile_patches,
    num_image_tokens,
    patches_to_tiles,
    resized_size,
    select_best_resolution,
    tile_patches,
)

sizes = st.integers(min_value=1, max_value=4000)


@pytest.mark.parametrize(
    ("width", "height", "tiles_hw", "tokens"),
    [  # haplovl_spec.md §2.4, "Worked token counts"
        (336, 336, (1, 1), 576 + 24),
        (200, 100, (1, 1), None),  # anything ≤ 336² is one tile
        (640, 480, (2, 2), 1728 + 36),
        (1024, 1024, (2, 2), 2304 + 48),
        (1920, 1080, (2, 3), 2880 + 40),
        (300, 2000, (6, 1), 3168 + 144),
    ],
)
def test_the_specs_worked_table(width, height, tiles_hw, tokens):
    grid = anyres_grid(height, width)
    assert (grid.tiles_h, grid.tiles_w) == tiles_hw
    if tokens is not None:
        assert num_image_tokens(height, width) == tokens == grid.num_tokens


@given(sizes, sizes)
def test_best_fit_is_transformers_select_best_resolution(height, width):
    pinpoints = [list(p) for p in DEFAULT_PINPOINTS]
    assert select_best_resolution(height, width, DEFAULT_PINPOINTS) == tuple(
        hf_select_best_resolution((height, width), pinpoints)
    )


def test_ties_go_to_the_least_waste_then_the_first_pinpoint():
    # 100×100 keeps all its pixels on every canvas: the smallest canvas wins.
    assert select_best_resolution(100, 100, DEFAULT_PINPOINTS) == (336, 336)
    # Equal effective pixels and equal waste: the earlier pinpoint wins, in either order.
    assert select_best_resolution(1000, 1000, [(336, 672), (672, 336)]) == (336, 672)
    assert select_best_resolution(1000, 1000, [(672, 336), (336, 672)]) == (672, 336)


def _naive_layout(height, width, config=DEFAULT_ANYRES):
    """The released model's steps on a grid of (tile, position) ids: [tiles_h, tiles_w, side, side] tiles
    reassembled by permute, unpadded by comparing aspect ratios of the tensor's shape, a newline column
    appended, flattened row-major. Returns (tile ids, position ids) per token, -1 at newlines."""
    bh, bw = hf_select_best_resolution((height, width), [list(p) for p in config.pinpoints])
    th, tw, s = bh // config.tile_size, bw // config.tile_size, config.positions_per_side
    ids = torch.stack(
        [
            torch.arange(th * tw).repeat_interleave(s * s).view(th * tw, s, s),
            torch.arange(s * s).view(1, s, s).expand(th * tw, s, s),
        ]
    )  # [2, tiles, s, s]
    grid = ids.view(2, th, tw, s, s).permute(0, 1, 3, 2, 4).reshape(2, th * s, tw * s)
    cur_h, cur_w = grid.shape[1:]
    if width / height > cur_w / cur_h:
        pad = (cur_h - int(round(height * (cur_w / width), 7))) // 2
        grid = grid[:, pad : cur_h - pad, :]
    else:
        pad = (cur_w - int(round(width * (cur_h / height), 7))) // 2
        grid = grid[:, :, pad : cur_w - pad]
    grid = torch.cat([grid, torch.full((2, grid.shape[1], 1), -1)], dim=2)
    return grid[0].reshape(-1).numpy(), grid[1].reshape(-1).numpy()


@given(sizes, sizes)
def test_layout_matches_a_naive_reassembly(height, width):
    grid = anyres_grid(height, width)
    layout = image_layout(grid)
    tile, position = _naive_layout(height, width)
    np.testing.assert_array_equal(layout.tile, tile)
    np.testing.assert_array_equal(layout.position, position)
    assert len(layout) == grid.num_tokens == num_image_tokens(height, width) == grid.rows * (grid.cols + 1)
    assert layout.is_newline.sum() == grid.rows and np.all(layout.is_newline == (tile < 0))
    assert layout.num_tiles == grid.num_tiles == grid.tiles_h * grid.tiles_w
    side2 = DEFAULT_ANYRES.positions_per_tile
    np.testing.assert_array_equal(layout.patch[~layout.is_newline], tile[tile >= 0] * side2 + position[tile >= 0])
    assert np.all(layout.patch[layout.is_newline] == -1)
    assert grid.num_tokens <= 6 * 576 + 6 * 24  # at most 6 tiles, never the release's downscale


def test_a_small_custom_grid():
    """2-px "patches" in 4-px tiles: every number small enough to check by hand."""
    cfg = AnyresConfig(tile_size=4, patch_size=2, pinpoints=((4, 8), (4, 4)), anyres_max=2)
    grid = anyres_grid(4, 6, cfg)  # 6 wide, 4 high → a 4×8 canvas (1×2 tiles), grid 2×4
    assert (grid.tiles_h, grid.tiles_w, grid.rows, grid.cols, grid.top, grid.left) == (1, 2, 2, 4, 0, 0)
    grid = anyres_grid(2, 8, cfg)  # 8×2 → grid 2×4, new_h = round(2·4/8) = 1, pad (2-1)//2 = 0: nothing cropped
    assert (grid.rows, grid.cols) == (2, 4)
    grid = anyres_grid(1, 8, cfg)  # new_h = round(0.5) → 0 (banker's rounding), pad 1: both rows cropped
    assert (grid.rows, grid.cols, grid.num_tokens) == (0, 4, 0)
    layout = image_layout(anyres_grid(4, 4, cfg))  # 4×4 → the 4×4 pinpoint: one tile, 2×2 patches
    np.testing.assert_array_equal(layout.patch, [0, 1, -1, 2, 3, -1])


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="AnyresConfig.pinpoints"):
        AnyresConfig(pinpoints=((336, 500),))
    with pytest.raises(ValueError, match="AnyresConfig.pinpoints"):
        AnyresConfig(anyres_max=2)  # 2016×336 has 6 tiles' patches: above 2's downscale threshold
    with pytest.raises(ValueError, match="AnyresConfig.tile_size"):
        AnyresConfig(tile_size=340)
    with pytest.raises(ValueError, match="image size"):
        anyres_grid(0, 10)


def _white(width, height):
    return Image.new("RGB", (width, height), (255, 255, 255))


def test_tiles_of_640x480_are_resized_padded_black_and_row_major():
    img = Image.fromarray(np.random.default_rng(0).integers(1, 256, (480, 640, 3), dtype=np.uint8))
    tiles = image_tiles(img)
    assert tiles.shape == (4, 336, 336, 3) and tiles.dtype == np.uint8
    canvas = np.concatenate([np.concatenate(list(row), axis=1) for row in tiles.reshape(2, 2, 336, 336, 3)], axis=0)
    assert resized_size(480, 640, (672, 672)) == (504, 672)
    expected = np.asarray(img.resize((672, 504), Image.Resampling.BICUBIC))
    np.testing.assert_array_equal(canvas[84 : 84 + 504], expected)  # centred: (672 − 504) / 2 = 84
    assert not canvas[:84].any() and not canvas[84 + 504 :].any()  # black bars
    # The crop drops exactly the 6 black patch rows at each end: every kept patch row shows the image.
    grid = anyres_grid(480, 640)
    assert (grid.top, grid.rows) == (6, 36)


def test_an_odd_padding_leaves_the_last_tile_short_and_it_is_resized():
    height, width = 335, 700
    target = select_best_resolution(height, width, DEFAULT_PINPOINTS)
    new_h, new_w = resized_size(height, width, target)
    assert target == (336, 1008) and (new_h, new_w) == (336, 703)  # 1008 − 703 = 305: odd
    tiles = image_tiles(_white(width, height))
    assert tiles.shape == (3, 336, 336, 3)
    # Canvas: 152 black columns, 703 white, 152 black = 1007 px; the last tile is 335 px, stretched to 336.
    canvas = np.zeros((336, 1007, 3), np.uint8)
    canvas[:, 152 : 152 + 703] = 255
    np.testing.assert_array_equal(tiles[0], canvas[:, :336])
    np.testing.assert_array_equal(tiles[1], canvas[:, 336:672])
    last = np.asarray(Image.fromarray(canvas[:, 672:]).resize((336, 336), Image.Resampling.BICUBIC))
    np.testing.assert_array_equal(tiles[2], last)
    assert not np.array_equal(tiles[2], np.pad(canvas[:, 672:], ((0, 0), (0, 1), (0, 0))))  # not merely padded


def test_patch_order_is_channel_major_and_round_trips():
    rng = np.random.default_rng(1)
    tiles = rng.integers(0, 256, (2, 336, 336, 3), dtype=np.uint8)
    patches = tile_patches(tiles)
    assert patches.shape == (2 * 576, 3 * 14 * 14)
    # patch of tile 1 at grid (y=3, x=5), channel 2, pixel (4, 7)
    assert patches[576 + 3 * 24 + 5, 2 * 196 + 4 * 14 + 7] == tiles[1, 3 * 14 + 4, 5 * 14 + 7, 2]
    back = patches_to_tiles(patches)
    np.testing.assert_array_equal(back, tiles.transpose(0, 3, 1, 2))
    np.testing.assert_array_equal(patches_to_tiles(torch.from_numpy(patches)).numpy(), back)
    normed = normalize_tile_patches(patches)
    mean, std = DEFAULT_ANYRES.mean[0], DEFAULT_ANYRES.std[0]
    assert math.isclose(normed[0, 0], (patches[0, 0] / 255 - mean) / std, rel_tol=1e-5)
