"""HF generate() on an export: the tokens of megatron.solo.inference on the same weights, batched with left padding
over any mix of images; the KV cache changes nothing but the work done (patches are embedded once, at prefill)."""

import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_models import random_mistral

from megatron.solo.config import get_preset
from megatron.solo.convert.checkpoint import solo_config_from_model_config
from megatron.solo.convert.hf_export import write_hf_export
from megatron.solo.convert.name_table import megatron_to_hf
from megatron.solo.inference import Generator, allowed_ids, build_prompt, greedy_generate
from megatron.solo.model import build_model, make_transformer_config
from megatron.solo.tokenizer import default_tokenizer_model

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
import convert_checkpoint  # noqa: E402
import generate  # noqa: E402

pytestmark = pytest.mark.timeout(300)

NEW = 8
WEIGHT_STD = 0.2


@pytest.fixture(scope="module")
def images(tmp_path_factory, sample_photos):
    """Three sizes of random images and one real photo."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    paths = []
    for i, (w, h) in enumerate([(70, 40), (40, 100), (64, 64)]):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / f"{i}.png")
        paths.append(str(root / f"{i}.png"))
    Image.open(sample_photos[0]).resize((160, 160)).save(root / "photo.png")
    return paths + [str(root / "photo.png")]


@pytest.fixture(scope="module")
def megatron_model(megatron_world, tokenizer):
    """The tiny preset with weights far from init (std 0.02 leaves attention near uniform, so that wrong
    positions or a wrong mask would hardly change a token); norms random around 1."""
    cfg = get_preset("tiny").replace(vocab_size=tokenizer.vocab_size)
    torch.manual_seed(0)
    model = build_model(cfg, make_transformer_config(cfg)).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1.0 + 0.1 * noise if "norm" in name else WEIGHT_STD * noise)
    return model, cfg


@pytest.fixture(scope="module")
def hf(megatron_model, tokenizer, tmp_path_factory):
    """The same weights exported to HF, loaded back with AutoProcessor + AutoModelForCausalLM."""
    from transformers import AutoModelForCausalLM, AutoProcessor

    model, cfg = megatron_model
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    out = write_hf_export(
        tmp_path_factory.mktemp("export") / "tiny",
        megatron_to_hf(state, cfg, vocab_size=cfg.vocab_size),
        solo_config_from_model_config(cfg, tokenizer),
        tokenizer,
        torch.float32,
    )
    hf_model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    return AutoProcessor.from_pretrained(out), hf_model


def requests(images):
    """(images, text, template) of a mixed batch: one image, none, two of other sizes, a chat prompt."""
    return [
        ([images[0]], "A photo of", "none"),
        ([], "Two plus two is", "none"),
        ([images[1], images[2]], "Describe.", "none"),
        ([images[3]], "What is in the image?", "mistral"),
    ]


def hf_batch(processor, reqs):
    texts, per_sample = [], []
    for imgs, text, template in reqs:
        if template == "mistral":
            parts = [{"type": "image"} for _ in imgs] + [{"type": "text", "text": text}]
            texts.append(processor.apply_chat_template([{"role": "user", "content": parts}]))
        else:
            texts.append(text)
        per_sample.append(imgs)
    return processor(images=per_sample, text=texts)


def new_tokens(out, batch, eos_id):
    """Generated ids per row, up to and excluding the first EOS."""
    rows = []
    for row in out[:, batch["input_ids"].shape[1] :].tolist():
        rows.append(row[: row.index(eos_id)] if eos_id in row else row)
    return rows


def test_hf_greedy_equals_megatron_greedy_on_a_mixed_batch(megatron_model, hf, tokenizer, images):
    model, _ = megatron_model
    processor, hf_model = hf
    reqs = requests(images)
    prompts = [build_prompt(tokenizer, imgs, text, template) for imgs, text, template in reqs]
    want = greedy_generate(
        model,
        prompts,
        eos_id=tokenizer.eos_id,
        pad_id=tokenizer.pad_id,
        allowed=allowed_ids(tokenizer, model.vocab_size),
        max_new_tokens=NEW,
    )
    batch = hf_batch(processor, reqs)
    for row, prompt in enumerate(prompts):  # the same prompts, left-padded
        assert batch["input_ids"][row][batch["attention_mask"][row].bool()].tolist() == prompt.tokens.tolist()
    with torch.no_grad():
        out = hf_model.generate(**batch, max_new_tokens=NEW, do_sample=False)
    got = new_tokens(out, batch, tokenizer.eos_id)
    assert got == want
    assert all(len(ids) == NEW for ids in got)  # a random model never says EOS: all steps compared


def test_cache_and_no_cache_give_the_same_tokens_and_patches_are_embedded_only_at_prefill(hf, images):
    processor, hf_model = hf
    batch = hf_batch(processor, requests(images))
    calls = []
    hook = hf_model.model.embed_vision_patch.register_forward_hook(lambda m, args, out: calls.append(len(args[0])))
    try:
        with torch.no_grad():
            cached = hf_model.generate(**batch, max_new_tokens=NEW, do_sample=False, use_cache=True)
            cached_calls, calls[:] = list(calls), []
            uncached = hf_model.generate(**batch, max_new_tokens=NEW, do_sample=False, use_cache=False)
    finally:
        hook.remove()
    assert torch.equal(cached, uncached)
    n_patches = len(batch["vision_patches"])
    assert cached_calls == [n_patches]  # once, at prefill
    assert calls == [n_patches] * NEW  # without a cache every step re-reads the whole prompt


def test_sampling_with_a_mixed_batch(hf, images, tokenizer):
    processor, hf_model = hf
    batch = hf_batch(processor, requests(images))
    with torch.no_grad():
        greedy = hf_model.generate(**batch, max_new_tokens=NEW, do_sample=False)
        top1 = hf_model.generate(**batch, max_new_tokens=NEW, do_sample=True, top_k=1)
        runs = []
        for use_cache in (True, False, True):
            torch.manual_seed(3)
            runs.append(hf_model.generate(**batch, max_new_tokens=NEW, do_sample=True, use_cache=use_cache))
    assert torch.equal(top1, greedy)  # sampling from the single most likely token is greedy decoding
    assert torch.equal(runs[0], runs[2]) and torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], greedy)  # a random model's flat distribution: sampling does differ
    sampled = runs[0][:, batch["input_ids"].shape[1] :]
    assert not set(sampled.flatten().tolist()) & set(tokenizer.vision_token_ids)  # suppressed in sampling too
    texts = processor.batch_decode(sampled)
    assert len(texts) == 4 and all(isinstance(t, str) for t in texts)


def test_an_image_free_batch_generates_as_plain_text(hf, tokenizer):
    processor, hf_model = hf
    batch = processor(text=["Two plus two is", "The capital of France is a city"])
    assert batch["vision_patches"].shape[0] == 0
    with torch.no_grad():
        got = hf_model.generate(**batch, max_new_tokens=NEW, do_sample=False)
        plain = hf_model.generate(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], max_new_tokens=NEW, do_sample=False
        )
    assert torch.equal(got, plain)


def test_exported_checkpoint_answers_as_tools_generate_does(tmp_path, megatron_world, images, tokenizer, capsys):
    """One Megatron checkpoint (made by tools/convert_checkpoint.py from an HF Mistral), read by
    tools/generate.py's Generator and, exported by megatron-to-hf, by AutoProcessor + generate()."""
    from transformers import AutoModelForCausalLM, AutoProcessor

    mistral = random_mistral(vocab_size=32000, max_position_embeddings=512)
    mistral.save_pretrained(tmp_path / "mistral")
    shutil.copyfile(default_tokenizer_model(), tmp_path / "mistral" / "tokenizer.model")
    ckpt, export = tmp_path / "ckpt", tmp_path / "hf"
    assert convert_checkpoint.main(["hf-to-megatron", "--hf-model", str(tmp_path / "mistral"), "--out", str(ckpt)]) == 0
    assert convert_checkpoint.main(["megatron-to-hf", "--load", str(ckpt), "--out", str(export)]) == 0
    processor = AutoProcessor.from_pretrained(export)
    hf_model = AutoModelForCausalLM.from_pretrained(export, dtype="auto").eval()

    reqs = requests(images)
    generator = Generator(ckpt)
    want = generator.generate_ids(
        [build_prompt(generator.tokenizer, imgs, text, template) for imgs, text, template in reqs], NEW
    )
    batch = hf_batch(processor, reqs)
    with torch.no_grad():
        got = new_tokens(hf_model.generate(**batch, max_new_tokens=NEW), batch, tokenizer.eos_id)
    assert got == want

    # the command line: one prompt asked of each image, one answer per line
    capsys.readouterr()
    argv = ["--load", str(ckpt), "--each", "--image", images[0], "--image", images[3], "--prompt", "It shows"]
    assert generate.main(argv + ["--max-new-tokens", str(NEW)]) == 0
    printed = [line.split("\t", 1)[1] for line in capsys.readouterr().out.splitlines()]
    batch = processor(images=[images[0], images[3]], text=["It shows", "It shows"])
    with torch.no_grad():
        out = hf_model.generate(**batch, max_new_tokens=NEW)
    answers = [text.strip() for text in processor.batch_decode(out[:, batch["input_ids"].shape[1] :])]
    assert printed == answers and all(printed)
