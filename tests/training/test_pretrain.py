"""pretrain_solo.py end to end on CPU (gloo, tiny preset): parallel parity, exact resume, resharding, signals.

Every run starts from the same release checkpoint (random tiny weights, as a converted model would be), so
layouts whose padded vocabularies differ still start from identical weights.
"""

from __future__ import annotations

import math
import os
import signal

import pytest
import torch
from loader_helpers import SEQ_LENGTH, preprocess_to
from PIL import Image
from pretrain_helpers import (
    checkpoint_common,
    losses,
    metrics,
    recipe_args,
    run_pretrain,
    saved_rng,
    saved_weights,
    start_pretrain,
    wait_for_lines,
)

from megatron.solo import faults
from megatron.solo import image as im

ITERS = 4


@pytest.fixture(scope="module")
def data(tmp_path_factory, sample_photos) -> list[str]:
    """--data-path values: 0.6 captioned photos (image packs), 0.4 text."""
    root = tmp_path_factory.mktemp("pretrain-data")
    captions = []
    for i in range(16):
        path = root / f"photo{i}.jpg"
        size = [(96, 64), (64, 96), (70, 50), (100, 100)][i % 4]
        im.load_image(sample_photos[i % len(sample_photos)]).resize(size, Image.Resampling.BICUBIC).save(path)
        captions.append({"image": path.name, "caption": f"photo number {i} of a series of sixteen"})
    text = [{"text": f"Document {i}: " + " ".join(f"word{(i * 7 + k) % 50}" for k in range(40))} for i in range(16)]
    return ["0.6", preprocess_to(root / "captions", captions), "0.4", preprocess_to(root / "text", text)]


@pytest.fixture(scope="module")
def release(tmp_path_factory, megatron_world, tokenizer) -> str:
    """A release checkpoint of the tiny preset with the real tokenizer, padded for TP=2."""
    from megatron.solo.checkpointing import CheckpointMetadata, save_model
    from megatron.solo.config import get_preset
    from megatron.solo.model import build_model, make_transformer_config
    from megatron.solo.parallel import tensor_parallel_seed

    cfg = get_preset("tiny")
    tensor_parallel_seed(7)
    model = build_model(cfg, make_transformer_config(cfg), padded_vocab_size=cfg.padded_vocab_size(2))
    root = tmp_path_factory.mktemp("release")
    tokenizer.save_pretrained(root)
    save_model(root, model, CheckpointMetadata(cfg, cfg.padded_vocab_size(2)))
    return str(root)


def common(data, release, *extra) -> list[str]:
    return recipe_args(data, release, SEQ_LENGTH, ITERS, *extra)


@pytest.fixture(scope="module")
def reference(data, release, tmp_path_factory):
    """TP=1 × DP=1, 4 micro-batches of 1 pack per step, uninterrupted."""
    out = tmp_path_factory.mktemp("reference")
    run_pretrain(common(data, release, "--metrics-file", str(out / "m.jsonl"), "--peak-tflops", "1"))
    return out / "m.jsonl"


def test_reference_run_learns_and_logs_every_metric(reference):
    m = metrics(reference)
    assert sorted(m) == list(range(1, ITERS + 1))
    assert m[ITERS]["lm_loss"] < m[1]["lm_loss"] - 0.2  # it learns
    for line in m.values():
        assert line["img_lm_loss"] is not None and line["txt_lm_loss"] is not None  # both kinds of pack
        assert line["target_tokens"] > 0 and line["tokens_per_s"] > 0 and math.isfinite(line["grad_norm"])
        assert line["consumed_samples"] == 4 * line["iteration"]
    assert m[1]["lr"] == pytest.approx(3e-3)  # warmup 1 → peak, then cosine towards --min-lr
    assert 3e-4 <= m[ITERS]["lr"] < m[2]["lr"] < m[1]["lr"]


def _reference_work(data, tokenizer) -> dict[int, dict[str, float]]:
    """Per iteration of the reference run, from its batches rebuilt here: target tokens on image-bearing and
    on text-only packs, real tokens and attention pairs (what the trainer's metrics must be made of)."""
    from megatron.solo.training.arguments import parse_data_path
    from megatron.solo.training.dataset import BlendedPackDataset, build_train_loader
    from megatron.solo.training.metrics import batch_work

    dataset = BlendedPackDataset(parse_data_path(data), ITERS * 4, seed=1234, decode_patches=False)
    batches = build_train_loader(
        dataset,
        seq_length=SEQ_LENGTH,
        micro_batch_size=1,
        data_parallel_rank=0,
        data_parallel_size=1,
        num_workers=0,
        pad_id=tokenizer.pad_id,
    )
    work = {it: dict(img=0.0, txt=0.0, tokens=0.0, pairs=0.0) for it in range(1, ITERS + 1)}
    for i, batch in enumerate(batches):
        w = work[i // 4 + 1]
        kind = "img" if (batch.tokens == tokenizer.vision_patch_id).any() else "txt"
        w[kind] += batch.loss_mask.sum().item()
        tokens, pairs = batch_work(batch.cu_seqlens, batch.pack_lengths, SEQ_LENGTH, None).tolist()
        w["tokens"] += tokens
        w["pairs"] += pairs
    return work


def test_logged_losses_add_up_and_flops_follow_the_work(reference, data, tokenizer):
    """Image and text losses are token-weighted parts of the loss; TFLOP/s is the model FLOPs of the real
    tokens over the step time, MFU that over --peak-tflops (1 here)."""
    from megatron.solo.config import get_preset
    from megatron.solo.training.metrics import model_flops

    work = _reference_work(data, tokenizer)
    for it, line in metrics(reference).items():
        w = work[it]
        assert w["img"] > 0 and w["txt"] > 0, it
        assert line["target_tokens"] == w["img"] + w["txt"]
        parts = line["img_lm_loss"] * w["img"] + line["txt_lm_loss"] * w["txt"]
        assert line["lm_loss"] == pytest.approx(parts / line["target_tokens"], rel=1e-6)  # fp32 sums
        seconds = line["ms_per_iteration"] / 1000
        assert line["tokens_per_s"] == pytest.approx(w["tokens"] / seconds, rel=1e-9)
        assert line["padding"] == pytest.approx(1 - w["tokens"] / (4 * SEQ_LENGTH), rel=1e-9)
        cfg = get_preset("tiny")  # the release is padded for TP=2; logits only at the targets
        flops = model_flops(
            cfg, w["tokens"], w["pairs"], logit_tokens=line["target_tokens"], padded_vocab_size=cfg.padded_vocab_size(2)
        )
        assert line["tflops_per_device"] == pytest.approx(flops / seconds / 1e12, rel=1e-6)
        assert line["mfu"] == pytest.approx(line["tflops_per_device"] / 1.0, rel=1e-12)


def test_tp2_dp2_with_sequence_parallel_matches_tp1(data, release, reference, tmp_path):
    """4 ranks, micro-batch 2: the same global batches, the same losses up to fp32 reduction order."""
    out = tmp_path / "m.jsonl"
    run_pretrain(
        common(
            data,
            release,
            "--tensor-model-parallel-size",
            "2",
            "--sequence-parallel",
            "--micro-batch-size",
            "2",
            "--metrics-file",
            str(out),
        ),
        nproc=4,
        timeout=300,
    )
    got, want = metrics(out), metrics(reference)
    assert sorted(got) == sorted(want)
    for it in want:
        # Step 1 starts from identical weights: only reduction order differs. Later, Adam's normalised
        # updates amplify that noise a little per step (a layout bug shows at step 1, by orders of magnitude).
        tol = 2e-5 if it == 1 else 3e-4
        for key in ("lm_loss", "img_lm_loss", "txt_lm_loss", "grad_norm"):  # grad norm: clipping sees the same
            assert got[it][key] == pytest.approx(want[it][key], rel=tol), (it, key)
        assert got[it]["target_tokens"] == want[it]["target_tokens"]


def test_killed_run_resumes_exactly_also_at_another_tensor_parallel_size(data, release, reference, tmp_path):
    save = tmp_path / "ckpt"
    killed = run_pretrain(
        common(
            data, release, "--save", str(save), "--save-interval", "2", "--metrics-file", str(tmp_path / "killed.jsonl")
        ),
        expect_rc=None,
        env=faults.env("train.kill_at_iteration", 3),
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert (save / "latest_checkpointed_iteration.txt").read_text().strip() == "2"

    # The checkpoint at iteration 2, resumed at TP=2 (a new --save: the original stays untouched).
    run_pretrain(
        common(
            data,
            release,
            "--load",
            str(save),
            "--save",
            str(tmp_path / "tp2"),
            "--tensor-model-parallel-size",
            "2",
            "--metrics-file",
            str(tmp_path / "tp2.jsonl"),
        ),
        nproc=2,
    )
    # Re-running the killed command: --save holds a checkpoint, so it resumes from it.
    resumed = run_pretrain(
        common(
            data,
            release,
            "--save",
            str(save),
            "--save-interval",
            "2",
            "--metrics-file",
            str(tmp_path / "resumed.jsonl"),
        )
    )
    assert "resume" in resumed.stdout

    want = losses(reference)
    assert losses(tmp_path / "killed.jsonl") == {it: want[it] for it in (1, 2, 3)}
    assert losses(tmp_path / "resumed.jsonl") == {it: want[it] for it in (3, 4)}  # bit-exact
    tp2 = losses(tmp_path / "tp2.jsonl")
    assert sorted(tp2) == [3, 4]
    for it in tp2:
        assert tp2[it] == pytest.approx(want[it], rel=1e-5 if it == 3 else 3e-4)
    assert (save / "latest_checkpointed_iteration.txt").read_text().strip() == str(ITERS)


def test_sigterm_saves_and_exits_cleanly(data, release, tmp_path):
    save, out = tmp_path / "ckpt", tmp_path / "m.jsonl"
    args = common(data, release, "--save", str(save), "--metrics-file", str(out))
    args[args.index("--train-iters") + 1] = "100000"
    proc = start_pretrain(args)
    try:
        wait_for_lines(out, 2, proc)
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, stderr[-3000:]
    last = max(metrics(out))
    assert "termination signal" in stdout
    assert (save / "latest_checkpointed_iteration.txt").read_text().strip() == str(last)


def test_new_stage_from_a_trained_checkpoint_starts_fresh(data, release, selective, tmp_path):
    """--finetune: the weights of a checkpoint, iteration 0, a new warmup; frozen LM trains only the projection.
    Stage 1 is the ``selective`` run's checkpoint: one trained step (its Adam state has step 1), only read here."""
    stage1, stage2 = selective[1] / "ckpt", tmp_path / "stage2"
    out = tmp_path / "m.jsonl"
    run_pretrain(
        common(
            data,
            release,
            "--load",
            str(stage1),
            "--finetune",
            "--save",
            str(stage2),
            "--train-iters",
            "2",
            "--freeze-language-model",
            "--metrics-file",
            str(out),
            "--lr",
            "1e-3",
            "--lr-warmup-iters",
            "2",
        )
    )
    m = metrics(out)
    assert sorted(m) == [1, 2] and m[1]["consumed_samples"] == 4
    assert (stage2 / "tokenizer.model").is_file()
    # The new schedule from step 0: half-way through its 2 warm-up steps, then its peak.
    assert m[1]["lr"] == pytest.approx(5e-4) and m[2]["lr"] == pytest.approx(1e-3)
    # A fresh optimizer and data position: 2 steps of Adam (3 if stage 1's state had been loaded), 8 samples.
    common1, common2 = checkpoint_common(stage1, 1), checkpoint_common(stage2, 2)
    assert {g["step"] for g in common2["optimizer"]["optimizer"]["param_groups"]} == {2}
    assert common2["opt_param_scheduler"]["num_steps"] == 2 and common2["opt_param_scheduler"]["max_lr"] == 1e-3
    assert (common2["iteration"], common2["consumed_samples"]) == (2, 8)
    assert common1["consumed_samples"] == 4
    # --freeze-language-model: every weight but the patch projection is stage 1's, bit for bit.
    before, after = saved_weights(stage1, 1), saved_weights(stage2, 2)
    assert before.keys() == after.keys()
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed == {name for name in before if name.startswith("patch_embedding")} != set()


def test_non_finite_loss_stops_before_the_optimizer_step(data, release, tmp_path):
    proc = run_pretrain(
        common(data, release, "--lr", "1e30", "--min-lr", "1e30", "--clip-grad", "0", "--train-iters", "6"), expect_rc=3
    )
    assert "the loss is not finite" in proc.stderr


def test_a_non_finite_loss_leaves_weights_and_optimizer_untouched(data, release, megatron_world):
    """In process: a step whose loss is NaN (NaN pixels) raises before the optimizer and the schedule move."""
    from megatron.solo.training.arguments import parse_args
    from megatron.solo.training.loop import NonFiniteLossError, Trainer

    trainer = Trainer(parse_args(common(data, release, "--num-workers", "0")))
    loader = trainer._batches()
    batches = [next(loader) for _ in range(trainer.layout.num_microbatches)]
    poisoned = [b for b in batches if b.patches.numel()]
    assert poisoned, "no image in the first step"
    for batch in poisoned:  # float32 patches pass the device normalisation as they are (uint8 cannot be NaN)
        batch.patches = torch.full(batch.patches.shape, float("nan"))
    model = trainer.parts.model
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    with pytest.raises(NonFiniteLossError, match="stopped before the optimizer step"):
        trainer.train_step(iter(batches))
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), name
    assert trainer.parts.scheduler.num_steps == 0
    adams = [o.optimizer for o in getattr(trainer.parts.optimizer, "chained_optimizers", [trainer.parts.optimizer])]
    assert not any(state.get("step") for adam in adams for state in adam.state.values())  # Adam never stepped


def test_missing_data_fails_at_start_naming_the_prefix(release, tmp_path):
    proc = run_pretrain(common(["1", str(tmp_path / "nowhere")], release), expect_rc=2)
    assert "nowhere" in proc.stderr and "--data-path" in proc.stderr


def test_packs_longer_than_seq_length_fail_before_the_model_is_built(data, release):
    proc = run_pretrain(common(data, release, "--seq-length", "64"), expect_rc=2)
    assert "error: --seq-length: 64 is shorter than the packs of --data-path prefix" in proc.stderr, proc.stderr
    assert data[1] in proc.stderr and "Traceback" not in proc.stderr


# ---------------------------------------------------------------------------------------------
# Flags run through the trainer, each cheaply (launches are shared: a launch costs more than its steps)


def _assert_same_steps(got: dict[int, dict], want: dict[int, dict], iterations, rel: float = 1e-5) -> None:
    assert sorted(got) == list(iterations)
    for it in iterations:
        for key in ("lm_loss", "img_lm_loss", "txt_lm_loss", "grad_norm"):  # grad norm: the backward agrees too
            assert got[it][key] == pytest.approx(want[it][key], rel=rel), (it, key)


def test_pipeline_parallel_with_full_recompute_matches_and_exit_interval_saves(data, release, reference, tmp_path):
    """PP=2 (2 ranks) with --recompute-granularity full --recompute-method uniform: the reference's steps;
    --exit-interval 2 stops after iteration 2 with a checkpoint."""
    save, out = tmp_path / "ckpt", tmp_path / "m.jsonl"
    proc = run_pretrain(
        common(
            data,
            release,
            "--pipeline-model-parallel-size",
            "2",
            "--recompute-granularity",
            "full",
            "--recompute-method",
            "uniform",
            "--recompute-num-layers",
            "1",
            "--exit-interval",
            "2",
            "--save",
            str(save),
            "--metrics-file",
            str(out),
        ),
        nproc=2,
    )
    assert "stopping after iteration 2: --exit-interval 2" in proc.stdout
    assert (save / "latest_checkpointed_iteration.txt").read_text().strip() == "2"
    _assert_same_steps(metrics(out), metrics(reference), [1, 2])


@pytest.fixture(scope="module")
def selective(data, release, tmp_path_factory):
    """--recompute-granularity selective, stopped by a tiny --exit-duration-in-mins after its first step."""
    root = tmp_path_factory.mktemp("selective")
    proc = run_pretrain(
        common(
            data,
            release,
            "--recompute-granularity",
            "selective",
            "--exit-duration-in-mins",
            "1e-9",
            "--save",
            str(root / "ckpt"),
            "--metrics-file",
            str(root / "m.jsonl"),
        )
    )
    return proc, root


def test_selective_recompute_matches_and_exit_duration_saves(selective, reference):
    proc, root = selective
    assert "stopping after iteration 1: --exit-duration-in-mins 1e-09" in proc.stdout
    assert (root / "ckpt" / "latest_checkpointed_iteration.txt").read_text().strip() == "1"
    _assert_same_steps(metrics(root / "m.jsonl"), metrics(reference), [1])


def test_resume_without_optimizer_and_rng_on_a_new_schedule(data, release, reference, selective, tmp_path):
    """--no-load-optim: Adam starts afresh (2 steps in the next checkpoint, not 3); --no-load-rng: the RNG
    streams start from --seed, as in the run that saved; --override-opt-param-scheduler: the flags' schedule
    at the checkpoint's step (without it the changed schedule is refused)."""
    _, root = selective
    out, save = tmp_path / "m.jsonl", tmp_path / "ckpt"
    run_pretrain(
        common(
            data,
            release,
            "--load",
            str(root / "ckpt"),
            "--save",
            str(save),
            "--train-iters",
            "3",
            "--lr-decay-iters",
            "5",
            "--lr",
            "1e-3",
            "--min-lr",
            "1e-4",
            "--no-load-optim",
            "--no-load-rng",
            "--override-opt-param-scheduler",
            "--metrics-file",
            str(out),
        )
    )
    m, want = metrics(out), metrics(reference)
    assert sorted(m) == [2, 3]
    assert m[2]["lm_loss"] == pytest.approx(want[2]["lm_loss"], rel=1e-5)  # its weights and data position
    # cosine from 1e-3 to 1e-4 over steps 1..5, at step 3: half-way
    assert m[3]["lr"] == pytest.approx(1e-4 + 0.5 * 9e-4)
    saved = checkpoint_common(save, 3)
    assert {g["step"] for g in saved["optimizer"]["optimizer"]["param_groups"]} == {2}
    assert saved["opt_param_scheduler"]["num_steps"] == 3 and saved["consumed_samples"] == 12
    # Nothing in a step draws from torch's generator (no dropout); setting up draws the same in both runs (the
    # model's initialisation, the loader's base seed). Loaded, the state would be the checkpoint's advanced by
    # this run's loader: a different one.
    assert torch.equal(saved_rng(save, 3)["torch"], saved_rng(root / "ckpt", 1)["torch"])
