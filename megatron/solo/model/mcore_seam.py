"""Every place ``SoloModel`` depends on megatron-core 0.16.1 internals that are not public API, in one module.

``SoloModel`` is a ``GPTModel`` and reaches into it where the public API has no hook:

- ``GPTModel._preprocess`` returns ``(decoder_input, rotary_pos_emb, rotary_pos_cos, rotary_pos_sin,
  sequence_len_offset, padding_mask[, rotary_pos_cos_sin])``; on the local backend the rotary table at
  index 1 (built for positions 0..s-1) is replaced by one looked up at ``position_ids``, because packed
  documents restart their positions (:func:`rotary_at_positions`);
- ``GPTModel._postprocess(hidden_states, input_ids, position_ids, labels, ..., loss_mask=...)`` (called
  with keywords) is overridden to compute logits at the loss targets only;
- ``ColumnParallelLinear.sequence_parallel`` is switched off while the output layer projects hidden states
  that are already gathered (:func:`output_layer_gathered`);
- under Transformer Engine's THD layout the pipeline stages exchange ``[b·s, 1, h]``, so the schedule
  must be sized ``seq_length=b·s, micro_batch_size=1`` (:func:`pipeline_tensor_shape`).

:func:`check_internals` verifies the signatures and attributes these rely on and raises, naming what
changed, on a megatron-core whose internals moved; ``tests/model/test_mcore_seam.py`` runs it and checks the
``_preprocess`` tuple's order by behaviour.
"""

from __future__ import annotations

import contextlib
import inspect

import torch

ROTARY_INDEX = 1  # rotary_pos_emb in GPTModel._preprocess's output
PREPROCESS_PARAMETERS = ("input_ids", "position_ids", "decoder_input")
POSTPROCESS_PARAMETERS = ("hidden_states", "input_ids", "position_ids", "labels")


class MegatronCoreChanged(RuntimeError):
    """The installed megatron-core no longer has an internal this project relies on."""


def rotary_at_positions(preprocessed: tuple, rotary_pos_emb, position_ids: torch.Tensor) -> tuple:
    """``_preprocess``'s output with the rotary table looked up at ``position_ids`` [b, s] (restarting per
    document) instead of 0..s-1. ``rotary_pos_emb`` is the model's ``RotaryEmbedding``."""
    out = list(preprocessed)
    if out[ROTARY_INDEX] is None:  # not the first stage's concern, or no RoPE
        return preprocessed
    out[ROTARY_INDEX] = rotary_lookup(rotary_pos_emb, position_ids)
    return tuple(out)


def rotary_lookup(rotary_pos_emb, position_ids: torch.Tensor) -> torch.Tensor:
    """[s, b, 1, d]: the rotary table of ``rotary_pos_emb`` (a ``RotaryEmbedding``) at ``position_ids`` [b, s]."""
    table = rotary_pos_emb(int(position_ids.max()) + 1)  # [P, 1, 1, d]
    return table[position_ids.t()].squeeze(2)


@contextlib.contextmanager
def output_layer_gathered(output_layer):
    """Run a ``ColumnParallelLinear`` on hidden states that are already gathered over sequence parallelism:
    its forward must not all-gather them again."""
    sequence_parallel = output_layer.sequence_parallel
    output_layer.sequence_parallel = False
    try:
        yield output_layer
    finally:
        output_layer.sequence_parallel = sequence_parallel


def pipeline_tensor_shape(backend: str, micro_batch_size: int, seq_length: int) -> tuple[int, int]:
    """``(seq_length, micro_batch_size)`` to give megatron-core's pipeline schedule: what a stage sends."""
    return (micro_batch_size * seq_length, 1) if backend == "te" else (seq_length, micro_batch_size)


def _parameters(function) -> list[str]:
    return list(inspect.signature(function).parameters)[1:]  # without self


def check_internals() -> None:
    """Raise :class:`MegatronCoreChanged` unless the installed megatron-core has what this module relies on."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear

    problems = []
    pre = _parameters(GPTModel._preprocess)
    if tuple(pre[: len(PREPROCESS_PARAMETERS)]) != PREPROCESS_PARAMETERS:
        problems.append(f"GPTModel._preprocess{tuple(pre)} no longer starts with {PREPROCESS_PARAMETERS}")
    post = _parameters(GPTModel._postprocess)
    if tuple(post[: len(POSTPROCESS_PARAMETERS)]) != POSTPROCESS_PARAMETERS or "loss_mask" not in post:
        problems.append(f"GPTModel._postprocess{tuple(post)} no longer takes {POSTPROCESS_PARAMETERS} and loss_mask")
    if "self.sequence_parallel" not in inspect.getsource(ColumnParallelLinear.forward):
        problems.append("ColumnParallelLinear.forward no longer reads self.sequence_parallel")
    if "compute_language_model_loss" not in dir(GPTModel):
        problems.append("GPTModel.compute_language_model_loss is gone")
    if problems:
        raise MegatronCoreChanged(
            "megatron-core's internals changed (megatron/solo/model/mcore_seam.py): " + "; ".join(problems)
        )
