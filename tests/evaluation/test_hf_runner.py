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
