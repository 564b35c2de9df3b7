"""SoloProcessor: the ids and patches preprocessing makes, batched with left padding; chat template; remote load."""

import base64
import io
import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_models import random_mistral

from megatron.solo.convert.hf_export import write_hf_export
from megatron.solo.convert.hf_solo import SoloConfig
from megatron.solo.data.encode import EncodeConfig, encode_turns
from megatron.solo.data.errors import Origin
from megatron.solo.data.packed_format import decode_patches
from megatron.solo.data.samples import ImageRef, Turn
from megatron.solo.image import normalize_patches, process_image
from megatron.solo.inference import build_prompt

SOLO_VOCAB = 33029


@pytest.fixture(scope="module")
def export_dir(tokenizer, tmp_path_factory):
    model = random_mistral(SoloConfig, vocab_size=SOLO_VOCAB, vision_patch_size=32)
    out = tmp_path_factory.mktemp("export") / "solo-tiny"
    return write_hf_export(out, model.state_dict(), model.config, tokenizer, torch.float32)


@pytest.fixture(scope="module")
def processor(export_dir):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(export_dir)


def preprocessed(tokenizer, turns, template="plain", end_token="</vision>"):
    """(ids, normalised patches) as preprocessing encodes ``turns`` (images stored losslessly), no final EOS."""
    config = EncodeConfig(image_format="raw", chat_template=template, append_eod=False, max_aspect_distortion=None)
    tokens, _, images = encode_turns(tuple(turns), tokenizer, config, Origin("<test>"))
    tokens = tokens.astype(np.int64)
    if end_token == "<vision>":  # the quirk: each image's closer (at its last position) becomes <vision>
        for im in images:
            tokens[im.position + im.num_tokens - 1] = tokenizer.vision_start_id
    return tokens.tolist(), normalize_patches(decode_patches(images, 32))


def unpadded(batch, row):
    keep = batch["attention_mask"][row].bool()
    return batch["input_ids"][row][keep].tolist(), batch["vision_patch_indices"][row][keep]


def test_one_image_and_text_is_the_pretraining_prompt(processor, tokenizer, sample_photos):
    for photo in sample_photos[:4]:
        out = processor(images=str(photo), text="What is in the image?")
        prompt = build_prompt(tokenizer, [photo], "What is in the image?")
        assert out["input_ids"][0].tolist() == prompt.tokens.tolist(), photo
        assert torch.equal(out["vision_patches"], torch.from_numpy(normalize_patches(prompt.patches)))
        np.testing.assert_array_equal(out["vision_patches"].numpy(), process_image(photo).patches)
        index = out["vision_patch_indices"][0]
        assert (index >= 0).nonzero().flatten().tolist() == prompt.patch_positions.tolist()
        assert index[index >= 0].tolist() == list(range(len(prompt.patches)))
        assert out["attention_mask"].all()


def test_chat_template_gives_the_instruction_documents_ids(processor, tokenizer, sample_photos):
    a, b = str(sample_photos[0]), str(sample_photos[1])
    messages = [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": [{"type": "image", "image": a}, {"type": "text", "text": "What is it?"}]},
        {"role": "assistant", "content": "A person."},
        {"role": "user", "content": [{"type": "text", "text": "And this?"}, {"type": "image", "path": b}]},
    ]
    text = processor.apply_chat_template(messages)
    assert text == "<s>[INST] Answer briefly. <image> What is it? [/INST] A person.</s>[INST] And this? <image> [/INST]"
    out = processor.apply_chat_template(messages, tokenize=True)
    turns = [
        Turn("system", ("Answer briefly.",)),
        Turn("user", (ImageRef(a), "What is it?")),
        Turn("assistant", ("A person.",)),
        Turn("user", ("And this?", ImageRef(b))),
    ]
    ids, patches = preprocessed(tokenizer, turns, template="mistral")
    assert out["input_ids"][0].tolist() == ids
    assert torch.equal(out["vision_patches"], torch.from_numpy(patches))
    # the generation prompt of build_prompt(template="mistral") too, and images given apart from the messages
    one = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe."}]}]
    out = processor.apply_chat_template(one, tokenize=True, images=[a])
    assert out["input_ids"][0].tolist() == build_prompt(tokenizer, [a], "Describe.", template="mistral").tokens.tolist()


def test_mixed_batch_is_left_padded_and_each_row_is_its_sample_alone(processor, tokenizer, sample_photos):
    photos = [str(p) for p in sample_photos[:3]]
    texts = ["A photo of", "Two plus two is", "<image> differs from <image> in"]
    images = [[photos[0]], [], [photos[1], photos[2]]]
    batch = processor(images=images, text=texts)
    b, s = batch["input_ids"].shape
    assert b == 3 and batch["vision_patch_indices"].shape == (3, s)
    assert batch["vision_patches"].shape == (sum(len(process_image(p).patches) for p in photos), 3072)
    offset = 0
    for row, (text, row_images) in enumerate(zip(texts, images)):
        alone = processor(images=[row_images], text=text)
        ids, index = unpadded(batch, row)
        assert ids == alone["input_ids"][0].tolist()
        n = len(ids)
        assert batch["attention_mask"][row].tolist() == [0] * (s - n) + [1] * n  # left padding
        assert batch["input_ids"][row, : s - n].eq(tokenizer.pad_id).all()
        assert batch["vision_patch_indices"][row, : s - n].eq(-1).all()
        local = alone["vision_patch_indices"][0]
        assert torch.equal(index, torch.where(local >= 0, local + offset, local))  # global over the batch
        if row_images:
            assert torch.equal(batch["vision_patches"][index[index >= 0]], alone["vision_patches"])
        offset += len(alone["vision_patches"])
    turns = [Turn("user", (ImageRef(photos[1]), "differs from", ImageRef(photos[2]), "in"))]
    assert unpadded(batch, 2)[0] == preprocessed(tokenizer, turns)[0]
    assert unpadded(batch, 1)[0] == [tokenizer.bos_id] + tokenizer.encode("Two plus two is")
    right = processor(images=images, text=texts, padding_side="right")
    assert right["attention_mask"][1, 0] == 1 and right["attention_mask"][1, -1] == 0


def test_image_free_batch_and_flat_image_lists(processor, sample_photos):
    text_only = processor(text=["Hello", "A longer text prompt"])
    assert text_only["vision_patches"].shape == (0, 3072) and text_only["vision_patch_indices"].eq(-1).all()
    a, b = str(sample_photos[0]), str(sample_photos[1])
    nested = processor(images=[[a], [b]], text=["x", "y"])
    for flat in (processor(images=[a, b], text=["x", "y"]), processor(images=[a, b], text=["<image> x", "<image> y"])):
        assert torch.equal(flat["input_ids"], nested["input_ids"])
        assert torch.equal(flat["vision_patches"], nested["vision_patches"])
    with pytest.raises(ValueError, match="3 images for 2 <image> placeholders"):
        processor(images=[a, b, a], text=["<image> x", "<image> y"])
    with pytest.raises(ValueError, match="sample 0: its text has 2 <image> but 1 images"):
        processor(images=[[a]], text=["<image><image>"])
    with pytest.raises(ValueError, match="sample 1: image 1: .*identify"):
        processor(images=[[a], [b, b"not an image"]], text=["x", "y"])
    with pytest.raises(ValueError, match="sample 0: image 0: .*No such file"):
        processor(images="missing.png", text="x")


def test_every_image_source_and_mode_gives_preprocessings_patches(processor, sample_photos, tmp_path):
    photo = sample_photos[0]
    data = photo.read_bytes()
    url = "data:image/png;base64," + base64.b64encode(data).decode()
    want = processor(images=str(photo), text="")["vision_patches"]
    for source in (photo, data, url, Image.open(photo), io.BytesIO(data)):
        assert torch.equal(processor(images=source, text="")["vision_patches"], want), type(source)
    rng = np.random.default_rng(0)
    rgba = Image.fromarray(rng.integers(0, 256, (50, 70, 4), dtype=np.uint8), "RGBA")
    grey16 = Image.fromarray(rng.integers(0, 65535, (40, 33), dtype=np.uint16))
    rotated = Image.fromarray(rng.integers(0, 256, (30, 90, 3), dtype=np.uint8))
    exif = rotated.getexif()
    exif[0x0112] = 6  # rotate 90° on display
    rotated.save(tmp_path / "rotated.jpg", exif=exif)
    cases = [
        rgba,
        rgba.convert("P"),
        rgba.convert("LA"),
        grey16,
        tmp_path / "rotated.jpg",
        Image.open(photo).convert("L"),
    ]
    for image in cases:
        got = processor(images=image, text="")["vision_patches"].numpy()
        np.testing.assert_array_equal(got, process_image(image).patches)


def test_solo7b_image_end_quirk_is_a_config_field_and_a_call_switch(processor, tokenizer, export_dir, sample_photos):
    photo = str(sample_photos[2])
    turns = [Turn("user", (ImageRef(photo), "Caption:"))]
    default = processor(images=photo, text="Caption:")["input_ids"][0].tolist()
    assert default == preprocessed(tokenizer, turns)[0] and tokenizer.vision_end_id in default
    quirk = processor(images=photo, text="Caption:", image_end_token="<vision>")["input_ids"][0].tolist()
    assert quirk == preprocessed(tokenizer, turns, end_token="<vision>")[0] and tokenizer.vision_end_id not in quirk
    rows, cols = process_image(photo).n_rows, process_image(photo).n_cols
    assert quirk[1 : 1 + rows * cols + rows + 1] == tokenizer.image_layout_ids(rows, cols, end_token="<vision>")

    # the released demo's whole prompt (reference spec §8.1): the image block before BOS, closed by <vision>
    demo = processor(images=photo, text="<image><s>[INST] What is it? [/INST]", image_end_token="<vision>")
    layout = tokenizer.image_layout_ids(rows, cols, end_token="<vision>")
    assert demo["input_ids"][0].tolist() == layout + tokenizer.encode("[INST] What is it? [/INST]", bos=True)
    assert demo["vision_patch_indices"][0][: len(layout)].ge(0).sum() == rows * cols

    from transformers import AutoProcessor

    assert json.loads((export_dir / "processor_config.json").read_text())["image_end_token"] == "</vision>"
    released = AutoProcessor.from_pretrained(export_dir, image_end_token="<vision>")
    assert released(images=photo, text="Caption:")["input_ids"][0].tolist() == quirk
    with pytest.raises(ValueError, match="image_end_token"):
        processor(images=photo, text="x", image_end_token="<vpatch>")


def test_decode_drops_vision_ids_and_vision_text_stays_text(processor, tokenizer, sample_photos):
    batch = processor(images=[[str(sample_photos[0])], []], text=["a red circle", "<vision> is text"])
    assert processor.batch_decode(batch["input_ids"]) == ["a red circle", "<vision> is text"]
    with_specials = processor.batch_decode(batch["input_ids"], skip_special_tokens=False)
    assert not any(t in text for text in with_specials for t in ("<vpatch>", "<vrow_sep>", "</vision>"))
    row = unpadded(batch, 1)[0]
    assert row == [tokenizer.bos_id] + tokenizer.encode("<vision> is text")
    assert not set(row) & set(tokenizer.vision_token_ids)
    assert processor.decode(unpadded(batch, 0)[0]) == tokenizer.decode(unpadded(batch, 0)[0]).strip()


REMOTE_PROCESS = textwrap.dedent("""
    import importlib.abc, json, sys

    class BlockSoloMegatron(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "megatron.solo" or name.startswith("megatron.solo."):
                raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)")

    sys.meta_path.insert(0, BlockSoloMegatron())
    import torch
    from transformers import AutoProcessor

    export_dir, photo, out_path = sys.argv[1:]
    processor = AutoProcessor.from_pretrained(export_dir, trust_remote_code=True)
    messages = [[{"role": "user", "content": [{"type": "image", "image": photo}, {"type": "text", "text": "What?"}]}],
                [{"role": "user", "content": "Text only."}]]
    batch = processor.apply_chat_template(messages, tokenize=True)
    torch.save(dict(batch), out_path)
    print(json.dumps({"class": type(processor).__name__, "module": type(processor).__module__,
                      "solo_loaded": sorted(m for m in sys.modules if m.startswith("megatron.solo"))}))
""")


def test_processor_loads_as_remote_code_where_the_package_is_not_importable(
    export_dir, processor, sample_photos, tmp_path
):
    copy = shutil.copytree(export_dir, tmp_path / "elsewhere" / "export")
    (tmp_path / "remote.py").write_text(REMOTE_PROCESS)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HOME=str(tmp_path / "hf_home"), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    run = subprocess.run(
        [sys.executable, str(tmp_path / "remote.py"), str(copy), str(sample_photos[0]), str(tmp_path / "out.pt")],
        cwd=tmp_path,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert report["class"] == "SoloProcessor" and report["module"].startswith("transformers_modules.")
    assert report["solo_loaded"] == []
    got = torch.load(tmp_path / "out.pt")
    messages = [
        [
            {
                "role": "user",
                "content": [{"type": "image", "image": str(sample_photos[0])}, {"type": "text", "text": "What?"}],
            }
        ],
        [{"role": "user", "content": "Text only."}],
    ]
    want = processor.apply_chat_template(messages, tokenize=True)
    assert set(got) == {"input_ids", "attention_mask", "vision_patches", "vision_patch_indices"}
    for key in got:
        assert torch.equal(got[key], want[key]), key


def test_chat_with_a_tokenizer_json_base_is_preprocessings(sample_photos, tmp_path):
    """A tokenizer.json base (Llama-3-style: BOS/EOS are <|begin_of_text|>/<|end_of_text|>): the Mistral chat
    layout ends an answer with that EOS, and the processor gives preprocessing's ids."""
    from tiny_llama3 import llama3_tokenizer_dir

    from megatron.solo.convert.hf_solo import SoloProcessor
    from megatron.solo.convert.hf_tokenizer import build_hf_tokenizer
    from megatron.solo.tokenizer import SoloTokenizer

    llama3_tokenizer_dir(tmp_path)
    tokenizer = SoloTokenizer(tmp_path)
    processor = SoloProcessor(build_hf_tokenizer(tokenizer))
    photo = str(sample_photos[0])
    messages = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello there."},
        {"role": "user", "content": [{"type": "image", "image": photo}, {"type": "text", "text": "photo"}]},
    ]
    text = processor.apply_chat_template(messages)
    assert text == "<|begin_of_text|>[INST] Hi [/INST] Hello there.<|end_of_text|>[INST] <image> photo [/INST]"
    turns = [Turn("user", ("Hi",)), Turn("assistant", ("Hello there.",)), Turn("user", (ImageRef(photo), "photo"))]
    ids, patches = preprocessed(tokenizer, turns, template="mistral")
    out = processor.apply_chat_template(messages, tokenize=True)
    assert out["input_ids"][0].tolist() == ids and tokenizer.eos_id in ids
    assert torch.equal(out["vision_patches"], torch.from_numpy(patches))
