"""The lmms-eval model ``solo``: an HF SOLO export scored by lmms-eval like its own models.

    python -m lmms_eval --model solo --model_args pretrained=EXPORT_DIR[,template=none|solo7b][,batch_size=8] \
        --tasks mmstar,ai2d [--include_path DIR] --output_path OUT

Registered through lmms-eval's entry-point group ``lmms_eval.models`` (setup.py → :mod:`.lmms_plugin`);
imported only by lmms-eval. ``generate_until`` and ``loglikelihood`` run in batches of ``batch_size``
requests (one forward / one ``generate`` per batch, left-padded; requests sorted by length first so a batch
wastes little padding). Images are the task's ``doc_to_visual``; videos and audio are refused.

Two conventions of lmms-eval 0.7.3 that ``loglikelihood`` follows:

* multiple-choice answers are ranked by the *smallest* value a model returns (its own HF models return a
  loss), so this model returns the negative log-likelihood, summed over the continuation's tokens, with the
  greedy flag;
* the evaluator turns every response that is not text into its ``str()`` (``api/instance.py``,
  ``unwrap_generation_output``), after which multiple-choice scoring fails ("too many values to unpack") for
  any model; a ``GenerationResult`` hands its ``text`` through untouched, so each (value, greedy) pair is
  wrapped in one.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from lmms_eval.api.instance import GenerationResult, Instance
from lmms_eval.api.model import lmms
from PIL import Image
from tqdm import tqdm

from megatron.solo.evaluation.hf_runner import Request, SoloRunner
from megatron.solo.evaluation.pipeline import check_lmms_eval_version


class Solo(lmms):
    is_simple = True

    def __init__(
        self,
        pretrained: str,
        template: str = "mistral",
        batch_size: int | str = 8,
        device: str | None = None,
        dtype: str | None = None,
        image_end_token: str | None = None,
        max_new_tokens: int = 128,
        **kwargs,
    ) -> None:
        super().__init__()
        check_lmms_eval_version()  # the conventions below are 0.7.3's
        unknown = {k: v for k, v in kwargs.items() if k not in ("max_batch_size",)}
        if unknown:
            raise ValueError(
                f"solo: unknown --model_args {sorted(unknown)} (known: pretrained, template, batch_size, "
                "device, dtype, image_end_token, max_new_tokens)"
            )
        if device is not None and str(device).startswith("cuda") and not torch.cuda.is_available():
            device = "cpu"  # lmms-eval passes its --device default ("cuda") on machines without one
        self.batch_size = 8 if str(batch_size) == "auto" else int(batch_size)
        if self.batch_size < 1:
            raise ValueError(f"solo: batch_size must be ≥ 1, got {batch_size}")
        self.max_new_tokens = int(max_new_tokens)
        self.runner = SoloRunner(
            pretrained,
            template=template,
            device=device,
            dtype=dtype,
            image_end_token=image_end_token,
        )

    # -- requests → (images, text) -------------------------------------------------------------

    def _visuals(self, doc_to_visual, doc_id, task, split) -> list[Image.Image]:
        if doc_to_visual is None:
            return []
        visuals = doc_to_visual(self.task_dict[task][split][doc_id]) or []
        out = []
        for v in visuals if isinstance(visuals, (list, tuple)) else [visuals]:
            if not isinstance(v, Image.Image):
                raise ValueError(f"solo: task {task} doc {doc_id}: only images are supported, got {type(v).__name__}")
            out.append(v)  # as given: the processor converts any mode as preprocessing does (alpha on white)
        return out

    # -- lmms-eval's interface -----------------------------------------------------------------

    def generate_until(self, requests: list[Instance]) -> list[str]:
        args = [r.args for r in requests]
        order = sorted(range(len(args)), key=lambda i: -len(args[i][0]))
        answers: list[str | None] = [None] * len(args)
        for chunk in tqdm(_chunks(order, self.batch_size), disable=self.rank != 0, desc="solo generate"):
            # a batch shares one set of generation arguments; split where they differ
            for group in _group_by(chunk, lambda i: repr(sorted(args[i][1].items()))):
                context, gen_kwargs, doc_to_visual, doc_id, task, split = args[group[0]]
                until = gen_kwargs.get("until") or []
                reqs = [Request(self._visuals(*args[i][2:]), args[i][0]) for i in group]
                outs = self.runner.generate(
                    reqs,
                    max_new_tokens=int(gen_kwargs.get("max_new_tokens", self.max_new_tokens)),
                    until=[until] if isinstance(until, str) else list(until),
                    temperature=float(gen_kwargs.get("temperature", 0) or 0),
                    top_p=gen_kwargs.get("top_p"),
                )
                for i, text in zip(group, outs):
                    answers[i] = text
        return answers

    def loglikelihood(self, requests: list[Instance]) -> list[GenerationResult]:
        args = [r.args for r in requests]
        short = next((r for r in requests if len(r.args) != 6), None)
        if short is not None:  # before any work: acc_mutual_info's unconditional requests are (context, continuation)
            raise NotImplementedError(
                f"solo: task {short.task_name}: a loglikelihood request of {len(short.args)} arguments, without "
                "images or document (the acc_mutual_info metric's unconditional requests): not supported, use acc"
            )
        order = sorted(range(len(args)), key=lambda i: -len(args[i][0]))
        scores: list[GenerationResult | None] = [None] * len(args)
        for chunk in tqdm(_chunks(order, self.batch_size), disable=self.rank != 0, desc="solo loglikelihood"):
            reqs, conts = [], []
            for i in chunk:
                context, target, doc_to_visual, doc_id, task, split = args[i]
                doc = self.task_dict[task][split][doc_id]
                conts.append(target if isinstance(target, str) else target(doc))
                reqs.append(Request(self._visuals(doc_to_visual, doc_id, task, split), context))
            for i, (ll, greedy) in zip(chunk, self.runner.loglikelihood(reqs, conts)):
                scores[i] = GenerationResult(text=(-ll, greedy))  # the least value wins: a loss
        return scores

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError("solo: multi-round generation is not supported")


def _chunks(items: Sequence[int], n: int) -> list[list[int]]:
    return [list(items[k : k + n]) for k in range(0, len(items), n)]


def _group_by(items: Sequence[int], key) -> list[list[int]]:
    groups: dict[str, list[int]] = {}
    for i in items:
        groups.setdefault(key(i), []).append(i)
    return list(groups.values())


__all__ = ["Solo"]
