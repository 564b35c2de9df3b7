"""What a training step reports: losses split by pack kind, throughput, an MFU estimate, and where it goes.

Losses travel as ``[sum, count]`` pairs from the loss function, are summed over micro-batches and
data-parallel ranks, and only then divided: so every target token of the global batch weighs the same
(``--loss-averaging token``), or every sample does (``sample``: the count is samples, each token weighs
1 / its sample's target tokens).
"""

from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import dataclass

import numpy as np
import torch

from megatron.solo.config import ModelConfig
from megatron.solo.model import weighted_token_loss

LOSS_KEYS = ("lm loss", "img lm loss", "txt lm loss")
COUNT_KEY = "targets"  # [target tokens, samples with a target] of the micro-batch, whatever the averaging
WORK_KEY = "work"  # [model FLOPs, real tokens] of the micro-batch (:func:`micro_batch_work`)
# Dense bf16 peak per device (vendor datasheets), for the MFU estimate when --peak-tflops is not given.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "GH200": 989.0, "B200": 2250.0, "A100": 312.0, "L40S": 362.0}


def loss_with_breakdown(
    loss_mask: torch.Tensor,
    image_rows: torch.Tensor,
    work: torch.Tensor,
    samples: torch.Tensor,
    per_token_loss: torch.Tensor,
    *,
    weights: torch.Tensor | None = None,
):
    """The loss ([sum, count] for ``calculate_per_token_loss``) plus the same for image-bearing and text-only
    packs, the target counts and the work done.

    loss_mask, per_token_loss [b, s]; image_rows bool [b]; work [2] from :func:`micro_batch_work`; samples
    int []: documents with a target. ``weights`` [b, s] from ``model.sample_weights`` (its count is
    ``samples``) average per sample; None: per target token.
    """
    mask = loss_mask.float()
    weights, count = (mask, mask.sum().to(torch.int)) if weights is None else (weights, samples)
    total, count, logs = weighted_token_loss(weights, count, per_token_loss)
    per_row = (per_token_loss.detach().float() * weights).sum(1)  # [b]
    rows = weights.sum(1)  # target tokens, or samples, per row
    img = image_rows.to(per_row.dtype)
    logs["img lm loss"] = torch.stack([(per_row * img).sum(), (rows * img).sum()])
    logs["txt lm loss"] = torch.stack([(per_row * (1 - img)).sum(), (rows * (1 - img)).sum()])
    logs[COUNT_KEY] = torch.stack([mask.sum(), samples.float()])
    logs[WORK_KEY] = work
    return total, count, logs


def sum_micro_batches(outputs: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    """[len(LOSS_KEYS) + 2, 2]: every logged pair summed over this rank's micro-batches."""
    keys = (*LOSS_KEYS, COUNT_KEY, WORK_KEY)
    return torch.stack([torch.stack([out[k].float() for out in outputs]).sum(0) for k in keys])


def causal_pairs(lengths: np.ndarray, window: int | None) -> float:
    """Σ over documents of the (query, key) pairs causal attention computes: Σ_{i=1..L} min(i, W)."""
    lengths = np.asarray(lengths, dtype=np.float64)
    if window is None:
        return float((lengths * (lengths + 1) / 2).sum())
    inside = np.minimum(lengths, window)
    return float((inside * (inside + 1) / 2 + np.maximum(lengths - window, 0) * window).sum())


def batch_work(
    cu_seqlens: torch.Tensor, pack_lengths: torch.Tensor, seq_length: int, window: int | None
) -> torch.Tensor:
    """float32 [2]: (real tokens, attention pairs) of a micro-batch, padding spans left out.

    Host tensors in (cu_seqlens int32 [n + 1] over the flat b·s stream, pack_lengths int64 [b]): no device sync.
    """
    cu = cu_seqlens.numpy().astype(np.int64)
    starts, lengths = cu[:-1], np.diff(cu)
    rows = starts // seq_length
    documents = lengths[starts < rows * seq_length + pack_lengths.numpy()[rows]]
    return torch.tensor([float(pack_lengths.sum()), causal_pairs(documents, window)], dtype=torch.float32)


def model_flops(
    cfg: ModelConfig,
    tokens: float,
    attention_pairs: float,
    *,
    logit_tokens: float | None = None,
    padded_vocab_size: int | None = None,
) -> float:
    """Model FLOPs of a training step (forward + backward; recompute is not counted, as MFU's convention) over
    ``tokens`` real tokens whose attention computes ``attention_pairs`` (query, key) pairs (:func:`causal_pairs`):
    6 per weight and token in the decoder, 6·h·V per token that gets logits (``logit_tokens``, default every
    token; the trainer computes them at the loss targets only), and 4·d per pair and head forward (QKᵀ and AV),
    ×3 with backward."""
    h, d = cfg.hidden_size, cfg.head_dim
    per_layer = h * d * (2 * cfg.num_attention_heads + 2 * cfg.num_query_groups) + 3 * h * cfg.ffn_hidden_size
    logit_tokens = tokens if logit_tokens is None else logit_tokens
    output_layer = 6.0 * h * (padded_vocab_size or cfg.vocab_size) * logit_tokens  # the patch projection is noise
    return (
        6.0 * cfg.num_layers * per_layer * tokens
        + output_layer
        + 12.0 * cfg.num_layers * cfg.num_attention_heads * d * attention_pairs
        + _pre_decoder_flops(cfg, tokens, attention_pairs)
    )


def stage1_flops(
    cfg: ModelConfig,
    tokens: float,
    attention_pairs: float,
    *,
    patches: float,
    text_tokens: float,
    padded_vocab_size: int,
    heads: tuple[int, int],
) -> float:
    """Model FLOPs of a HaploVL stage-1 step (forward + backward), counting what runs: the pre-decoder as
    :func:`model_flops` counts it, without the connector; the stem's patch projection, 4·patch_dim·pre per
    patch (forward and its weight's gradient: the pixels need none); the vision and text heads, 6 per weight
    (``heads``: their weight counts, :func:`head_weights`) per patch and per distilled text token; the CTP
    logits against the frozen embedding, 4·H·V per text token (forward and the predictions' gradient). Not
    counted: the frozen LLM and output layer (they do not run in stage 1) and the frozen teacher's forward."""
    pre = cfg.pre_decoder
    vision_head, text_head = heads
    return (
        _pre_decoder_flops(cfg, tokens, attention_pairs, connector=False)
        + 4.0 * cfg.patch_dim * pre.hidden_size * patches
        + 6.0 * (vision_head * patches + text_head * text_tokens)
        + 4.0 * cfg.hidden_size * padded_vocab_size * text_tokens
    )


def head_weights(distill_heads) -> tuple[int, int]:
    """(vision head, text head) weight counts of HaploVL's ``DistillationHeads`` (matrices only, no biases)."""
    return tuple(
        sum(p.numel() for p in head.parameters() if p.dim() == 2)
        for head in (distill_heads.vision_head, distill_heads.text_head)
    )


def _pre_decoder_flops(cfg: ModelConfig, tokens: float, attention_pairs: float, connector: bool = True) -> float:
    """HaploVL: its pre-decoder (every token goes through it) and connector, counted as the LLM's layers
    (the causal pairs; an image's bidirectional pairs are a small addition); 0 for SOLO."""
    pre = getattr(cfg, "pre_decoder", None)
    if pre is None:
        return 0.0
    h, d, f = pre.hidden_size, pre.head_dim, pre.ffn_hidden_size
    per_layer = h * d * (2 * pre.num_attention_heads + 2 * pre.query_groups) + (3 if pre.gated else 2) * h * f
    connector_weights = h * cfg.hidden_size if connector else 0
    return 6.0 * (pre.num_layers * per_layer + connector_weights) * tokens + 12.0 * pre.num_layers * (
        pre.num_attention_heads * d * attention_pairs
    )


def micro_batch_work(batch, cfg: ModelConfig, padded_vocab_size: int) -> torch.Tensor:
    """float32 [2]: (model FLOPs, real tokens) of a host ``Batch`` as the trainer runs it (logits at the loss
    targets only), computed before the copy to the device: no device sync."""
    tokens, pairs = batch_work(batch.cu_seqlens, batch.pack_lengths, batch.tokens.shape[1], cfg.sliding_window).tolist()
    flops = model_flops(
        cfg, tokens, pairs, logit_tokens=float(batch.loss_mask.sum()), padded_vocab_size=padded_vocab_size
    )
    return torch.tensor([flops, tokens], dtype=torch.float32)


def stage1_micro_batch_work(
    batch, distill_mask: torch.Tensor, cfg: ModelConfig, padded_vocab_size: int, heads: tuple[int, int]
) -> torch.Tensor:
    """float32 [2]: (stage-1 FLOPs (:func:`stage1_flops`), real tokens) of a host ``Batch`` whose distilled
    text positions are ``distill_mask`` [b, s]."""
    tokens, pairs = batch_work(batch.cu_seqlens, batch.pack_lengths, batch.tokens.shape[1], cfg.sliding_window).tolist()
    patches = 0 if batch.patch_index is None else batch.patch_index.numel()
    flops = stage1_flops(
        cfg,
        tokens,
        pairs,
        patches=float(patches),
        text_tokens=float(distill_mask.sum()),
        padded_vocab_size=padded_vocab_size,
        heads=heads,
    )
    return torch.tensor([flops, tokens], dtype=torch.float32)


def default_peak_tflops() -> float | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((tflops for key, tflops in PEAK_TFLOPS.items() if key in name), None)


@dataclass
class Window:
    """Accumulates the iterations between two log lines."""

    sums: torch.Tensor | None = None
    iterations: int = 0
    seconds: float = 0.0
    grad_norm: float | None = None  # the window's last

    def add(self, reduced: torch.Tensor, seconds: float, grad_norm: float | None) -> None:
        self.sums = reduced.clone() if self.sums is None else self.sums + reduced
        self.iterations += 1
        self.seconds += seconds
        if grad_norm is not None:
            self.grad_norm = float(grad_norm)

    def summary(
        self,
        *,
        iteration: int,
        consumed_samples: int,
        lr: float,
        tokens_per_iteration: int,
        world_size: int,
        peak_tflops: float | None,
    ) -> dict:
        """Averages over the window; losses are means per target token (or per sample, as the run averages)."""
        sums = self.sums.double()
        out = {"iteration": iteration, "consumed_samples": consumed_samples, "lr": lr}
        for key, (total, count) in zip(LOSS_KEYS, sums[: len(LOSS_KEYS)].tolist()):
            out[key.replace(" ", "_")] = total / count if count else None
        targets, samples = sums[len(LOSS_KEYS)].tolist()
        out["target_tokens"] = int(targets / self.iterations)
        out["samples"] = int(samples / self.iterations)
        out["ms_per_iteration"] = 1000.0 * self.seconds / self.iterations
        flops, tokens = sums[-1].tolist()
        out["tokens_per_s"] = tokens / self.seconds  # real tokens: padding is not work
        out["padding"] = 1.0 - tokens / (tokens_per_iteration * self.iterations)
        out["grad_norm"] = self.grad_norm
        out["tflops_per_device"] = flops / self.seconds / world_size / 1e12
        out["mfu"] = out["tflops_per_device"] / peak_tflops if peak_tflops else None
        return out


def format_line(m: dict, train_iters: int) -> str:
    def num(value, fmt):
        return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, fmt)

    return (
        f" iteration {m['iteration']:>7}/{train_iters} | consumed samples {m['consumed_samples']} | "
        f"ms/iter {m['ms_per_iteration']:.1f} | lr {m['lr']:.3e} | lm loss {num(m['lm_loss'], '.5f')} | "
        f"img {num(m['img_lm_loss'], '.5f')} | txt {num(m['txt_lm_loss'], '.5f')} | "
        f"target tokens {m['target_tokens']} | tokens/s {m['tokens_per_s']:.4g} | "
        f"grad norm {num(m['grad_norm'], '.4f')} | TFLOP/s/device {m['tflops_per_device']:.3g} | "
        f"MFU {num(None if m['mfu'] is None else 100 * m['mfu'], '.1f')}%"
    )


class MetricSinks:
    """stdout, an optional JSON-lines file, TensorBoard and W&B (the last two optional packages)."""

    def __init__(self, cfg, enabled: bool):
        self.enabled = enabled
        self.metrics_file = cfg.metrics_file if enabled else None
        self.tensorboard = self.wandb = None
        if not enabled:
            return
        if cfg.tensorboard_dir:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as err:
                raise ImportError(f"--tensorboard-dir needs the tensorboard package ({err})") from None
            self.tensorboard = SummaryWriter(cfg.tensorboard_dir)
        if cfg.wandb_project:
            try:
                import wandb
            except ImportError as err:
                raise ImportError(f"--wandb-project needs the wandb package ({err})") from None
            self.wandb = wandb.init(
                project=cfg.wandb_project,
                name=cfg.wandb_exp_name,
                dir=cfg.wandb_save_dir,
                config=cfg.to_dict(),
                resume="allow",
            )
        if self.metrics_file:
            os.makedirs(os.path.dirname(os.path.abspath(self.metrics_file)), exist_ok=True)

    def log(self, metrics: dict, train_iters: int) -> None:
        if not self.enabled:
            return
        print(format_line(metrics, train_iters), flush=True)
        if self.metrics_file:
            with open(self.metrics_file, "a") as f:
                f.write(json.dumps(metrics) + "\n")
        scalars = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and k != "iteration"}
        if self.tensorboard is not None:
            for key, value in scalars.items():
                self.tensorboard.add_scalar(f"train/{key}", value, metrics["iteration"])
            self.tensorboard.flush()
        if self.wandb is not None:
            self.wandb.log({f"train/{k}": v for k, v in scalars.items()}, step=metrics["iteration"])

    def message(self, text: str) -> None:
        if self.enabled:
            print(text, file=sys.stdout, flush=True)

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()
