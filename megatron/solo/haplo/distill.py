"""Stage 1 of HaploVL: distil the pre-decoder from a frozen vision teacher and the LLM's frozen text embeddings.

The pre-decoder's output ``H_m`` is split into image-patch positions ``H_v`` and text positions ``H_t``
(newline positions belong to neither: they have no teacher feature and no token). Then (spec §4.2):

- vision: ``L_v = 1 − mean_i cos(VisionHead(H_v,i), T_v,i)``, ``T_v`` the teacher's feature of the same patch;
- text feature: ``L_feat = mean_i (‖Ĥ_t,i − T_t,i‖₂ − cos(Ĥ_t,i, T_t,i))``, ``Ĥ_t = TextHead(H_t)``,
  ``T_t,i = W[id_i]``;
- current-token prediction: ``L_ctp = CE(logit_scale · Ĥ_t Wᵀ, id_i)``, the token *at* position i (not the
  next one), ``W`` the LLM's frozen input-embedding matrix ``[V, D]``.

Choices where the spec says "unknown" (§7), all settings of :class:`DistillConfig`:

- **loss weights** 1 : 1 : 1 (``L = L_v + L_feat + L_ctp``, i.e. ``L_v + L_t`` with the paper's ``L_t``);
- **logit_scale**: CLIP's parameterisation, learned, ``exp(s)`` with ``s`` initialised to ``log(1/0.07)`` and
  the scale clamped at 100. A fixed scale of 1 would leave the CE near ``log V`` (LLM embedding rows have
  norms ≈ 1, so unscaled logits differ by O(1)); ``learn_logit_scale=False`` keeps the initial value fixed;
- **heads**: one linear layer each (with bias); ``head="mlp"`` gives Linear → GELU → Linear. The vision head
  maps pre width → teacher width and starts as the identity when the two are equal, so a pre-decoder
  initialised from the teacher's own layers starts near ``L_v = 0`` instead of at 1; the text head maps pre
  width → LLM embedding width (its output is dotted with ``W``) and starts random;
- **teacher layer**: the output of the teacher's last layer (``teacher_layer=-1``, before CLIP's
  ``post_layernorm``), the features a pre-decoder made of all 24 CLIP layers reproduces at initialisation;
  LLaVA's penultimate layer is ``-2``. Indices follow HF ``hidden_states``: 0 = after ``pre_layrnorm``;
- **teacher input**: each 336×336 tile separately (what the teacher was trained on; the pre-decoder's
  position table is per tile too); its features are gathered in our token order, unpadding included
  (``training/stage1.py``: ``Stage1Teacher.targets``).

Per-token losses are returned (:func:`distillation_losses`) so the trainer can sum and normalise them over
the global batch like the LM loss.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

Head = Literal["linear", "mlp"]


def _require(condition: bool, field: str, message: str) -> None:
    if not condition:
        raise ValueError(f"DistillConfig.{field}: {message}")


@dataclass(frozen=True, kw_only=True)
class DistillConfig:
    """Stage-1 settings (the module docstring says why each default was chosen)."""

    head: Head = "linear"
    mlp_hidden_size: int | None = None
    """Hidden width of the MLP heads; None: the head's output width."""
    vision_weight: float = 1.0
    feature_weight: float = 1.0
    ctp_weight: float = 1.0
    logit_scale: float = 1 / 0.07
    learn_logit_scale: bool = True
    max_logit_scale: float = 100.0
    teacher_layer: int = -1

    def __post_init__(self) -> None:
        _require(self.head in ("linear", "mlp"), "head", f"unknown {self.head!r}; choose linear or mlp")
        if self.mlp_hidden_size is not None:
            _require(
                isinstance(self.mlp_hidden_size, int) and self.mlp_hidden_size > 0,
                "mlp_hidden_size",
                f"must be a positive int or None, got {self.mlp_hidden_size!r}",
            )
        for name in ("vision_weight", "feature_weight", "ctp_weight"):
            value = getattr(self, name)
            _require(math.isfinite(value) and value >= 0, name, f"must be a finite number ≥ 0, got {value}")
        _require(self.logit_scale > 0, "logit_scale", f"must be positive, got {self.logit_scale}")
        _require(
            self.max_logit_scale >= self.logit_scale,
            "max_logit_scale",
            f"{self.max_logit_scale} is below logit_scale={self.logit_scale}",
        )
        _require(isinstance(self.teacher_layer, int), "teacher_layer", f"must be an int, got {self.teacher_layer!r}")


def _head(config: DistillConfig, in_size: int, out_size: int, identity: bool) -> nn.Module:
    if config.head == "mlp":
        hidden = config.mlp_hidden_size or out_size
        return nn.Sequential(nn.Linear(in_size, hidden), nn.GELU(), nn.Linear(hidden, out_size))
    linear = nn.Linear(in_size, out_size)
    nn.init.normal_(linear.weight, std=0.02)
    nn.init.zeros_(linear.bias)
    if identity and in_size == out_size:
        with torch.no_grad():
            linear.weight.copy_(torch.eye(in_size))
    return linear


class DistillationHeads(nn.Module):
    """The vision head (pre width → teacher width), the text head (pre width → LLM embedding width) and the
    logit scale. Plain replicated modules; dropped after stage 1.

    Under tensor parallelism every TP rank feeds the heads the same tokens (under sequence parallelism the
    hidden states are gathered first), as the vocab-parallel CTP loss needs: it splits the vocabulary, not
    the tokens.
    """

    def __init__(
        self,
        config: DistillConfig,
        *,
        pre_hidden_size: int,
        teacher_hidden_size: int,
        text_embedding_size: int,
    ):
        super().__init__()
        self.config = config
        self.vision_head = _head(config, pre_hidden_size, teacher_hidden_size, identity=True)
        self.text_head = _head(config, pre_hidden_size, text_embedding_size, identity=False)
        log_scale = torch.tensor(math.log(config.logit_scale))
        if config.learn_logit_scale:
            self.log_logit_scale = nn.Parameter(log_scale)
        else:
            self.register_buffer("log_logit_scale", log_scale)

    def logit_scale(self) -> torch.Tensor:
        """The scale applied to the CTP logits, clamped at ``max_logit_scale`` (a scalar tensor)."""
        return self.log_logit_scale.exp().clamp(max=self.config.max_logit_scale)


def vision_loss_per_token(predicted: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``1 − cos(predicted_i, target_i)`` [n] for predicted [n, C], target [n, C] (computed in float32)."""
    return 1 - F.cosine_similarity(predicted.float(), target.float(), dim=-1)


def feature_loss_per_token(predicted: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``‖predicted_i − target_i‖₂ − cos(predicted_i, target_i)`` [m] (plain, not squared, L2; float32)."""
    p, t = predicted.float(), target.float()
    return (p - t).norm(dim=-1) - F.cosine_similarity(p, t, dim=-1)


def ctp_loss_per_token(
    predicted: torch.Tensor,
    embedding: torch.Tensor,
    token_ids: torch.Tensor,
    logit_scale: torch.Tensor | float,
    *,
    vocab_parallel: bool = False,
) -> torch.Tensor:
    """Current-token cross-entropy [m]: ``CE(logit_scale · predicted Wᵀ, token_ids)``.

    predicted [m, D]; embedding ``W`` [V, D], frozen (no gradient flows into it); token_ids [m].
    ``vocab_parallel``: ``W`` is this tensor-parallel rank's vocabulary shard (as megatron's embedding holds
    it) and the cross-entropy is megatron-core's vocab-parallel one; ``predicted`` must be the same on every
    TP rank (its gradient is all-reduced over the group).
    """
    weight = embedding.detach().float()
    hidden = predicted.float()
    if vocab_parallel:
        from megatron.core import tensor_parallel

        # the scale enters before the copy: each rank's logits are a vocabulary shard, so the scale's
        # gradient (like the hidden states') is a sum over the group, which the copy's backward all-reduces
        hidden = tensor_parallel.copy_to_tensor_model_parallel_region(logit_scale * hidden)
        logits = hidden @ weight.t()
        return tensor_parallel.vocab_parallel_cross_entropy(logits.unsqueeze(0), token_ids.unsqueeze(0))[0]
    logits = logit_scale * (hidden @ weight.t())
    return F.cross_entropy(logits, token_ids, reduction="none")


def distillation_losses(
    heads: DistillationHeads,
    image_hidden: torch.Tensor,
    teacher_features: torch.Tensor,
    text_hidden: torch.Tensor,
    token_ids: torch.Tensor,
    embedding: nn.Module,
    *,
    vocab_parallel: bool = False,
) -> dict[str, torch.Tensor]:
    """Weighted per-token stage-1 losses.

    image_hidden [n, h] (pre-decoder outputs at patch positions) with teacher_features [n, C];
    text_hidden [m, h] at text positions with their token_ids [m]; embedding: the LLM's frozen input
    embedding (megatron's ``VocabParallelEmbedding``, weight ``W`` [V(/tp), D]; ``vocab_parallel`` when it is a
    tensor-parallel shard), which also looks up the text targets ``T_t``.
    Returns ``{"vision": [n], "feature": [m], "ctp": [m]}``, each already multiplied by its weight; the stage-1
    loss is their sum over all tokens divided by the number of tokens each term is averaged over
    (``vision`` over n, the text terms over m).
    """
    cfg = heads.config
    vision = vision_loss_per_token(heads.vision_head(image_hidden), teacher_features) * cfg.vision_weight
    predicted = heads.text_head(text_hidden)
    with torch.no_grad():  # frozen targets
        target = embedding(token_ids)  # [m, D]
    feature = feature_loss_per_token(predicted, target) * cfg.feature_weight
    weight = embedding.weight
    ctp = ctp_loss_per_token(predicted, weight, token_ids, heads.logit_scale(), vocab_parallel=vocab_parallel)
    return {"vision": vision, "feature": feature, "ctp": ctp * cfg.ctp_weight}


# --- the frozen teacher ---------------------------------------------------------------------------------


class VisionTeacher(nn.Module):
    """A frozen ``transformers.CLIPVisionModel`` giving per-patch features of one hidden layer.

    Only the layers up to ``layer`` are kept (the rest would be computed for nothing). Always in eval mode,
    no parameter requires grad, and :meth:`forward` runs under ``torch.no_grad``. The CLS token is dropped.
    """

    def __init__(self, model: nn.Module, layer: int = -1):
        super().__init__()
        vision = getattr(model, "vision_model", model)  # transformers 4.x nests it; 5.x does not
        num_layers = len(vision.encoder.layers)
        keep = layer if layer >= 0 else num_layers + 1 + layer
        if not 0 <= keep <= num_layers:
            raise ValueError(
                f"DistillConfig.teacher_layer: {layer} is outside the teacher's layers "
                f"0..{num_layers} (or -{num_layers + 1}..-1)"
            )
        vision.encoder.layers = vision.encoder.layers[:keep]
        self.model = model
        self.layer = keep
        self.image_size = vision.config.image_size
        self.hidden_size = vision.config.hidden_size
        self.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> VisionTeacher:
        return self  # frozen: stays in eval mode whatever the caller's model.train() says

    @torch.no_grad()
    def forward(self, tiles: torch.Tensor, group=None) -> torch.Tensor:
        """tiles [n, 3, T, T] (CLIP-normalised pixels) → features [n, (T/P)², C], row-major patches, no CLS.

        ``group``: a process group whose ranks all hold the same ``tiles`` (the tensor-parallel group): each
        rank runs the teacher on its share of the tiles and the features are all-gathered, instead of every
        rank computing all of them.
        """
        if group is None or torch.distributed.get_world_size(group) == 1:
            return self._features(tiles)
        world, rank = torch.distributed.get_world_size(group), torch.distributed.get_rank(group)
        per = -(-tiles.shape[0] // world)
        mine = self._features(tiles[rank * per : (rank + 1) * per])
        padded = mine.new_zeros(per, *mine.shape[1:])
        padded[: mine.shape[0]] = mine
        gathered = [torch.empty_like(padded) for _ in range(world)]
        torch.distributed.all_gather(gathered, padded, group=group)
        return torch.cat(gathered)[: tiles.shape[0]]

    def _features(self, tiles: torch.Tensor) -> torch.Tensor:
        if tiles.shape[0] == 0:
            side = self.image_size // self.model.config.patch_size
            dtype = next(self.model.parameters()).dtype
            return tiles.new_zeros(0, side * side, self.hidden_size, dtype=dtype)
        dtype = next(self.model.parameters()).dtype
        return self.model(pixel_values=tiles.to(dtype)).last_hidden_state[:, 1:]


def load_vision_teacher(directory: str | Path, layer: int = -1, dtype: torch.dtype = torch.float32) -> VisionTeacher:
    """The teacher from a local HF directory (a ``CLIPVisionModel`` or a full ``CLIPModel`` checkpoint);
    nothing is downloaded."""
    from transformers import CLIPVisionModel

    directory = Path(directory)
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(f"vision teacher: {directory} has no config.json (a local HF CLIP directory is needed)")
    model = CLIPVisionModel.from_pretrained(directory, local_files_only=True, dtype=dtype)
    return VisionTeacher(model, layer)
