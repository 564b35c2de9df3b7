"""The SOLO model on megatron-core: ``GPTModel`` + a pixel-patch projection, packed-document attention."""

from megatron.solo.model.attention import document_ids, packed_causal_mask, thd_packed_seq_params
from megatron.solo.model.build import build_model, make_transformer_config
from megatron.solo.model.loss import LOSS_AVERAGING, masked_token_loss, sample_weights, weighted_token_loss
from megatron.solo.model.solo_model import SoloModel
from megatron.solo.model.specs import RMSNorm, resolve_backend

__all__ = [
    "LOSS_AVERAGING",
    "sample_weights",
    "weighted_token_loss",
    "RMSNorm",
    "SoloModel",
    "build_model",
    "document_ids",
    "make_transformer_config",
    "masked_token_loss",
    "packed_causal_mask",
    "resolve_backend",
    "thd_packed_seq_params",
]
