"""The HaploVL miniature's scorer: each candidate's summed log-probability, computed through the trainer's
Batch path with padded rows, equals a direct computation from the model's logits on that candidate alone
(log-softmax at the positions before the answer's tokens, found from the tokenizer, not the loss mask)."""

import pytest
import torch

from megatron.solo.haplo.anyres import AnyresConfig

pytestmark = pytest.mark.timeout(300)
TILING = AnyresConfig(tile_size=56, patch_size=14, pinpoints=tuple((56 * h, 56 * w) for h in (1, 2) for w in (1, 2)))


@pytest.fixture(scope="module")
def model(megatron_world, tokenizer):
    from megatron.solo.families import build_model, get_preset
    from megatron.solo.model import make_transformer_config
    from megatron.solo.parallel import tensor_parallel_seed

    cfg = get_preset("haplo-tiny").replace(vocab_size=tokenizer.vocab_size, image_grid_pinpoints=TILING.pinpoints)
    tensor_parallel_seed(3)
    return build_model(cfg, make_transformer_config(cfg), padded_vocab_size=cfg.padded_vocab_size(1)).eval()


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    import random

    from megatron.solo.demo import scenes

    path = tmp_path_factory.mktemp("scorer") / "scene.png"
    rng = random.Random(5)
    scenes.render_scene(rng, scenes.random_scene(rng)).save(path)
    return path


def direct_logprob(model, tokenizer, encode, image, question, answer) -> float:
    from megatron.solo.batch import collate
    from megatron.solo.demo.likelihood import chat_example

    ex = chat_example(image, question, answer, tokenizer, encode)
    want = [*tokenizer.encode(answer), tokenizer.eos_id]  # the document ends with the answer and </s>
    n = len(ex.tokens)
    assert ex.tokens[n - len(want) :].tolist() == want
    batch = collate([ex], n, pad_id=tokenizer.pad_id, patch_dim=encode.image.patch_dim).normalized(encode.image)
    with torch.no_grad():
        logits = model(
            batch.tokens,
            batch.position_ids,
            batch.cu_seqlens,
            batch.max_seqlen,
            batch.patches,
            batch.patch_index,
            image_block_ids=batch.image_block_ids,
            patch_table_index=batch.patch_table_index,
        )[0].double()
    logp = torch.log_softmax(logits, dim=-1)
    return sum(float(logp[n - len(want) + i - 1, t]) for i, t in enumerate(want))


def test_ranked_scores_match_a_direct_computation(model, tokenizer, image):
    from megatron.solo.data.encode import EncodeConfig
    from megatron.solo.demo.likelihood import rank_answers

    encode = EncodeConfig(layout="haplo", anyres=TILING)
    question = "What colour is the square?"
    candidates = ["red", "green", "blue", "yellow", "purple"]  # different token counts: padded rows
    best, scores = rank_answers(model, tokenizer, encode, image, question, candidates)
    want = [direct_logprob(model, tokenizer, encode, image, question, c) for c in candidates]
    assert scores == pytest.approx(want, abs=2e-4)
    assert best == candidates[max(range(len(want)), key=want.__getitem__)]
    assert len(set(round(s, 3) for s in scores)) == len(scores)  # distinct: the scores see the answers


def test_candidates_cover_every_held_out_answer(tmp_path):
    from megatron.solo.demo.data import DemoDataConfig, write_demo_data
    from megatron.solo.demo.evaluate import read_questions
    from megatron.solo.demo.likelihood import CANDIDATES

    config = DemoDataConfig(
        per_class=1, heldout_per_class=1, captions=2, heldout_captions=40, text_documents=1, sft_chats=1, sft_heldout=40
    )
    write_demo_data(tmp_path / "raw", config, workers=1)
    questions = read_questions(tmp_path / "raw" / "sft" / "heldout.jsonl", tmp_path / "raw" / "captions")
    assert {q["kind"] for q in questions} == set(CANDIDATES)
    for q in questions:
        assert q["answer"] in CANDIDATES[q["kind"]], q
