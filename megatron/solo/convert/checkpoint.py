"""Whole-checkpoint conversion: an HF Mistral/SOLO directory ↔ a Megatron SOLO checkpoint.

``hf_to_megatron_checkpoint`` builds the model on the meta device and *assigns* the converted tensors, so
nothing is allocated twice; the result is a layout-free dist_checkpointing "release" checkpoint (it loads
at any TP/PP/DP). The tensor-parallel size chosen at conversion only fixes the vocabulary padding
(a multiple of 128·TP, as the reference did) and is validated against the architecture, as is PP.
``megatron_to_hf_checkpoint`` loads a checkpoint (release or any training iteration) at TP=PP=1 in one
process and writes an HF export with our ``SoloForCausalLM`` (see ``hf_export``).
Both run in a single process (a world of one is formed if none exists).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from megatron.solo.checkpointing import (
    CheckpointMetadata,
    checkpoint_dtype,
    load_full_model,
    load_model_state,
    save_model,
)
from megatron.solo.config import ModelConfig
from megatron.solo.convert.hf_export import read_hf_checkpoint, write_hf_export
from megatron.solo.convert.hf_solo import SoloConfig
from megatron.solo.convert.name_table import PATCH_INIT_SEED, hf_to_megatron, megatron_to_hf, model_config_from_hf
from megatron.solo.families import build_model
from megatron.solo.model import make_transformer_config
from megatron.solo.parallel import ensure_model_parallel_of_one
from megatron.solo.tokenizer import SoloTokenizer, has_tokenizer


def solo_config_from_model_config(cfg: ModelConfig, tokenizer: SoloTokenizer) -> SoloConfig:
    """The HF config of a Megatron architecture (untied, SwiGLU, RMSNorm, default RoPE)."""
    return SoloConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.ffn_hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_query_groups,
        head_dim=cfg.head_dim,
        max_position_embeddings=cfg.max_sequence_length,
        rms_norm_eps=cfg.norm_epsilon,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rotary_base},
        sliding_window=cfg.sliding_window,
        tie_word_embeddings=False,
        vision_patch_size=cfg.patch_size,
        bos_token_id=tokenizer.bos_id,
        eos_token_id=tokenizer.eos_id,
    )


def _source_tokenizer(hf_dir: Path, tokenizer_model: str | os.PathLike | None) -> SoloTokenizer:
    path = Path(tokenizer_model) if tokenizer_model is not None else hf_dir
    if tokenizer_model is None and not has_tokenizer(hf_dir):
        raise FileNotFoundError(f"{hf_dir}: no tokenizer (tokenizer.model or tokenizer.json); pass --tokenizer-model")
    return SoloTokenizer(path)


def _floating_dtype(tensors) -> torch.dtype:
    for name in tensors:
        tensor = tensors[name]  # one read: the mapping may load lazily from disk
        if tensor.is_floating_point():
            return tensor.dtype
    raise ValueError("the checkpoint holds no floating-point tensor")


def _is_haplo(hf_dir: Path) -> bool:
    import json

    path = hf_dir / "config.json"
    if not path.is_file():
        return False
    config = json.loads(path.read_text())
    return config.get("model_type") == "haplo" or "pre_config" in config


def hf_to_megatron_checkpoint(
    hf_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    tensor_parallel: int = 1,
    pipeline_parallel: int = 1,
    tokenizer_model: str | os.PathLike | None = None,
    dtype: torch.dtype | None = None,
    seed: int = PATCH_INIT_SEED,
) -> CheckpointMetadata:
    """Convert an HF ``MistralForCausalLM`` (or SOLO-7B HF) directory into a Megatron release checkpoint; a
    directory in the released HaploVL layout goes to ``haplo_export.haplo_hf_to_megatron`` (``seed`` unused)."""
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    if _is_haplo(hf_dir):  # the released HaploVL layout (config.json's model_type): haplo_export's import
        from megatron.solo.convert.haplo_export import haplo_hf_to_megatron

        return haplo_hf_to_megatron(
            hf_dir,
            out_dir,
            tensor_parallel=tensor_parallel,
            pipeline_parallel=pipeline_parallel,
            tokenizer_model=tokenizer_model,
            dtype=dtype,
        )
    if (out_dir / "latest_checkpointed_iteration.txt").exists():
        raise FileExistsError(f"{out_dir} already holds a checkpoint; choose an empty --out")
    tokenizer = _source_tokenizer(hf_dir, tokenizer_model)
    hf_sd, hf_config = read_hf_checkpoint(hf_dir)
    cfg = model_config_from_hf(hf_config, vocab_size=tokenizer.vocab_size)
    cfg.validate_parallel(tensor_parallel=tensor_parallel, pipeline_parallel=pipeline_parallel)
    metadata = CheckpointMetadata(cfg, cfg.padded_vocab_size(tensor_parallel))
    dtype = dtype or _floating_dtype(hf_sd)
    m_sd = hf_to_megatron(
        hf_sd, cfg, padded_vocab_size=metadata.padded_vocab_size, generator=torch.Generator().manual_seed(seed)
    )
    save_converted(out_dir, cfg, m_sd, metadata, tokenizer, dtype)
    return metadata


def save_converted(
    out_dir: Path,
    cfg: ModelConfig,
    weights: dict[str, torch.Tensor],
    metadata: CheckpointMetadata,
    tokenizer: SoloTokenizer,
    dtype: torch.dtype,
) -> None:
    """Write converted ``weights`` (the model's state-dict names, any family) in ``dtype`` as a release
    checkpoint of ``cfg`` in ``out_dir``, with ``tokenizer``; every tensor of the model must be given."""
    weights = {name: tensor.to(dtype) for name, tensor in weights.items()}
    ensure_model_parallel_of_one()
    # The local spec on any machine: its parameter names are the name table's, and the checkpoint it writes
    # loads into either backend. On meta, shapes only: the converted tensors are assigned, not copied.
    tc = make_transformer_config(
        cfg, params_dtype=dtype, perform_initialization=False, backend="local", cpu_initialization=True
    )
    with torch.device("meta"):
        model = build_model(cfg, tc, padded_vocab_size=metadata.padded_vocab_size)
    load_model_state(model, weights, assign=True)
    tokenizer.save_pretrained(out_dir)  # before the tracker file marks the checkpoint complete
    save_model(out_dir, model, metadata)


def megatron_to_hf_checkpoint(
    load_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    iteration: int | None | str = "latest",
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
    chat_template: str = "mistral",
) -> Path:
    """Export a Megatron SOLO checkpoint as an HF ``SoloForCausalLM`` directory (safetensors + code) (a HaploVL
    checkpoint: ``haplo_export``'s ``HaploForCausalLM`` directory), in
    ``dtype`` (default: the checkpoint's own, so an fp32 checkpoint keeps its precision); ``chat_template``:
    the processor's chat layout (``llama3``: HaploVL only)."""
    family = CheckpointMetadata.read(load_dir).model.family
    if family == "haplo":  # the family comes from the checkpoint's own config: no flag
        from megatron.solo.convert.haplo_export import haplo_megatron_to_hf

        return haplo_megatron_to_hf(
            load_dir, out_dir, iteration=iteration, dtype=dtype, overwrite=overwrite, chat_template=chat_template
        )
    if family != "solo":
        raise ValueError(f"{load_dir}: a {family} checkpoint; no HF export for it")
    if chat_template != "mistral":
        raise ValueError(f"chat_template {chat_template!r}: a SOLO export has the mistral template only")
    dtype = dtype or checkpoint_dtype(load_dir, iteration)
    model, metadata = load_full_model(load_dir, iteration=iteration, dtype=dtype)
    state = {name: tensor for name, tensor in model.state_dict().items() if not name.endswith("_extra_state")}
    hf_sd = megatron_to_hf(state, metadata.model, vocab_size=metadata.model.vocab_size)
    tokenizer = SoloTokenizer.from_pretrained(load_dir)
    solo_config = solo_config_from_model_config(metadata.model, tokenizer)
    return write_hf_export(out_dir, hf_sd, solo_config, tokenizer, dtype, overwrite=overwrite)
