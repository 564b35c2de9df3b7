"""``HaploModel``: HaploVL on megatron-core — a pre-decoder at its own width in front of the LLM.

Forward (spec §2.1), on the first pipeline stage:

1. text embedded at the pre-decoder width (``embedding.word_embeddings``, vocab × pre);
2. at image positions the embedding is *replaced*: patches by ``patch_embed(x) + pos_embed[i]`` (``i`` the
   patch's row in the per-tile table), the other positions of an image block by ``image_newline``;
3. ``pre_norm`` (LayerNorm) over the whole sequence, text included;
4. the pre-decoder (``megatron.solo.haplo.pre_decoder``: CLIP-ViT-L geometry, no final norm), with its own RoPE;
5. ``connector`` (pre width → LLM width, no bias) on every position;

then the LLM: SOLO's decoder (``SoloModel``'s GPT layers, final RMSNorm, output layer, per-token loss at the
targets). Every layer, pre-decoder and LLM alike, gets the same mask (:mod:`megatron.solo.haplo.mask`).

Parameter names (state dict; the checkpoint maps the norms onto TE names as for SOLO)::

    embedding.word_embeddings.weight   [V, pre]        vocab-parallel
    patch_embed.weight                 [pre, 3·P·P]    C×P×P patch vectors, as SOLO's; no bias
    pos_embed                          [T², pre]       T = tile_size / patch_size (576 rows for 336 / 14)
    image_newline                      [pre]
    pre_norm.{weight,bias}             [pre]
    pre_decoder.layers.{i}.*           (see haplo/pre_decoder.py)
    connector.weight                   [H, pre]        no bias
    decoder.layers.{i}.*, decoder.final_layernorm.weight, output_layer.weight   (SOLO's GPT names)

Pipeline parallelism (stage 2; stage 1's split is below): the embeddings, the pre-decoder and the connector
live on the first stage, with its share of the LLM's layers; the stages exchange LLM-width hidden states as
SOLO's do. The stem and the connector are plain replicated layers: their inputs are replicated over
tensor-parallel ranks (the connector's is split over the sequence under sequence parallelism, so its weight
is marked for the TP all-reduce of ``finalize_model_grads``).

Stage 1 (``distill`` given: pre-decoder distillation, ``haplo/distill.py``): the model also holds the
distillation heads (``distill_heads.*``) and the LLM's frozen input embedding (``llm_embedding.weight``
[V, H], the text targets); ``forward(..., teacher_features=, distill_mask=)`` stops after the pre-decoder and
returns the per-token distillation loss: ``1 − cos`` at patch positions, ``L2 − cos`` + current-token CE at
the text positions of ``distill_mask``. Trainable then: the embeddings, the stem, ``pre_norm``, the
pre-decoder and the heads; the connector, the LLM and ``llm_embedding`` are frozen (not run). A stage-2 model
(no ``distill``) has neither heads nor ``llm_embedding``: loading a stage-1 checkpoint takes only its own
tensors, so both are dropped there.

Stage 1 under pipeline parallelism splits the *pre-decoder's* layers over the stages (the LLM does not run):
the first stage embeds (embeddings, stem, ``pos_embed``, ``image_newline``, ``pre_norm``) and runs its share of
the pre-decoder; the last runs its share, the heads (which live there, with ``llm_embedding``) and the loss;
the stages exchange pre-decoder-width hidden states [s(/tp), b, pre] (:meth:`HaploModel.pipeline_schedule_kwargs`
tells megatron-core's schedule that width). The frozen LLM keeps stage 2's layout (connector on the first
stage, its layers split as usual, output layer on the last), so a stage-1 checkpoint holds the whole model;
pre-decoder layers are numbered globally in it, so it loads at any pipeline size, into either stage.

Only the local backend (explicit mask) is implemented; the TE backend is refused (see ``haplo/mask.py``).
"""

from __future__ import annotations

from functools import partial

import torch
from megatron.core import tensor_parallel
from megatron.core.models.common.embeddings.language_model_embedding import LanguageModelEmbedding
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.spec_utils import ModuleSpec

from megatron.solo.haplo.config import HaploConfig
from megatron.solo.haplo.distill import DistillationHeads, DistillConfig, distillation_losses
from megatron.solo.haplo.mask import NO_IMAGE, haplo_attention_mask
from megatron.solo.haplo.pre_decoder import (
    build_pre_decoder,
    build_pre_decoder_rotary,
    make_pre_decoder_transformer_config,
)
from megatron.solo.model.build import check_megatron_core
from megatron.solo.model.mcore_seam import rotary_lookup
from megatron.solo.model.solo_model import SoloModel
from megatron.solo.model.specs import backend_of, decoder_block_spec


class HaploModel(SoloModel):
    """HaploVL: multimodal embedding → pre-norm → pre-decoder → connector → SOLO's decoder and loss."""

    def __init__(
        self,
        cfg: HaploConfig,
        config: TransformerConfig,
        block_spec: ModuleSpec,
        *,
        vocab_size: int,
        pre_process: bool = True,
        post_process: bool = True,
        vp_stage: int | None = None,
        distill: DistillConfig | None = None,
        teacher_hidden_size: int | None = None,
    ):
        if backend_of(config) == "te":
            self.refuse_te()
        if distill is not None and post_process and not teacher_hidden_size:
            raise ValueError("HaploVL stage 1 (distillation): the last pipeline stage needs the teacher's hidden size")
        # Built as a middle stage (no SOLO embedding or patch projection), then given HaploVL's input stage.
        super().__init__(
            config,
            block_spec,
            vocab_size=vocab_size,
            max_sequence_length=cfg.max_sequence_length,
            patch_dim=cfg.patch_dim,
            rotary_base=cfg.rotary_base,
            sliding_window=None,
            pre_process=False,
            post_process=post_process,
            vp_stage=vp_stage,
        )
        self.haplo_config = cfg
        self.pre_process = pre_process
        self.decoder.pre_process = pre_process  # the block reads its input from forward(), not set_input_tensor
        # stage 1 under pipeline parallelism: the pre-decoder's layers are what the stages split
        self.split_pre_decoder = distill is not None and config.pipeline_model_parallel_size > 1
        if pre_process:
            self._build_input_stage(cfg, config, vocab_size)
        elif self.split_pre_decoder:
            self._build_pre_decoder(cfg, config)
        self.distill = distill
        self.optional_checkpoint_prefixes: tuple[str, ...] = ()
        if distill is not None and post_process:
            self._build_stage1(distill, config, vocab_size, teacher_hidden_size)
            # a stage-1 run starting from a stage-2-shaped checkpoint: heads (and, in tests, the targets) new
            self.optional_checkpoint_prefixes = ("distill_heads.", "llm_embedding.")
        if distill is not None:  # on every pipeline stage: the LLM's share there does not train either
            for name, param in self.named_parameters():
                if name.startswith(STAGE1_FROZEN):
                    param.requires_grad = False

    def _build_stage1(self, distill: DistillConfig, config: TransformerConfig, vocab: int, teacher: int) -> None:
        self.llm_embedding = tensor_parallel.VocabParallelEmbedding(
            num_embeddings=vocab, embedding_dim=config.hidden_size, init_method=config.init_method, config=config
        )
        # Under sequence parallelism the heads see the gathered sequence (identical on every TP rank).
        self.distill_heads = DistillationHeads(
            distill,
            pre_hidden_size=self.haplo_config.pre_decoder.hidden_size,
            teacher_hidden_size=teacher,
            text_embedding_size=config.hidden_size,
        ).to(dtype=config.params_dtype, device=None if config.use_cpu_initialization else torch.cuda.current_device())

    @staticmethod
    def refuse_te() -> None:
        raise NotImplementedError(
            "HaploVL on the Transformer Engine backend: its mask (bidirectional inside each image, causal "
            "elsewhere, packed documents apart) is not expressible as TE's fused THD attention; run with "
            "--transformer-impl local (explicit mask). See megatron/solo/haplo/mask.py for the GPU options."
        )

    def _pre_decoder_config(self, cfg: HaploConfig, config: TransformerConfig) -> TransformerConfig:
        split = config.pipeline_model_parallel_size if self.split_pre_decoder else 1
        return make_pre_decoder_transformer_config(cfg.pre_decoder, config, pipeline_parallel=split)

    def _build_pre_decoder(self, cfg: HaploConfig, config: TransformerConfig) -> None:
        """A later stage of a split pre-decoder: its share of the layers (input from ``set_input_tensor``)."""
        self.pre_config = self._pre_decoder_config(cfg, config)
        self.pre_decoder = build_pre_decoder(self.pre_config, pre_process=False)
        self.pre_rotary = build_pre_decoder_rotary(cfg.pre_decoder, self.pre_config)

    def _build_input_stage(self, cfg: HaploConfig, config: TransformerConfig, vocab_size: int) -> None:
        self.pre_config = self._pre_decoder_config(cfg, config)
        pre = cfg.pre_decoder.hidden_size
        self.embedding = LanguageModelEmbedding(
            config=self.pre_config,
            vocab_size=vocab_size,
            max_sequence_length=cfg.max_sequence_length,
            position_embedding_type="none",
            scatter_to_sequence_parallel=False,  # images are merged first, then scattered (embed)
        )
        self.embedding.word_embeddings.weight.is_embedding_or_output_parameter = True
        device = None if config.use_cpu_initialization else torch.cuda.current_device()
        dtype = config.params_dtype
        self.patch_embed = torch.nn.Linear(cfg.patch_dim, pre, bias=False, dtype=dtype, device=device)
        self.pos_embed = torch.nn.Parameter(torch.empty(cfg.tile_positions, pre, dtype=dtype, device=device))
        self.image_newline = torch.nn.Parameter(torch.zeros(pre, dtype=dtype, device=device))
        self.pre_norm = torch.nn.LayerNorm(pre, eps=cfg.pre_norm_epsilon, dtype=dtype, device=device)
        self.pre_decoder = build_pre_decoder(self.pre_config)  # under a split: the first stage's share
        self.pre_rotary = build_pre_decoder_rotary(cfg.pre_decoder, self.pre_config)
        self.connector = torch.nn.Linear(pre, config.hidden_size, bias=False, dtype=dtype, device=device)
        self.connector.weight.sequence_parallel = config.sequence_parallel
        if config.perform_initialization:
            config.init_method(self.patch_embed.weight)
            config.init_method(self.connector.weight)
            with torch.no_grad():
                self.pos_embed.normal_(0.0, 0.02)  # the released code's randn · 0.02

    def embed(
        self,
        tokens: torch.Tensor,
        position_ids: torch.Tensor,
        mask: torch.Tensor,
        patches: torch.Tensor | None,
        patch_index: torch.Tensor | None,
        patch_table_index: torch.Tensor | None,
        image_block_ids: torch.Tensor,
    ) -> torch.Tensor:
        """[s(/tp), b, pre] the pre-decoder's output: the multimodal embedding through pre-norm and pre-decoder
        (a later stage of a split pre-decoder: its layers on the hidden states the schedule set as its input).

        tokens, position_ids, image_block_ids [b, s]; mask [b, 1, s, s]; patches [p, 3·P·P] landing at flat
        ``patch_index`` [p] with position-table rows ``patch_table_index`` [p].
        """
        hidden = None
        if self.pre_process:
            hidden = self._embed_input(tokens, patches, patch_index, patch_table_index, image_block_ids)
        rotary = None
        if self.pre_rotary is not None:  # [s, b, 1, d]: positions restart per document
            rotary = rotary_lookup(self.pre_rotary, position_ids)
        return self.pre_decoder(hidden_states=hidden, attention_mask=mask, rotary_pos_emb=rotary)

    def _embed_input(self, tokens, patches, patch_index, patch_table_index, image_block_ids) -> torch.Tensor:
        """[s(/tp), b, pre]: the multimodal embedding through pre-norm (the pre-decoder's input)."""
        b, s = tokens.shape
        flat = self.embedding(input_ids=tokens, position_ids=None).transpose(0, 1).reshape(b * s, -1)  # [b·s, pre]
        weight = self.patch_embed.weight
        if patches is None:  # text only: the stem still runs (on nothing), so its weights get zero gradients
            patches = weight.new_zeros(0, weight.shape[1])
            patch_index = patch_table_index = torch.zeros(0, dtype=torch.long, device=tokens.device)
        patch_values = self.patch_embed(patches.to(weight.dtype)) + self.pos_embed[patch_table_index]  # [p, pre]
        flat = flat.index_copy(0, patch_index, patch_values.to(flat.dtype))
        is_patch = torch.zeros(b * s, dtype=torch.bool, device=flat.device).index_fill(0, patch_index, True)
        newline = (image_block_ids.reshape(-1) != NO_IMAGE) & ~is_patch  # an image's positions without a patch
        flat = torch.where(newline[:, None], self.image_newline.to(flat.dtype), flat)
        hidden = self.pre_norm(flat).view(b, s, -1).transpose(0, 1).contiguous()  # [s, b, pre]
        if self.config.sequence_parallel:
            hidden = tensor_parallel.scatter_to_sequence_parallel_region(hidden)  # [s/tp, b, pre]
        return hidden

    def forward(
        self,
        tokens: torch.Tensor,
        position_ids: torch.Tensor,
        cu_seqlens: torch.Tensor,
        max_seqlen: int,
        patches: torch.Tensor | None = None,
        patch_index: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        loss_mask: torch.Tensor | None = None,
        *,
        image_block_ids: torch.Tensor | None = None,
        patch_table_index: torch.Tensor | None = None,
        teacher_features: torch.Tensor | None = None,
        distill_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """As ``SoloModel.forward``, with ``image_block_ids`` [b, s] (``Batch.image_block_ids``: the mask, on
        every stage) and ``patch_table_index`` [p] (first stage). Per-token loss [b, s] with ``labels``, else
        logits [b, s, V/tp]; hidden states [s, b, H] on stages before the last.

        Stage 1: ``teacher_features`` [p, C] (the teacher's feature of each patch, in ``patches`` order) and
        ``distill_mask`` [b, s] (1 at the text positions to distil) → per-token distillation loss [b, s]. Under
        pipeline parallelism (the pre-decoder split) stages before the last return its hidden states
        [s(/tp), b, pre] and need neither; the last needs no ``patches``. A stage-1 model's last stage without
        them raises ``ValueError``, at any pipeline size (its frozen LLM is not a fallback)."""
        b, s = tokens.shape
        if image_block_ids is None:
            image_block_ids = torch.full_like(tokens, NO_IMAGE)
        mask = haplo_attention_mask(cu_seqlens, image_block_ids)
        if teacher_features is not None or self.distill is not None:  # stage 1 (its LLM never runs)
            hidden = self.embed(tokens, position_ids, mask, patches, patch_index, patch_table_index, image_block_ids)
            if not self.post_process:
                return hidden
            return self._distillation_loss(hidden, tokens, patch_index, teacher_features, distill_mask)
        decoder_input = None
        if self.pre_process:
            hidden = self.embed(tokens, position_ids, mask, patches, patch_index, patch_table_index, image_block_ids)
            decoder_input = self.connector(hidden)
        out = GPTModel.forward(
            self,
            tokens,
            position_ids,
            mask,
            decoder_input=decoder_input,
            labels=labels,
            loss_mask=loss_mask if labels is not None else None,
        )
        if not self.post_process:
            return out
        return out.reshape(b, s, *out.shape[2:])

    def set_input_tensor(self, input_tensor) -> None:
        """The schedule's input of this stage: the LLM decoder's, or the split pre-decoder's in stage 1."""
        if not self.split_pre_decoder:
            return super().set_input_tensor(input_tensor)
        self.pre_decoder.set_input_tensor(input_tensor[0] if isinstance(input_tensor, list) else input_tensor)

    def pipeline_schedule_kwargs(self) -> dict:
        """Extra arguments of megatron-core's pipeline schedule: stage 1's split pre-decoder exchanges
        [s(/tp), b, pre] tensors, not the ``config.hidden_size`` ones the schedule assumes."""
        if not self.split_pre_decoder:
            return super().pipeline_schedule_kwargs()
        return {"adjust_tensor_shapes_fn": partial(_at_width, self.haplo_config.pre_decoder.hidden_size)}

    def _distillation_loss(self, hidden, tokens, patch_index, teacher_features, distill_mask) -> torch.Tensor:
        """Per-token stage-1 loss [b, s] (float32): vision terms at ``patch_index``, text terms where
        ``distill_mask`` [b, s] is non-zero, 0 elsewhere. hidden [s(/tp), b, pre]."""
        if self.distill is None:
            raise ValueError("teacher_features given to a model built without distillation heads (stage 2)")
        if teacher_features is None or distill_mask is None:
            raise ValueError("stage 1's last pipeline stage needs teacher_features and distill_mask")
        if self.config.sequence_parallel:  # every TP rank computes the heads on the whole sequence
            hidden = tensor_parallel.gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=False)
        s, b, pre = hidden.shape
        flat = hidden.transpose(0, 1).reshape(b * s, pre)
        if patch_index is None:
            patch_index = torch.zeros(0, dtype=torch.long, device=flat.device)
        text = distill_mask.reshape(-1).nonzero().squeeze(1)
        losses = distillation_losses(
            self.distill_heads,
            flat.index_select(0, patch_index),
            teacher_features,
            flat.index_select(0, text),
            tokens.reshape(-1).index_select(0, text),
            self.llm_embedding,
            vocab_parallel=self.config.tensor_model_parallel_size > 1,
        )
        per_token = flat.new_zeros(b * s, dtype=torch.float32).index_copy(0, patch_index, losses["vision"])
        per_token = per_token.index_add(0, text, losses["feature"] + losses["ctp"])
        return per_token.view(b, s)


def _at_width(width: int, recv: list, send: list) -> tuple[list, list]:
    """megatron-core's ``adjust_tensor_shapes_fn``: the [s, b, h] p2p shapes with ``h`` = ``width``."""
    return [(s, b, width) for s, b, _ in recv], [(s, b, width) for s, b, _ in send]


STAGE1_FROZEN = ("decoder.", "output_layer.", "connector.", "llm_embedding.")


def build_haplo_model(
    cfg: HaploConfig,
    transformer_config: TransformerConfig,
    *,
    padded_vocab_size: int | None = None,
    pre_process: bool = True,
    post_process: bool = True,
    vp_stage: int | None = None,
    distill: DistillConfig | None = None,
    teacher_hidden_size: int | None = None,
) -> HaploModel:
    """One pipeline stage of HaploVL; ``transformer_config`` is the LLM's (``model.make_transformer_config``)."""
    tp = transformer_config.tensor_model_parallel_size
    vocab = padded_vocab_size or cfg.padded_vocab_size(tp)
    if vocab < cfg.vocab_size or vocab % tp:
        raise ValueError(
            f"padded_vocab_size: {vocab} must be ≥ vocab_size={cfg.vocab_size} and a multiple of "
            f"tensor_model_parallel_size={tp}"
        )
    check_megatron_core()
    backend = backend_of(transformer_config)
    if backend == "te":  # before the TE layer spec is built: the model refuses it with the reason
        HaploModel.refuse_te()
    return HaploModel(
        cfg,
        transformer_config,
        decoder_block_spec(transformer_config, backend, vp_stage),
        vocab_size=vocab,
        pre_process=pre_process,
        post_process=post_process,
        vp_stage=vp_stage,
        distill=distill,
        teacher_hidden_size=teacher_hidden_size,
    )
