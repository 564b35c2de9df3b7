"""Greedy generation from a SOLO model, given images and a text prompt.

Prompts are built by preprocessing's own code (:func:`megatron.solo.data.encode.encode_turns`, images
stored losslessly), so a prompt is by construction a training document up to the answer: BOS, then each
image as ``<vision> … </vision>``, then the text, each part tokenized on its own. ``template="none"``
continues the pretraining format (captions and labels follow the image directly); ``template="mistral"``
wraps the parts in ``[INST] … [/INST]`` as the instruction data of stage 3. Patches are uint8 pixels,
normalised on the model's device exactly as in training (:meth:`megatron.solo.batch.Batch.normalized`).

Several prompts run as one batch, one per row, through the training forward path (``collate`` builds
positions and ``cu_seqlens``). There is no KV cache: every step recomputes the whole prefix, which is
cheap at demo scale; for serving, export to HF (``tools/convert_checkpoint.py megatron-to-hf``) and use
``generate()`` there.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from megatron.solo.batch import PackedExample, collate
from megatron.solo.checkpointing import CheckpointMetadata, load_full_model
from megatron.solo.data.encode import EncodeConfig, encode_turns
from megatron.solo.data.errors import Origin
from megatron.solo.data.packed_format import decode_patches
from megatron.solo.data.samples import ImageRef, Turn
from megatron.solo.image import DEFAULT_CONFIG, ImageConfig, ImageSource
from megatron.solo.tokenizer import SoloTokenizer

TEMPLATES = ("none", "mistral")
_ENCODE_TEMPLATE = {"none": "plain", "mistral": "mistral"}  # one user turn: its parts, or inside [INST] … [/INST]


@dataclass(frozen=True)
class Prompt:
    """Token ids of a prompt and its patches. tokens int [n]; patches uint8 [p, 3·P·P] (the resized
    image's pixels, or float32 normalised ones); patch_positions int [p]: the index in ``tokens`` of each
    patch's ``<vpatch>``."""

    tokens: np.ndarray
    patches: np.ndarray
    patch_positions: np.ndarray


def build_prompt(
    tokenizer,
    images: Sequence[ImageSource] = (),
    text: str = "",
    template: str = "none",
    image_config: ImageConfig = DEFAULT_CONFIG,
) -> Prompt:
    """BOS, the images (in order), then ``text``; under ``template="mistral"`` inside ``[INST] … [/INST]``.

    Preprocessing's encoder builds it, images stored ``raw`` (lossless) and never refused as slivers.
    """
    if template not in TEMPLATES:
        raise ValueError(f"template must be one of {', '.join(TEMPLATES)}, got {template!r}")
    parts = tuple(ImageRef(image) for image in images) + ((text.strip(),) if text.strip() else ())
    config = EncodeConfig(
        image=image_config,
        image_format="raw",
        chat_template=_ENCODE_TEMPLATE[template],
        append_eod=False,
        max_aspect_distortion=None,
    )
    tokens, _, encoded = encode_turns((Turn("user", parts),), tokenizer, config, Origin("<prompt>"))
    positions = np.flatnonzero(tokens == tokenizer.vision_patch_id)  # text never encodes to a vision id
    return Prompt(tokens.astype(np.int64), decode_patches(encoded, image_config.patch_size), positions.astype(np.int64))


def allowed_ids(tokenizer, padded_vocab_size: int) -> torch.Tensor:
    """bool [padded_vocab_size]: ids generation may emit (real vocabulary, no vision tokens)."""
    allowed = torch.zeros(padded_vocab_size, dtype=torch.bool)
    allowed[: tokenizer.vocab_size] = True
    allowed[list(tokenizer.vision_token_ids)] = False
    return allowed


@torch.no_grad()
def greedy_generate(
    model,
    prompts: Sequence[Prompt],
    *,
    eos_id: int,
    pad_id: int,
    allowed: torch.Tensor,
    max_new_tokens: int = 32,
    image_config: ImageConfig = DEFAULT_CONFIG,
) -> list[list[int]]:
    """New token ids per prompt (up to and excluding EOS), argmax over ``allowed`` at every step.

    ``model`` is a whole SoloModel (TP=PP=1) in eval mode; returns one list per prompt. uint8 patches are
    normalised by ``image_config`` on the model's device.
    """
    device = next(model.parameters()).device  # the batch goes where the model is
    allowed = allowed.to(device)
    out: list[list[int]] = [[] for _ in prompts]
    done = [False] * len(prompts)
    patch_dim = prompts[0].patches.shape[1] if prompts else image_config.patch_dim
    for _ in range(max_new_tokens):
        live = [i for i, d in enumerate(done) if not d]
        if not live:
            break
        examples = [_example(prompts[i], out[i]) for i in live]
        lengths = [len(e.tokens) for e in examples]
        batch = collate(examples, max(lengths), pad_id=pad_id, patch_dim=patch_dim).to(device).normalized(image_config)
        logits = model(
            batch.tokens, batch.position_ids, batch.cu_seqlens, batch.max_seqlen, batch.patches, batch.patch_index
        )  # [b, s, V]
        last = logits[torch.arange(len(live), device=device), torch.tensor(lengths, device=device) - 1].float()
        next_ids = last.masked_fill(~allowed[: last.shape[-1]], float("-inf")).argmax(-1).tolist()
        for i, t in zip(live, next_ids):
            if t == eos_id:
                done[i] = True
            else:
                out[i].append(t)
    return out


def _example(prompt: Prompt, generated: list[int]) -> PackedExample:
    tokens = np.concatenate([prompt.tokens, np.asarray(generated, dtype=np.int64)])
    return PackedExample(
        tokens, np.zeros(len(tokens), bool), np.array([0, len(tokens)]), prompt.patches, prompt.patch_positions
    )


class Generator:
    """A checkpoint loaded for generation: ``Generator(ckpt)([(images, text), …])`` → the decoded answers."""

    def __init__(
        self,
        load_dir: str | os.PathLike,
        iteration: int | None | str = "latest",
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ):
        if device is None:
            device = torch.cuda.current_device() if torch.cuda.is_available() else "cpu"
        family = CheckpointMetadata.read(load_dir).model.family
        if family != "solo":  # prompts are laid out as SOLO's documents, and the model called as SOLO's
            raise ValueError(f"{load_dir}: a {family} checkpoint; this generator serves SOLO models only")
        self.model, self.metadata = load_full_model(load_dir, iteration=iteration, dtype=dtype, device=device)
        self.tokenizer = SoloTokenizer(load_dir)
        self.allowed = allowed_ids(self.tokenizer, self.metadata.padded_vocab_size)

    def generate_ids(self, prompts: Sequence[Prompt], max_new_tokens: int = 32) -> list[list[int]]:
        return greedy_generate(
            self.model,
            prompts,
            eos_id=self.tokenizer.eos_id,
            pad_id=self.tokenizer.pad_id,
            allowed=self.allowed,
            max_new_tokens=max_new_tokens,
        )

    def __call__(
        self,
        requests: Sequence[tuple[Sequence[ImageSource], str]],
        *,
        template: str = "none",
        max_new_tokens: int = 32,
        batch_size: int = 32,
    ) -> list[str]:
        """Answers to (images, text) requests, in order, ``batch_size`` at a time."""
        answers: list[str] = []
        for start in range(0, len(requests), batch_size):
            chunk = requests[start : start + batch_size]
            prompts = [build_prompt(self.tokenizer, images, text, template) for images, text in chunk]
            answers += [self.tokenizer.decode(ids).strip() for ids in self.generate_ids(prompts, max_new_tokens)]
        return answers


__all__ = ["Generator", "Prompt", "TEMPLATES", "allowed_ids", "build_prompt", "greedy_generate"]
