"""SoloForCausalLM: Mistral whose input also takes raw 32×32×3 pixel patches through one linear layer.

Self-contained (imports only torch and transformers, plus the configuration next to it) so it ships inside
an exported checkpoint and loads with ``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)``
where solo-megatron is not installed. Parameter names are the released SOLO-7B's (``model.embed_vision_patch``).

Inputs, compatible with the reference:

* ``vision_patch_indices`` ``[b, s]`` int64: for each position the row of ``vision_patches`` it shows, or -1
  for text. Indices are global over the batch (one flat ``vision_patches`` for all samples).
* ``vision_patches`` ``[N, patch_dim]`` float: ImageNet-normalised pixels, each patch flattened channel-first.

At a patch position the decoder input is ``embed_tokens[<vpatch>] + embed_vision_patch(patch)`` (the
reference's merge: the token embedding is a shared learned bias). Text-only input (vision arguments None or
without any index ≥ 0) is exactly Mistral. ``generate`` works with images and a KV cache (unlike the
reference's repo version): the indices are padded with -1 over generated tokens and sliced to the tokens being
processed, and patches are passed only while a slice containing image positions is processed.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import Cache, MistralForCausalLM, MistralModel
from transformers.models.mistral.modeling_mistral import MistralPreTrainedModel

from .configuration_solo import SoloConfig


class SoloBaseModel(MistralModel):
    """``MistralModel`` + ``embed_vision_patch``: Linear(patch_dim → hidden, no bias)."""

    config_class = SoloConfig

    def __init__(self, config: SoloConfig):
        super().__init__(config)
        self.embed_vision_patch = nn.Linear(config.patch_dim, config.hidden_size, bias=False)
        self.post_init()  # again: MistralModel's own call ran before the patch projection existed

    def embed_inputs(
        self,
        input_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        vision_patch_indices: torch.LongTensor | None = None,
        vision_patches: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Decoder input ``[b, s, h]``: token embeddings, plus the projected patch where the index is ≥ 0."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if not _has_patches(vision_patch_indices, vision_patches, inputs_embeds.shape[:2], self.config.patch_dim):
            return inputs_embeds
        projected = self.embed_vision_patch(vision_patches.to(self.embed_vision_patch.weight.dtype))  # [N, h]
        # A zero row at the end: index -1 picks it, so text positions get exactly +0 (the reference's merge).
        table = torch.cat([projected, projected.new_zeros(1, projected.shape[1])]).to(inputs_embeds.dtype)
        return inputs_embeds + table[vision_patch_indices]

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        vision_patch_indices: torch.LongTensor | None = None,
        vision_patches: torch.Tensor | None = None,
        **kwargs,
    ):
        """``MistralModel.forward`` on the merged input; attention_mask, position_ids, … pass through."""
        inputs_embeds = self.embed_inputs(input_ids, inputs_embeds, vision_patch_indices, vision_patches)
        return super().forward(inputs_embeds=inputs_embeds, **kwargs)


class SoloForCausalLM(MistralForCausalLM):
    """``MistralForCausalLM`` over :class:`SoloBaseModel`; ``forward``/``generate`` take the vision inputs."""

    config_class = SoloConfig

    def __init__(self, config: SoloConfig):
        # MistralForCausalLM.__init__ would build (and allocate) a plain MistralModel first; build ours instead.
        MistralPreTrainedModel.__init__(self, config)
        self.model = SoloBaseModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values=None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        vision_patch_indices: torch.LongTensor | None = None,
        vision_patches: torch.Tensor | None = None,
        **kwargs,
    ):
        """Mistral's causal-LM forward; ``labels`` give the shifted cross-entropy with ignore index -100.

        The parameters are spelled out because ``generate`` inspects this signature (attention_mask,
        position_ids, logits_to_keep) to decide what to pass. The KV cache is named ``past_key_values`` up to
        transformers 5.23 and ``cache`` from 5.24 (which still accepts the old name, deprecated): ``generate``
        passes whichever the installed version uses, and it goes through unchanged (in ``kwargs`` when it is
        ``cache``). ``past_key_values`` is only forwarded when given, so that 5.24 does not see both names.
        """
        inputs_embeds = self.model.embed_inputs(input_ids, inputs_embeds, vision_patch_indices, vision_patches)
        if past_key_values is not None:
            kwargs["past_key_values"] = past_key_values
        return super().forward(
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            labels=labels,
            use_cache=use_cache,
            logits_to_keep=logits_to_keep,
            **kwargs,
        )

    def _expand_inputs_for_generation(self, expand_size=1, is_encoder_decoder=False, input_ids=None, **model_kwargs):
        """Beams / ``num_return_sequences``: repeat per-sample tensors, but not ``vision_patches``.

        ``vision_patches`` is one [N, D] tensor for the whole batch that the (repeated) indices point into;
        repeating its rows like a per-sample tensor would silently hand every sequence the wrong patches.
        """
        patches = model_kwargs.pop("vision_patches", None)
        input_ids, model_kwargs = super()._expand_inputs_for_generation(
            expand_size=expand_size, is_encoder_decoder=is_encoder_decoder, input_ids=input_ids, **model_kwargs
        )
        if patches is not None:
            model_kwargs["vision_patches"] = patches
        return input_ids, model_kwargs

    def prepare_inputs_for_generation(
        self, input_ids, inputs_embeds=None, vision_patch_indices=None, vision_patches=None, **kwargs
    ):
        """The base preparation, plus the vision inputs for exactly the tokens this step processes.

        ``inputs_embeds`` is named so that ``generate`` keeps accepting text-only ``inputs_embeds`` (it checks
        this signature); with vision inputs, pass ``input_ids``.
        """
        model_inputs = super().prepare_inputs_for_generation(input_ids, inputs_embeds=inputs_embeds, **kwargs)
        if vision_patch_indices is None:
            return model_inputs
        step_ids = model_inputs.get("input_ids")
        if step_ids is None:
            raise ValueError("generate() with vision inputs needs input_ids, not inputs_embeds")
        # The cache holds every earlier token, so this step covers absolute positions [past, past + n). The cache
        # is found by type, not by key: transformers 5.24 renamed it from "past_key_values" to "cache", and a
        # missed cache would make every decode step re-read the prompt's first positions (and their patches).
        caches = [value for value in model_inputs.values() if isinstance(value, Cache)]
        if len(caches) > 1:
            raise ValueError(f"expected at most one KV cache in the generation inputs, got {len(caches)}")
        past = caches[0].get_seq_length() if caches else 0
        if not caches and step_ids.shape[1] != input_ids.shape[1]:
            # Without a cache every step must process the whole sequence; anything else means a cache we missed.
            raise ValueError(
                f"generate() processes {step_ids.shape[1]} of {input_ids.shape[1]} tokens but no KV cache was "
                "found in the model inputs, so the positions of the vision inputs are unknown"
            )
        step_indices = _pad_indices(vision_patch_indices, past + step_ids.shape[1])[:, past:]
        if (step_indices >= 0).any():  # a prompt slice with image positions: the only time patches are needed
            model_inputs["vision_patch_indices"] = step_indices
            model_inputs["vision_patches"] = vision_patches
        return model_inputs


def _pad_indices(indices: torch.LongTensor, length: int) -> torch.LongTensor:
    """``[b, s]`` → ``[b, length]``, padded with -1 (text) on the right: generated tokens carry no patch."""
    if indices.shape[1] >= length:
        return indices[:, :length]
    return torch.nn.functional.pad(indices, (0, length - indices.shape[1]), value=-1)


def _has_patches(indices, patches, batch_seq: torch.Size, patch_dim: int) -> bool:
    """Whether any position shows a patch, after checking that the vision inputs fit together."""
    if indices is None:
        if patches is not None and patches.numel() > 0:
            raise ValueError("vision_patches were given without vision_patch_indices")
        return False
    if tuple(indices.shape) != tuple(batch_seq):
        raise ValueError(
            f"vision_patch_indices has shape {list(indices.shape)}, expected [batch, seq] = {list(batch_seq)}"
        )
    if indices.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"vision_patch_indices must be an integer tensor, got {indices.dtype}")
    n = 0 if patches is None else patches.shape[0]
    if patches is not None and (patches.dim() != 2 or patches.shape[1] != patch_dim):
        raise ValueError(f"vision_patches has shape {list(patches.shape)}, expected [N, {patch_dim}]")
    if indices.numel() and (indices.min() < -1 or indices.max() >= n):
        raise ValueError(
            f"vision_patch_indices must be -1 (text) or in 0..{n - 1} (rows of vision_patches), "
            f"got values in {indices.min().item()}..{indices.max().item()}"
        )
    return n > 0 and bool((indices >= 0).any())


__all__ = ["SoloBaseModel", "SoloForCausalLM"]
