"""HaploVL's variable resolution ("anyres"), as the released processor and model do it (spec §2.4, §3.1).

For an image of original size ``(height, width)``:

1. **best fit**: among the pinpoints ``(h, w)`` (multiples of the 336-px tile), the one that keeps the most
   of the image's pixels after an aspect-preserving downscale (``min(scaled area, original area)``), ties
   broken by the least canvas area wasted, then by the first in the list (transformers'
   ``select_best_resolution``);
2. **resize** (PIL bicubic) so the image fits that canvas: one side equals the canvas side, the other is
   ``min(ceil(side · scale), canvas side)``;
3. **pad** with black, centred; the released code pads ``⌊diff/2⌋`` on *both* sides, so an odd difference
   leaves the canvas one pixel short and the last tile row or column 335 px;
4. **tile** into 336×336 crops, row-major, and resize each tile to 336×336 (a no-op for full tiles;
   PIL returns an untouched copy); no global thumbnail tile;
5. each tile becomes 24×24 patches of 14 px (C×P×P flattened, as SOLO's) with the tile's position table;
6. the tiles' patch grids are reassembled into one ``(tiles_h·24) × (tiles_w·24)`` grid, **unpadded** (the
   model's rule: the rows or columns that show the padding are cropped, ``⌊(current − new)/2⌋`` from both
   ends, ``new = int(round(original · scale, 7))``), and one newline token follows each of its rows.

An image therefore takes ``H'·W' + H'`` tokens (:func:`num_image_tokens`). The released model would
bilinearly downscale grids larger than ``anyres_max · 576 · 1.21`` patches; with the default 336 grid (at
most 6 tiles = 3456 < 4181 patches) that never happens, and here it is an error (:class:`AnyresConfig`
refuses pinpoints that could reach it).

One discrepancy of the release is not copied: its processor counts placeholders with ``int(x)`` where the
model crops with ``int(round(x, 7))``; when ``x`` lies a hair below an integer the release fails its own
assert. Here the count is always that of the model's crop (:func:`anyres_grid` is the one rule).

All functions are pure numpy/PIL. Pinpoints and sizes are ``(height, width)`` as in the release.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from megatron.solo.image import ImageConfig, normalize_patches, patchify_uint8

TILE_SIZE = 336
PATCH_SIZE = 14
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# The released model config's 14 pinpoints, (height, width), at most 6 tiles (spec §3.1).
DEFAULT_PINPOINTS: tuple[tuple[int, int], ...] = (
    (336, 336),
    (336, 672),
    (336, 1008),
    (336, 1344),
    (336, 1680),
    (336, 2016),
    (672, 336),
    (672, 672),
    (672, 1008),
    (1008, 336),
    (1008, 672),
    (1344, 336),
    (1680, 336),
    (2016, 336),
)


def _require(condition: bool, field_name: str, message: str) -> None:
    if not condition:
        raise ValueError(f"AnyresConfig.{field_name}: {message}")


@dataclass(frozen=True, kw_only=True)
class AnyresConfig:
    """Tiling settings; defaults are the released model's (336-px tiles, 14-px patches, the 14 pinpoints,
    ``anyres_max_6``, OpenAI-CLIP normalisation)."""

    tile_size: int = TILE_SIZE
    patch_size: int = PATCH_SIZE
    pinpoints: tuple[tuple[int, int], ...] = DEFAULT_PINPOINTS
    anyres_max: int = 6
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    image_config: ImageConfig = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name in ("tile_size", "patch_size", "anyres_max"):
            value = getattr(self, name)
            _require(isinstance(value, int) and value > 0, name, f"must be a positive int, got {value!r}")
        _require(
            self.tile_size % self.patch_size == 0,
            "tile_size",
            f"{self.tile_size} is not a multiple of patch_size={self.patch_size}",
        )
        pinpoints = tuple(tuple(int(v) for v in p) for p in self.pinpoints)
        object.__setattr__(self, "pinpoints", pinpoints)
        _require(len(pinpoints) > 0, "pinpoints", "must not be empty")
        side = self.positions_per_side
        for h, w in pinpoints:
            _require(
                h > 0 and w > 0 and h % self.tile_size == 0 and w % self.tile_size == 0,
                "pinpoints",
                f"({h}, {w}) is not a positive multiple of tile_size={self.tile_size} on both sides",
            )
            # The released model would downscale a grid above this (sqrt(area / (N·side²)) > 1.1); refuse the
            # pinpoints that could produce one rather than reproduce an interpolation nobody trained with.
            patches = (h // self.patch_size) * (w // self.patch_size)
            _require(
                math.sqrt(patches / (self.anyres_max * side * side)) <= 1.1,
                "pinpoints",
                f"({h}, {w}) gives up to {patches} patches, above anyres_max={self.anyres_max}'s downscale threshold",
            )
        config = ImageConfig(patch_size=self.patch_size, max_size=self.tile_size, mean=self.mean, std=self.std)
        object.__setattr__(self, "image_config", config)

    @property
    def positions_per_side(self) -> int:
        """Patches along a tile's side: 24; the position table has ``positions_per_side²`` = 576 entries."""
        return self.tile_size // self.patch_size

    @property
    def positions_per_tile(self) -> int:
        return self.positions_per_side**2

    @property
    def patch_dim(self) -> int:
        return 3 * self.patch_size * self.patch_size


DEFAULT_ANYRES = AnyresConfig()


def select_best_resolution(height: int, width: int, pinpoints) -> tuple[int, int]:
    """The pinpoint ``(h, w)`` that keeps the most pixels of an image of ``(height, width)``.

    Effective pixels = ``min(int(width·s)·int(height·s), width·height)`` with ``s = min(w/width, h/height)``;
    ties go to the least waste ``h·w − effective``, then to the earlier pinpoint.
    """
    _check_size(height, width)
    best, best_effective, best_waste = None, 0, math.inf
    for h, w in pinpoints:
        scale = min(w / width, h / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        waste = w * h - effective
        if effective > best_effective or (effective == best_effective and waste < best_waste):
            best, best_effective, best_waste = (h, w), effective, waste
    if best is None:
        raise ValueError(f"no pinpoint keeps any pixel of a {width}x{height} image: {list(pinpoints)}")
    return best


def resized_size(height: int, width: int, target: tuple[int, int]) -> tuple[int, int]:
    """``(new_h, new_w)``: the image scaled to fit ``target`` = (h, w), aspect kept (the released rule)."""
    th, tw = target
    scale_w, scale_h = tw / width, th / height
    if scale_w < scale_h:
        return min(math.ceil(height * scale_w), th), tw
    return th, min(math.ceil(width * scale_h), tw)


@dataclass(frozen=True)
class AnyresGrid:
    """Where an image's tokens come from: a ``tiles_h × tiles_w`` tiling whose ``(tiles_h·side) ×
    (tiles_w·side)`` patch grid is cropped to ``rows × cols`` starting at patch ``(top, left)``."""

    tiles_h: int
    tiles_w: int
    side: int
    rows: int
    cols: int
    top: int
    left: int

    @property
    def num_tiles(self) -> int:
        return self.tiles_h * self.tiles_w

    @property
    def num_patches(self) -> int:
        """Patch tokens in the sequence (after unpadding): ``H'·W'``."""
        return self.rows * self.cols

    @property
    def num_tokens(self) -> int:
        """Sequence positions of the image: ``H'·W' + H'`` (one newline per row)."""
        return self.rows * self.cols + self.rows


def anyres_grid(height: int, width: int, config: AnyresConfig = DEFAULT_ANYRES) -> AnyresGrid:
    """The tiling and unpadded patch grid of an image of original ``(height, width)`` (closed form)."""
    bh, bw = select_best_resolution(height, width, config.pinpoints)
    side = config.positions_per_side
    tiles_h, tiles_w = bh // config.tile_size, bw // config.tile_size
    grid_h, grid_w = tiles_h * side, tiles_w * side
    top = left = 0
    rows, cols = grid_h, grid_w
    if width / height > grid_w / grid_h:  # wider than the grid: padding rows at top and bottom
        new_h = int(round(height * (grid_w / width), 7))
        top = (grid_h - new_h) // 2
        rows = grid_h - 2 * top
    else:
        new_w = int(round(width * (grid_h / height), 7))
        left = (grid_w - new_w) // 2
        cols = grid_w - 2 * left
    return AnyresGrid(tiles_h, tiles_w, side, rows, cols, top, left)


def num_image_tokens(height: int, width: int, config: AnyresConfig = DEFAULT_ANYRES) -> int:
    """Sequence positions an image of original ``(height, width)`` takes: ``H'·W' + H'``."""
    return anyres_grid(height, width, config).num_tokens


@dataclass(frozen=True)
class ImageLayout:
    """Per image token, in sequence order (each int64/bool ``[n_tokens]``):

    - ``is_newline``: the token is the row's newline embedding (no patch, no teacher target);
    - ``tile``: the tile the patch comes from (-1 at newlines);
    - ``position``: its entry of the per-tile position table, ``y·side + x`` (-1 at newlines);
    - ``patch``: its row in :func:`tile_patches`' tile-major array, ``tile·side² + position`` (-1 at newlines);
      also the row of the teacher's per-tile features flattened the same way;

    and ``num_tiles``, the image's tile count (a sliver's crop can leave tiles with no token).
    """

    is_newline: np.ndarray
    tile: np.ndarray
    position: np.ndarray
    patch: np.ndarray
    num_tiles: int

    def __len__(self) -> int:
        return len(self.is_newline)


def image_layout(grid: AnyresGrid) -> ImageLayout:
    """The per-token layout of ``grid``: rows of the unpadded grid, row-major, each ending in a newline."""
    r = np.arange(grid.rows)[:, None] + grid.top  # rows/cols of the full (padded) patch grid
    c = np.arange(grid.cols)[None, :] + grid.left
    tile = (r // grid.side) * grid.tiles_w + c // grid.side
    position = (r % grid.side) * grid.side + c % grid.side
    newline = np.full((grid.rows, 1), -1)

    def with_newlines(values: np.ndarray) -> np.ndarray:
        return np.concatenate([values, newline], axis=1).reshape(-1).astype(np.int64)

    tile, position = with_newlines(tile), with_newlines(position)
    is_newline = tile < 0
    patch = np.where(is_newline, -1, tile * grid.side * grid.side + position)
    return ImageLayout(is_newline, tile, position, patch, grid.num_tiles)


# --- pixels ------------------------------------------------------------------------------------------


def image_tiles(img: Image.Image, config: AnyresConfig = DEFAULT_ANYRES) -> np.ndarray:
    """An RGB image → uint8 ``[tiles_h·tiles_w, T, T, 3]`` tiles, row-major (steps 1–4 of the module doc)."""
    if img.mode != "RGB":
        raise ValueError(f"image must be RGB, got mode {img.mode!r} (convert it first)")
    width, height = img.size
    target = select_best_resolution(height, width, config.pinpoints)
    new_h, new_w = resized_size(height, width, target)
    resized = np.asarray(img.resize((new_w, new_h), Image.Resampling.BICUBIC))
    pad_y, pad_x = (target[0] - new_h) // 2, (target[1] - new_w) // 2
    canvas = np.pad(resized, ((pad_y, pad_y), (pad_x, pad_x), (0, 0)))  # may be 1 px short of target
    t = config.tile_size
    tiles = []
    for y in range(0, canvas.shape[0], t):
        for x in range(0, canvas.shape[1], t):
            tile = Image.fromarray(canvas[y : y + t, x : x + t])
            tiles.append(np.asarray(tile.resize((t, t), Image.Resampling.BICUBIC)))
    expected = (target[0] // t) * (target[1] // t)
    if len(tiles) != expected:  # cannot happen for tile-multiple pinpoints; a guard for the invariant
        raise AssertionError(f"{len(tiles)} tiles for a {target} canvas")
    return np.stack(tiles)


def tile_patches(tiles: np.ndarray, config: AnyresConfig = DEFAULT_ANYRES) -> np.ndarray:
    """uint8 ``[n, T, T, 3]`` → uint8 ``[n·side², 3·P·P]``: tile-major, each tile's patches row-major, each
    patch flattened C×P×P (so CLIP's conv weight ``[out, 3, P, P].reshape(out, -1)`` applies directly)."""
    if tiles.ndim != 4 or tiles.shape[1:] != (config.tile_size, config.tile_size, 3) or tiles.dtype != np.uint8:
        raise ValueError(
            f"tiles must be uint8 [n, {config.tile_size}, {config.tile_size}, 3], got {tiles.dtype} {tiles.shape}"
        )
    return np.concatenate([patchify_uint8(t, config.patch_size) for t in tiles]) if len(tiles) else _no_patches(config)


def _no_patches(config: AnyresConfig) -> np.ndarray:
    return np.zeros((0, config.patch_dim), np.uint8)


def normalize_tile_patches(patches: np.ndarray, config: AnyresConfig = DEFAULT_ANYRES) -> np.ndarray:
    """uint8 patches → float32 ``(x/255 − mean)/std`` with the CLIP mean/std."""
    return normalize_patches(patches, config.image_config)


def patches_to_tiles(patches: np.ndarray, config: AnyresConfig = DEFAULT_ANYRES) -> np.ndarray:
    """Inverse of :func:`tile_patches` (numpy or torch, any dtype): ``[n·side², 3·P·P]`` → ``[n, 3, T, T]``,
    channels first as CLIP's pixel input."""
    side, p = config.positions_per_side, config.patch_size
    if patches.ndim != 2 or patches.shape[1] != config.patch_dim or patches.shape[0] % (side * side):
        raise ValueError(f"patches must be [n·{side * side}, {config.patch_dim}], got {patches.shape}")
    n = patches.shape[0] // (side * side)
    grid = patches.reshape(n, side, side, 3, p, p)  # [tile, y, x, c, py, px]
    order = (0, 3, 1, 4, 2, 5)
    grid = grid.permute(order) if hasattr(grid, "permute") else grid.transpose(order)  # torch or numpy
    return grid.reshape(n, 3, side * p, side * p)


def _check_size(height: int, width: int) -> None:
    if not (
        isinstance(height, (int, np.integer)) and isinstance(width, (int, np.integer)) and height > 0 and width > 0
    ):
        raise ValueError(f"image size must be positive ints (height, width), got ({height!r}, {width!r})")
