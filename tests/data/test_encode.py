"""Sample → Document: templates, loss targets, EOS policy, image encoding and image-level skips."""

import base64
import io

import numpy as np
import pytest
from data_helpers import psnr
from PIL import Image

from megatron.solo import image as im
from megatron.solo.data import codec
from megatron.solo.data.encode import EncodeConfig, encode_sample
from megatron.solo.data.errors import Origin, SampleError
from megatron.solo.data.samples import ImageRef, Sample, Turn

ORIGIN = Origin("in.jsonl", line=9)
PNG = EncodeConfig(image_format="png")


def doc_of(turns, tokenizer, config=PNG):
    return encode_sample(Sample(tuple(Turn(r, tuple(p)) for r, p in turns), ORIGIN), tokenizer, config)


def assemble(pieces):
    """[(ids, target)] → (tokens, targets) as the documented layout says."""
    tokens = [i for ids, _ in pieces for i in ids]
    targets = [t for ids, t in pieces for _ in ids]
    return tokens, targets


def test_caption_document_matches_front_end(tokenizer, small_photos, front_end):
    photo = small_photos[0]
    doc = doc_of([("assistant", [ImageRef(str(photo)), "A small photo."])], tokenizer)
    image_ids, patches = front_end(photo)
    tokens, targets = assemble(
        [([1], False), (image_ids, False), (tokenizer.encode("A small photo."), True), ([2], True)]
    )
    assert doc.tokens.tolist() == tokens and doc.targets.tolist() == targets
    (image,) = doc.images
    assert (image.position, image.num_tokens) == (1, len(image_ids))
    assert doc.tokens[image.position] == tokenizer.vision_start_id
    pixels = codec.decode_image(image.data, image.codec, image.n_cols * 32, image.n_rows * 32)
    np.testing.assert_array_equal(im.normalize_patches(im.patchify_uint8(pixels)), patches)  # png: bit-exact


def test_mistral_template_multi_turn(tokenizer, small_photos, front_end):
    photo = ImageRef(str(small_photos[1]))
    doc = doc_of(
        [
            ("system", ["Be brief."]),
            ("user", [photo, "What is it?"]),
            ("assistant", ["A rocket."]),
            ("user", ["Colour?"]),
            ("assistant", ["White."]),
        ],
        tokenizer,
    )
    enc = tokenizer.encode
    tokens, targets = assemble(
        [
            ([1], False),
            (enc("[INST]"), False),
            (enc("Be brief."), False),
            (front_end(photo.source)[0], False),
            (enc("What is it?"), False),
            (enc("[/INST]"), False),
            (enc("A rocket."), True),
            ([2], True),
            (enc("[INST]"), False),
            (enc("Colour?"), False),
            (enc("[/INST]"), False),
            (enc("White."), True),
            ([2], True),
        ]
    )
    assert doc.tokens.tolist() == tokens and doc.targets.tolist() == targets
    # the markers tokenize exactly as the joined Mistral-instruct string does
    joined = enc("[INST] Colour? [/INST]")
    assert joined == enc("[INST]") + enc("Colour?") + enc("[/INST]")


def test_plain_template_is_the_references_concatenation(tokenizer):
    config = EncodeConfig(chat_template="plain")
    doc = doc_of([("user", ["Question?"]), ("assistant", ["Answer."]), ("user", ["More?"])], tokenizer, config)
    enc = tokenizer.encode
    tokens, targets = assemble(
        [([1], False), (enc("Question?"), False), (enc("Answer."), True), (enc("More?"), False), ([2], False)]
    )  # EOS after a non-target token is not a target
    assert doc.tokens.tolist() == tokens and doc.targets.tolist() == targets


def test_system_turn_without_user_and_no_append_eod(tokenizer):
    config = EncodeConfig(append_eod=False)
    doc = doc_of([("system", ["Rules."]), ("assistant", ["Hello."])], tokenizer, config)
    enc = tokenizer.encode
    assert doc.tokens.tolist() == [1] + enc("[INST]") + enc("Rules.") + enc("[/INST]") + enc("Hello.")
    assert doc.targets.sum() == len(enc("Hello."))
    trailing = doc_of([("assistant", ["Hi."]), ("system", ["Note."])], tokenizer)
    assert trailing.tokens.tolist() == [1] + enc("Hi.") + [2] + enc("[INST]") + enc("Note.") + enc("[/INST]") + [2]
    assert trailing.targets.tolist()[-1] is False


def test_text_document_all_targets_except_bos(tokenizer):
    text = "Line one.\n\n  Line two with   spaces.\n"
    doc = doc_of([("assistant", [text])], tokenizer)
    assert doc.tokens.tolist() == tokenizer.encode(text, bos=True, eos=True)
    assert doc.targets.tolist() == [False] + [True] * (len(doc) - 1)
    assert tokenizer.decode(doc.tokens.tolist()) == text


def test_nothing_to_learn_is_refused(tokenizer, small_photos):
    for turns in ([("user", ["Only a question."])], [("assistant", [ImageRef(str(small_photos[0]))])]):
        with pytest.raises(SampleError, match="in.jsonl:9") as e:
            doc_of(turns, tokenizer)
        assert e.value.reason == "no_targets"


def _png(size, color=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return buf.getvalue()


def test_slivers_by_aspect_distortion(tokenizer):
    ok = doc_of([("assistant", [ImageRef(_png((1000, 10))), "banner"])], tokenizer)  # 100:1 → 32:1, 3.1x
    assert (ok.images[0].n_rows, ok.images[0].n_cols) == (1, 32)
    with pytest.raises(SampleError, match=r"400x4 image would become 416x32.*limit 4x") as e:
        doc_of([("assistant", [ImageRef(_png((400, 4))), "thin"])], tokenizer)
    assert e.value.reason == "sliver"
    lenient = EncodeConfig(image_format="png", max_aspect_distortion=None)
    assert doc_of([("assistant", [ImageRef(_png((5000, 4))), "thin"])], tokenizer, lenient).images[0].n_rows == 1
    # uniform upscaling of small images and rounding of ordinary sizes are not slivers
    for size in [(10, 10), (33, 64), (640, 20), (1, 1)]:
        doc_of([("assistant", [ImageRef(_png(size)), "fine"])], tokenizer)


def test_image_failures_keep_the_front_ends_reason(tokenizer, small_photos, tmp_path):
    jpeg = small_photos[5].read_bytes()
    (tmp_path / "empty.jpg").write_bytes(b"")
    cases = {
        "missing_file": str(tmp_path / "gone.jpg"),
        "empty_file": str(tmp_path / "empty.jpg"),
        "corrupt_image": b"this is not an image" * 8,
        "truncated_image": jpeg[: len(jpeg) // 2],
        "bad_data_url": "data:image/png;base64,@@@not-base64@@@",
    }
    for reason, source in cases.items():
        with pytest.raises(SampleError) as e:
            doc_of([("assistant", [ImageRef(source), "caption"])], tokenizer)
        assert e.value.reason == reason, (reason, e.value)
        assert e.value.origin == ORIGIN
    bomb = EncodeConfig(image=im.ImageConfig(max_pixels=1000))
    with pytest.raises(SampleError) as e:
        doc_of([("assistant", [ImageRef(_png((100, 100))), "big"])], tokenizer, bomb)
    assert e.value.reason == "decompression_bomb"


def test_data_url_images(tokenizer):
    url = "data:image/png;base64," + base64.b64encode(_png((64, 32))).decode()
    doc = doc_of([("user", [ImageRef(url), "What colour?"]), ("assistant", ["Red."])], tokenizer)
    assert (doc.images[0].n_rows, doc.images[0].n_cols) == (1, 2)


@pytest.mark.parametrize("fmt", codec.LOSSLESS)
def test_lossless_codecs_are_bit_exact(fmt, sample_photos):
    img, _ = im.load_and_resize(sample_photos[0])
    data = codec.encode_image(img, fmt)
    np.testing.assert_array_equal(codec.decode_image(data, codec.CODECS[fmt], img.width, img.height), np.asarray(img))
    assert codec.encode_image(img, fmt) == data  # deterministic


def test_lossy_codecs_close_and_compact(sample_photos):
    """Measured on the real photos at their native sizes: jpeg q92 4:4:4 ≥ 39 dB, max error ≤ 35 levels,
    ≤ 400 B/patch each (338 on average over nine skimage photos); webp is smaller still."""
    sizes = {"jpeg": [], "webp": []}
    for photo in sample_photos[:4]:
        img, _ = im.load_and_resize(photo)
        patches = img.width * img.height // 1024
        for fmt in sizes:
            data = codec.encode_image(img, fmt)
            back = codec.decode_image(data, codec.CODECS[fmt], img.width, img.height)
            assert psnr(back, np.asarray(img)) > 38, (photo.name, fmt)
            if fmt == "jpeg":
                assert np.abs(back.astype(int) - np.asarray(img)).max() <= 40, photo.name
            sizes[fmt].append(len(data) / patches)
    assert max(sizes["jpeg"]) <= 400, sizes
    assert np.mean(sizes["webp"]) < np.mean(sizes["jpeg"]), sizes


def test_decode_rejects_wrong_sizes():
    img = Image.new("RGB", (64, 32))
    with pytest.raises(ValueError, match="64x32, expected 32x64"):
        codec.decode_image(codec.encode_image(img, "png"), codec.CODECS["png"], 32, 64)
    with pytest.raises(ValueError, match="raw image"):
        codec.decode_image(b"\0" * 10, codec.CODECS["raw"], 32, 32)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"image_format": "gif"}, "image_format"),
        ({"image_quality": 0}, "image_quality"),
        ({"chat_template": "chatml"}, "chat_template"),
        ({"max_aspect_distortion": 0.5}, "max_aspect_distortion"),
    ],
)
def test_encode_config_validation_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"EncodeConfig.{field}"):
        EncodeConfig(**kwargs)


def test_document_cuts_never_split_an_image(tokenizer):
    doc = doc_of([("assistant", ["Before.", ImageRef(_png((64, 64))), "After the image."])], tokenizer)
    start = doc.images[0].position
    end = start + doc.images[0].num_tokens
    assert doc.cut_allowed(start) and doc.cut_allowed(end) and not doc.cut_allowed(start + 1)
    head, tail = doc.head(end), doc.tail(end)
    assert len(head.images) == 1 and tail.images == () and tail.continuation
    assert np.concatenate([head.tokens, tail.tokens]).tolist() == doc.tokens.tolist()
    moved = doc.tail(start)
    assert moved.images[0].position == 0 and moved.tokens[0] == tokenizer.vision_start_id
    with pytest.raises(AssertionError):
        doc.head(start + 2)
