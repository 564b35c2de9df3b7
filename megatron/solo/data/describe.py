"""A human-readable view of one pack (``tools/inspect_mm_data.py``), and its images written back as PNG."""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

from megatron.solo.data.packed_format import PackView
from megatron.solo.tokenizer import LLAMA3_CHAT_TOKENS

NO_LOSS_OPEN, NO_LOSS_CLOSE = "⟦", "⟧"


def describe_pack(
    view: PackView, tokenizer, *, index: int | None = None, seq_length: int | None = None, max_chars: int = 2000
) -> str:
    """Pack summary, then per document: token range, token/loss/image counts and its decoded text, with
    images shown as ``<image RxC>`` and text that carries no loss inside ⟦…⟧."""
    n = len(view.tokens)
    title = f"pack {index}" if index is not None else "pack"
    padding = f" (+{seq_length - n:,} padding to {seq_length:,})" if seq_length else ""
    lines = [
        f"{title}: {n:,} tokens{padding}, {view.n_docs} documents, {len(view.images)} images "
        f"({view.n_patches:,} patches), {_loss_tokens(view):,} loss tokens",
        f"  (text in {NO_LOSS_OPEN}…{NO_LOSS_CLOSE} carries no loss; a document's first token is never predicted)",
    ]
    for d in range(view.n_docs):
        start, end = int(view.doc_offsets[d]), int(view.doc_offsets[d + 1])
        images = [im for im in view.images if start <= im.position < end]
        loss = int(view.targets[start + 1 : end].sum())
        continuation = "" if view.tokens[start] == tokenizer.bos_id else " (continues the previous chunk)"
        lines.append(
            f"doc {d}: tokens [{start:,}, {end:,}) = {end - start:,} tokens, {loss:,} loss, "
            f"{len(images)} images{continuation}"
        )
        text = render_document(view, start, end, tokenizer)
        if len(text) > max_chars:
            text = text[:max_chars] + f"… ({len(text) - max_chars:,} more characters)"
        lines.append("  " + text.replace("\n", "\n  "))
    return "\n".join(lines)


def _loss_tokens(view: PackView) -> int:
    starts = view.doc_offsets[:-1]
    return int(view.targets.sum()) - int(view.targets[starts].sum()) if len(starts) else 0


def render_document(view: PackView, start: int, end: int, tokenizer) -> str:
    """Tokens [start, end) as text: images summarised, BOS/EOS (and Llama-3's chat markers) written out, no-loss
    text bracketed."""
    images = {im.position: im for im in view.images if start <= im.position < end}
    markers = _marker_ids(tokenizer)
    out: list[str] = []
    run: list[int] = []
    run_target = None

    def flush():
        if run:
            text = tokenizer.decode(run)
            out.append(text if run_target else f"{NO_LOSS_OPEN}{text}{NO_LOSS_CLOSE}")
            run.clear()

    i = start
    while i < end:
        if i in images:
            flush()
            im = images[i]
            out.append(f"<image {im.n_rows}x{im.n_cols}>")
            i += im.num_tokens
            continue
        token, target = int(view.tokens[i]), bool(view.targets[i])
        if token in markers:
            flush()
            out.append(tokenizer.id_to_token(token))  # the tokenizer's own: <s>, </s>; <|begin_of_text|>, …
        else:
            if target != run_target:
                flush()
                run_target = target
            run.append(token)
        i += 1
    flush()
    return "".join(out)


def _marker_ids(tokenizer) -> set[int]:
    """BOS, EOS and the chat markers the tokenizer has (decoding would drop these special tokens silently)."""
    ids = {tokenizer.bos_id, tokenizer.eos_id}
    for name in LLAMA3_CHAT_TOKENS:
        try:
            ids.add(tokenizer.token_to_id(name))
        except KeyError:
            pass
    return ids


def save_images(view: PackView, directory: str, stem: str = "image") -> list[str]:
    """Write each image of the pack as ``DIRECTORY/STEM_K.png`` (its stored, resized pixels)."""
    os.makedirs(directory, exist_ok=True)
    paths = []
    for k, im in enumerate(view.images):
        path = os.path.join(directory, f"{stem}_{k}.png")
        Image.fromarray(np.ascontiguousarray(im.pixels(view.image_config.patch_size))).save(path)
        paths.append(path)
    return paths


__all__ = ["describe_pack", "render_document", "save_images"]
