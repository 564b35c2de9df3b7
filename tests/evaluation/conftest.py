"""A tiny random Megatron checkpoint and its HF export, shared by the evaluation tests."""

import pytest
from tiny_checkpoint import write_tiny_checkpoint


@pytest.fixture(scope="session")
def tiny_megatron(megatron_world, tokenizer, tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("eval") / "ckpt", tokenizer)


@pytest.fixture(scope="session")
def tiny_export(tiny_megatron, tmp_path_factory):
    from megatron.solo.convert.checkpoint import megatron_to_hf_checkpoint

    return megatron_to_hf_checkpoint(tiny_megatron, tmp_path_factory.mktemp("eval") / "hf")
