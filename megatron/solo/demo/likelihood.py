"""Short answers scored by a model's log-likelihood: the HaploVL miniature's evaluator.

``inference.Generator`` serves SOLO models only; a HaploVL checkpoint is scored here by ranking the candidate
answers of a question (every colour, every shape, "one" … "six", "yes"/"no") by the log-probability the
model gives each, teacher-forced. Each candidate becomes exactly the document preprocessing makes of an SFT
chat (``[INST] <image> question [/INST] answer</s>``, the image in the HaploVL layout, stored with the same
codec), goes through the trainer's path (``encode_pack`` → ``view_pack_record`` → ``collate`` →
:class:`~megatron.solo.batch.Batch`) and the model's forward with ``labels``; its score is the summed
log-probability of its target tokens (the answer and its ``</s>``), so an answer that is a prefix of another
cannot win by stopping early. Works for any model whose forward takes the Batch fields (SOLO's too).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch

from megatron.solo.batch import Batch, PackedExample, collate
from megatron.solo.data.encode import EncodeConfig, encode_sample
from megatron.solo.data.errors import Origin
from megatron.solo.data.packed_format import encode_pack, view_pack_record
from megatron.solo.data.packing import Pack
from megatron.solo.data.samples import ImageRef, Sample, Turn
from megatron.solo.demo.scenes import CANDIDATES


def chat_example(
    image: str | os.PathLike, question: str, answer: str, tokenizer, encode: EncodeConfig
) -> PackedExample:
    """One question-answer chat about ``image`` as the loader yields it (one document, one pack)."""
    turns = (Turn("user", (ImageRef(str(image)), question.strip())), Turn("assistant", (answer.strip(),)))
    doc = encode_sample(Sample(turns, Origin(str(image))), tokenizer, encode)
    tokens, record = encode_pack(Pack((doc,)), np.int32)
    view = view_pack_record(tokens, record, encode.image)
    return PackedExample(
        tokens=view.tokens.astype(np.int64),
        targets=view.targets,
        doc_offsets=view.doc_offsets,
        patches=view.patches_uint8(),
        patch_positions=view.patch_positions,
        image_spans=view.image_spans,
        patch_table_index=view.patch_table_index,
    )


@torch.no_grad()
def target_logprobs(model, batch: Batch, encode: EncodeConfig) -> torch.Tensor:
    """float32 [b]: each row's summed log-probability of its targets (``loss_mask``), teacher-forced."""
    batch = batch.normalized(encode.image)
    loss = model(
        batch.tokens,
        batch.position_ids,
        batch.cu_seqlens,
        batch.max_seqlen,
        batch.patches,
        batch.patch_index,
        labels=batch.labels,
        loss_mask=batch.loss_mask,
        image_block_ids=batch.image_block_ids,
        patch_table_index=batch.patch_table_index,
    )  # [b, s]: -log p(label) per position
    return -(loss.float() * batch.loss_mask).sum(dim=1)


def rank_answers(
    model,
    tokenizer,
    encode: EncodeConfig,
    image: str | os.PathLike,
    question: str,
    candidates: Sequence[str],
) -> tuple[str, list[float]]:
    """(the most likely candidate, every candidate's summed log-probability), one row per candidate."""
    examples = [chat_example(image, question, c, tokenizer, encode) for c in candidates]
    seq_length = max(len(ex.tokens) for ex in examples)
    batch = collate(examples, seq_length, pad_id=tokenizer.pad_id, patch_dim=encode.image.patch_dim)
    scores = target_logprobs(model, batch, encode).tolist()
    return candidates[int(np.argmax(scores))], scores


__all__ = ["CANDIDATES", "chat_example", "rank_answers", "target_logprobs"]
