"""The work a step is credited with (MFU): attention pairs as the model's own mask computes them, padding left
out; and a window's losses, throughput and MFU from the reduced sums."""

import numpy as np
import pytest
import torch

from megatron.solo.batch import PackedExample, collate
from megatron.solo.config import get_preset
from megatron.solo.model import make_transformer_config, packed_causal_mask
from megatron.solo.training.metrics import Window, batch_work, causal_pairs, micro_batch_work, model_flops


def pack(lengths: list[int]) -> PackedExample:
    n = sum(lengths)
    return PackedExample(
        np.arange(3, n + 3),
        np.ones(n, bool),
        np.concatenate([[0], np.cumsum(lengths)]),
        np.zeros((0, 3072), np.float32),
        np.zeros(0, np.int64),
    )


@pytest.mark.parametrize("window", [None, 1, 4, 100])
def test_attention_pairs_are_what_the_models_mask_lets_through(window):
    """The mask the local backend attends with is the independent count: its allowed (query, key) pairs over
    the documents, padding rows excluded."""
    s = 24
    batch = collate([pack([5, 11, 3]), pack([24]), pack([7])], s, pad_id=0)  # rows 0 and 2 end in padding
    tokens, pairs = batch_work(batch.cu_seqlens, batch.pack_lengths, s, window).tolist()
    masked = packed_causal_mask(batch.cu_seqlens, 3, s, window)  # [b, 1, s, s], True = masked out
    real = torch.arange(s)[None, :] < batch.pack_lengths[:, None]  # [b, s] query rows that are documents
    assert tokens == 19 + 24 + 7
    assert pairs == (~masked[:, 0] & real[:, :, None]).sum().item()


def test_a_window_caps_long_documents_and_padding_is_not_work():
    assert causal_pairs(np.array([32768]), 4096) == pytest.approx(4096 * 4097 / 2 + (32768 - 4096) * 4096)
    assert causal_pairs(np.array([32768]), None) / causal_pairs(np.array([32768]), 4096) > 4  # the old over-count
    padded = collate([pack([10, 6])], 64, pad_id=0)
    unpadded = collate([pack([10, 6])], 16, pad_id=0)
    assert (
        batch_work(padded.cu_seqlens, padded.pack_lengths, 64, None).tolist()
        == batch_work(unpadded.cu_seqlens, unpadded.pack_lengths, 16, None).tolist()
    )


def test_window_summary_adds_up_and_reports_model_flops():
    window = Window()
    # Two iterations of reduced sums: [lm, img, txt] × [loss sum, count], [target tokens, samples], then
    # [model FLOPs, tokens].
    for _ in range(2):
        window.add(
            torch.tensor([[30.0, 10.0], [20.0, 4.0], [10.0, 6.0], [10.0, 3.0], [3e12, 96.0]]),
            seconds=0.5,
            grad_norm=1.5,
        )
    m = window.summary(
        iteration=2, consumed_samples=8, lr=1e-3, tokens_per_iteration=128, world_size=2, peak_tflops=2.0
    )
    assert m["lm_loss"] == pytest.approx(3.0) and m["img_lm_loss"] == pytest.approx(5.0)
    assert m["txt_lm_loss"] == pytest.approx(10 / 6)
    assert m["lm_loss"] * 10 == pytest.approx(m["img_lm_loss"] * 4 + m["txt_lm_loss"] * 6)  # the parts add up
    assert m["target_tokens"] == 10 and m["samples"] == 3 and m["grad_norm"] == 1.5
    assert m["tokens_per_s"] == pytest.approx(192 / 1.0) and m["padding"] == pytest.approx(0.25)
    assert m["tflops_per_device"] == pytest.approx(6e12 / 1.0 / 2 / 1e12)
    assert m["mfu"] == pytest.approx(m["tflops_per_device"] / 2.0)


def test_model_flops_count_logits_where_the_trainer_computes_them():
    cfg = get_preset("tiny")
    h, d = cfg.hidden_size, cfg.head_dim
    weights = cfg.num_layers * (
        h * d * (2 * cfg.num_attention_heads + 2 * cfg.num_query_groups) + 3 * h * cfg.ffn_hidden_size
    )
    attention = 12 * cfg.num_layers * cfg.num_attention_heads * d * 2000
    # 6 FLOPs per weight and token, 6·h·V per token with logits, 12·d per attention pair and head.
    assert model_flops(cfg, 192, 2000) == pytest.approx(6 * weights * 192 + 6 * h * cfg.vocab_size * 192 + attention)
    assert model_flops(cfg, 192, 2000, logit_tokens=10, padded_vocab_size=33152) == pytest.approx(
        6 * weights * 192 + 6 * h * 33152 * 10 + attention
    )
    batch = collate([pack([5, 11, 3]), pack([7])], 24, pad_id=0)
    flops, tokens = micro_batch_work(batch, cfg, 33152).tolist()
    pairs = batch_work(batch.cu_seqlens, batch.pack_lengths, 24, cfg.sliding_window)[1].item()
    assert tokens == 26
    assert flops == pytest.approx(
        model_flops(cfg, 26, pairs, logit_tokens=batch.loss_mask.sum().item(), padded_vocab_size=33152), rel=1e-6
    )


def test_stage1_flops_count_the_pre_decoder_stem_and_heads_only(megatron_world):
    """HaploVL stage 1 runs the pre-decoder, the stem and the heads; the frozen LLM never runs. The independent
    count: the built stage-1 model's own weight matrices."""
    from megatron.solo.families import build_model as build_family_model
    from megatron.solo.families import get_preset as family_preset
    from megatron.solo.haplo.distill import DistillConfig
    from megatron.solo.training.metrics import head_weights, stage1_flops

    cfg = family_preset("haplo-tiny")
    vocab, pre, teacher = cfg.padded_vocab_size(), cfg.pre_decoder, 24
    model = build_family_model(
        cfg, make_transformer_config(cfg), padded_vocab_size=vocab, distill=DistillConfig(), teacher_hidden_size=teacher
    )
    matrices = sum(p.numel() for p in model.pre_decoder.parameters() if p.dim() == 2)
    tokens, pairs, patches, text = 100, 3000, 40, 50
    want = (
        6 * matrices * tokens  # pre-decoder layers, forward + backward
        + 12 * pre.num_layers * pre.num_attention_heads * pre.head_dim * pairs
        + 4 * cfg.patch_dim * pre.hidden_size * patches  # stem: forward + its weight's gradient (pixels need none)
        + 6 * pre.hidden_size * teacher * patches  # linear heads
        + 6 * pre.hidden_size * cfg.hidden_size * text
        + 4 * cfg.hidden_size * vocab * text  # CTP logits: forward + the predictions' gradient (frozen embedding)
    )
    assert head_weights(model.distill_heads) == (pre.hidden_size * teacher, pre.hidden_size * cfg.hidden_size)
    got = stage1_flops(
        cfg,
        tokens,
        pairs,
        patches=patches,
        text_tokens=text,
        padded_vocab_size=vocab,
        heads=(pre.hidden_size * teacher, pre.hidden_size * cfg.hidden_size),
    )
    assert got == pytest.approx(want)
    assert got < 0.5 * model_flops(cfg, tokens, pairs, logit_tokens=text, padded_vocab_size=vocab)  # stage 2's

    big = family_preset("haplo-vicuna-7b")  # the real model: stage 1 is a few percent of a stage-2 step
    heads = (big.pre_decoder.hidden_size * 1024, big.pre_decoder.hidden_size * big.hidden_size)
    kwargs = dict(patches=2000, text_tokens=2000, padded_vocab_size=big.padded_vocab_size())
    stage1 = stage1_flops(big, 4096, 4096 * 2048, heads=heads, **kwargs)
    assert stage1 < 0.2 * model_flops(
        big, 4096, 4096 * 2048, logit_tokens=2000, padded_vocab_size=kwargs["padded_vocab_size"]
    )
