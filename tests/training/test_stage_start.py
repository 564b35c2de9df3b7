"""A new stage keeps the weights it loads, in the configuration users run: bf16, with and without the
distributed optimizer, through ``pretrain_solo.py``.

megatron-core's mixed-precision optimizers keep fp32 main copies of the weights, taken when the optimizer is
built; a run that loads weights afterwards must refresh them, or its first step writes the random
initialisation back over the loaded model. Every weight of the starting checkpoint is 0.5 (a random
initialisation has std 0.02 around 0), the runs take real optimizer steps at a small rate, so every weight of
the saved result must still be ≈ 0.5.
"""

from __future__ import annotations

import pytest
import torch
from loader_helpers import SEQ_LENGTH
from pretrain_helpers import metrics, run_pretrain

CONSTANT = 0.5
ITERS = 2


@pytest.fixture(scope="module")
def constant_release(tmp_path_factory, megatron_world, tokenizer) -> str:
    """A release checkpoint of the tiny preset in which every weight is 0.5."""
    from megatron.solo.checkpointing import CheckpointMetadata, save_model
    from megatron.solo.config import get_preset
    from megatron.solo.model import build_model, make_transformer_config

    cfg = get_preset("tiny")
    model = build_model(cfg, make_transformer_config(cfg, backend="local"))
    with torch.no_grad():
        for param in model.parameters():
            param.fill_(CONSTANT)
    root = tmp_path_factory.mktemp("constant-release")
    tokenizer.save_pretrained(root)
    save_model(root, model, CheckpointMetadata(cfg, cfg.padded_vocab_size()))
    return str(root)


def _train(load: str, save, data: list[str], distributed_optimizer: bool, *extra: str) -> dict[int, dict]:
    out = save.parent / f"{save.name}.jsonl"
    args = [
        "--load",
        load,
        "--save",
        str(save),
        "--data-path",
        *data,
        "--seq-length",
        str(SEQ_LENGTH),
        "--global-batch-size",
        "2",
        "--lr",
        "1e-4",
        "--min-lr",
        "1e-5",
        "--lr-warmup-iters",
        "0",
        "--lr-decay-iters",
        str(2 * ITERS),
        "--bf16",
        "--log-interval",
        "1",
        "--num-workers",
        "0",
        "--metrics-file",
        str(out),
        "--transformer-impl",
        "local",
        *extra,
    ]
    if distributed_optimizer:
        args.append("--use-distributed-optimizer")
    if "--train-iters" not in extra:
        args += ["--train-iters", str(ITERS)]
    run_pretrain(args)
    return metrics(out)


def _assert_weights_kept(root, iteration: int) -> None:
    from megatron.solo.checkpointing import load_full_model

    model, _ = load_full_model(root, iteration=iteration, dtype=torch.bfloat16)
    worst = {name: (param.float() - CONSTANT).abs().max().item() for name, param in model.named_parameters()}
    far = {name: dev for name, dev in worst.items() if dev > 0.01}
    assert not far, f"weights left the loaded 0.5 after {iteration} bf16 steps (random init?): {far}"


@pytest.mark.parametrize("distributed_optimizer", [False, True], ids=["optimizer", "distributed-optimizer"])
def test_bf16_stage_starts_keep_the_loaded_weights(
    constant_release, caption_prefix, text_prefix, tmp_path, distributed_optimizer
):
    data = ["0.5", caption_prefix, "0.5", text_prefix]
    # 1. Stage 1: from a converted release.
    stage1 = tmp_path / "stage1"
    m = _train(constant_release, stage1, data, distributed_optimizer)
    assert sorted(m) == list(range(1, ITERS + 1)) and all(line["grad_norm"] > 0 for line in m.values())
    _assert_weights_kept(stage1, ITERS)

    # 2. Stages 2/3: --finetune from the previous stage's iteration checkpoint.
    stage2 = tmp_path / "stage2"
    assert sorted(_train(str(stage1), stage2, data, distributed_optimizer, "--finetune")) == [1, 2]
    _assert_weights_kept(stage2, ITERS)

    # 3. A resume that does not load the optimizer state: the weights of the checkpoint, not the init.
    resumed = tmp_path / "resumed"
    m = _train(
        str(stage2),
        resumed,
        data,
        distributed_optimizer,
        "--no-load-optim",
        "--train-iters",
        str(2 * ITERS),
        "--override-opt-param-scheduler",
    )
    assert sorted(m) == [3, 4]
    _assert_weights_kept(resumed, 2 * ITERS)
