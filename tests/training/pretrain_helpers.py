"""Helpers of the trainer tests: running pretrain_solo.py with hard timeouts, reading its metrics."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

from session_run import child_env, run_in_session, torchrun_command

REPO = Path(__file__).resolve().parents[2]


def recipe_args(data: list[str], release: str, seq_length: int, train_iters: int, *extra: str) -> list[str]:
    """The flags every end-to-end trainer run shares (the GPU checks' too): 4 packs a step with the
    distributed optimizer, warm-up 1 then cosine, weight decay and clipping, a log line per iteration."""
    recipe = "--global-batch-size 4 --lr 3e-3 --min-lr 3e-4 --lr-warmup-iters 1 --weight-decay 0.1 --clip-grad 1.0"
    return ["--load", release, "--data-path", *data, "--seq-length", str(seq_length), "--train-iters",
            str(train_iters), *recipe.split(), "--use-distributed-optimizer", "--log-interval", "1",
            "--num-workers", "1", *extra]  # fmt: skip


def pretrain_command(args: list[str], nproc: int = 1) -> list[str]:
    """A plain ``python`` run for one process (a world of one), torchrun for more."""
    script = str(REPO / "pretrain_solo.py")
    if nproc == 1:
        return [sys.executable, script, *args]
    return torchrun_command(script, nproc, *args)


def run_pretrain(
    args: list[str], nproc: int = 1, timeout: float = 240, expect_rc: int | None = 0, env: dict[str, str] | None = None
):
    """Run pretrain_solo.py with a hard timeout (megatron-core hangs are a known trap); ``env``: additions
    (e.g. ``faults.env(...)``)."""
    cmd = pretrain_command(args, nproc)
    proc = run_in_session(cmd, timeout=timeout, env=child_env(**(env or {})), cwd=REPO)
    if expect_rc is not None and proc.returncode != expect_rc:
        raise AssertionError(
            f"{' '.join(cmd)} exited {proc.returncode} (expected {expect_rc}):\n"
            f"{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
        )
    return proc


def start_pretrain(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen(
        pretrain_command(args),
        env=child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
        start_new_session=True,
    )


def wait_for_lines(path: Path, n: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.is_file() and len(path.read_text().splitlines()) >= n:
            return
        if proc.poll() is not None:
            raise AssertionError(
                f"exited {proc.returncode} early:\n{proc.stdout.read()[-3000:]}\n{proc.stderr.read()[-5000:]}"
            )
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    raise AssertionError(f"{path}: fewer than {n} lines after {timeout} s")


def metrics(path: Path) -> dict[int, dict]:
    """iteration → its metrics line."""
    return {m["iteration"]: m for m in map(json.loads, path.read_text().splitlines())}


def losses(path: Path) -> dict[int, float]:
    return {it: m["lm_loss"] for it, m in metrics(path).items()}


def checkpoint_common(root: Path, iteration: int) -> dict:
    """The non-tensor state of a saved iteration: optimizer param groups (Adam's step), schedule, position."""
    from megatron.core import dist_checkpointing

    from megatron.solo.checkpointing import iteration_dir

    return dist_checkpointing.load_common_state_dict(str(iteration_dir(root, iteration)))


def saved_weights(root: Path, iteration: int) -> dict:
    """name → tensor of a saved iteration's whole model (needs a TP=PP=1 world in this process)."""
    from megatron.solo.checkpointing import load_full_model

    model, _ = load_full_model(root, iteration=iteration)
    return {name: param.detach().clone() for name, param in model.named_parameters()}


def saved_rng(root: Path, iteration: int) -> dict:
    """The RNG states a one-rank run saved (needs a TP=PP=1 world in this process)."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    from megatron.solo.checkpointing import load_sharded

    request = {"rng_state": ShardedObject("rng_state", None, (1, 1, 1), (0, 0, 0), replica_id=0)}
    return load_sharded(root, request, iteration)["rng_state"]
