"""The runner under the lmms-eval model, on a tiny export: batched = one at a time, log-likelihoods = HF's own
loss, generation = tools/generate.py's code (megatron.solo.inference) on the Megatron checkpoint."""

import pytest
import torch

from megatron.solo.evaluation.hf_runner import Request, SoloRunner, append_right, continuation_scores, cut_at

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    from PIL import Image

    root = tmp_path_factory.mktemp("img")
    paths = []
    for i, (w, h, colour) in enumerate([(64, 40, (200, 30, 30)), (40, 90, (20, 160, 40)), (70, 70, (10, 10, 220))]):
        Image.new("RGB", (w, h), colour).save(root / f"{i}.png")
        paths.append(str(root / f"{i}.png"))
    return paths


def requests(images):
    return [
        Request([images[0]], "What colour is it?"),
        Request([], "Two plus two is"),
        Request([images[1], images[2]], "Which is taller?"),
    ]


@pytest.fixture(scope="module", params=["mistral", "none"])
def runner(request, tiny_export):
    return SoloRunner(tiny_export, template=request.param, device="cpu")


def reference_loglikelihood(runner, request, continuation):
    """HF's own shifted cross-entropy over the continuation (labels -100 elsewhere), one request, no padding."""
    batch = runner._encode([request])
    cont = runner.processor.tokenizer(continuation, add_special_tokens=False)["input_ids"]
    ids = torch.cat([batch["input_ids"], torch.tensor([cont])], dim=1)
    labels = torch.full_like(ids, -100)
    labels[0, -len(cont) :] = ids[0, -len(cont) :]
    indices = torch.cat([batch["vision_patch_indices"], torch.full((1, len(cont)), -1)], dim=1)
    with torch.no_grad():
        out = runner.model(
            input_ids=ids, vision_patch_indices=indices, vision_patches=batch["vision_patches"], labels=labels
        )
    return -float(out.loss) * len(cont)


def test_batched_loglikelihood_equals_hf_loss_one_request_at_a_time(runner, images):
    reqs = requests(images)
    conts = ["red", "four apples", "the green one"]  # different lengths: right padding inside the batch
    got = runner.loglikelihood(reqs, conts)
    for (ll, greedy), req, cont in zip(got, reqs, conts):
        assert ll == pytest.approx(reference_loglikelihood(runner, req, cont), rel=1e-4, abs=1e-4)
        assert isinstance(greedy, bool)
    alone = [runner.loglikelihood([r], [c])[0][0] for r, c in zip(reqs, conts)]
    assert [g[0] for g in got] == pytest.approx(alone, rel=1e-4, abs=1e-4)


@pytest.fixture(scope="module")
def chat_runner(tiny_export):
    return SoloRunner(tiny_export, template="mistral", device="cpu")


def test_greedy_flag_is_true_exactly_for_what_greedy_decoding_says(chat_runner, images):
    """After [/INST] an answer starts a word, so the greedy tokens are the stripped text's own tokenization."""
    runner = chat_runner
    req = requests(images)[0]
    batch = runner._to_device(runner._encode([req]))
    with torch.no_grad():
        out = runner.model.generate(**batch, max_new_tokens=3, do_sample=False, eos_token_id=runner.eos_id)
    ids = out[0, batch["input_ids"].shape[1] :].tolist()
    text = runner.processor.tokenizer.decode(ids)
    assert runner.eos_id not in ids
    assert runner.processor.tokenizer(text.strip(), add_special_tokens=False)["input_ids"] == ids
    assert runner.loglikelihood([req], [text])[0][1] is True
    assert runner.loglikelihood([req], [text + " zebra"])[0][1] is False


def test_batched_generation_equals_megatron_inference(runner, images, tiny_megatron, tokenizer):
    """The answers tools/generate.py's code (and the demo's evaluator) gives on the Megatron checkpoint."""
    from megatron.solo.inference import Generator

    reqs = requests(images)
    got = runner.generate(reqs, max_new_tokens=6)
    want = Generator(tiny_megatron)([(r.images, r.text) for r in reqs], template=runner.template, max_new_tokens=6)
    assert got == want
    assert runner.generate(reqs[:1], max_new_tokens=6) == got[:1]


def test_helpers():
    assert cut_at("red square\nblue", ["\n"]) == "red square"
    assert cut_at("a. b", [".", ""]) == "a"
    batch = {
        "input_ids": torch.tensor([[0, 5, 6], [7, 8, 9]]),
        "attention_mask": torch.tensor([[0, 1, 1], [1, 1, 1]]),
        "vision_patch_indices": torch.tensor([[-1, 0, -1], [-1, -1, -1]]),
        "vision_patches": torch.zeros(1, 4),
    }
    out = append_right(batch, [[1, 2], [3]], pad_id=0)
    assert out["input_ids"].tolist() == [[0, 5, 6, 1, 2], [7, 8, 9, 3, 0]]
    assert out["attention_mask"].tolist() == [[0, 1, 1, 1, 1], [1, 1, 1, 1, 0]]
    assert out["position_ids"].tolist() == [[0, 0, 1, 2, 3], [0, 1, 2, 3, 3]]
    assert out["vision_patch_indices"].tolist() == [[-1, 0, -1, -1, -1], [-1, -1, -1, -1, -1]]
    logits = torch.randn(1, 4, 10, generator=torch.Generator().manual_seed(0))
    tokens = torch.tensor([[1, 2, 3, 4]])
    ((ll, greedy),) = continuation_scores(logits, tokens, [2], [2])
    logp = torch.log_softmax(logits[0], -1)
    assert ll == pytest.approx(float(logp[1, 3] + logp[2, 4]))
    assert greedy == bool(logp[1].argmax() == 3 and logp[2].argmax() == 4)
    with pytest.raises(ValueError, match="span"):
        continuation_scores(logits, tokens, [0], [2])


def test_solo7b_template_is_the_released_models_trained_layout(tiny_export, tokenizer, images):
    """Reference spec §8.1-8.2: every image first, closed by <vision> (the SFT quirk), then BOS and
    ``[INST] q [/INST]`` (the question stripped); the processor's patches are the images' own."""
    from megatron.solo.image import process_image

    runner = SoloRunner(tiny_export, template="solo7b", device="cpu")
    assert runner.image_end_token == "<vision>"
    batch = runner._encode([Request([images[0], images[1]], "<image> Which is taller? "), Request([], "Hi")])
    layouts = []
    for path in images[:2]:
        im = process_image(path)
        layouts += tokenizer.image_layout_ids(im.n_rows, im.n_cols, end_token="<vision>")
    keep = batch["attention_mask"].bool()
    assert batch["input_ids"][0][keep[0]].tolist() == layouts + tokenizer.encode(
        "[INST] Which is taller? [/INST]", bos=True
    )
    assert batch["input_ids"][1][keep[1]].tolist() == tokenizer.encode("[INST] Hi [/INST]", bos=True)
    assert tokenizer.vision_end_id not in batch["input_ids"].tolist()[0]
    n_patches = sum(process_image(p).n_rows * process_image(p).n_cols for p in images[:2])
    assert batch["vision_patch_indices"][0].ge(0).sum() == n_patches == batch["vision_patches"].shape[0]
    assert len(runner.generate(requests(images), max_new_tokens=2)) == 3
    # the closer can still be overridden (a checkpoint trained here with this order)
    assert SoloRunner(tiny_export, template="solo7b", image_end_token="</vision>", device="cpu").image_end_token == (
        "</vision>"
    )


def test_dtype_names():
    from megatron.solo.evaluation.hf_runner import parse_dtype

    assert parse_dtype("bf16") is parse_dtype("bfloat16") is torch.bfloat16
    assert parse_dtype("fp16") is torch.float16 and parse_dtype("float32") is torch.float32
    assert parse_dtype("auto") is None and parse_dtype(None) is None and parse_dtype(torch.float16) is torch.float16
    with pytest.raises(ValueError, match="dtype must be auto or one of bfloat16, bf16"):
        parse_dtype("bfloat")
