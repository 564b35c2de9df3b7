"""``pretrain_solo.py`` end to end: kill + resume ≡ uninterrupted, and (two GPUs) TP=2+SP ≡ TP=1, PP=2 ≡ PP=1.

Every run starts from the same release checkpoint (head_dim 128, a window shorter than the packs) with the
same captioned-photo and text data, so runs differ only in what the check varies.
"""

from __future__ import annotations

import json
import math
import os
import signal
import time
from pathlib import Path

from gpu_common import REPO, Context, build, run_in_session

ITERS = 4
TIMEOUT_S = {True: 150, False: 180}  # per pretrain_solo.py process: smoke (CPU), GPU
# bf16 across parallel layouts: reduction order changes rounding (≈1e-3 on the loss at step 1); a layout bug
# (a missing all-reduce, a wrong shard) shows in the gradient norm by far more.
LAYOUT_TOLERANCE = {"lm_loss": 1e-2, "grad_norm": 5e-2}


def pretrain_arch(ctx: Context):
    """GPU: head_dim 128 (what TE's kernels see in production) and a window shorter than the 128-token packs;
    smoke: the tiny preset with that window (three CPU launches must fit the CI budget)."""
    from megatron.solo.config import get_preset

    tiny = get_preset("tiny").replace(sliding_window=64)
    if ctx.smoke:
        return tiny
    return tiny.replace(hidden_size=256, ffn_hidden_size=512, num_attention_heads=2, num_query_groups=1)


def _sample_photos() -> list[Path]:
    import skimage.data

    root = Path(skimage.data.__file__).parent
    photos = [
        root / n
        for n in ("astronaut.png", "chelsea.png", "coffee.png", "camera.png", "rocket.jpg")
        if (root / n).is_file()
    ]
    if len(photos) < 3:
        raise FileNotFoundError(f"expected scikit-image sample photos in {root}")
    return photos


def pretrain_inputs(ctx: Context) -> dict:
    """(cached) --data-path values (0.6 captioned photos, 0.4 text) and a release checkpoint padded for TP=2."""
    if "pretrain" in ctx.cache:
        return ctx.cache["pretrain"]
    from loader_helpers import SEQ_LENGTH, preprocess_to
    from PIL import Image

    from megatron.solo import image as im
    from megatron.solo.checkpointing import CheckpointMetadata, save_model
    from megatron.solo.tokenizer import SoloTokenizer

    data = ctx.workdir("pretrain-data")
    photos, captions = _sample_photos(), []
    for i in range(16):
        path = data / f"photo{i}.jpg"
        size = [(96, 64), (64, 96), (70, 50), (100, 100)][i % 4]
        im.load_image(photos[i % len(photos)]).resize(size, Image.Resampling.BICUBIC).save(path)
        captions.append({"image": path.name, "caption": f"photo number {i} of a series of sixteen"})
    text = [{"text": f"Document {i}: " + " ".join(f"word{(i * 7 + k) % 50}" for k in range(40))} for i in range(16)]
    data_path = ["0.6", preprocess_to(data / "captions", captions), "0.4", preprocess_to(data / "text", text)]

    cfg = pretrain_arch(ctx)
    release = ctx.workdir("pretrain-release")
    model = build(cfg, ctx, "local", seed=7, dtype=ctx.dtype)
    SoloTokenizer().save_pretrained(release)
    save_model(release, model, CheckpointMetadata(cfg, cfg.padded_vocab_size(2)))
    del model
    ctx.cache["pretrain"] = {"data_path": data_path, "release": str(release), "seq_length": SEQ_LENGTH}
    return ctx.cache["pretrain"]


def common_args(ctx: Context, inputs: dict, *extra: str) -> list[str]:
    from pretrain_helpers import recipe_args

    precision = ["--transformer-impl", "local"] if ctx.smoke else ["--bf16", "--transformer-impl", "transformer_engine"]
    return recipe_args(inputs["data_path"], inputs["release"], inputs["seq_length"], ITERS, *precision, *extra)


def pretrain_env() -> dict[str, str]:
    """A fresh world per launch; deterministic TE/cuBLAS kernels, so that a resume can be bit-exact."""
    drop = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT", "MASTER_ADDR", "NVTE_DEBUG", "NVTE_DEBUG_LEVEL")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(
        OMP_NUM_THREADS="1",
        PYTHONWARNINGS="ignore",
        NVTE_ALLOW_NONDETERMINISTIC_ALGO="0",
        CUBLAS_WORKSPACE_CONFIG=":4096:8",
    )
    return env


def run_pretrain(
    ctx: Context, args: list[str], nproc: int = 1, expect_rc: int | None = 0, fault: dict[str, str] | None = None
):
    """pretrain_solo.py in a session of its own (a ``train.kill_at_iteration`` fault kills its whole process
    group), under a hard timeout."""
    from pretrain_helpers import pretrain_command

    cmd = pretrain_command(args, nproc)
    start = time.monotonic()
    proc = run_in_session(cmd, timeout=TIMEOUT_S[ctx.smoke], env={**pretrain_env(), **(fault or {})}, cwd=REPO)
    ctx.cache.setdefault("launch_seconds", []).append(round(time.monotonic() - start, 1))
    if expect_rc is not None and proc.returncode != expect_rc:
        raise AssertionError(
            f"{' '.join(cmd)} exited {proc.returncode} (expected {expect_rc}):\n"
            f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
        )
    return proc


def read_metrics(path: Path) -> dict[int, dict]:
    if not path.is_file():
        return {}
    return {m["iteration"]: m for m in map(json.loads, path.read_text().splitlines())}


def reference_run(ctx: Context) -> dict[int, dict]:
    """(cached) The uninterrupted TP=1 run every other run is compared with."""
    if "reference" not in ctx.cache:
        out = ctx.workdir("pretrain-reference") / "metrics.jsonl"
        run_pretrain(ctx, common_args(ctx, pretrain_inputs(ctx), "--metrics-file", str(out)))
        ctx.cache["reference"] = read_metrics(out)
    return ctx.cache["reference"]


def _losses(metrics: dict[int, dict]) -> dict[int, float]:
    return {it: m["lm_loss"] for it, m in sorted(metrics.items())}


def check_kill_resume(ctx: Context) -> dict:
    """SIGKILL after iteration 3 (checkpoint at 2), re-run the same command: losses equal the uninterrupted run."""
    from megatron.solo import faults

    inputs = pretrain_inputs(ctx)
    want = _losses(reference_run(ctx))
    work = ctx.workdir("pretrain-kill")
    save, tracker = work / "ckpt", work / "ckpt" / "latest_checkpointed_iteration.txt"
    args = common_args(ctx, inputs, "--save", str(save), "--save-interval", "2")
    killed = run_pretrain(
        ctx,
        [*args, "--metrics-file", str(work / "killed.jsonl")],
        expect_rc=None,
        fault=faults.env("train.kill_at_iteration", 3),
    )
    latest_after_kill = tracker.read_text().strip() if tracker.is_file() else None
    resumed = run_pretrain(ctx, [*args, "--metrics-file", str(work / "resumed.jsonl")])
    got_killed, got_resumed = (
        _losses(read_metrics(work / "killed.jsonl")),
        _losses(read_metrics(work / "resumed.jsonl")),
    )
    expect_killed = {it: want.get(it) for it in (1, 2, 3)}
    expect_resumed = {it: want.get(it) for it in range(3, ITERS + 1)}
    diffs = [
        abs(got[it] - ref[it])
        for got, ref in ((got_killed, expect_killed), (got_resumed, expect_resumed))
        for it in ref
        if it in got and ref[it] is not None
    ]
    learns = len(want) == ITERS and want[ITERS] < want[1]
    return {
        "ok": killed.returncode == -signal.SIGKILL
        and latest_after_kill == "2"
        and "resume" in resumed.stdout
        and got_killed == expect_killed
        and got_resumed == expect_resumed
        and learns
        and tracker.read_text().strip() == str(ITERS),
        "killed_returncode": killed.returncode,
        "latest_after_kill": latest_after_kill,
        "resume_announced": "resume" in resumed.stdout,
        "reference_lm_loss": want,
        "killed_lm_loss": got_killed,
        "resumed_lm_loss": got_resumed,
        "max_abs_loss_difference": max(diffs) if diffs else None,
        "reference_learns": learns,
        "precision": "fp32 local" if ctx.smoke else "bf16 transformer_engine",
        "launch_seconds": ctx.cache.get("launch_seconds"),
    }


def layout_command(name: str) -> str:
    return f"bash tests/gpu/run_checks.sh --only {name}   # on a machine with ≥ 2 GPUs"


def check_layout(ctx: Context, name: str, layout_flags: list[str]) -> dict:
    """A two-rank layout ≡ TP=1: the same losses and gradient norms per iteration, up to bf16 rounding."""
    if ctx.gpus < 2:
        return {
            "ok": None,
            "status": f"not run: needs 2 GPUs ({ctx.gpus} here)",
            "command": layout_command(name),
            "pretrain_flags": layout_flags,
        }
    want = reference_run(ctx)
    out = ctx.workdir(f"pretrain-{name}") / "metrics.jsonl"
    run_pretrain(ctx, common_args(ctx, pretrain_inputs(ctx), *layout_flags, "--metrics-file", str(out)), nproc=2)
    got = read_metrics(out)
    errors = {
        key: {it: _rel(got.get(it, {}).get(key), want[it][key]) for it in sorted(want)} for key in LAYOUT_TOLERANCE
    }
    within = all(err <= LAYOUT_TOLERANCE[key] for key, per_it in errors.items() for err in per_it.values())
    return {
        "ok": sorted(got) == sorted(want) and len(want) == ITERS and within,
        "pretrain_flags": layout_flags,
        "world_size": 2,
        "tolerance": LAYOUT_TOLERANCE,
        "relative_errors": errors,
        "lm_loss": _losses(got),
        "reference_lm_loss": _losses(want),
    }


def _rel(got, want) -> float:
    if got is None or want is None or not math.isfinite(got) or not math.isfinite(want):
        return math.inf
    return abs(got - want) / max(abs(want), 1e-12)
