"""Broken storage: checkpoints carry checksums that every load verifies, never hold NaN/inf weights, and a
killed trainer leaves no checkpoint-writer processes behind."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
import torch
from loader_helpers import SEQ_LENGTH
from pretrain_helpers import run_pretrain, start_pretrain, wait_for_lines

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def release(tmp_path_factory, megatron_world, tokenizer) -> Path:
    from megatron.solo.checkpointing import CheckpointMetadata, save_model
    from megatron.solo.config import get_preset
    from megatron.solo.model import build_model, make_transformer_config

    cfg = get_preset("tiny")
    model = build_model(cfg, make_transformer_config(cfg, backend="local"))
    root = tmp_path_factory.mktemp("release")
    tokenizer.save_pretrained(root)
    save_model(root, model, CheckpointMetadata(cfg, cfg.padded_vocab_size()))
    return root


def _copy(release: Path, tmp_path: Path) -> Path:
    import shutil

    return Path(shutil.copytree(release, tmp_path / "ckpt"))


def _largest_shard(root: Path) -> Path:
    return max((root / "release").glob("*.distcp"), key=lambda p: p.stat().st_size)


def _load(root: Path):
    from megatron.solo.checkpointing import load_full_model

    return load_full_model(root)


def test_every_save_writes_a_sha256sum_manifest(release):
    import hashlib

    manifest = (release / "release" / "CHECKSUMS").read_text().splitlines()
    digests = dict(reversed(line.split("  ", 1)) for line in manifest if not line.startswith("#"))
    files = sorted(p.name for p in (release / "release").iterdir() if p.name != "CHECKSUMS")
    assert sorted(digests) == files
    for name, digest in digests.items():
        assert hashlib.sha256((release / "release" / name).read_bytes()).hexdigest() == digest


def test_a_corrupted_shard_is_refused_naming_the_file(release, tmp_path):
    """4 KB overwritten inside a .distcp shard used to load silently."""
    from megatron.solo.checksums import ChecksumError

    root = _copy(release, tmp_path)
    shard = _largest_shard(root)
    data = bytearray(shard.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 4096] = os.urandom(4096)
    shard.write_bytes(bytes(data))
    with pytest.raises(ChecksumError, match=rf"\(release\).*{shard.name}: sha256 differs"):
        _load(root)


def test_flipped_bits_and_truncation_are_named(release, tmp_path):
    from megatron.solo.checksums import ChecksumError

    root = _copy(release, tmp_path)
    shard = _largest_shard(root)
    data = bytearray(shard.read_bytes())
    for i in range(64):  # 64 flipped bits spread over the file
        data[(i * 7919) % len(data)] ^= 1 << (i % 8)
    shard.write_bytes(bytes(data))
    with pytest.raises(ChecksumError, match=f"{shard.name}: sha256 differs"):
        _load(root)
    shard.write_bytes(bytes(data[: len(data) // 3]))
    with pytest.raises(ChecksumError, match=f"{shard.name}: .* bytes, the manifest says .*truncated"):
        _load(root)


def test_non_finite_weights_are_never_saved(megatron_world, tmp_path):
    from megatron.solo.checkpointing import CheckpointMetadata, NonFiniteParametersError, save_model
    from megatron.solo.config import get_preset
    from megatron.solo.model import build_model, make_transformer_config

    cfg = get_preset("tiny")
    model = build_model(cfg, make_transformer_config(cfg, backend="local"))
    with torch.no_grad():
        model.embedding.word_embeddings.weight[-1, :4] = float("nan")  # an unused (padding) row
    with pytest.raises(NonFiniteParametersError, match="word_embeddings"):
        save_model(tmp_path, model, CheckpointMetadata(cfg, cfg.padded_vocab_size()))
    assert not (tmp_path / "latest_checkpointed_iteration.txt").exists()


def test_the_trainer_refuses_a_damaged_checkpoint_unless_told(release, caption_prefix, tmp_path):
    root = _copy(release, tmp_path)
    shard = _largest_shard(root)
    data = bytearray(shard.read_bytes())
    data[100] ^= 0xFF
    shard.write_bytes(bytes(data))
    args = [
        "--load",
        str(root),
        "--data-path",
        caption_prefix,
        "--seq-length",
        str(SEQ_LENGTH),
        "--train-iters",
        "1",
        "--num-workers",
        "0",
        "--transformer-impl",
        "local",
    ]
    proc = run_pretrain(args, expect_rc=4)
    assert "damaged" in proc.stderr and shard.name in proc.stderr and "release" in proc.stderr
    run_pretrain([*args, "--no-verify-checkpoint"])  # a flipped bit in a weight still loads, as asked


def _session_processes(sid: int) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.getsid(int(entry.name)) == sid:
                    pids.append(int(entry.name))
            except (ProcessLookupError, PermissionError):
                pass
    return pids


def test_a_killed_trainer_leaves_no_checkpoint_helpers(release, caption_prefix, tmp_path):
    """megatron-core's checkpoint writer starts a multiprocessing manager and forks a worker per file; killing
    the trainer (only it, as an OOM killer or a failed node would) must leave none of them, nor the resource
    tracker, running. Before the fix a worker killed mid-save stayed blocked on its unread results."""
    out = tmp_path / "m.jsonl"
    proc = start_pretrain(
        [
            "--load",
            str(release),
            "--save",
            str(tmp_path / "save"),
            "--save-interval",
            "1",
            "--data-path",
            caption_prefix,
            "--seq-length",
            str(SEQ_LENGTH),
            "--train-iters",
            "1000",
            "--num-workers",
            "0",
            "--transformer-impl",
            "local",
            "--log-interval",
            "1",
            "--metrics-file",
            str(out),
        ]
    )
    try:
        wait_for_lines(out, 2, proc)  # two iterations logged: at least one checkpoint saved
        assert len(_session_processes(proc.pid)) > 1  # the writer's helpers exist
        proc.kill()
        proc.wait(timeout=30)
        # Linux kills the writer's manager and forked workers with the trainer; the resource tracker then ends
        # once no process holds its pipe (seconds; the margin is for a loaded machine).
        deadline = time.monotonic() + 30
        while _session_processes(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        left = _session_processes(proc.pid)
        assert not left, [Path(f"/proc/{pid}/cmdline").read_bytes()[:120] for pid in left]
    finally:
        if _session_processes(proc.pid):
            os.killpg(proc.pid, signal.SIGKILL)
