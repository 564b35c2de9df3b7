"""``SoloModel``: megatron-core's ``GPTModel`` whose input also takes raw pixel patches.

At a ``<vpatch>`` position the decoder input is the ``<vpatch>`` token embedding **plus** the projected
patch (``Linear(3·32·32 → hidden, bias=False)``), as in the reference. The projection is a plain replicated
``nn.Linear`` on the first pipeline stage: its input is replicated across tensor-parallel ranks, so its
gradients come out identical there and need no extra reduction. Patches are merged into the full-sequence
embedding, and only then scattered for sequence parallelism.
"""

from __future__ import annotations

import torch
from megatron.core import tensor_parallel
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.spec_utils import ModuleSpec

from megatron.solo.model.attention import packed_causal_mask, thd_packed_seq_params
from megatron.solo.model.mcore_seam import output_layer_gathered, pipeline_tensor_shape, rotary_at_positions
from megatron.solo.model.specs import Backend, backend_of


class SoloModel(GPTModel):
    """A Mistral decoder (RoPE, untied embeddings) with a patch projection on the first stage."""

    def __init__(
        self,
        config: TransformerConfig,
        block_spec: ModuleSpec,
        *,
        vocab_size: int,
        max_sequence_length: int,
        patch_dim: int,
        rotary_base: float,
        sliding_window: int | None,
        pre_process: bool = True,
        post_process: bool = True,
        vp_stage: int | None = None,
    ):
        super().__init__(
            config,
            block_spec,
            vocab_size=vocab_size,
            max_sequence_length=max_sequence_length,
            pre_process=pre_process,
            post_process=post_process,
            position_embedding_type="rope",
            rotary_base=rotary_base,
            share_embeddings_and_output_weights=False,
            scatter_embedding_sequence_parallel=False,  # merge patches first, scatter after (forward)
            vp_stage=vp_stage,
        )
        self.backend: Backend = backend_of(config)
        self.sliding_window = sliding_window
        self.patch_dim = patch_dim
        if pre_process:
            # Where megatron-core puts its own weights: no device (CPU, or a torch.device context such as
            # meta) under use_cpu_initialization, else the current GPU.
            device = None if config.use_cpu_initialization else torch.cuda.current_device()
            self.patch_embedding = torch.nn.Linear(
                patch_dim, config.hidden_size, bias=False, dtype=config.params_dtype, device=device
            )
            if config.perform_initialization:
                config.init_method(self.patch_embedding.weight)

    def embed(
        self, tokens: torch.Tensor, patches: torch.Tensor | None, patch_index: torch.Tensor | None
    ) -> torch.Tensor:
        """[s, b, h] decoder input: token embeddings, plus projected patches at their flat positions.

        tokens [b, s]; patches [p, patch_dim]; patch_index [p], flat ``row·s + col``.
        """
        emb = self.embedding(input_ids=tokens, position_ids=None)  # [s, b, h], the full sequence
        b, s = tokens.shape
        weight = self.patch_embedding.weight
        if patches is None:  # text only: still run the projection (on nothing) so its weight gets a zero
            patches = weight.new_zeros(0, self.patch_dim)  # gradient; DDP's bucket sync expects every grad
            patch_index = torch.zeros(0, dtype=torch.long, device=tokens.device)
        projected = self.patch_embedding(patches.to(weight.dtype))  # [p, h]
        flat = emb.transpose(0, 1).reshape(b * s, -1)
        flat = flat.index_add(0, patch_index, projected.to(flat.dtype))
        emb = flat.view(b, s, -1).transpose(0, 1).contiguous()
        if self.config.sequence_parallel:
            emb = tensor_parallel.scatter_to_sequence_parallel_region(emb)  # [s/tp, b, h]
        return emb

    def _preprocess(self, *args, **kwargs):
        # GPTModel builds RoPE for positions 0..s-1 and ignores position_ids; packed documents restart
        # their positions, so look the rotary table up by position (exact, not only relative). TE's THD
        # RoPE restarts at every cu_seqlens span by itself.
        out = super()._preprocess(*args, **kwargs)
        position_ids = kwargs.get("position_ids")
        if self.backend == "local" and position_ids is not None:
            out = rotary_at_positions(out, self.rotary_pos_emb, position_ids)
        return out

    def pipeline_shape(self, micro_batch_size: int, seq_length: int) -> tuple[int, int]:
        """``(seq_length, micro_batch_size)`` of the tensors this model's pipeline stages exchange."""
        return pipeline_tensor_shape(self.backend, micro_batch_size, seq_length)

    def pipeline_schedule_kwargs(self) -> dict:
        """Extra keyword arguments of megatron-core's pipeline schedule for this model (none here)."""
        return {}

    def _postprocess(self, hidden_states, input_ids, position_ids, labels, *args, loss_mask=None, **kwargs):
        if labels is None or loss_mask is None or not self.post_process or self.config.mtp_num_layers:
            return super()._postprocess(
                hidden_states, input_ids, position_ids, labels, *args, loss_mask=loss_mask, **kwargs
            )
        return self._target_loss(hidden_states, labels, loss_mask)

    def _target_loss(self, hidden: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
        """Per-token loss [B, S], computed only where ``loss_mask`` [B, S] is non-zero (0 elsewhere).

        hidden [S(/tp), B, h]. Under sequence parallelism the hidden states are gathered here (so positions
        can be picked from the whole sequence) and the output layer runs as a plain column-parallel layer,
        whose backward all-reduces the input gradient: the gather's backward must then only split it.
        """
        if self.config.sequence_parallel:
            hidden = tensor_parallel.gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=False)
        s, b, h = hidden.shape
        where = loss_mask.t().reshape(-1).nonzero().squeeze(1)  # [n], flat over the [S, B] order of hidden
        picked = hidden.reshape(s * b, h).index_select(0, where).unsqueeze(1)  # [n, 1, h]
        with output_layer_gathered(self.output_layer) as output_layer:
            logits, _ = output_layer(picked)  # [n, 1, V/tp]
        picked_labels = labels.t().reshape(-1).index_select(0, where).unsqueeze(0)  # [1, n]
        loss = self.compute_language_model_loss(picked_labels, logits)  # [1, n]
        return loss.new_zeros(s * b).index_copy(0, where, loss.reshape(-1)).view(s, b).t()

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
    ) -> torch.Tensor:
        """Per-token loss [b, s] when ``labels`` are given, else logits [b, s, V/tp] (last pipeline stage).

        ``image_block_ids`` and ``patch_table_index`` (``Batch`` fields for HaploVL) are accepted and ignored:
        SOLO is causal everywhere and has no position table, so the trainer calls both families alike.

        With ``loss_mask`` [b, s] as well, logits are computed only where it is non-zero and the loss is 0
        elsewhere: SOLO learns text only, so most positions of an image-bearing pack need no logits.

        tokens, position_ids, labels: int64 [b, s]; cu_seqlens: int32 [n + 1] over the flattened b·s
        stream; patches [p, patch_dim] with patch_index [p] (used on the first pipeline stage only).
        With the TE backend the stages exchange [b·s, 1, h] hidden states: a pipeline schedule must then
        be called with ``seq_length=b·s, micro_batch_size=1``.
        """
        b, s = tokens.shape
        if self.backend == "te":
            # THD: the micro-batch is one stream of b·s tokens whose documents cu_seqlens delimits; flat
            # patch indices (row·s + col) are already positions in that stream.
            tokens, position_ids = tokens.reshape(1, b * s), position_ids.reshape(1, b * s)
            labels = None if labels is None else labels.reshape(1, b * s)
            loss_mask = None if loss_mask is None else loss_mask.reshape(1, b * s)
            mask, packed = None, thd_packed_seq_params(cu_seqlens, max_seqlen)
        else:
            mask, packed = packed_causal_mask(cu_seqlens, b, s, self.sliding_window), None
        decoder_input = self.embed(tokens, patches, patch_index) if self.pre_process else None
        out = super().forward(
            tokens,
            position_ids,
            mask,
            decoder_input=decoder_input,
            labels=labels,
            packed_seq_params=packed,
            loss_mask=loss_mask if labels is not None else None,
        )
        if not self.post_process:
            return out  # hidden states [s, b, h] ([b·s, 1, h] under THD) for the next pipeline stage
        return out.reshape(b, s, *out.shape[2:])
