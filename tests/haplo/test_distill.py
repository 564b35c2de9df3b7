"""Stage-1 distillation: each loss against a direct float64 computation, the heads, and the frozen CLIP teacher
(a tiny random ``CLIPVisionModel`` saved to a temporary directory); its features in our token order are
tested on the training path (tests/haplo/test_training_haplo.py)."""

import math

import numpy as np
import pytest
import torch
from transformers import CLIPVisionConfig, CLIPVisionModel

from megatron.solo.haplo.distill import (
    DistillationHeads,
    DistillConfig,
    VisionTeacher,
    ctp_loss_per_token,
    distillation_losses,
    feature_loss_per_token,
    load_vision_teacher,
    vision_loss_per_token,
)


def _cos64(a, b):
    a, b = a.double(), b.double()
    return [float(x @ y / math.sqrt((x @ x) * (y @ y))) for x, y in zip(a, b, strict=True)]


def test_vision_loss_is_one_minus_cosine():
    g = torch.Generator().manual_seed(0)
    p, t = torch.randn(7, 5, generator=g), torch.randn(7, 5, generator=g)
    expected = [1 - c for c in _cos64(p, t)]
    np.testing.assert_allclose(vision_loss_per_token(p, t).double().numpy(), expected, rtol=1e-5, atol=1e-6)
    assert vision_loss_per_token(p, 3 * p).abs().max() < 1e-6  # scale-free: only the direction counts


def test_feature_loss_is_plain_l2_minus_cosine():
    g = torch.Generator().manual_seed(1)
    p, t = torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g)
    l2 = [math.sqrt(float(((x - y).double() ** 2).sum())) for x, y in zip(p, t, strict=True)]
    expected = [d - c for d, c in zip(l2, _cos64(p, t), strict=True)]
    np.testing.assert_allclose(feature_loss_per_token(p, t).double().numpy(), expected, rtol=1e-5, atol=1e-6)
    assert feature_loss_per_token(t, t).add(1).abs().max() < 1e-6  # a perfect match scores −1


def test_ctp_loss_is_cross_entropy_of_the_current_token():
    g = torch.Generator().manual_seed(2)
    hidden, weight = torch.randn(5, 8, generator=g), torch.randn(11, 8, generator=g)
    ids = torch.tensor([0, 3, 3, 10, 7])
    scale = 2.5
    logits = scale * hidden.double() @ weight.double().t()
    expected = [float(torch.logsumexp(row, 0) - row[i]) for row, i in zip(logits, ids, strict=True)]
    got = ctp_loss_per_token(hidden, weight, ids, scale)
    np.testing.assert_allclose(got.double().numpy(), expected, rtol=1e-5)


def test_vocab_parallel_path_equals_the_plain_one_at_tp1(megatron_world):
    g = torch.Generator().manual_seed(3)
    hidden, weight = torch.randn(4, 8, generator=g), torch.randn(9, 8, generator=g)
    ids = torch.tensor([1, 8, 0, 4])
    plain = ctp_loss_per_token(hidden, weight, ids, 3.0)
    parallel = ctp_loss_per_token(hidden, weight, ids, 3.0, vocab_parallel=True)
    torch.testing.assert_close(parallel, plain)


def test_heads_and_the_weighted_total():
    cfg = DistillConfig(vision_weight=0.5, feature_weight=2.0, ctp_weight=3.0)
    heads = DistillationHeads(cfg, pre_hidden_size=6, teacher_hidden_size=6, text_embedding_size=4)
    torch.testing.assert_close(heads.vision_head.weight, torch.eye(6))  # identity start (equal widths)
    assert heads.text_head.weight.shape == (4, 6)
    assert math.isclose(float(heads.logit_scale()), 1 / 0.07, rel_tol=1e-5)
    g = torch.Generator().manual_seed(4)
    image_hidden, teacher = torch.randn(3, 6, generator=g), torch.randn(3, 6, generator=g)
    text_hidden, ids = torch.randn(5, 6, generator=g), torch.tensor([0, 1, 2, 2, 6])
    embedding = torch.nn.Embedding(7, 4)  # requires grad, yet must get none: a frozen target
    weight = embedding.weight.detach()
    losses = distillation_losses(heads, image_hidden, teacher, text_hidden, ids, embedding)
    predicted = heads.text_head(text_hidden)
    torch.testing.assert_close(losses["vision"], 0.5 * vision_loss_per_token(image_hidden, teacher))
    torch.testing.assert_close(losses["feature"], 2.0 * feature_loss_per_token(predicted, weight[ids]))
    torch.testing.assert_close(losses["ctp"], 3.0 * ctp_loss_per_token(predicted, weight, ids, 1 / 0.07))
    sum(term.mean() for term in losses.values()).backward()
    assert embedding.weight.grad is None
    assert all(p.grad is not None for p in heads.parameters())
    assert heads.log_logit_scale.grad != 0


def test_mlp_heads_fixed_scale_and_clamp():
    cfg = DistillConfig(head="mlp", mlp_hidden_size=10, learn_logit_scale=False, logit_scale=50.0, max_logit_scale=60.0)
    heads = DistillationHeads(cfg, pre_hidden_size=6, teacher_hidden_size=3, text_embedding_size=4)
    assert heads.vision_head(torch.zeros(2, 6)).shape == (2, 3) and heads.text_head[0].out_features == 10
    assert "log_logit_scale" not in dict(heads.named_parameters()) and float(heads.logit_scale()) == pytest.approx(50.0)
    with torch.no_grad():
        heads.log_logit_scale.fill_(10.0)
    assert float(heads.logit_scale()) == pytest.approx(60.0)


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"head": "conv"}, "head"),
        ({"ctp_weight": -1.0}, "ctp_weight"),
        ({"logit_scale": 0.0}, "logit_scale"),
        ({"max_logit_scale": 1.0}, "max_logit_scale"),
    ],
)
def test_config_errors_name_the_field(changes, field):
    with pytest.raises(ValueError, match=f"DistillConfig.{field}"):
        DistillConfig(**changes)


# --- teacher ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    torch.manual_seed(0)
    cfg = CLIPVisionConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2, image_size=28, patch_size=14
    )
    path = tmp_path_factory.mktemp("clip")
    CLIPVisionModel(cfg).save_pretrained(path)
    return path


@pytest.mark.parametrize("layer", [-1, -2, 0, 2])
def test_teacher_is_frozen_and_gives_the_requested_hidden_layer(clip_dir, layer):
    teacher = load_vision_teacher(clip_dir, layer=layer)
    reference = CLIPVisionModel.from_pretrained(clip_dir, local_files_only=True).eval()
    tiles = torch.randn(3, 3, 28, 28)
    outer = torch.nn.Sequential(teacher)
    outer.train()  # a trainer's model.train() must not wake the teacher
    assert not teacher.training and not any(m.training for m in teacher.modules())
    assert not any(p.requires_grad for p in teacher.parameters())
    features = teacher(tiles)
    assert not features.requires_grad and features.shape == (3, 4, 16)
    with torch.no_grad():
        expected = reference(pixel_values=tiles, output_hidden_states=True).hidden_states[layer][:, 1:]
    torch.testing.assert_close(features, expected)


def test_teacher_layer_out_of_range_and_missing_directory(clip_dir, tmp_path):
    with pytest.raises(ValueError, match="teacher_layer"):
        load_vision_teacher(clip_dir, layer=4)
    with pytest.raises(ValueError, match="teacher_layer"):
        VisionTeacher(CLIPVisionModel.from_pretrained(clip_dir, local_files_only=True), layer=-5)
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_vision_teacher(tmp_path)


def _sharded_teacher_worker(rank, world, init_file, clip_dir, out_dir):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        tiles = torch.randn(5, 3, 28, 28, generator=torch.Generator().manual_seed(0))  # 5 tiles: 3 + 2 (padded)
        torch.save(load_vision_teacher(clip_dir)(tiles, group=dist.group.WORLD), out_dir / f"{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(180)
def test_teacher_split_over_a_group_gives_every_rank_all_features(clip_dir, tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_sharded_teacher_worker, args=(2, str(tmp_path / "init"), clip_dir, tmp_path), nprocs=2, join=True)
    tiles = torch.randn(5, 3, 28, 28, generator=torch.Generator().manual_seed(0))
    want = load_vision_teacher(clip_dir)(tiles)
    for rank in range(2):
        torch.testing.assert_close(torch.load(tmp_path / f"{rank}.pt"), want)
