"""A tiny random Megatron SOLO checkpoint with the real tokenizer (a helper module, imported by name)."""

from pathlib import Path

import torch

# the local lmms-eval task folder (not in conftest.py: "from conftest import" picks whichever conftest came first)
TASKS = Path(__file__).resolve().parents[2] / "examples" / "solo" / "lmms_tasks"


def write_tiny_checkpoint(root: Path, tokenizer, seed: int = 0) -> Path:
    """The ``tiny`` preset, random weights, saved at iteration 3 with its tokenizer; returns ``root``."""
    from megatron.solo.checkpointing import CheckpointMetadata, save_model
    from megatron.solo.config import get_preset
    from megatron.solo.model import build_model, make_transformer_config

    cfg = get_preset("tiny").replace(vocab_size=tokenizer.vocab_size)
    torch.manual_seed(seed)
    model = build_model(cfg, make_transformer_config(cfg)).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # far from init: a flat model would rank every answer the same
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1.0 + 0.1 * noise if "norm" in name else 0.2 * noise)
    tokenizer.save_pretrained(root)
    save_model(root, model, CheckpointMetadata(cfg, cfg.padded_vocab_size()), iteration=3)
    return root
