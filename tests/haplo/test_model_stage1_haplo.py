"""HaploModel in stage 1 (distillation): the per-token loss against a float64 computation from the state
dict (the spec's L_v, L_feat, L_ctp at the right positions), what trains and what is frozen, and a stage-2
model taking a stage-1 checkpoint without its heads and text targets."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from haplo_reference import pre_decoder_output
from test_model_haplo import CFG, SEQ, image_example

from megatron.solo.batch import collate
from megatron.solo.families import build_model
from megatron.solo.haplo.distill import DistillConfig
from megatron.solo.model import make_transformer_config

TEACHER = 24


@pytest.fixture(scope="module")
def stage1(megatron_world):
    torch.manual_seed(0)
    return build_model(CFG, make_transformer_config(CFG), distill=DistillConfig(), teacher_hidden_size=TEACHER)


def batch_and_inputs(seed: int = 1):
    rng = np.random.default_rng(seed)
    batch = collate(
        [image_example(rng, [18, 15], [(3, 2, 3), (21, 2, 2)]), image_example(rng, [10, 25], [(12, 3, 5)])],
        SEQ,
        pad_id=0,
        patch_dim=CFG.patch_dim,
    )
    teacher = torch.randn(len(batch.patch_index), TEACHER, generator=torch.Generator().manual_seed(seed))
    real = torch.arange(SEQ)[None, :] < batch.pack_lengths[:, None]
    text = (real & (batch.image_block_ids == -1)).float()
    return batch, teacher, text


def run(model, batch, teacher, text):
    return model(
        batch.tokens,
        batch.position_ids,
        batch.cu_seqlens,
        batch.max_seqlen,
        batch.patches,
        batch.patch_index,
        image_block_ids=batch.image_block_ids,
        patch_table_index=batch.patch_table_index,
        teacher_features=teacher,
        distill_mask=text,
    )


def test_per_token_distillation_loss_equals_a_float64_computation(stage1):
    batch, teacher, text = batch_and_inputs()
    with torch.no_grad():
        got = run(stage1, batch, teacher, text).double()
    sd = {k: v.double() for k, v in stage1.state_dict().items() if not k.endswith("_extra_state")}
    h = pre_decoder_output(CFG, sd, batch).reshape(-1, CFG.pre_decoder.hidden_size)
    want = torch.zeros(h.shape[0], dtype=torch.float64)
    vision = h[batch.patch_index] @ sd["distill_heads.vision_head.weight"].T + sd["distill_heads.vision_head.bias"]
    want[batch.patch_index] = 1 - F.cosine_similarity(vision, teacher.double(), dim=-1)
    where = text.reshape(-1).nonzero().squeeze(1)
    ids = batch.tokens.reshape(-1)[where]
    predicted = h[where] @ sd["distill_heads.text_head.weight"].T + sd["distill_heads.text_head.bias"]
    table = sd["llm_embedding.weight"]
    target = table[ids]
    feature = (predicted - target).norm(dim=-1) - F.cosine_similarity(predicted, target, dim=-1)
    scale = sd["distill_heads.log_logit_scale"].exp().clamp(max=100.0)
    ctp = F.cross_entropy(scale * predicted @ table.T, ids, reduction="none")  # the token itself, not the next
    want[where] = feature + ctp
    assert (got.reshape(-1) - want).abs().max() < 1e-4
    assert bool((got.reshape(-1)[want == 0] == 0).all())  # newlines and padding carry no loss
    assert want[batch.patch_index].abs().min() > 0 and ctp.min() > 0


def test_stage1_trains_the_pre_decoder_side_only(stage1):
    batch, teacher, text = batch_and_inputs(2)
    stage1.zero_grad()
    run(stage1, batch, teacher, text).sum().backward()
    trainable = {n for n, p in stage1.named_parameters() if p.requires_grad}
    assert not any(n.startswith(("decoder.", "output_layer.", "connector.", "llm_embedding.")) for n in trainable)
    for prefix in (
        "embedding.",
        "patch_embed.",
        "pos_embed",
        "image_newline",
        "pre_norm.",
        "pre_decoder.",
        "distill_heads.",
    ):
        names = [n for n in trainable if n.startswith(prefix)]
        assert names, prefix
    params = dict(stage1.named_parameters())
    assert all(params[n].grad is not None for n in trainable)
    assert params["distill_heads.log_logit_scale"].grad.abs() > 0
    assert all(p.grad is None for n, p in params.items() if n not in trainable)


def test_a_stage2_model_loads_a_stage1_state_without_heads(stage1, megatron_world):
    from megatron.solo.checkpointing import load_model_state

    stage2 = build_model(CFG, make_transformer_config(CFG))
    state = stage1.state_dict()
    with pytest.raises(KeyError, match="unexpected"):
        load_model_state(stage2, state)  # a plain load would carry the heads over: they must be left out
    kept = {k: v for k, v in state.items() if not k.startswith(("distill_heads.", "llm_embedding."))}
    load_model_state(stage2, kept)
    assert torch.equal(
        stage2.pre_decoder.layers[0].self_attention.linear_qkv.weight,
        stage1.pre_decoder.layers[0].self_attention.linear_qkv.weight,
    )


def test_a_stage1_model_without_teacher_features_is_refused(stage1):
    """As at PP > 1: a stage-1 model never runs its frozen LLM in place of the distillation loss."""
    batch, teacher, text = batch_and_inputs()
    with pytest.raises(ValueError, match="stage 1's last pipeline stage needs teacher_features and distill_mask"):
        run(stage1, batch, None, text)
    with pytest.raises(ValueError, match="stage 1's last pipeline stage needs teacher_features and distill_mask"):
        run(stage1, batch, teacher, None)
