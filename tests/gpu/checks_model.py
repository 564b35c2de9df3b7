"""In-process checks of the model: TE ≡ local spec, checkpoints across backends and from HF, the trainer's build."""

from __future__ import annotations

import shutil

import numpy as np
import torch
from gpu_common import (
    Context,
    bitwise_differences,
    build,
    checkpoint_parameters,
    free,
    rel_err,
    same_keys,
    set_all_parameters,
)

# bf16 tolerances of TE vs the local spec (both bf16, same weights). On CPU, bf16 vs fp32 of the local spec
# at these sizes gives logits 0.008, loss 0.007, worst gradient 0.012; a missing window or missing document
# isolation gives logits ≥ 0.4, loss ≥ 0.4, worst gradient ≥ 0.66 (so the 10× margin below holds).
TOLERANCE = {"logits": 2e-2, "loss": 3e-2, "grads": 5e-2}
CONTROL_MARGIN = 10.0  # a negative control must miss every tolerance by at least this factor


def parity_config(ctx: Context):
    """head_dim 128, a window shorter than some documents: the GPU sizes, or a smaller CPU model."""
    from megatron.solo.config import get_preset

    if ctx.smoke:
        return get_preset("tiny").replace(
            hidden_size=256,
            ffn_hidden_size=512,
            num_attention_heads=2,
            num_query_groups=1,
            vocab_size=1000,
            sliding_window=32,
            max_sequence_length=128,
        )
    return get_preset("tiny").replace(
        hidden_size=512,
        ffn_hidden_size=1024,
        num_attention_heads=4,
        num_query_groups=2,
        vocab_size=1000,
        sliding_window=64,
        max_sequence_length=256,
    )


def parity_batch(cfg, seed: int = 0):
    """Two packs of ``max_sequence_length`` slots: documents longer and shorter than the window, padding,
    patches on ~15% of the slots, about half the positions targets."""
    from megatron.solo.batch import PackedExample, collate

    s, w = cfg.max_sequence_length, cfg.sliding_window
    rows = [[int(2.6 * w), w // 2, int(0.6 * w)], [w // 3, int(3.4 * w)]]  # then padding to s = 4w
    rng = np.random.default_rng(seed)
    examples = []
    for lengths in rows:
        n = sum(lengths)
        assert n < s, (lengths, s)
        positions = np.sort(rng.choice(n, n // 6, replace=False))
        examples.append(
            PackedExample(
                tokens=rng.integers(3, cfg.vocab_size, n),
                targets=rng.random(n) < 0.5,
                doc_offsets=np.concatenate([[0], np.cumsum(lengths)]),
                patches=rng.standard_normal((len(positions), cfg.patch_dim)).astype(np.float32),
                patch_positions=positions,
            )
        )
    return collate(examples, s, pad_id=0, patch_dim=cfg.patch_dim)


def forward_backward(model, batch, cu_seqlens=None) -> dict:
    """Logits (no labels), then per-token loss with labels + loss mask and its backward: every grad."""
    cu = batch.cu_seqlens if cu_seqlens is None else cu_seqlens
    args = (batch.tokens, batch.position_ids, cu, int(torch.diff(cu).max()), batch.patches, batch.patch_index)
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        logits = model(*args).float()
    loss = model(*args, labels=batch.labels, loss_mask=batch.loss_mask)
    mask = batch.loss_mask
    (loss.float() * mask).sum().div(mask.sum()).backward()
    params = checkpoint_parameters(model)
    missing = [k for k, p in params.items() if p.grad is None]
    if missing:
        raise AssertionError(f"no gradient for {missing[:5]}")
    return {"logits": logits, "loss": loss.detach().float(), "grads": {k: p.grad.float() for k, p in params.items()}}


def compare(got: dict, want: dict, mask: torch.Tensor) -> dict:
    """Relative errors. The loss is measured against its spread over the targets: at random initialisation
    every token's loss is ≈ ln V, so a plain relative error would hide a wrong attention pattern."""
    targets = mask.bool()
    spread = want["loss"] - want["loss"][targets].mean()
    loss_err = ((got["loss"] - want["loss"]) * mask).norm().item() / (spread * mask).norm().item()
    grads = {k: rel_err(got["grads"][k], want["grads"][k]) for k in same_keys(got["grads"], want["grads"], "grads")}
    worst = max(grads, key=grads.get)
    return {
        "logits": rel_err(got["logits"], want["logits"]),
        "loss": loss_err,
        "loss_plain": rel_err(got["loss"], want["loss"]),
        "grads": grads[worst],
        "worst_grad": worst,
        "grads_median": float(np.median(list(grads.values()))),
        "nonzero_loss_off_targets": int(torch.count_nonzero(got["loss"][~targets])),
    }


def check_te_local_parity(ctx: Context, backend_log) -> dict:
    """The TE model (THD, window in TE) ≡ the local spec (dense mask) on one state dict; controls must fail."""
    from megatron.solo.checkpointing import CheckpointMetadata, load_model, save_model

    cfg = parity_config(ctx)
    batch = parity_batch(cfg).to(ctx.device)
    local = build(cfg, ctx, "local", seed=11)
    root = ctx.workdir("parity-ckpt")
    save_model(root, local, CheckpointMetadata(cfg, cfg.padded_vocab_size()))
    want = forward_backward(local, batch)
    del local
    free()

    candidate = build(cfg, ctx, ctx.backend, seed=12)
    load_model(root, candidate)
    got = forward_backward(candidate, batch)
    backend_log.quiet_te()  # the first TE forward has logged its choice
    # No document isolation: one span per pack row, so documents of a row see each other.
    s = batch.tokens.shape[1]
    rows = torch.arange(0, (batch.tokens.shape[0] + 1) * s, s, dtype=torch.int32, device=ctx.device)
    no_isolation = forward_backward(candidate, batch, cu_seqlens=rows)
    del candidate
    free()
    no_window_model = build(cfg.replace(sliding_window=None), ctx, ctx.backend, seed=13)
    load_model(root, no_window_model)
    no_window = forward_backward(no_window_model, batch)
    del no_window_model
    free()

    parity = compare(got, want, batch.loss_mask)
    controls = {
        "no_window": compare(no_window, want, batch.loss_mask),
        "no_document_isolation": compare(no_isolation, want, batch.loss_mask),
    }
    parity_ok = all(parity[k] < TOLERANCE[k] for k in TOLERANCE) and parity["nonzero_loss_off_targets"] == 0
    controls_ok = {name: all(c[k] > CONTROL_MARGIN * TOLERANCE[k] for k in TOLERANCE) for name, c in controls.items()}
    return {
        "ok": parity_ok and all(controls_ok.values()),
        "backends": f"{ctx.backend} vs local",
        "dtype": str(ctx.dtype),
        "head_dim": cfg.head_dim,
        "sliding_window": cfg.sliding_window,
        "seq_length": s,
        "micro_batch": batch.tokens.shape[0],
        "document_lengths": torch.diff(batch.cu_seqlens).tolist(),
        "patches": batch.patches.shape[0],
        "targets": int(batch.loss_mask.sum()),
        "tolerance": TOLERANCE,
        "control_margin": CONTROL_MARGIN,
        "parity": parity,
        "negative_controls": controls,
        "negative_controls_fail_widely": controls_ok,
        "te_attention_backend": backend_log.lines or ("not reported by TE" if not ctx.smoke else None),
    }


def small_config():
    from megatron.solo.config import get_preset

    return get_preset("tiny").replace(
        hidden_size=256,
        ffn_hidden_size=512,
        num_attention_heads=2,
        num_query_groups=1,
        vocab_size=1000,
        sliding_window=32,
    )


def _round_trip(ctx: Context, cfg, source_backend: str, target_backend: str, name: str) -> dict:
    """Save a model of one backend, load it into a differently initialised model of the other: bit-equal."""
    from megatron.solo.checkpointing import CheckpointMetadata, load_model, save_model

    source = build(cfg, ctx, source_backend, seed=21)
    target = build(cfg, ctx, target_backend, seed=22)
    src, dst = checkpoint_parameters(source), checkpoint_parameters(target)
    differed_before = len(bitwise_differences(src, dst))
    root = ctx.workdir(name)
    save_model(root, source, CheckpointMetadata(cfg, cfg.padded_vocab_size()))
    load_model(root, target)
    differ = bitwise_differences(src, dst)
    return {
        "ok": not differ and differed_before > 0,
        "tensors": len(src),
        "differed_before_load": differed_before,
        "differ_after_load": differ[:10],
    }


def check_checkpoint_local_te(ctx: Context) -> dict:
    """local → TE and TE → local through a checkpoint: every tensor bit-equal (and it had to change)."""
    cfg = small_config()
    to_te = _round_trip(ctx, cfg, "local", ctx.backend, "ckpt-local-to-te")
    to_local = _round_trip(ctx, cfg, ctx.backend, "local", "ckpt-te-to-local")
    return {
        "ok": to_te["ok"] and to_local["ok"],
        "dtype": str(ctx.dtype),
        "local_to_te": to_te,
        "te_to_local": to_local,
    }


def check_checkpoint_hf(ctx: Context) -> dict:
    """HF Mistral → Megatron release (on this host) → load into the TE model → save → HF export: bit-equal."""
    from tiny_models import random_mistral

    from megatron.solo.checkpointing import CheckpointMetadata, load_model, save_model
    from megatron.solo.convert.checkpoint import hf_to_megatron_checkpoint, megatron_to_hf_checkpoint
    from megatron.solo.convert.hf_export import read_hf_checkpoint
    from megatron.solo.model import build_model, make_transformer_config
    from megatron.solo.tokenizer import SoloTokenizer, default_tokenizer_model

    hf_vocab = 32000
    hf_dir, mg_dir, te_dir, out_dir = (ctx.root / n for n in ("hf-in", "hf-megatron", "hf-te", "hf-out"))
    original = random_mistral(vocab_size=hf_vocab).to(ctx.dtype)
    original.save_pretrained(hf_dir)
    shutil.copyfile(default_tokenizer_model(), hf_dir / "tokenizer.model")
    want = {k: v.detach().clone() for k, v in original.state_dict().items()}
    del original

    metadata = hf_to_megatron_checkpoint(hf_dir, mg_dir)
    cfg = metadata.model
    model = build_model(
        cfg,
        make_transformer_config(cfg, params_dtype=ctx.dtype, backend=ctx.backend, perform_initialization=False),
        padded_vocab_size=metadata.padded_vocab_size,
    ).to(ctx.device)
    load_model(mg_dir, model)
    on_device = all(p.device.type == ctx.device.type for p in model.parameters())
    SoloTokenizer.from_pretrained(mg_dir).save_pretrained(te_dir)  # the export reads the tokenizer from here
    save_model(te_dir, model, CheckpointMetadata(cfg, metadata.padded_vocab_size))
    backend = model.backend
    del model
    free()

    megatron_to_hf_checkpoint(te_dir, out_dir, dtype=ctx.dtype)
    got, _ = read_hf_checkpoint(out_dir)
    differ, compared = [], 0
    for name, tensor in want.items():
        exported = got[name]
        if "embed_tokens" in name or "lm_head" in name:  # SOLO adds 1029 tokens after Mistral's 32000
            exported = exported[:hf_vocab]
        compared += 1
        if exported.dtype != tensor.dtype or not torch.equal(exported, tensor):
            differ.append(name)
    return {
        "ok": not differ and on_device and backend == ctx.backend and compared > 0,
        "backend": backend,
        "dtype": str(ctx.dtype),
        "loaded_on": ctx.device.type,
        "all_on_device": on_device,
        "tensors_compared": compared,
        "differ": differ[:10],
    }


def check_trainer_build(ctx: Context, distributed_optimizer: bool) -> dict:
    """``build_components`` as the trainer runs it; weights loaded from a release survive an optimizer step.

    Every weight of the release is 0.5; a step with zero gradients must leave them there (a stale fp32
    main copy would write the random initialisation back), and every parameter must be on the device.
    """
    from megatron.solo.checkpointing import CheckpointMetadata, save_model
    from megatron.solo.config import get_preset
    from megatron.solo.training.arguments import TrainConfig
    from megatron.solo.training.build import build_components
    from megatron.solo.training.checkpoint import Start, load_training_checkpoint

    cfg = get_preset("tiny").replace(vocab_size=1000)
    padded = cfg.padded_vocab_size()
    root = ctx.workdir(f"release-half-{'distopt' if distributed_optimizer else 'ddp'}")
    release = build(cfg, ctx, "local", seed=31)
    set_all_parameters(release, 0.5)
    save_model(root, release, CheckpointMetadata(cfg, padded))
    del release

    train = TrainConfig(
        model_preset="tiny",
        train_iters=0,
        lr=1e-3,
        bf16=not ctx.smoke,
        transformer_impl="local" if ctx.smoke else "transformer_engine",
        use_distributed_optimizer=distributed_optimizer,
    )
    parts = build_components(train, cfg, padded)
    params = list(parts.model.parameters())
    at_half_before = sum(bool((p == 0.5).all()) for p in params)
    load_training_checkpoint(
        Start(cfg, padded, "weights", str(root), None),
        train,
        model=parts.model,
        optimizer=parts.optimizer,
        scheduler=parts.scheduler,
    )
    parts.ddp.zero_grad_buffer()
    parts.optimizer.zero_grad()
    stepped, grad_norm, _ = parts.optimizer.step()
    drift = max((p.detach().float() - 0.5).abs().max().item() for p in params)
    want_device = "cpu" if ctx.smoke else "cuda"
    off_device = [n for n, p in parts.model.named_parameters() if p.device.type != want_device]
    dtypes = sorted({str(p.dtype) for p in params})
    result = {
        "ok": bool(stepped)
        and drift < 1e-2
        and not off_device
        and at_half_before < len(params)
        and parts.model.backend == ctx.backend
        and dtypes == [str(ctx.dtype)],
        "distributed_optimizer": distributed_optimizer,
        "backend": parts.model.backend,
        "param_dtypes": dtypes,
        "optimizer": type(parts.optimizer).__name__,
        "step_successful": bool(stepped),
        "grad_norm": None if grad_norm is None else float(grad_norm),
        "max_abs_drift_from_0.5": drift,
        "params_at_0.5_before_load": at_half_before,
        "params": len(params),
        "off_device": off_device[:5],
    }
    del parts, params
    free()
    return result
