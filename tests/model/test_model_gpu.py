"""The Transformer Engine path (THD packed attention, sliding window) ≡ the local path. Needs a GPU + TE."""

import numpy as np
import pytest
import torch

from megatron.solo.model.specs import transformer_engine_available

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not (torch.cuda.is_available() and transformer_engine_available()), reason="needs CUDA and transformer-engine"
    ),
]


def test_te_thd_matches_local_mask_path(megatron_world, tmp_path):
    from megatron.solo.batch import PackedExample, collate
    from megatron.solo.checkpointing import CheckpointMetadata, load_model, save_model
    from megatron.solo.config import get_preset
    from megatron.solo.model import build_model, make_transformer_config

    cfg = get_preset("tiny").replace(
        vocab_size=400,
        sliding_window=8,
        max_sequence_length=64,
        hidden_size=128,
        num_attention_heads=4,
        num_query_groups=2,
    )
    meta = CheckpointMetadata(cfg, cfg.padded_vocab_size())
    local = build_model(cfg, make_transformer_config(cfg, params_dtype=torch.bfloat16, backend="local"))
    save_model(tmp_path, local, meta)  # also checks that a local-spec checkpoint loads into the TE spec
    te = build_model(cfg, make_transformer_config(cfg, params_dtype=torch.bfloat16, backend="te"))
    load_model(tmp_path, te)
    rng = np.random.default_rng(0)
    examples = [
        PackedExample(
            tokens=rng.integers(3, 400, n),
            targets=np.ones(n, bool),
            doc_offsets=np.array([0, n // 3, n]),
            patches=rng.standard_normal((3, 3072), np.float32),
            patch_positions=np.array([1, 2, 3]),
        )
        for n in (40, 64)
    ]
    batch = collate(examples, 64, pad_id=2).to("cuda")
    with torch.no_grad():
        args = (batch.tokens, batch.position_ids, batch.cu_seqlens, batch.max_seqlen, batch.patches, batch.patch_index)
        a, b = local(*args).float(), te(*args).float()
    assert (a - b).abs().max() < 0.1  # bf16 kernels differ; a wrong mask, window or RoPE gives O(1)
