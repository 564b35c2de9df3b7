"""Batched generation and log-likelihood scoring on an HF SOLO export: what the lmms-eval model calls.

Everything goes through the export's own ``AutoProcessor`` and ``AutoModelForCausalLM`` (remote code), as a
user of the export would: a request is images (PIL images, paths or bytes) with a text;
``template="mistral"`` wraps it in the export's chat template (``[INST] … [/INST]``, instruction-tuned
checkpoints), ``template="none"`` continues the pretraining format (a label or caption follows the image
directly), ``template="solo7b"`` is the released SOLO-7B's trained layout (reference spec §8.1-8.2): every image
first, closed by ``<vision>`` (its quirk; ``image_end_token`` defaults to it), then ``<s>[INST] q [/INST]``,
the image before BOS. Use ``solo7b`` to score the released checkpoint (converted with
``tools/convert_checkpoint.py``); checkpoints trained here use ``mistral``, the image inside the question.
The processor lays a batch out left-padded (``input_ids``, ``attention_mask``, ``vision_patches``,
``vision_patch_indices``) with the ids preprocessing gives the same sample.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

TEMPLATES = ("none", "mistral", "solo7b")
SOLO7B_IMAGE_END = "<vision>"
DTYPES = {
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
}
IMAGE_PLACEHOLDER = "<image>"


@dataclass(frozen=True)
class Request:
    """One prompt: its images and its text. Images go where the text has ``<image>`` (one per image) or,
    without placeholders, before the text."""

    images: Sequence
    text: str


def prompt_text(processor, request: Request, template: str) -> str:
    """The processor's text for ``request``: as is (``none``) or rendered by the export's chat template."""
    if template == "none":
        return request.text
    if template == "solo7b":  # the released model's demo prompt: images, then BOS and the instruction
        question = request.text.replace(IMAGE_PLACEHOLDER, " ").strip()
        return IMAGE_PLACEHOLDER * len(request.images) + f"<s>[INST] {question} [/INST]"
    if template != "mistral":
        raise ValueError(f"template must be one of {', '.join(TEMPLATES)}, got {template!r}")
    if request.text.count(IMAGE_PLACEHOLDER) == len(request.images) and request.images:
        content = request.text  # the task placed its images itself
    else:
        text = request.text.replace(IMAGE_PLACEHOLDER, " ").strip()
        content = [{"type": "image"} for _ in request.images] + [{"type": "text", "text": text}]
    return processor.apply_chat_template([{"role": "user", "content": content}])


def stop_token_ids(processor, generation_config) -> list[int]:
    """The ids an answer ends at: the tokenizer's EOS, the export's ``generation_config.json`` EOS id(s), and
    ``<|eot_id|>`` for a ``llama3`` chat layout (a base Llama-3 tokenizer's EOS is ``<|end_of_text|>``)."""
    tok = processor.tokenizer
    ids = [tok.eos_token_id]
    configured = getattr(generation_config, "eos_token_id", None)
    ids += configured if isinstance(configured, (list, tuple)) else [configured]
    if getattr(processor, "chat_format", None) == "llama3":
        ids.append(tok.convert_tokens_to_ids("<|eot_id|>"))
    return [int(i) for i in dict.fromkeys(ids) if i is not None]


def continuation_scores(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    start: Sequence[int],
    length: Sequence[int],
    suppressed: Sequence[int] = (),
) -> list[tuple[float, bool]]:
    """(log-likelihood, greedy) of ``tokens[row, start:start+length]`` per row.

    logits ``[b, s, V]`` (position t predicts token t+1), tokens ``[b, s]``; the span must not begin at 0.
    ``greedy``: every token is the argmax among the ids generation may emit (not ``suppressed``).
    """
    out = []
    for row, (a, n) in enumerate(zip(start, length, strict=True)):
        if a < 1 or n < 1 or a + n > tokens.shape[1]:
            raise ValueError(f"row {row}: span [{a}, {a + n}) is not inside 1..{tokens.shape[1]}")
        logp = torch.log_softmax(logits[row, a - 1 : a + n - 1].float(), dim=-1)  # [n, V]
        target = tokens[row, a : a + n]
        picked = logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)
        allowed = logp.clone()
        allowed[:, list(suppressed)] = float("-inf")
        out.append((float(picked.sum()), bool((allowed.argmax(-1) == target).all())))
    return out


def append_right(batch: dict[str, torch.Tensor], continuations: Sequence[Sequence[int]], pad_id: int):
    """A left-padded prompt batch with each row's continuation appended after its last column (rows with
    shorter continuations padded on the right); adds ``position_ids`` (0 at each row's first real token)."""
    b, s = batch["input_ids"].shape
    width = max(len(c) for c in continuations)
    ids = torch.full((b, width), pad_id, dtype=torch.long)
    mask = torch.zeros((b, width), dtype=torch.long)
    for row, cont in enumerate(continuations):
        ids[row, : len(cont)] = torch.tensor(list(cont), dtype=torch.long)
        mask[row, : len(cont)] = 1
    out = dict(batch)
    out["input_ids"] = torch.cat([batch["input_ids"], ids], dim=1)
    out["attention_mask"] = torch.cat([batch["attention_mask"], mask], dim=1)
    out["vision_patch_indices"] = torch.cat(
        [batch["vision_patch_indices"], torch.full((b, width), -1, dtype=torch.long)], dim=1
    )
    out["position_ids"] = (out["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    return out


class SoloRunner:
    """An HF export loaded for evaluation: ``generate`` and ``loglikelihood`` over batches of requests."""

    def __init__(
        self,
        pretrained: str | os.PathLike,
        *,
        template: str = "mistral",
        device: str | torch.device | None = None,
        dtype: torch.dtype | str | None = None,
        image_end_token: str | None = None,
    ):
        from transformers import AutoModelForCausalLM, AutoProcessor

        if template not in TEMPLATES:
            raise ValueError(f"template must be one of {', '.join(TEMPLATES)}, got {template!r}")
        pretrained = Path(pretrained)
        if not (pretrained / "config.json").is_file():
            raise FileNotFoundError(f"{pretrained}: no config.json; pretrained= must be an HF SOLO export directory")
        self.template = template
        if image_end_token is None and template == "solo7b":
            image_end_token = SOLO7B_IMAGE_END
        self.image_end_token = image_end_token
        dtype = parse_dtype(dtype)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.processor = AutoProcessor.from_pretrained(pretrained, trust_remote_code=True)
        self.model = AutoModelForCausalLM.from_pretrained(pretrained, trust_remote_code=True, dtype=dtype or "auto")
        self.model.to(self.device).eval()
        tok = self.processor.tokenizer
        self.eos_id = tok.eos_token_id
        self.stop_ids = stop_token_ids(self.processor, self.model.generation_config)
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    def _encode(self, requests: Sequence[Request]) -> dict[str, torch.Tensor]:
        texts = [prompt_text(self.processor, r, self.template) for r in requests]
        batch = self.processor(
            images=[list(r.images) for r in requests], text=texts, image_end_token=self.image_end_token
        )
        return {k: v for k, v in batch.items()}

    def _to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {k: v.to(self.device) for k, v in batch.items()}
        out["vision_patches"] = out["vision_patches"].to(self.model.dtype)
        return out

    @torch.no_grad()
    def generate(
        self,
        requests: Sequence[Request],
        *,
        max_new_tokens: int = 32,
        until: Sequence[str] = (),
        temperature: float = 0.0,
        top_p: float | None = None,
    ) -> list[str]:
        """Answers, in order: greedy (``temperature`` 0) or sampled, up to EOS, cut before any of ``until``."""
        batch = self._to_device(self._encode(requests))
        sample = temperature > 0
        out = self.model.generate(
            **batch,
            max_new_tokens=max_new_tokens,
            do_sample=sample,
            **({"temperature": temperature, "top_p": top_p} if sample else {}),
            eos_token_id=self.stop_ids,
            pad_token_id=self.pad_id,
        )
        answers = []
        for ids in out[:, batch["input_ids"].shape[1] :].tolist():
            ids = ids[: next((i for i, t in enumerate(ids) if t in self.stop_ids), len(ids))]
            answers.append(cut_at(self.processor.decode(ids).strip(), until))
        return answers

    @torch.no_grad()
    def loglikelihood(self, requests: Sequence[Request], continuations: Sequence[str]) -> list[tuple[float, bool]]:
        """(log P(continuation | prompt), whether greedy decoding yields it) per request.

        The continuation is stripped and tokenized on its own, as preprocessing tokenizes an answer after its
        prompt (the processor tokenizes each text piece the same way).
        """
        tok = self.processor.tokenizer
        conts = []
        for text in continuations:
            ids = tok(text.strip(), add_special_tokens=False, split_special_tokens=True)["input_ids"]
            if not ids:
                raise ValueError(f"empty continuation {text!r}: nothing to score")
            conts.append(ids)
        prompts = self._encode(requests)
        s = prompts["input_ids"].shape[1]
        batch = self._to_device(append_right(prompts, conts, self.pad_id))
        logits = self.model(**batch).logits
        suppressed = self.model.generation_config.suppress_tokens or []  # the vision ids: never generated
        return continuation_scores(logits, batch["input_ids"], [s] * len(conts), [len(c) for c in conts], suppressed)


def parse_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """A torch dtype from its name (``bfloat16``/``bf16``, ``float16``/``fp16``, ``float32``/``fp32``);
    ``None`` or ``"auto"``: the export's own."""
    if dtype is None or isinstance(dtype, torch.dtype) or dtype == "auto":
        return None if dtype == "auto" else dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be auto or one of {', '.join(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def cut_at(text: str, until: Sequence[str]) -> str:
    """``text`` up to the first occurrence of any stop string."""
    for stop in until:
        if stop:
            text = text.split(stop, 1)[0]
    return text


__all__ = [
    "Request",
    "SoloRunner",
    "append_right",
    "continuation_scores",
    "cut_at",
    "parse_dtype",
    "prompt_text",
    "stop_token_ids",
]
