"""Greedy generation: prompts laid out as training documents; batched decoding ≡ one prompt at a time."""

import numpy as np
import pytest
import torch
from PIL import Image

from megatron.solo.config import get_preset
from megatron.solo.data.encode import EncodeConfig, encode_sample
from megatron.solo.data.errors import Origin
from megatron.solo.data.samples import ImageRef, Sample, Turn
from megatron.solo.image import normalize_patches, process_image
from megatron.solo.inference import allowed_ids, build_prompt, greedy_generate
from megatron.solo.model import build_model, make_transformer_config


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    rng = np.random.default_rng(0)
    paths = []
    for i, size in enumerate([(70, 40), (40, 100), (64, 64)]):
        path = root / f"{i}.png"
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    return paths


def training_document(tokenizer, turns):
    sample = Sample(tuple(Turn(role, tuple(parts)) for role, parts in turns), Origin("x.jsonl", line=1))
    return encode_sample(sample, tokenizer, EncodeConfig(image_format="png"))


def test_prompt_is_the_training_document_up_to_the_answer(tokenizer, images):
    doc = training_document(tokenizer, [("assistant", [ImageRef(images[0]), "red circle"])])
    prompt = build_prompt(tokenizer, [images[0]])
    n = len(prompt.tokens)
    assert prompt.tokens.tolist() == doc.tokens[:n].tolist()
    assert doc.targets[n:].all() and not doc.targets[:n].any()  # the answer starts right after the prompt
    assert prompt.tokens[prompt.patch_positions].tolist() == [tokenizer.vision_patch_id] * len(prompt.patches)
    assert prompt.patches.dtype == np.uint8  # normalised on the device, as in training
    np.testing.assert_array_equal(normalize_patches(prompt.patches), process_image(images[0]).patches)


def test_mistral_prompt_is_the_instruction_document_up_to_the_answer(tokenizer, images):
    doc = training_document(
        tokenizer, [("user", [ImageRef(images[1]), ImageRef(images[2]), "What is it?"]), ("assistant", ["A test."])]
    )
    prompt = build_prompt(tokenizer, images[1:], "What is it?", template="mistral")
    n = len(prompt.tokens)
    assert prompt.tokens.tolist() == doc.tokens[:n].tolist() and doc.targets[n] and not doc.targets[n - 1]
    assert len(prompt.patches) == (doc.tokens == tokenizer.vision_patch_id).sum()


def test_text_only_prompt_and_bad_template(tokenizer):
    prompt = build_prompt(tokenizer, [], "One plus one is")
    assert prompt.tokens.tolist() == [tokenizer.bos_id] + tokenizer.encode("One plus one is")
    assert prompt.patches.shape == (0, 3072) and prompt.patches.dtype == np.uint8
    with pytest.raises(ValueError, match="template"):
        build_prompt(tokenizer, [], "x", template="chatml")


@pytest.fixture(scope="module")
def model(megatron_world, tokenizer):
    cfg = get_preset("tiny").replace(vocab_size=tokenizer.vocab_size)
    torch.manual_seed(0)
    return build_model(cfg, make_transformer_config(cfg)).eval()


def reference_greedy(model, prompt, allowed, eos_id, max_new_tokens):
    """One prompt, no padding or batching: the full sequence each step, argmax over allowed ids."""
    ids = prompt.tokens.tolist()
    new = []
    for _ in range(max_new_tokens):
        n = len(ids)
        with torch.no_grad():
            logits = model(
                torch.tensor([ids]),
                torch.arange(n)[None],
                torch.tensor([0, n], dtype=torch.int32),
                n,
                torch.from_numpy(normalize_patches(prompt.patches)),
                torch.from_numpy(prompt.patch_positions),
            )
        t = int(logits[0, -1].masked_fill(~allowed, float("-inf")).argmax())
        if t == eos_id:
            break
        new.append(t)
        ids.append(t)
    return new


def test_batched_greedy_equals_each_prompt_alone(model, tokenizer, images):
    allowed = allowed_ids(tokenizer, model.vocab_size)
    prompts = [
        build_prompt(tokenizer, [images[0]]),
        build_prompt(tokenizer, [], "Two plus two is"),
        build_prompt(tokenizer, images[1:], "Describe."),
    ]
    got = greedy_generate(
        model, prompts, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id, allowed=allowed, max_new_tokens=6
    )
    for prompt, ids in zip(prompts, got):
        assert ids == reference_greedy(model, prompt, allowed, tokenizer.eos_id, 6)
        assert len(ids) == 6 and not set(ids) & set(tokenizer.vision_token_ids)


class ScriptedModel:
    """Logits that make token 100 + (sequence length) the argmax, and EOS once a row reaches ``stop_at``."""

    def __init__(self, stop_at: dict[int, int], vocab: int = 400, eos: int = 2):
        self.stop_at, self.vocab, self.eos, self.calls = stop_at, vocab, eos, []

    def parameters(self):  # generation puts its batches where the model's parameters are
        yield torch.zeros(0)

    def __call__(self, tokens, position_ids, cu_seqlens, max_seqlen, patches, patch_index):
        b, s = tokens.shape
        self.calls.append(b)
        logits = torch.zeros(b, s, self.vocab)
        for row in range(b):
            for pos in range(s):
                n = pos + 1
                best = self.eos if n >= self.stop_at.get(int(tokens[row, 0]), 10**9) else 100 + n
                logits[row, pos, best] = 1.0
        return logits


def test_rows_stop_at_eos_and_finished_rows_leave_the_batch():
    prompts = [build_prompt_ids([7, 5]), build_prompt_ids([8, 5, 5, 5]), build_prompt_ids([9])]
    model = ScriptedModel(stop_at={7: 4, 8: 6})  # row 0 stops after 2 new tokens, row 1 after 2, row 2 never
    out = greedy_generate(
        model, prompts, eos_id=2, pad_id=0, allowed=torch.ones(400, dtype=torch.bool), max_new_tokens=5
    )
    assert out == [[102, 103], [104, 105], [101, 102, 103, 104, 105]]
    assert model.calls == [3, 3, 3, 1, 1]


def build_prompt_ids(ids):
    from megatron.solo.inference import Prompt

    return Prompt(np.asarray(ids, np.int64), np.zeros((0, 3072), np.float32), np.zeros(0, np.int64))


def test_generate_tool_refuses_bad_arguments_naming_them(tmp_path, capsys):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    import generate

    (tmp_path / "ckpt").mkdir()
    cases = [
        ([], "--load"),
        (["--load", str(tmp_path / "ckpt")], "give --image and/or --prompt"),
        (["--load", str(tmp_path / "ckpt"), "--image", str(tmp_path / "nope.png")], "no such file"),
        (["--load", str(tmp_path / "ckpt"), "--prompt", "hi"], "not a SOLO checkpoint"),
        (["--load", str(tmp_path / "ckpt"), "--prompt", "hi", "--max-new-tokens", "0"], "--max-new-tokens"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit) as e:
            generate.parse_args(argv)
        assert e.value.code == 2 and message in capsys.readouterr().err, argv
