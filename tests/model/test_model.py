"""SoloModel on one process: packed-document isolation, the patch merge, masks, loss, presets."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from megatron.solo.batch import PackedExample, collate
from megatron.solo.config import get_preset
from megatron.solo.model import build_model, make_transformer_config, masked_token_loss, packed_causal_mask

CFG = get_preset("tiny").replace(vocab_size=400, sliding_window=6, max_sequence_length=64)


@pytest.fixture(scope="module")
def model(megatron_world):
    torch.manual_seed(0)
    return build_model(CFG, make_transformer_config(CFG)).eval()


def example(rng, lens, n_patches):
    n = sum(lens)
    pos = np.sort(rng.choice(n, n_patches, replace=False)) if n_patches else np.zeros(0, np.int64)
    return PackedExample(
        tokens=rng.integers(3, CFG.vocab_size, n),
        targets=rng.random(n) < 0.5,
        doc_offsets=np.concatenate([[0], np.cumsum(lens)]),
        patches=rng.standard_normal((n_patches, CFG.patch_dim)).astype(np.float32),
        patch_positions=pos,
    )


def sub_example(ex, start, end):
    keep = (ex.patch_positions >= start) & (ex.patch_positions < end)
    return PackedExample(
        ex.tokens[start:end],
        ex.targets[start:end],
        np.array([0, end - start]),
        ex.patches[keep],
        ex.patch_positions[keep] - start,
    )


def run(model, batch, labels=False):
    with torch.no_grad():
        return model(
            batch.tokens,
            batch.position_ids,
            batch.cu_seqlens,
            batch.max_seqlen,
            batch.patches,
            batch.patch_index,
            labels=batch.labels if labels else None,
        )


def test_each_document_of_a_pack_equals_the_document_alone(model):
    rng = np.random.default_rng(1)
    lens = [9, 14, 5]  # longer than the sliding window of 6, so the window is exercised too
    packs = [example(rng, lens, 10), example(rng, [20, 8], 4)]
    packed = run(model, collate(packs, 40, pad_id=2))
    assert torch.isfinite(packed).all()
    for row, ex in enumerate(packs):
        offsets = ex.doc_offsets
        for start, end in zip(offsets[:-1], offsets[1:]):
            alone = run(model, collate([sub_example(ex, start, end)], 24, pad_id=2))
            # equal up to fp32 reduction order (different sequence lengths tile the matmuls differently)
            torch.testing.assert_close(packed[row, start:end], alone[0, : end - start], rtol=0, atol=2e-6)


def test_documents_do_interact_without_the_boundary(model):
    """Control: the same tokens as one document give different outputs for the second part."""
    rng = np.random.default_rng(2)
    ex = example(rng, [5, 5], 0)
    merged = PackedExample(ex.tokens, ex.targets, np.array([0, 10]), ex.patches, ex.patch_positions)
    a, b = run(model, collate([ex], 12, pad_id=2)), run(model, collate([merged], 12, pad_id=2))
    assert (a[0, 5:10] - b[0, 5:10]).abs().max() > 1e-3


def test_patch_positions_get_vpatch_embedding_plus_projection(model):
    rng = np.random.default_rng(3)
    ex = example(rng, [12], 4)
    batch = collate([ex], 12, pad_id=2)
    with torch.no_grad():
        emb = model.embed(batch.tokens, batch.patches, batch.patch_index)[:, 0]  # [s, h]
        expected = model.embedding.word_embeddings.weight[batch.tokens[0]].clone()
        expected[torch.from_numpy(ex.patch_positions)] += batch.patches @ model.patch_embedding.weight.T
    torch.testing.assert_close(emb, expected, rtol=1e-6, atol=1e-6)


def test_patches_change_only_their_document_and_later_positions(model):
    rng = np.random.default_rng(4)
    ex = example(rng, [8, 8], 0)
    with_patch = PackedExample(
        ex.tokens,
        ex.targets,
        ex.doc_offsets,
        rng.standard_normal((1, CFG.patch_dim)).astype(np.float32),
        np.array([11]),
    )
    a, b = run(model, collate([ex], 16, pad_id=2)), run(model, collate([with_patch], 16, pad_id=2))
    assert torch.equal(a[0, :11], b[0, :11])
    assert (a[0, 11:] - b[0, 11:]).abs().amax(-1).min() > 0


def test_packed_causal_mask_matches_a_loop():
    cu = torch.tensor([0, 3, 7, 10, 16, 20], dtype=torch.int32)  # two rows of 10
    for window in (None, 1, 2, 3):
        mask = packed_causal_mask(cu, 2, 10, window)
        bounds = cu.tolist()
        doc = [next(i for i in range(len(bounds) - 1) if bounds[i] <= t < bounds[i + 1]) for t in range(20)]
        for r in range(2):
            for q in range(10):
                for k in range(10):
                    same = doc[r * 10 + q] == doc[r * 10 + k]
                    visible = same and k <= q and (window is None or q - k < window)
                    assert mask[r, 0, q, k].item() == (not visible)


def test_loss_is_token_mean_over_targets(model):
    rng = np.random.default_rng(5)
    batch = collate([example(rng, [7, 9], 3), example(rng, [12], 2)], 20, pad_id=2)
    per_token = run(model, batch, labels=True)
    logits = run(model, batch).double()
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch.labels.reshape(-1), reduction="none")
    torch.testing.assert_close(per_token.double().reshape(-1), ce, rtol=1e-5, atol=1e-5)
    total, count, logs = masked_token_loss(batch.loss_mask, per_token)
    assert count.item() == int(batch.loss_mask.sum())
    expected = (ce * batch.loss_mask.reshape(-1).double()).sum()
    assert math.isclose(total.item(), expected.item(), rel_tol=1e-5)
    assert torch.equal(logs["lm loss"], torch.stack([total, batch.loss_mask.sum()]))


def _loss_and_grads(model, batch, loss_mask):
    model.zero_grad()
    per_token = model(
        batch.tokens,
        batch.position_ids,
        batch.cu_seqlens,
        batch.max_seqlen,
        batch.patches,
        batch.patch_index,
        labels=batch.labels,
        loss_mask=loss_mask,
    )
    (per_token * batch.loss_mask).sum().backward()
    return per_token.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_logits_at_targets_only_give_the_dense_loss_and_gradients(model):
    rng = np.random.default_rng(6)
    batch = collate([example(rng, [7, 9], 3), example(rng, [12], 2)], 20, pad_id=2)
    dense, dense_grads = _loss_and_grads(model, batch, None)
    sparse, sparse_grads = _loss_and_grads(model, batch, batch.loss_mask)
    mask = batch.loss_mask.bool()
    assert 0 < mask.sum() < mask.numel()
    torch.testing.assert_close(sparse[mask], dense[mask], rtol=1e-6, atol=1e-6)
    assert torch.all(sparse[~mask] == 0) and torch.all(dense[~mask] != 0)
    for name, grad in dense_grads.items():
        torch.testing.assert_close(sparse_grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)
    none, grads = _loss_and_grads(model, batch, torch.zeros_like(batch.loss_mask))  # a pack without targets
    assert torch.all(none == 0) and all(torch.all(g == 0) for g in grads.values())


def test_mistral_7b_preset_on_meta_has_the_expected_parameter_count(megatron_world):
    cfg = get_preset("mistral-7b")
    assert (
        cfg.num_layers,
        cfg.hidden_size,
        cfg.ffn_hidden_size,
        cfg.num_attention_heads,
        cfg.num_query_groups,
        cfg.sliding_window,
        cfg.rotary_base,
    ) == (32, 4096, 14336, 32, 8, 4096, 1e4)
    with torch.device("meta"):
        model = build_model(
            cfg, make_transformer_config(cfg, params_dtype=torch.bfloat16, perform_initialization=False)
        )
    count = sum(p.numel() for p in model.parameters())
    mistral = 7_241_732_096  # MistralForCausalLM(Mistral-7B-v0.1), vocab 32000
    extra = (33152 - 32000) * 4096 * 2 + 3072 * 4096  # padded SOLO vocab (in and out) + patch projection
    assert count == mistral + extra == cfg.num_parameters()
    assert all(p.is_meta for p in model.parameters())


@pytest.mark.parametrize(
    "changes, field",
    [
        (dict(num_query_groups=3), "num_query_groups"),
        (dict(hidden_size=66), "hidden_size"),
        (dict(sliding_window=0), "sliding_window"),
        (dict(num_layers=0), "num_layers"),
    ],
)
def test_config_errors_name_the_field(changes, field):
    with pytest.raises(ValueError, match=f"^{field}:"):
        get_preset("tiny").replace(**changes)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(tensor_parallel=3), "tensor_model_parallel_size"),
        (dict(pipeline_parallel=3), "pipeline_model_parallel_size"),
        (dict(sequence_parallel=True), "sequence_parallel"),
        (dict(tensor_parallel=2, sequence_parallel=True, seq_length=33), "seq_length"),
    ],
)
def test_parallel_layout_errors_name_the_flag(kwargs, field):
    with pytest.raises(ValueError, match=f"^{field}:"):
        get_preset("tiny").validate_parallel(**kwargs)


def test_rope_is_looked_up_by_restarting_position_ids(model):
    """Exact restart semantics (relative RoPE alone would hide a shift): the rotary table the decoder gets
    at each slot is the one of that slot's position inside its document."""
    rng = np.random.default_rng(6)
    batch = collate([example(rng, [5, 9, 3], 2), example(rng, [11], 0)], 20, pad_id=2)
    out = model._preprocess(input_ids=batch.tokens, position_ids=batch.position_ids)
    table = model.rotary_pos_emb(64)  # [P, 1, 1, d]
    assert torch.equal(out[1], table[batch.position_ids.t()].squeeze(2))
    unpacked = table[:20].squeeze(1)[:, None].expand(20, 2, 1, -1)  # what positions 0..s-1 would give
    assert out[1].shape == unpacked.shape and not torch.equal(out[1], unpacked)


def test_text_only_step_under_ddp_with_overlapped_grad_reduce(megatron_world):
    """The patch projection must get a (zero) gradient on steps without images, or DDP's bucket sync fails."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    tc = make_transformer_config(CFG)
    ddp = DistributedDataParallel(
        tc,
        DistributedDataParallelConfig(overlap_grad_reduce=True, use_distributed_optimizer=False),
        build_model(CFG, tc),
    )
    rng = np.random.default_rng(7)
    for n_patches in (0, 3):
        batch = collate([example(rng, [10], n_patches)], 12, pad_id=2)
        ddp.zero_grad_buffer()
        loss = ddp(
            batch.tokens,
            batch.position_ids,
            batch.cu_seqlens,
            batch.max_seqlen,
            None if n_patches == 0 else batch.patches,
            None if n_patches == 0 else batch.patch_index,
            labels=batch.labels,
        )
        masked_token_loss(batch.loss_mask, loss)[0].backward()
        ddp.finish_grad_sync()
        grad = ddp.module.patch_embedding.weight.main_grad
        assert (grad.abs().sum() > 0) == (n_patches > 0)
