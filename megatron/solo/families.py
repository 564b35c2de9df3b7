"""The model families of the stack (SOLO, HaploVL), chosen by a config's ``family``.

Everything else is shared: sources → documents → packs → the packed format, the loader and ``Batch``, the
trainer, checkpoints. A checkpoint's saved model config names its family (``ModelConfig.to_dict``), so
loading one needs no flag: :func:`config_from_dict` rebuilds the right config and :func:`build_model` the
right model. Both families take the same ``TransformerConfig`` (``model.make_transformer_config``: the
LLM's) and the same forward arguments.
"""

from __future__ import annotations

from typing import Any

from megatron.core.transformer import TransformerConfig

from megatron.solo.config import PRESETS as SOLO_PRESETS
from megatron.solo.config import ModelConfig
from megatron.solo.haplo.config import HAPLO_PRESETS, HaploConfig
from megatron.solo.model import build_model as build_solo_model

FAMILIES: dict[str, type[ModelConfig]] = {"solo": ModelConfig, "haplo": HaploConfig}
PRESETS: dict[str, ModelConfig] = {**SOLO_PRESETS, **HAPLO_PRESETS}


def config_from_dict(data: dict[str, Any]) -> ModelConfig:
    """The config a saved ``to_dict()`` describes, of its family's class (no ``family``: SOLO, as before)."""
    family = data.get("family", "solo")
    if family not in FAMILIES:
        raise ValueError(f"family: unknown model family {family!r}; known: {', '.join(sorted(FAMILIES))}")
    return FAMILIES[family].from_dict(data)


def get_preset(name: str) -> ModelConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"model preset: unknown {name!r}; choose from {', '.join(sorted(PRESETS))}") from None


def build_model(
    cfg: ModelConfig,
    transformer_config: TransformerConfig,
    *,
    padded_vocab_size: int | None = None,
    pre_process: bool = True,
    post_process: bool = True,
    vp_stage: int | None = None,
    **family_options: Any,
):
    """One pipeline stage of ``cfg``'s family's model (``SoloModel`` or ``HaploModel``). ``family_options``:
    what only that family takes (HaploVL stage 1: ``distill``, ``teacher_hidden_size``)."""
    kwargs = dict(
        padded_vocab_size=padded_vocab_size, pre_process=pre_process, post_process=post_process, vp_stage=vp_stage
    )
    if isinstance(cfg, HaploConfig):
        from megatron.solo.haplo.model import build_haplo_model

        return build_haplo_model(cfg, transformer_config, **kwargs, **family_options)
    if family_options:
        raise ValueError(f"{', '.join(sorted(family_options))}: not options of a SOLO model")
    return build_solo_model(cfg, transformer_config, **kwargs)
