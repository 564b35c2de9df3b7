"""A Megatron HaploVL checkpoint → HF export in the released layout (``tools/convert_checkpoint.py megatron-to-hf``,
the family read from the checkpoint): in a process where ``megatron.solo`` cannot be imported, AutoProcessor turns
an image + text into exactly the ids and pixels our preprocessing (``--image-layout haplo``) stores, and
AutoModelForCausalLM (remote code) gives the Megatron ``HaploModel``'s logits on them and the greedy tokens of a
Megatron-side greedy loop."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "training"))
from test_training_haplo import preprocess  # noqa: E402

from megatron.solo import image as im  # noqa: E402

pytestmark = pytest.mark.timeout(600)
NEW_TOKENS = 4
CAPTION = "a photo of a cat"


def randomise(model, seed: int) -> None:
    """Every weight non-trivial (norms away from 1, biases and the newline non-zero): a wrong mapping shows."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1.0 + 0.1 * noise if "norm" in name and name.endswith("weight") else 0.05 * noise)


def haplo_checkpoint(root: Path, tokenizer, llm_bias: str = "none") -> Path:
    from megatron.solo.checkpointing import CheckpointMetadata, save_model
    from megatron.solo.families import build_model, get_preset
    from megatron.solo.model import make_transformer_config

    cfg = get_preset("haplo-tiny").replace(vocab_size=tokenizer.vocab_size, llm_bias=llm_bias)
    model = build_model(cfg, make_transformer_config(cfg, backend="local"), padded_vocab_size=cfg.padded_vocab_size())
    randomise(model, 5)
    tokenizer.save_pretrained(root)
    save_model(root, model, CheckpointMetadata(cfg, cfg.padded_vocab_size()))
    return root


@pytest.fixture(scope="module")
def megatron_ckpt(tmp_path_factory, megatron_world, tokenizer) -> Path:
    return haplo_checkpoint(tmp_path_factory.mktemp("haplo-mg"), tokenizer)


@pytest.fixture(scope="module")
def export(megatron_ckpt, tmp_path_factory) -> Path:
    from tools.convert_checkpoint import main

    out = tmp_path_factory.mktemp("haplo-hf") / "export"
    assert main(["megatron-to-hf", "--load", str(megatron_ckpt), "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def sample(tmp_path_factory, sample_photos):
    """(the photo, the loader's batch of its preprocessed caption sample: ids, patches, layout)."""
    from megatron.solo.training.dataset import BlendedPackDataset, build_train_loader

    root = tmp_path_factory.mktemp("haplo-sample")
    photo = root / "photo.png"
    im.load_image(sample_photos[1]).resize((90, 64)).save(photo)
    prefix = preprocess(root / "one", [{"image": photo.name, "caption": CAPTION}])
    loader = build_train_loader(
        BlendedPackDataset([(1.0, prefix)], num_samples=1, seed=0), seq_length=160, micro_batch_size=1,
        data_parallel_rank=0, data_parallel_size=1, consumed_samples=0, num_workers=0, pad_id=0,
        patch_dim=3 * 14 * 14,
    )  # fmt: skip
    return photo, next(iter(loader))


CLIENT = (
    textwrap.dedent("""
    import importlib.abc, json, sys

    class BlockSoloMegatron(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "megatron.solo" or name.startswith("megatron.solo."):
                raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)")

    sys.meta_path.insert(0, BlockSoloMegatron())
    import torch
    from transformers import AutoModelForCausalLM, AutoProcessor

    export_dir, photo, out_path, new_tokens = sys.argv[1:]
    processor = AutoProcessor.from_pretrained(export_dir, trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained(export_dir, trust_remote_code=True, dtype=torch.float32).eval()
    prompt = processor(images=photo, text="PROMPT")
    chat = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}]}, {"role": "assistant", "content": "CAPTION"}], tokenize=False
    )
    with torch.no_grad():
        logits = model(**prompt).logits
        out = model.generate(**prompt, max_new_tokens=int(new_tokens), do_sample=False)
    torch.save({"prompt": dict(prompt), "logits": logits, "generated": out}, out_path)
    print(json.dumps({"classes": [type(processor).__module__, type(model).__module__], "chat": chat,
                      "solo_loaded": sorted(m for m in sys.modules if m.startswith("megatron.solo"))}))
""")
    .replace("PROMPT", CAPTION + "</s>")
    .replace("CAPTION", CAPTION)
)


@pytest.fixture(scope="module")
def remote(export, sample, tmp_path_factory) -> tuple[dict, dict]:
    root = tmp_path_factory.mktemp("haplo-remote")
    (root / "client.py").write_text(CLIENT)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HOME=str(root / "hf_home"), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    run = subprocess.run(
        [sys.executable, str(root / "client.py"), str(export), str(sample[0]), str(root / "out.pt"), str(NEW_TOKENS)],
        cwd=root, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-4000:]
    return json.loads(run.stdout.strip().splitlines()[-1]), torch.load(root / "out.pt")


def test_export_files_and_config(export, megatron_ckpt):
    from megatron.solo.checkpointing import CheckpointMetadata

    cfg = CheckpointMetadata.read(megatron_ckpt).model
    names = {p.name for p in export.iterdir()}
    assert {"configuration_haplo.py", "modeling_haplo.py", "processing_haplo.py", "model.safetensors"} <= names
    assert {"processor_config.json", "tokenizer.json", "tokenizer.model", "generation_config.json"} <= names
    config = json.loads((export / "config.json").read_text())
    assert config["model_type"] == "haplo" and config["architectures"] == ["HaploForCausalLM"]
    assert config["auto_map"]["AutoProcessor"] == "processing_haplo.HaploProcessor"
    assert (config["num_hidden_layers"], config["pre_config"]["num_hidden_layers"]) == (2, 2)
    assert (config["default_image_size"], config["vocab_size"]) == (cfg.tile_size, cfg.vocab_size)


def test_remote_code_loads_without_megatron_solo(remote):
    report, _ = remote
    assert report["solo_loaded"] == []
    assert all(m.startswith("transformers_modules.") for m in report["classes"]), report
    assert report["chat"] == f"<s>[INST] <image> [/INST] {CAPTION}", report  # the template's text


def _megatron_logits(model, batch, tokens: torch.Tensor) -> torch.Tensor:
    """[s, V] float32 logits of one document ``tokens`` [s] whose image positions are the batch's."""
    s = tokens.shape[0]
    blocks = torch.full((1, s), -1, dtype=torch.long)
    n = batch.image_block_ids.shape[1]
    blocks[0, : min(s, n)] = batch.image_block_ids[0, : min(s, n)]
    blocks[blocks >= 0] = 0
    with torch.no_grad():
        logits = model(
            tokens[None],
            torch.arange(s)[None],
            torch.tensor([0, s], dtype=torch.int32),
            s,
            batch.patches,
            batch.patch_index,
            image_block_ids=blocks,
            patch_table_index=batch.patch_table_index,
        )
    return logits[0].float()


def test_logits_and_greedy_tokens_equal_megatrons(remote, sample, megatron_ckpt):
    from megatron.solo.checkpointing import CheckpointMetadata, load_full_model
    from megatron.solo.haplo.anyres import AnyresConfig

    _, out = remote
    cfg = CheckpointMetadata.read(megatron_ckpt).model
    tiling = AnyresConfig(tile_size=cfg.tile_size, patch_size=cfg.patch_size, pinpoints=cfg.image_grid_pinpoints)
    batch = sample[1].normalized(tiling.image_config)
    length = int(batch.pack_lengths[0])
    tokens = batch.tokens[0, :length]
    prompt = out["prompt"]["input_ids"][0]
    assert torch.equal(prompt, tokens)  # the processor's ids are preprocessing's: <s>, the image, the caption, </s>
    model, _ = load_full_model(megatron_ckpt)
    vocab = cfg.vocab_size
    want = _megatron_logits(model, batch, tokens)[:, :vocab]
    torch.testing.assert_close(out["logits"][0], want, atol=2e-4, rtol=1e-4)

    from megatron.solo.tokenizer import SoloTokenizer

    suppressed = list(SoloTokenizer.from_pretrained(megatron_ckpt).vision_token_ids)
    seq = tokens
    for _ in range(NEW_TOKENS):  # the Megatron-side greedy loop: full forwards, vision ids suppressed
        logits = _megatron_logits(model, batch, seq)[-1, :vocab]
        logits[suppressed] = -float("inf")
        seq = torch.cat([seq, logits.argmax()[None]])
    assert out["generated"][0].tolist() == seq.tolist()


def test_pixels_equal_preprocessings_patches(remote, sample, megatron_ckpt):
    from megatron.solo.checkpointing import CheckpointMetadata
    from megatron.solo.haplo import anyres

    _, out = remote
    cfg = CheckpointMetadata.read(megatron_ckpt).model
    tiling = anyres.AnyresConfig(tile_size=cfg.tile_size, patch_size=cfg.patch_size, pinpoints=cfg.image_grid_pinpoints)
    pixels, sizes = out["prompt"]["pixel_values"], out["prompt"]["image_sizes"]
    photo = im.load_image(sample[0])
    assert sizes.tolist() == [[photo.height, photo.width]]
    side, p = tiling.positions_per_side, tiling.patch_size
    patches = pixels.reshape(-1, 3, side, p, side, p).permute(0, 2, 4, 1, 3, 5).reshape(-1, 3 * p * p)
    layout = anyres.image_layout(anyres.anyres_grid(photo.height, photo.width, tiling))
    rows = torch.from_numpy(layout.patch[~layout.is_newline])
    want = sample[1].normalized(tiling.image_config).patches
    assert torch.equal(patches[rows], want)
    assert np.array_equal(sample[1].patch_table_index.numpy(), layout.position[~layout.is_newline])


def _kept_patches(pixels: torch.Tensor, sizes: torch.Tensor, tiling) -> torch.Tensor:
    """[Σ unpadded patches, 3·P·P]: each image's sequence patches from its tiles (pixel_values [tiles, 3, T, T])."""
    from megatron.solo.haplo import anyres

    side, p = tiling.positions_per_side, tiling.patch_size
    patches = pixels.reshape(-1, 3, side, p, side, p).permute(0, 2, 4, 1, 3, 5).reshape(-1, 3 * p * p)
    out, start = [], 0
    for h, w in sizes.tolist():
        layout = anyres.image_layout(anyres.anyres_grid(h, w, tiling))
        out.append(patches[start * side * side :][torch.from_numpy(layout.patch[~layout.is_newline])])
        start += layout.num_tiles
    assert start == len(pixels)
    return torch.cat(out)


def test_chat_messages_and_a_padded_batch_are_preprocessings(tokenizer, sample_photos, tmp_path):
    """In process (the same file the export ships): a system turn, two images of other shapes with text between,
    as the ``mistral`` template's document; a batch left-padded with each row its sample alone."""
    from megatron.solo.convert.haplo_export import haplo_processor
    from megatron.solo.data.encode import EncodeConfig, encode_turns
    from megatron.solo.data.errors import Origin
    from megatron.solo.data.packed_format import decode_patches
    from megatron.solo.families import get_preset
    from megatron.solo.haplo import anyres
    from megatron.solo.image import normalize_patches
    from tools.preprocess_mm_data import haplo_tiling

    cfg = get_preset("haplo-tiny")
    processor = haplo_processor(cfg, tokenizer)
    tiling = haplo_tiling(cfg.tile_size)
    messages, turns, (a, b) = chat_sample(sample_photos, tmp_path)
    out = processor.apply_chat_template(messages, tokenize=True)
    config = EncodeConfig(layout="haplo", anyres=tiling, image_format="raw", chat_template="mistral", append_eod=False)
    ids, _, images = encode_turns(turns, tokenizer, config, Origin("<test>"))
    assert out["input_ids"][0].tolist() == ids.tolist()
    assert out["image_sizes"].tolist() == [[60, 150], [130, 40]]
    want = torch.from_numpy(normalize_patches(decode_patches(images, 14), tiling.image_config))
    assert torch.equal(_kept_patches(out["pixel_values"], out["image_sizes"], tiling), want)
    assert sum(anyres.num_image_tokens(h, w, tiling) for h, w in ((60, 150), (130, 40))) == int(
        (out["input_ids"] == tokenizer.vision_patch_id).sum()
    )

    batch = processor(images=[[str(a)], [], [str(b)]], text=["A photo of", "Two plus two is", "<image> Describe."])
    samples = (([str(a)], "A photo of"), ([], "Two plus two is"), ([str(b)], "<image> Describe."))
    for row, (imgs, text) in enumerate(samples):
        alone = processor(images=imgs or None, text=text)
        keep = batch["attention_mask"][row].bool()
        assert batch["input_ids"][row][keep].tolist() == alone["input_ids"][0].tolist()
        assert not batch["attention_mask"][row][: (~keep).sum()].any()  # padding on the left
    assert batch["pixel_values"].shape[0] == sum(
        anyres.anyres_grid(h, w, tiling).num_tiles for h, w in ((60, 150), (130, 40))
    )
    text_only = processor(text=["Two plus two is", "Hello"])
    assert set(text_only) == {"input_ids", "attention_mask"}  # no image keys: the model takes none


def test_a_llama3_export_of_a_mistral_checkpoint_is_refused(megatron_ckpt, tmp_path):
    """Preprocessing refuses ``--chat-template llama3`` with Mistral's tokenizer (no header/turn tokens); the
    export does too, before reading the weights, and writes nothing."""
    from megatron.solo.convert.haplo_export import haplo_megatron_to_hf

    out = tmp_path / "hf"
    with pytest.raises(ValueError, match=r"llama3 needs the tokenizer's <\|start_header_id\|>"):
        haplo_megatron_to_hf(megatron_ckpt, out, chat_template="llama3")
    assert not out.exists()


def chat_sample(sample_photos, tmp_path):
    """(chat messages, the same chat as preprocessing's turns, the two image paths): a system turn, an image
    before and one after the text, and a follow-up turn."""
    from megatron.solo.data.samples import ImageRef, Turn

    a, b = tmp_path / "a.png", tmp_path / "b.png"
    im.load_image(sample_photos[0]).resize((150, 60)).save(a)
    im.load_image(sample_photos[3]).resize((40, 130)).save(b)
    messages = [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": [{"type": "image", "image": str(a)}, {"type": "text", "text": "What is it?"}]},
        {"role": "assistant", "content": "A person."},
        {"role": "user", "content": [{"type": "text", "text": "And this?"}, {"type": "image", "path": str(b)}]},
    ]
    turns = (
        Turn("system", ("Answer briefly.",)),
        Turn("user", (ImageRef(str(a)), "What is it?")),
        Turn("assistant", ("A person.",)),
        Turn("user", ("And this?", ImageRef(str(b)))),
    )
    return messages, turns, (a, b)
