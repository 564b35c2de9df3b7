"""HaploVL through the shared stack: preprocessing with ``--image-layout haplo`` writes a 14-px prefix whose
header and records say so, the one loader yields the ``Batch`` fields the model's mask and position table
need, and ``pretrain_solo.py`` trains a HaploVL checkpoint (stage 2: next-token loss, everything trainable)
chosen by the checkpoint's own config: the loss falls, a killed run resumes bit-exactly, and a SOLO prefix is
refused."""

import json
import signal
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "training"))
from pretrain_helpers import losses, recipe_args, run_pretrain  # noqa: E402

from megatron.solo import faults  # noqa: E402
from megatron.solo import image as im  # noqa: E402

pytestmark = pytest.mark.timeout(600)
SEQ_LENGTH = 160
ITERS = 4
BF16_STAGE1_RTOL = 1e-3  # bf16 stage 1 against fp32, per iteration: measured ≤ 1e-4 on CPU (4 iterations), 2e-4 at PP=2
SIZES = [(96, 64), (64, 96), (70, 50), (120, 120), (40, 160)]


def preprocess(prefix: Path, records: list[dict], layout: str = "haplo") -> str:
    import io

    from megatron.solo.data.encode import EncodeConfig
    from megatron.solo.data.packing import PackConfig
    from megatron.solo.data.pipeline import PreprocessConfig
    from megatron.solo.data.pipeline import preprocess as run
    from tools.preprocess_mm_data import haplo_tiling

    source = prefix.with_suffix(".jsonl")
    source.write_text("".join(json.dumps(r) + "\n" for r in records))
    encode = EncodeConfig(layout=layout, anyres=haplo_tiling(56), image_format="png")
    config = PreprocessConfig(
        inputs=(str(source),),
        output_prefix=str(prefix),
        encode=encode,
        pack=PackConfig(seq_length=SEQ_LENGTH),
        workers=0,
        progress=False,
    )
    run(config, stream=io.StringIO())
    return str(prefix)


@pytest.fixture(scope="module")
def photos(tmp_path_factory, sample_photos) -> tuple[Path, list[dict]]:
    root = tmp_path_factory.mktemp("haplo-data")
    records = []
    for i in range(16):
        path = root / f"photo{i}.png"
        im.load_image(sample_photos[i % len(sample_photos)]).resize(SIZES[i % len(SIZES)]).save(path)
        records.append({"image": path.name, "caption": f"photo number {i} of a series of sixteen"})
    return root, records


@pytest.fixture(scope="module")
def data(photos) -> list[str]:
    root, records = photos
    text = [{"text": f"Document {i}: " + " ".join(f"word{(i * 7 + k) % 50}" for k in range(30))} for i in range(12)]
    return ["0.7", preprocess(root / "captions", records), "0.3", preprocess(root / "text", text)]


def _signature(patches: np.ndarray, table: np.ndarray, num_tokens: int) -> tuple:
    return patches.tobytes(), table.tobytes(), num_tokens


def test_prefix_records_the_haplo_layout_and_its_images(data, photos):
    """Each stored image gives exactly the released anyres pipeline's patches, position-table rows and token
    count (``haplo.anyres``: tiles, unpadding, a newline per row), computed here from the photo itself."""
    from megatron.solo.data.packed_format import PackedDataset
    from megatron.solo.haplo import anyres
    from tools.preprocess_mm_data import haplo_tiling

    tiling = haplo_tiling(56)
    root, records = photos
    want = []
    for record in records:
        img = im.load_image(root / record["image"])
        grid = anyres.anyres_grid(img.size[1], img.size[0], tiling)
        layout = anyres.image_layout(grid)
        keep = ~layout.is_newline
        patches = anyres.tile_patches(anyres.image_tiles(img, tiling), tiling)[layout.patch[keep]]
        want.append(_signature(patches, layout.position[keep], len(layout)))
    ds = PackedDataset(data[1])
    assert ds.header["layout"] == "haplo" and ds.header["patch_size"] == 14
    assert tuple(ds.header["mean"]) == anyres.CLIP_MEAN
    got = []
    for view in ds:
        patches, table, spans = view.patches_uint8(), view.patch_table_index, view.image_spans
        at = 0
        for image, (start, end) in zip(view.images, spans):
            n = image.n_patches
            assert end - start == image.num_tokens == n + image.grid[0]
            positions = view.patch_positions[at : at + n]
            assert positions.min() >= start and positions.max() < end
            assert np.all(view.tokens[start:end] == view.tokens[start])  # one placeholder id
            got.append(_signature(patches[at : at + n], table[at : at + n], image.num_tokens))
            at += n
        assert at == len(patches) == len(table)
    assert sorted(got) == sorted(want)


def test_loader_yields_image_blocks_and_table_rows(data):
    from megatron.solo.training.dataset import BlendedPackDataset, build_train_loader

    dataset = BlendedPackDataset([(0.7, data[1]), (0.3, data[3])], num_samples=8, seed=1)
    loader = build_train_loader(
        dataset, seq_length=SEQ_LENGTH, micro_batch_size=2, data_parallel_rank=0, data_parallel_size=1,
        consumed_samples=0, num_workers=0, pad_id=0, patch_dim=3 * 14 * 14,
    )  # fmt: skip
    images = 0
    for batch in loader:
        blocks = batch.image_block_ids.reshape(-1)
        assert bool((blocks[batch.patch_index] >= 0).all())  # every patch sits inside an image block
        assert int((blocks >= 0).sum()) > len(batch.patch_index) or not len(batch.patch_index)  # + newlines
        assert len(batch.patch_table_index) == len(batch.patch_index)
        assert bool((batch.patch_table_index >= 0).all()) and bool((batch.patch_table_index < 16).all())
        images += len(blocks[blocks >= 0].unique())
    assert images > 0


def test_stage1_loader_decodes_each_image_once_and_gives_the_same_patches(data, monkeypatch):
    """With the teacher's tiles, the loader decodes every image once and takes the sequence's patches from the
    tiles: byte for byte the patches of the crop-then-patchify decode (``decode_patches``)."""
    from megatron.solo.data import codec
    from megatron.solo.training.dataset import BlendedPackDataset

    blend = [(1.0, data[1])]
    plain = BlendedPackDataset(blend, num_samples=6, seed=1)
    stage1 = BlendedPackDataset(blend, num_samples=6, seed=1, teacher_inputs=True)
    decode, calls = codec.decode_image, []
    monkeypatch.setattr(codec, "decode_image", lambda *a: calls.append(1) or decode(*a))
    for i in range(len(stage1)):
        want, calls[:] = plain[i], []
        got = stage1[i]
        prefix, pack = stage1.source(i)
        assert len(calls) == len(stage1.datasets[0][pack].images) > 0, (i, len(calls))
        assert got.patches.dtype == np.uint8 and got.patches.tobytes() == want.patches.tobytes(), i
        assert np.array_equal(got.patches, got.tile_patches[got.patch_tile_rows])
        assert np.array_equal(got.patch_table_index, want.patch_table_index)


def test_stage1_targets_are_the_teachers_features_of_each_patch(data, photos, release, teacher_dir, megatron_world):
    """The training path (loader's tiles → ``Stage1Teacher.targets``) against the teacher run on each photo's
    own tiles (the released anyres pipeline), each patch's feature picked by its tile and position."""
    import torch
    from transformers import CLIPVisionModel

    from megatron.solo.families import get_preset
    from megatron.solo.haplo import anyres
    from megatron.solo.training.arguments import TrainConfig
    from megatron.solo.training.dataset import BlendedPackDataset, build_train_loader
    from megatron.solo.training.stage1 import Stage1Teacher
    from tools.preprocess_mm_data import haplo_tiling

    tiling, (root, records) = haplo_tiling(56), photos
    clip = CLIPVisionModel.from_pretrained(teacher_dir, local_files_only=True).eval()
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (anyres.CLIP_MEAN, anyres.CLIP_STD))
    by_patches = {}  # a photo's sequence patches (bytes) → its teacher targets, computed directly
    for record in records:
        img = im.load_image(root / record["image"])
        tiles = anyres.image_tiles(img, tiling)  # [n, T, T, 3]
        layout = anyres.image_layout(anyres.anyres_grid(img.size[1], img.size[0], tiling))
        keep = ~layout.is_newline
        with torch.no_grad():
            pixels = (torch.from_numpy(tiles).permute(0, 3, 1, 2).double() / 255 - mean) / std
            features = clip(pixel_values=pixels.float()).last_hidden_state[:, 1:]  # [n, side², C], no CLS
        picked = torch.stack([features[t, q] for t, q in zip(layout.tile[keep], layout.position[keep])])
        patches = anyres.tile_patches(tiles, tiling)[layout.patch[keep]]
        by_patches[patches.tobytes()] = picked

    dataset = BlendedPackDataset([(1.0, data[1])], num_samples=4, seed=1, teacher_inputs=True)
    loader = build_train_loader(
        dataset, seq_length=SEQ_LENGTH, micro_batch_size=2, data_parallel_rank=0, data_parallel_size=1,
        consumed_samples=0, num_workers=0, pad_id=0, patch_dim=3 * 14 * 14,
    )  # fmt: skip
    stage1 = Stage1Teacher(TrainConfig(load=release, distill_teacher=teacher_dir), get_preset("haplo-tiny"))
    for step, batch in zip(range(2), loader):
        want, at = [], 0
        for sample in range(2 * step, 2 * step + 2):
            for image in dataset.datasets[0][dataset.source(sample)[1]].images:
                want.append(by_patches[batch.patches[at : at + image.n_patches].numpy().tobytes()])
                at += image.n_patches
        assert at == len(batch.patches) > 0
        got = stage1.targets(batch.normalized(dataset.image_config))
        torch.testing.assert_close(got, torch.cat(want), rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def release(tmp_path_factory, megatron_world, tokenizer) -> str:
    """A release checkpoint of haplo-tiny with SOLO's tokenizer (random weights, as a converted model)."""
    from megatron.solo.checkpointing import CheckpointMetadata, save_model
    from megatron.solo.families import build_model, get_preset
    from megatron.solo.model import make_transformer_config
    from megatron.solo.parallel import tensor_parallel_seed

    cfg = get_preset("haplo-tiny").replace(vocab_size=tokenizer.vocab_size)
    tensor_parallel_seed(7)
    model = build_model(cfg, make_transformer_config(cfg), padded_vocab_size=cfg.padded_vocab_size(2))
    root = tmp_path_factory.mktemp("haplo-release")
    tokenizer.save_pretrained(root)
    save_model(root, model, CheckpointMetadata(cfg, cfg.padded_vocab_size(2)))
    return str(root)


def common(data, release, *extra) -> list[str]:
    return recipe_args(data, release, SEQ_LENGTH, ITERS, *extra)


@pytest.fixture(scope="module")
def reference(data, release, tmp_path_factory):
    out = tmp_path_factory.mktemp("haplo-reference")
    proc = run_pretrain(common(data, release, "--metrics-file", str(out / "m.jsonl")))
    return out / "m.jsonl", proc


def test_stage2_run_from_a_haplo_checkpoint_learns(reference):
    path, proc = reference
    got = losses(path)
    assert sorted(got) == list(range(1, ITERS + 1))
    assert got[ITERS] < got[1] - 0.5, got  # full fine-tuning, every weight trainable: the loss falls


def test_killed_run_resumes_exactly(data, release, reference, tmp_path):
    save = tmp_path / "ckpt"
    args = common(data, release, "--save", str(save), "--save-interval", "2")
    killed = run_pretrain(
        [*args, "--metrics-file", str(tmp_path / "killed.jsonl")],
        expect_rc=None,
        env=faults.env("train.kill_at_iteration", 3),
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    resumed = run_pretrain([*args, "--metrics-file", str(tmp_path / "resumed.jsonl")])
    assert "resume" in resumed.stdout
    want = losses(reference[0])
    assert losses(tmp_path / "resumed.jsonl") == {it: want[it] for it in (3, 4)}  # bit-exact

    from megatron.solo.checkpointing import CheckpointMetadata

    assert CheckpointMetadata.read(save).model.family == "haplo"


def test_a_solo_prefix_is_refused_for_a_haplo_model(photos, release):
    root, records = photos
    solo = preprocess(root / "solo", records[:4], layout="solo")  # image paths are relative to the JSONL
    proc = run_pretrain(recipe_args(["1.0", solo], release, 512, 1), expect_rc=2)
    assert "--image-layout haplo" in proc.stderr


def test_solo_only_features_refuse_a_haplo_checkpoint(data, release, tmp_path):
    from megatron.solo.inference import Generator

    with pytest.raises(ValueError, match="a haplo checkpoint; this generator serves SOLO models only"):
        Generator(release)
    proc = run_pretrain(common(data, release, "--freeze-language-model"), expect_rc=2)
    assert "--freeze-language-model: SOLO's warm-up" in proc.stderr


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory) -> str:
    """A tiny random CLIP vision tower seeing 56-px tiles of 14-px patches (haplo-tiny's), saved locally."""
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    config = CLIPVisionConfig(
        image_size=56, patch_size=14, hidden_size=24, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4
    )
    root = tmp_path_factory.mktemp("teacher")
    CLIPVisionModel(config).save_pretrained(root)
    return str(root)


@pytest.fixture(scope="module")
def stage1_reference(data, release, teacher_dir, tmp_path_factory) -> Path:
    """The single-process stage-1 run (``ITERS`` iterations): its checkpoint ``s1`` and metrics ``m.jsonl``."""
    out = tmp_path_factory.mktemp("haplo-stage1")
    args = ["--distill-teacher", teacher_dir, "--save", str(out / "s1"), "--metrics-file", str(out / "m.jsonl")]
    run_pretrain(common(data, release, *args))
    return out


def test_stage1_distils_the_pre_decoder_then_stage2_starts_without_heads(data, release, stage1_reference, tmp_path):
    import torch
    from megatron.core import dist_checkpointing

    from megatron.solo.checkpointing import iteration_dir

    s1, s2 = stage1_reference / "s1", tmp_path / "s2"
    got = losses(stage1_reference / "m.jsonl")
    assert got[ITERS] < got[1] - 0.5, got
    saved = dist_checkpointing.load_tensors_metadata(str(iteration_dir(s1, ITERS)))
    assert "llm_embedding.weight" in saved and "distill_heads.text_head.weight" in saved

    run_pretrain(recipe_args(data, str(s1), SEQ_LENGTH, 2, "--finetune", "--save", str(s2)))
    saved = dist_checkpointing.load_tensors_metadata(str(iteration_dir(s2, 2)))
    assert not [k for k in saved if k.startswith(("distill_heads.", "llm_embedding."))]

    before, after = _weights(release, None), _weights(s1, ITERS)  # stage 1 moved only the pre-decoder side
    for name, value in before.items():
        changed = not torch.equal(value, after[name])
        assert changed == name.startswith(
            ("embedding.", "patch_embed", "pos_embed", "image_newline", "pre_norm", "pre_decoder")
        ), name


def _weights(root, iteration):
    from megatron.solo.checkpointing import load_full_model
    from megatron.solo.parallel import ensure_model_parallel_of_one

    ensure_model_parallel_of_one()
    model, _ = load_full_model(root, iteration=iteration)
    return {name: param.detach().clone() for name, param in model.named_parameters()}


def test_stage1_pipeline_split_must_divide_the_pre_decoder(release, teacher_dir):
    """Stage 1 splits the pre-decoder's layers (2 in haplo-tiny) over the pipeline stages: evenly or not at all."""
    from megatron.solo.families import get_preset
    from megatron.solo.training.arguments import ConfigError, TrainConfig, check_model

    cfg = get_preset("haplo-tiny").replace(num_layers=4)  # the LLM's 4 layers split 4 ways; the pre-decoder's 2 not
    flags = TrainConfig(load=release, distill_teacher=teacher_dir, pipeline_model_parallel_size=4)
    message = "^--pipeline-model-parallel-size: PreDecoderConfig.num_layers: 2 is not divisible by .*=4 \\(stage 1"
    with pytest.raises(ConfigError, match=message):
        check_model(flags, cfg, cfg.padded_vocab_size())
    check_model(TrainConfig(load=release, pipeline_model_parallel_size=4), cfg, cfg.padded_vocab_size())  # stage 2
    check_model(TrainConfig(load=release, distill_teacher=teacher_dir, pipeline_model_parallel_size=2), cfg, 512)


def test_stage1_killed_run_resumes_exactly(data, release, teacher_dir, stage1_reference, tmp_path):
    args = common(
        data, release, "--distill-teacher", teacher_dir, "--save", str(tmp_path / "c"), "--save-interval", "2"
    )
    killed = run_pretrain(
        [*args, "--metrics-file", str(tmp_path / "killed.jsonl")],
        expect_rc=None,
        env=faults.env("train.kill_at_iteration", 3),
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    run_pretrain([*args, "--metrics-file", str(tmp_path / "resumed.jsonl")])
    want = losses(stage1_reference / "m.jsonl")
    assert losses(tmp_path / "resumed.jsonl") == {it: want[it] for it in (3, 4)}  # bit-exact, heads included


def test_transformer_engine_is_refused_for_haplo_at_configuration(release):
    from megatron.solo.families import get_preset
    from megatron.solo.training.arguments import ConfigError, TrainConfig, check_model

    cfg = get_preset("haplo-tiny")
    flags = TrainConfig(load=release, transformer_impl="transformer_engine", bf16=True)
    with pytest.raises(ConfigError, match="^--transformer-impl: HaploVL's mask"):
        check_model(flags, cfg, cfg.padded_vocab_size())
    check_model(TrainConfig(load=release), cfg, cfg.padded_vocab_size())  # auto: fine (local for HaploVL)


def test_bf16_runs_of_both_stages(data, release, teacher_dir, stage1_reference, tmp_path):
    """The product's dtype (bf16 weights, fp32 main params) through both stages, on the local backend: stage 1
    (its teacher in bf16 too) follows the fp32 run's distillation losses to bf16's precision."""
    run_pretrain(
        common(data, release, "--bf16", "--distill-teacher", teacher_dir, "--metrics-file", str(tmp_path / "1"))
    )
    want, got = losses(stage1_reference / "m.jsonl"), losses(tmp_path / "1")
    assert sorted(got) == sorted(want)
    for it in got:
        assert got[it] == pytest.approx(want[it], rel=BF16_STAGE1_RTOL), (it, got, want)
    run_pretrain(recipe_args(data, release, SEQ_LENGTH, 2, "--bf16", "--metrics-file", str(tmp_path / "2")))
    got = losses(tmp_path / "2")
    assert sorted(got) == [1, 2] and all(np.isfinite(v) and v > 0 for v in got.values()), got


def test_the_stage1_teacher_runs_in_the_runs_dtype(release, teacher_dir):
    import torch

    from megatron.solo.families import get_preset
    from megatron.solo.haplo.anyres import patches_to_tiles
    from megatron.solo.training.arguments import TrainConfig
    from megatron.solo.training.stage1 import Stage1Teacher

    model = get_preset("haplo-tiny")
    for bf16, dtype in ((False, torch.float32), (True, torch.bfloat16)):
        stage1 = Stage1Teacher(TrainConfig(load=release, distill_teacher=teacher_dir, bf16=bf16), model)
        assert {p.dtype for p in stage1.teacher.parameters()} == {dtype}, bf16
        tiles = patches_to_tiles(torch.rand(2 * 16, 3 * 14 * 14), stage1.tiling)
        assert stage1.teacher(tiles).dtype == dtype


@pytest.mark.parametrize(
    "layout", [["--tensor-model-parallel-size", "2", "--sequence-parallel"], ["--pipeline-model-parallel-size", "2"]]
)
def test_stage2_parallel_layouts_match_the_reference(data, release, reference, layout, tmp_path):
    """Through the trainer (DDP, distributed optimizer, finalize_model_grads): TP=2+SP and PP=2 on 2 ranks
    follow the single-process run's losses (the first step to fp32 reduction-order noise)."""
    run_pretrain(common(data, release, *layout, "--metrics-file", str(tmp_path / "m.jsonl")), nproc=2, timeout=400)
    want, got = losses(reference[0]), losses(tmp_path / "m.jsonl")
    assert sorted(got) == sorted(want)
    for it in got:
        assert got[it] == pytest.approx(want[it], rel=1e-5 if it == 1 else 3e-4), (it, got, want)


def test_stage1_tensor_parallel_follows_the_single_process_run(data, release, teacher_dir, stage1_reference, tmp_path):
    """Stage 1 through the trainer at TP=2 + SP (the teacher's tiles split over the TP ranks, vocab-parallel
    text targets) follows the TP=1 run's distillation losses."""
    common_args = common(data, release, "--distill-teacher", teacher_dir)
    tp2 = ["--tensor-model-parallel-size", "2", "--sequence-parallel", "--metrics-file", str(tmp_path / "tp2.jsonl")]
    run_pretrain([*common_args, *tp2], nproc=2, timeout=400)
    want, got = losses(stage1_reference / "m.jsonl"), losses(tmp_path / "tp2.jsonl")
    assert sorted(got) == sorted(want)
    for it in got:
        assert got[it] == pytest.approx(want[it], rel=1e-5 if it == 1 else 3e-4), (it, got, want)


def test_stage1_pipeline_parallel_follows_the_single_process_run_and_resumes_at_pp1(
    data, teacher_dir, stage1_reference, tmp_path
):
    """Stage 1 through the trainer at PP=2 (the pre-decoder's layers split over the stages, the teacher on the
    last) follows the PP=1 run's losses; its checkpoint, saved at PP=2, resumes stage 1 at PP=1 (optimizer
    included) onto the PP=1 run's next loss. (That a PP=2 stage-1 checkpoint loads into a stage-2 model is
    test_model_parallel_haplo's; that the trainer starts stage 2 from a stage-1 checkpoint,
    test_stage1_distils_the_pre_decoder_then_stage2_starts_without_heads'.) Both start from a stage-1
    checkpoint: fresh heads are drawn where the RNG stands after the stage's other layers, which depends on the
    layout."""
    s1 = str(stage1_reference / "s1")
    args = recipe_args(data, s1, SEQ_LENGTH, 2, "--finetune", "--distill-teacher", teacher_dir)
    run_pretrain([*args, "--metrics-file", str(tmp_path / "pp1.jsonl")])
    pp2 = ["--pipeline-model-parallel-size", "2", "--exit-interval", "1", "--metrics-file", str(tmp_path / "a.jsonl")]
    save = ["--save", str(tmp_path / "pp2")]
    run_pretrain([*args, *save, *pp2], nproc=2, timeout=400)
    resumed = run_pretrain([*args, *save, "--metrics-file", str(tmp_path / "b.jsonl")])
    assert "resume" in resumed.stdout
    want, got = losses(tmp_path / "pp1.jsonl"), {**losses(tmp_path / "a.jsonl"), **losses(tmp_path / "b.jsonl")}
    assert sorted(got) == sorted(want) == [1, 2]
    assert got[1] == pytest.approx(want[1], rel=1e-5), (got, want)
    assert got[2] == pytest.approx(want[2], rel=3e-4), (got, want)
