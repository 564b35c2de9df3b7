"""The image front end: size rule, decoding of every mode, patch order, errors."""

import base64
import io
import math
import struct
import zlib

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from megatron.solo import image as im
from megatron.solo.image import ImageConfig, ImageError

P = 32


def reference_target_size(width, height):
    """Literal transcription of the reference rule (float division, int(), math.ceil); may return 0."""
    if width >= height:
        new_long = min(math.ceil(width / P) * P, 1024)
        new_short = math.ceil(int(new_long * height / width) / P) * P
        return new_long, new_short
    new_long = min(math.ceil(height / P) * P, 1024)
    new_short = math.ceil(int(new_long * width / height) / P) * P
    return new_short, new_long


def encode(img: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


# --- size rule ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "size, expected",
    [
        ((640, 480), (640, 480)),
        ((1920, 1080), (1024, 576)),
        ((224, 224), (224, 224)),
        ((300, 2000), (160, 1024)),
        ((10, 10), (32, 32)),
        ((1023, 20), (1024, 32)),
        ((500, 375), (512, 384)),
        ((1000, 1000), (1024, 1024)),
        # slivers: the reference computes a 0-pixel side and crashes; we clamp to one patch
        ((5000, 4), (1024, 32)),
        ((4, 5000), (32, 1024)),
        ((1, 1), (32, 32)),
    ],
)
def test_target_size_examples(size, expected):
    assert im.target_size(*size) == expected


@given(st.integers(1, 8000), st.integers(1, 8000))
def test_target_size_equals_reference_rule(width, height):
    ref = reference_target_size(width, height)
    if 0 in ref:  # the reference's crash case, where we deliberately give one patch instead
        assert im.target_size(width, height) == tuple(s or P for s in ref)
    else:
        assert im.target_size(width, height) == ref


@given(st.integers(1, 8000), st.integers(1, 8000))
def test_target_size_properties(width, height):
    w, h = im.target_size(width, height)
    assert w % P == 0 and h % P == 0
    assert P <= w <= 1024 and P <= h <= 1024
    assert (w >= h) == (width >= height) or w == h  # orientation is kept


@given(st.integers(1, 32), st.integers(1, 32))
def test_aligned_sizes_are_kept_and_token_count_is_layout_length(tokenizer, cols, rows):
    width, height = cols * P, rows * P
    assert im.target_size(width, height) == (width, height)
    assert im.grid_size(width, height) == (rows, cols)
    ids = tokenizer.image_token_ids(width, height)
    assert im.num_image_tokens(width, height) == len(ids) == rows * cols + rows + 1


@given(st.integers(1, 6000), st.integers(1, 6000))
def test_num_image_tokens_equals_real_layout_for_any_size(tokenizer, width, height):
    assert im.num_image_tokens(width, height) == len(tokenizer.image_token_ids(width, height)) <= 1057


def test_image_config_validation_names_the_field():
    with pytest.raises(ValueError, match="ImageConfig.max_size"):
        ImageConfig(max_size=1000)
    with pytest.raises(ValueError, match="ImageConfig.patch_size"):
        ImageConfig(patch_size=0)
    with pytest.raises(ValueError, match="ImageConfig.std"):
        ImageConfig(std=(0.2, 0.0, 0.2))
    with pytest.raises(ValueError, match="ImageConfig.max_pixels"):
        ImageConfig(max_pixels=0)
    assert ImageConfig().patch_dim == 3072


# --- patch order and normalisation -------------------------------------------------------------


def test_patch_order_and_flatten_against_naive_loops():
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(3 * P, 2 * P, 3), dtype=np.uint8)  # 3 rows x 2 cols
    patches = im.patchify_uint8(pixels)
    assert patches.shape == (6, 3 * P * P)
    expected = np.zeros_like(patches)
    for i in range(3):
        for j in range(2):
            for c in range(3):
                for y in range(P):
                    for x in range(P):
                        expected[i * 2 + j, c * P * P + y * P + x] = pixels[i * P + y, j * P + x, c]
    np.testing.assert_array_equal(patches, expected)


def test_patches_bit_equal_to_reference_torch_pipeline():
    """ToTensor + Normalize + unfold/permute/view, exactly as the reference does it, in float32."""
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, size=(4 * P, 5 * P, 3), dtype=np.uint8)
    x = torch.from_numpy(pixels).permute(2, 0, 1).float().div(255)
    x = x.sub(torch.tensor(im.IMAGENET_MEAN).view(3, 1, 1)).div(torch.tensor(im.IMAGENET_STD).view(3, 1, 1))
    ref = x.unfold(1, P, P).unfold(2, P, P).permute(1, 2, 0, 3, 4).reshape(20, -1).numpy()
    ours = im.image_to_patches(Image.fromarray(pixels))
    assert ours.dtype == np.float32
    np.testing.assert_array_equal(ours, ref)


def test_unpatchify_inverts_patchify():
    rng = np.random.default_rng(2)
    pixels = rng.integers(0, 256, size=(2 * P, 3 * P, 3), dtype=np.uint8)
    np.testing.assert_array_equal(im.unpatchify(im.patchify_uint8(pixels), 2, 3), pixels)
    np.testing.assert_array_equal(im.unpatchify(im.image_to_patches(Image.fromarray(pixels)), 2, 3), pixels)
    with pytest.raises(ValueError, match="expected patches of shape"):
        im.unpatchify(im.patchify_uint8(pixels), 3, 3)


def test_patchify_rejects_unaligned_pixels():
    with pytest.raises(ValueError, match="multiples of 32"):
        im.patchify_uint8(np.zeros((33, 64, 3), np.uint8))


# --- real photos -------------------------------------------------------------------------------


def test_real_photos_decode_resize_and_patchify(sample_photos):
    for path in sample_photos:
        original = Image.open(path)
        result = im.process_image(path)
        w, h = im.target_size(*original.size)
        assert result.original_size == original.size
        assert (result.n_rows, result.n_cols) == (h // P, w // P)
        assert result.patches.shape == (result.n_rows * result.n_cols, 3072)
        assert result.num_tokens == im.num_image_tokens(*original.size)
        # Patches hold exactly the bilinear-resized RGB pixels (alpha composited on white).
        resized = np.asarray(im.to_rgb(original).resize((w, h), Image.Resampling.BILINEAR))
        np.testing.assert_array_equal(im.unpatchify(result.patches, result.n_rows, result.n_cols), resized)


def test_photo_as_jpeg_bytes_and_data_url(sample_photos):
    jpeg = encode(Image.open(sample_photos[0]).convert("RGB"), "JPEG", quality=90)
    from_bytes = im.process_image(jpeg)
    url = "data:image/jpeg;base64," + base64.b64encode(jpeg).decode()
    np.testing.assert_array_equal(im.process_image(url).patches, from_bytes.patches)
    np.testing.assert_array_equal(im.process_image(io.BytesIO(jpeg)).patches, from_bytes.patches)


# --- modes -------------------------------------------------------------------------------------


def _blend_on_white(rgb, alpha):
    return tuple(round((c * alpha + 255 * (255 - alpha)) / 255) for c in rgb)


def _palette_image(transparent_index=None):
    img = Image.new("P", (2, 1))
    img.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    img.putpixel((0, 0), 0)
    img.putpixel((1, 0), 1)
    if transparent_index is not None:
        img.info["transparency"] = transparent_index
    return img


MODE_CASES = {
    "1": (Image.new("1", (1, 1), 1), (255, 255, 255)),
    "L": (Image.new("L", (1, 1), 77), (77, 77, 77)),
    "RGB": (Image.new("RGB", (1, 1), (10, 20, 30)), (10, 20, 30)),
    "RGBX": (Image.new("RGBX", (1, 1), (10, 20, 30, 0)), (10, 20, 30)),
    "RGBA": (Image.new("RGBA", (1, 1), (255, 0, 0, 128)), _blend_on_white((255, 0, 0), 128)),
    "RGBA transparent": (Image.new("RGBA", (1, 1), (0, 0, 0, 0)), (255, 255, 255)),
    "LA": (Image.new("LA", (1, 1), (0, 64)), _blend_on_white((0, 0, 0), 64)),
    "RGBa premultiplied": (Image.new("RGBa", (1, 1), (100, 0, 0, 128)), _blend_on_white((199, 0, 0), 128)),
    "La premultiplied": (Image.new("La", (1, 1), (50, 100)), _blend_on_white((127, 127, 127), 100)),
    "CMYK": (
        Image.new("CMYK", (1, 1), (50, 100, 150, 60)),
        tuple(round((255 - v) * (255 - 60) / 255) for v in (50, 100, 150)),
    ),
    "I;16": (Image.new("I;16", (1, 1), 32896), (128, 128, 128)),
    "I;16B": (Image.new("I;16B", (1, 1), 65535), (255, 255, 255)),
    "I 16-bit values": (Image.new("I", (1, 1), 1028), (4, 4, 4)),
    "I 8-bit values": (Image.new("I", (1, 1), 200), (200, 200, 200)),
    "F in [0, 1]": (Image.new("F", (1, 1), 0.5), (128, 128, 128)),
    "F in [0, 255]": (Image.new("F", (1, 1), 200.0), (200, 200, 200)),
    "YCbCr": (Image.new("YCbCr", (1, 1), (128, 128, 128)), (128, 128, 128)),
    "HSV": (Image.new("HSV", (1, 1), (0, 0, 90)), (90, 90, 90)),
    "LAB": (Image.new("LAB", (1, 1), (255, 128, 128)), (255, 255, 255)),
}


@pytest.mark.parametrize("case", MODE_CASES)
def test_every_mode_converts_to_rgb(case):
    img, expected = MODE_CASES[case]
    rgb = im.to_rgb(img)
    assert rgb.mode == "RGB"
    np.testing.assert_allclose(np.asarray(rgb)[0, 0].astype(int), expected, atol=1)


def test_palette_with_and_without_transparency():
    assert np.asarray(im.to_rgb(_palette_image())).tolist() == [[[255, 0, 0], [0, 0, 255]]]
    assert np.asarray(im.to_rgb(_palette_image(transparent_index=1))).tolist() == [[[255, 0, 0], [255, 255, 255]]]
    pa = Image.new("PA", (1, 1))
    pa.putpalette([0, 255, 0] + [0] * 765)
    pa.putpixel((0, 0), (0, 0))
    assert np.asarray(im.to_rgb(pa)).tolist() == [[[255, 255, 255]]]


@pytest.mark.parametrize(
    "img, fmt",
    [
        (_palette_image(transparent_index=1), "PNG"),  # tRNS palette entry
        (Image.new("RGBA", (2, 1), (0, 0, 0, 0)), "PNG"),
        (Image.new("LA", (2, 1), (0, 0)), "PNG"),
        (Image.new("RGBA", (2, 1), (0, 0, 0, 0)), "WEBP"),
        (Image.new("P", (2, 1)), "GIF"),
    ],
)
def test_transparent_files_composite_on_white(img, fmt):
    if fmt == "GIF":
        img.info["transparency"] = 0
    loaded = im.load_image(encode(img, fmt, **({"lossless": True} if fmt == "WEBP" else {})))
    assert np.asarray(loaded)[0, -1].tolist() == [255, 255, 255]


@pytest.mark.parametrize("mode, key, kept", [("RGB", (0, 0, 0), (9, 9, 9)), ("L", 0, 9)])
def test_png_with_transparent_color_key(mode, key, kept):
    img = Image.new(mode, (2, 1), key)
    img.putpixel((0, 0), kept)
    loaded = im.load_image(encode(img, "PNG", transparency=key))
    assert np.asarray(loaded).tolist() == [[[9, 9, 9], [255, 255, 255]]]


@pytest.mark.parametrize(
    "img",
    [
        Image.new("1", (2, 1), 0),
        Image.fromarray(np.zeros((1, 2), np.uint16)),  # opens as I;16
    ],
    ids=["1-bit", "16-bit"],
)
def test_grey_png_colour_key_for_every_bit_depth(img):
    img.putpixel((0, 0), 1 if img.mode == "1" else 40000)
    loaded = np.asarray(im.load_image(encode(img, "PNG", transparency=0)))
    assert loaded[0, 1].tolist() == [255, 255, 255]  # the key: transparent → white
    assert loaded[0, 0].tolist() == ([255] * 3 if img.mode == "1" else [156] * 3)  # 40000·255/65535


def test_rgba_palette_and_rgba_input_to_patches():
    rgba = Image.new("RGBA", (32, 32), (0, 0, 0, 0))
    quantized = rgba.quantize()  # P with an RGBA palette, in memory
    assert np.asarray(im.to_rgb(quantized))[0, 0].tolist() == [255, 255, 255]
    patches = im.image_to_patches(rgba)
    assert im.unpatchify(patches, 1, 1)[0, 0].tolist() == [255, 255, 255]


def test_16bit_png_file_is_rescaled_not_clipped():
    values = np.array([[0, 257 * 64, 65535]], dtype=np.uint16)
    loaded = im.load_image(encode(Image.fromarray(values)))
    assert np.asarray(loaded)[0, :, 0].tolist() == [0, 64, 255]


def test_cmyk_jpeg_file():
    img = Image.new("CMYK", (8, 8), (0, 255, 255, 0))  # pure red
    r, g, b = np.asarray(im.load_image(encode(img, "JPEG", quality=100)))[4, 4].astype(int)
    assert r > 240 and g < 15 and b < 15


# --- EXIF orientation --------------------------------------------------------------------------


EXIF_ORIENTATIONS = {  # EXIF 2.3 tag 0x0112, as numpy operations on [H, W, C]
    1: lambda a: a,
    2: lambda a: a[:, ::-1],  # mirror left-right
    3: lambda a: a[::-1, ::-1],  # rotate 180
    4: lambda a: a[::-1],  # mirror top-bottom
    5: lambda a: a.transpose(1, 0, 2),  # transpose
    6: lambda a: np.rot90(a, k=-1),  # rotate 90 clockwise
    7: lambda a: a[::-1, ::-1].transpose(1, 0, 2),  # transverse
    8: lambda a: np.rot90(a, k=1),  # rotate 90 counter-clockwise
}


@pytest.mark.parametrize("orientation", EXIF_ORIENTATIONS)
def test_exif_orientation_is_applied(orientation):
    pixels = np.zeros((32, 64, 3), np.uint8)  # four quadrants of four colours: no two transforms agree
    pixels[:16, :32], pixels[:16, 32:] = (255, 0, 0), (0, 255, 0)
    pixels[16:, :32], pixels[16:, 32:] = (0, 0, 255), (255, 255, 0)
    img = Image.fromarray(pixels)
    exif = img.getexif()
    exif[0x0112] = orientation
    loaded = np.asarray(im.load_image(encode(img, "PNG", exif=exif)))
    np.testing.assert_array_equal(loaded, EXIF_ORIENTATIONS[orientation](pixels))


# --- bad input ---------------------------------------------------------------------------------


def _png_header_claiming(width, height) -> bytes:
    """A PNG whose IHDR claims (width, height) and whose pixel data is absent: only the header is valid."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"") + chunk(b"IEND", b"")


def test_bomb_refused_by_configurable_limit(tmp_path):
    path = tmp_path / "big.png"
    path.write_bytes(encode(Image.new("RGB", (64, 64))))
    with pytest.raises(ImageError, match=r"big\.png.*4096 pixels exceeds max_pixels=1000") as err:
        im.load_image(path, max_pixels=1000)
    assert err.value.reason == "decompression_bomb"
    with pytest.raises(ImageError, match="decompression bomb"):
        im.process_image(path, ImageConfig(max_pixels=1000))
    assert im.load_image(path, max_pixels=4096).size == (64, 64)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # Pillow warns, we refuse
def test_bomb_refused_before_decoding(tmp_path):
    # 100 M pixels: above our default limit, below Pillow's hard one. The file holds no pixel data, so
    # decoding it would fail as a truncated image: only a check made from the header gives this error.
    path = tmp_path / "bomb.png"
    path.write_bytes(_png_header_claiming(10_000, 10_000))
    with pytest.raises(
        ImageError, match=r"bomb\.png: decompression bomb: 10000x10000 = 100000000 pixels exceeds"
    ) as err:
        im.load_image(path)
    assert err.value.reason == "decompression_bomb"
    with pytest.raises(ImageError) as err:
        im.load_image(path, max_pixels=None)
    assert err.value.reason == "truncated_image"


def test_truncated_data_refused_even_where_pillow_was_told_to_accept_it(tmp_path, monkeypatch):
    # lmms-eval's task module sets this process-wide flag at import; our loader must not inherit it
    from PIL import ImageFile

    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    path = tmp_path / "cut.png"
    path.write_bytes(_png_header_claiming(64, 64))
    with pytest.raises(ImageError) as err:
        im.load_image(path)
    assert err.value.reason == "truncated_image"
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # the caller's setting is left as it was


def test_pillow_hard_limit_still_applies(tmp_path):
    path = tmp_path / "huge.png"
    path.write_bytes(_png_header_claiming(40_000, 40_000))  # 1.6 G pixels in 57 bytes
    with pytest.raises(ImageError, match=r"huge\.png: decompression bomb: .*MAX_IMAGE_PIXELS") as err:
        im.load_image(path, max_pixels=None)
    assert err.value.reason == "decompression_bomb"


def test_image_error_survives_pickling():
    """Preprocessing workers send errors across processes; an unpicklable one hangs multiprocessing.Pool."""
    import pickle

    with pytest.raises(ImageError) as err:
        im.load_image(b"junk")
    copy = pickle.loads(pickle.dumps(err.value))
    assert (copy.reason, copy.source, str(copy)) == (err.value.reason, err.value.source, str(err.value))


def test_bad_files_raise_named_reasons(tmp_path):
    good = encode(Image.new("RGB", (64, 64), (1, 2, 3)), "JPEG")
    cases = {
        "missing_file": tmp_path / "nope.jpg",
        "empty_file": tmp_path / "empty.jpg",
        "corrupt_image": tmp_path / "garbage.jpg",
        "truncated_image": tmp_path / "truncated.jpg",
    }
    cases["empty_file"].write_bytes(b"")
    cases["corrupt_image"].write_bytes(b"this is not an image" * 10)
    cases["truncated_image"].write_bytes(good[: len(good) // 2])
    for reason, path in cases.items():
        with pytest.raises(ImageError) as err:
            im.load_image(path)
        assert err.value.reason == reason, (reason, str(err.value))
        assert str(path) in str(err.value)


def test_data_urls_as_lenient_as_the_reference():
    png = encode(Image.new("RGB", (8, 8), (1, 2, 3)))
    payload = base64.b64encode(png).decode()
    for url in [
        "data:image/png;base64," + base64.encodebytes(png).decode(),  # wrapped at 76 columns
        "data:image/png;base64," + payload + "\n",
        "DATA:image/png;BASE64," + payload,
        "data:image/jpeg;base64," + payload,  # the MIME type is not trusted, the bytes are
        "data:image/png," + payload,  # the reference always decodes base64
    ]:
        assert np.asarray(im.load_image(url))[0, 0].tolist() == [1, 2, 3]


def test_bad_data_urls():
    with pytest.raises(ImageError, match="bad data url") as err:
        im.load_image("data:image/png;base64,@@not-base64@@")
    assert err.value.reason == "bad_data_url"
    with pytest.raises(ImageError, match="bad data url"):
        im.load_image("data:image/png;base64")
    with pytest.raises(ImageError) as err:
        im.load_image(b"")
    assert err.value.reason == "empty_file"


# ---------------------------------------------------------------------------------------------
# Normalisation on the device: uint8 patches travel, torch normalises them like the numpy front end


@pytest.mark.parametrize(
    "config",
    [im.DEFAULT_CONFIG, im.ImageConfig(patch_size=14, max_size=1022, mean=(0.5, 0.4, 0.3), std=(0.26, 0.7, 0.11))],
)
def test_torch_normalisation_is_bit_identical_to_numpy(config):
    import torch

    rng = np.random.default_rng(0)
    raw = rng.integers(0, 256, (64, config.patch_dim), dtype=np.uint8)
    raw[0] = np.arange(config.patch_dim) % 256  # every value in every channel
    got = im.normalize_patches_torch(torch.from_numpy(raw), config)
    assert got.dtype == torch.float32 and got.shape == raw.shape
    np.testing.assert_array_equal(got.numpy().view(np.uint32), im.normalize_patches(raw, config).view(np.uint32))
    with pytest.raises(ValueError, match="uint8"):
        im.normalize_patches_torch(torch.zeros(1, config.patch_dim), config)


def test_uint8_patches_normalised_in_torch_equal_the_front_end(sample_photos):
    import torch

    resized, _ = im.load_and_resize(sample_photos[0])
    raw = im.patchify_uint8(np.asarray(resized))
    out = np.empty_like(raw)
    assert im.patchify_uint8(np.asarray(resized), out=out) is out and np.array_equal(out, raw)
    got = im.normalize_patches_torch(torch.from_numpy(raw)).numpy()
    np.testing.assert_array_equal(got.view(np.uint32), im.process_image(sample_photos[0]).patches.view(np.uint32))
