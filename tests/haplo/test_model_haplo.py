"""HaploModel on one process: against a float64 direct computation, packed-document isolation, the image
blocks' bidirectional attention, the stem's gradients, the config family and the TE refusal."""

import dataclasses
import json

import numpy as np
import pytest
import torch
from haplo_reference import haplo_logits

from megatron.solo.batch import PackedExample, collate
from megatron.solo.config import ModelConfig, get_preset
from megatron.solo.families import PRESETS, build_model, config_from_dict
from megatron.solo.haplo.config import HAPLO_PRESETS, HaploConfig
from megatron.solo.haplo.model import HaploModel, build_haplo_model
from megatron.solo.model import make_transformer_config

CFG = HAPLO_PRESETS["haplo-tiny"].replace(vocab_size=300, max_sequence_length=64)
SEQ = 40


@pytest.fixture(scope="module")
def model(megatron_world):
    torch.manual_seed(0)
    m = build_model(CFG, make_transformer_config(CFG)).eval()
    with torch.no_grad():  # the released init leaves the newline at zero: make it count in the comparisons
        m.image_newline.normal_()
    return m


def image_example(rng, doc_lengths, images):
    """A pack of documents; ``images`` = [(start, rows, cols)]: a rows × cols patch grid, a newline after
    each row, placed at token ``start`` (inside one document)."""
    n = sum(doc_lengths)
    positions, table, spans = [], [], []
    for start, rows, cols in images:
        for r in range(rows):
            for c in range(cols):
                positions.append(start + r * (cols + 1) + c)
                table.append((r % CFG.tile_patches) * CFG.tile_patches + c % CFG.tile_patches)
        spans.append((start, start + rows * (cols + 1)))
    return PackedExample(
        tokens=rng.integers(3, CFG.vocab_size, n),
        targets=rng.random(n) < 0.6,
        doc_offsets=np.concatenate([[0], np.cumsum(doc_lengths)]),
        patches=rng.standard_normal((len(positions), CFG.patch_dim)).astype(np.float32),
        patch_positions=np.asarray(positions, dtype=np.int64),
        image_spans=np.asarray(spans, dtype=np.int64).reshape(-1, 2),
        patch_table_index=np.asarray(table, dtype=np.int64),
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
            image_block_ids=batch.image_block_ids,
            patch_table_index=batch.patch_table_index,
        )


def two_packs(rng):
    return collate(
        [
            image_example(rng, [18, 15], [(3, 2, 3), (21, 2, 2)]),
            image_example(rng, [10, 25], [(12, 3, 5)]),
        ],
        SEQ,
        pad_id=0,
        patch_dim=CFG.patch_dim,
    )


def test_forward_equals_a_float64_direct_computation(model):
    batch = two_packs(np.random.default_rng(1))
    got = run(model, batch).double()
    want = haplo_logits(CFG, model.state_dict(), batch)[..., : got.shape[-1]]
    real = torch.arange(SEQ)[None, :] < batch.pack_lengths[:, None]  # padding rows: any finite value
    assert (got - want)[real].abs().max() < 1e-4
    assert want[real].abs().max() > 0.1  # the comparison is not between two near-zero tensors


def test_a_wrong_mask_is_seen_by_the_reference_comparison(model, monkeypatch):
    """Control: with a plain causal mask the model no longer matches the reference (so the test can fail)."""
    import megatron.solo.haplo.model as haplo_model

    batch = two_packs(np.random.default_rng(1))
    original = haplo_model.haplo_attention_mask
    monkeypatch.setattr(
        haplo_model, "haplo_attention_mask", lambda cu, blocks: original(cu, torch.full_like(blocks, -1))
    )
    got = run(model, batch).double()
    want = haplo_logits(CFG, model.state_dict(), batch)[..., : got.shape[-1]]
    real = torch.arange(SEQ)[None, :] < batch.pack_lengths[:, None]
    assert (got - want)[real].abs().max() > 1e-2


def test_each_document_of_a_pack_equals_the_document_alone(model):
    rng = np.random.default_rng(2)
    packed = image_example(rng, [14, 20], [(2, 2, 3), (19, 3, 3)])
    batch = collate([packed], SEQ, pad_id=0, patch_dim=CFG.patch_dim)
    whole = run(model, batch)
    for start, end in ((0, 14), (14, 34)):
        keep = (packed.patch_positions >= start) & (packed.patch_positions < end)
        spans = packed.image_spans[(packed.image_spans[:, 0] >= start) & (packed.image_spans[:, 1] <= end)]
        alone = PackedExample(
            packed.tokens[start:end],
            packed.targets[start:end],
            np.array([0, end - start]),
            packed.patches[keep],
            packed.patch_positions[keep] - start,
            image_spans=spans - start,
            patch_table_index=packed.patch_table_index[keep],
        )
        single = run(model, collate([alone], SEQ, pad_id=0, patch_dim=CFG.patch_dim))
        assert (whole[0, start:end] - single[0, : end - start]).abs().max() < 1e-5


def test_image_positions_see_the_whole_image_and_text_sees_only_the_past(model):
    rng = np.random.default_rng(3)
    ex = image_example(rng, [34], [(4, 3, 3), (20, 2, 2)])  # image 1: tokens 4..15, image 2: 20..25
    base = collate([ex], SEQ, pad_id=0, patch_dim=CFG.patch_dim)
    changed = ex.patches.copy()
    changed[8] += 1.0  # the last patch of image 1 (token 14)
    after = run(
        model, collate([PackedExample(**{**ex.__dict__, "patches": changed})], SEQ, pad_id=0, patch_dim=CFG.patch_dim)
    )
    diff = (run(model, base) - after)[0].abs().amax(-1)
    assert diff[4:14].min() > 1e-6  # earlier positions of the same image see it (bidirectional)
    assert diff[:4].max() == 0  # text before the image does not
    assert diff[15:34].min() > 1e-6 and diff[34:].max() == 0  # the rest of the document sees it; padding not
    later = ex.patches.copy()
    later[-1] += 1.0  # image 2's last patch: image 1 and the text between must not see it
    moved = run(
        model, collate([PackedExample(**{**ex.__dict__, "patches": later})], SEQ, pad_id=0, patch_dim=CFG.patch_dim)
    )
    diff2 = (run(model, base) - moved)[0].abs().amax(-1)
    assert diff2[:20].max() == 0 and diff2[20:24].min() > 1e-6


def test_text_only_step_still_gives_the_stem_gradients(megatron_world):
    """DDP's bucket sync expects every gradient: the stem runs on nothing when a batch has no image."""
    torch.manual_seed(0)
    m = build_model(CFG, make_transformer_config(CFG))
    rng = np.random.default_rng(4)
    ex = PackedExample(rng.integers(3, 300, 20), rng.random(20) < 0.5, np.array([0, 20]), None, np.zeros(0, np.int64))
    b = collate([ex], SEQ, pad_id=0, patch_dim=CFG.patch_dim)
    loss = m(b.tokens, b.position_ids, b.cu_seqlens, b.max_seqlen, None, None, labels=b.labels, loss_mask=b.loss_mask)
    (loss * b.loss_mask).sum().backward()
    missing = [name for name, p in m.named_parameters() if p.grad is None]
    assert not missing
    assert m.patch_embed.weight.grad.abs().sum() == 0 and m.connector.weight.grad.abs().sum() > 0


def test_per_token_loss_is_the_cross_entropy_of_the_logits(model):
    batch = two_packs(np.random.default_rng(5))
    logits = run(model, batch)
    loss = run(model, batch, labels=True)
    want = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch.labels.flatten(), reduction="none")
    assert (loss.flatten() - want).abs().max() < 1e-4


def test_config_round_trips_through_json_and_selects_its_family():
    for name, preset in PRESETS.items():
        back = config_from_dict(json.loads(json.dumps(preset.to_dict())))
        assert back == preset and type(back) is type(preset), name
    solo = get_preset("tiny").to_dict()
    assert solo.pop("family") == "solo"
    assert type(config_from_dict(solo)) is ModelConfig  # written before the field existed: SOLO
    with pytest.raises(ValueError, match="family: unknown model family 'nope'"):
        config_from_dict({**solo, "family": "nope"})
    with pytest.raises(ValueError, match="family"):
        ModelConfig.from_dict(CFG.to_dict())


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="^sliding_window:"):
        CFG.replace(sliding_window=8)
    with pytest.raises(ValueError, match="^tile_size:"):
        CFG.replace(tile_size=50)
    with pytest.raises(ValueError, match="^llm_bias:"):
        CFG.replace(llm_bias="some")
    with pytest.raises(ValueError, match="^tensor_model_parallel_size:"):
        HaploConfig(
            **{**CFG.__dict__, "pre_decoder": CFG.pre_decoder.replace(num_attention_heads=2)}
        ).validate_parallel(tensor_parallel=4)


def test_released_geometry_counts(megatron_world):
    """Parameter counts: the formula agrees with a built model (tiny), and the 7B presets are what they claim."""
    torch.manual_seed(0)
    for bias in ("none", "all"):
        cfg = CFG.replace(llm_bias=bias)
        m = build_model(cfg, make_transformer_config(cfg))
        assert sum(p.numel() for p in m.parameters()) == cfg.num_parameters()
        assert (m.decoder.layers[0].self_attention.linear_proj.bias is not None) == (bias == "all")
    assert abs(HAPLO_PRESETS["haplo-vicuna-7b"].num_parameters() - 7.05e9) < 0.01e9
    assert len(CFG.image_grid_pinpoints) == 14 and len(HAPLO_PRESETS["haplo-llama3-8b"].image_grid_pinpoints) == 14


def test_transformer_engine_backend_is_refused_with_the_reason(megatron_world):
    tc = make_transformer_config(CFG)
    tc.transformer_impl = "transformer_engine"
    with pytest.raises(NotImplementedError, match="--transformer-impl local"):
        build_haplo_model(CFG, tc)
    assert issubclass(HaploModel, torch.nn.Module)


def test_model_flops_count_the_pre_decoder_and_connector():
    from megatron.solo.training.metrics import model_flops

    pre = CFG.pre_decoder
    llm_only = ModelConfig(**{f.name: getattr(CFG, f.name) for f in dataclasses.fields(ModelConfig)})
    extra = model_flops(CFG, 100, 3000) - model_flops(llm_only, 100, 3000)
    h, d, f, n = pre.hidden_size, pre.head_dim, pre.ffn_hidden_size, pre.num_layers
    weights = n * (h * 3 * pre.num_attention_heads * d + pre.num_attention_heads * d * h + 3 * h * f)  # MHA: q,k,v,o
    want = 6 * (weights + h * CFG.hidden_size) * 100 + 12 * n * pre.num_attention_heads * d * 3000
    assert extra == pytest.approx(want)
