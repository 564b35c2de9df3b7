"""The megatron-core internals SoloModel relies on (model/mcore_seam.py) are there, in the order assumed."""

import pytest
import torch
import torch.nn.functional as F

from megatron.solo.model import mcore_seam


def test_the_installed_megatron_core_has_every_internal_we_use():
    mcore_seam.check_internals()


def test_preprocess_returns_the_rotary_table_where_we_replace_it(megatron_world):
    """Behaviour, not only signatures: index ROTARY_INDEX of GPTModel._preprocess is the 0..s-1 rotary table."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig

    config = TransformerConfig(
        num_layers=1,
        hidden_size=32,
        num_attention_heads=2,
        ffn_hidden_size=64,
        use_cpu_initialization=True,
        activation_func=F.silu,
        add_bias_linear=False,
    )
    model = GPTModel(
        config, get_gpt_layer_local_spec(), vocab_size=64, max_sequence_length=16, position_embedding_type="rope"
    )
    tokens = torch.randint(0, 64, (2, 8))
    out = model._preprocess(input_ids=tokens, position_ids=torch.arange(8).expand(2, 8))
    assert out[0].shape == (8, 2, 32)  # decoder_input [s, b, h]
    assert torch.equal(out[mcore_seam.ROTARY_INDEX], model.rotary_pos_emb(8))
    restarted = mcore_seam.rotary_at_positions(out, model.rotary_pos_emb, torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4]] * 2))
    assert torch.equal(restarted[mcore_seam.ROTARY_INDEX][3], out[mcore_seam.ROTARY_INDEX][0].expand(2, 1, -1))


def test_a_changed_internal_fails_loudly_naming_it(monkeypatch):
    from megatron.core.models.gpt import GPTModel

    monkeypatch.setattr(GPTModel, "_postprocess", lambda self, hidden_states, input_ids, position_ids, labels: None)
    with pytest.raises(mcore_seam.MegatronCoreChanged, match=r"_postprocess.*loss_mask"):
        mcore_seam.check_internals()


def test_pipeline_stages_exchange_thd_under_te():
    assert mcore_seam.pipeline_tensor_shape("te", 2, 128) == (256, 1)
    assert mcore_seam.pipeline_tensor_shape("local", 2, 128) == (128, 2)
