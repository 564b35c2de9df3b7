"""A Megatron HaploVL checkpoint → an HF directory in the released layout, with our remote code.

The directory (written atomically, as SOLO's export)::

    config.json                  hf_haplo's HaploConfig (the release's nesting: LLM fields on top, pre_config),
                                 model_type "haplo", architectures, auto_map → the three files below
    configuration_haplo.py       copies of megatron/solo/haplo/hf_haplo/*: model, config and processor load with
    modeling_haplo.py            trust_remote_code=True where solo-megatron is not installed
    processing_haplo.py
    processor_config.json        HaploProcessor's settings (tile, patch, pinpoints, CLIP mean/std)
    chat_template.jinja          the Mistral [INST] … [/INST] template preprocessing writes
    generation_config.json       bos/eos/pad ids; the vision ids are suppressed (a generated <vpatch> has no image)
    model.safetensors            the release's names (``haplo/release_layout.py``), or shards + index
    tokenizer.json, tokenizer_config.json, tokenizer.model, solo_tokenizer.json   as SOLO's export

The image token (``image_token_index``) is the stack's placeholder, ``<vpatch>``; an LLM without biases exports
zero biases (the release has them everywhere); the stage-1 tensors (heads, text targets) are not exported.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch

from megatron.solo.checkpointing import CheckpointMetadata, checkpoint_dtype, load_full_model
from megatron.solo.convert.hf_export import DEFAULT_MAX_SHARD_BYTES, _replace_dir, _write_weights
from megatron.solo.haplo.config import HaploConfig
from megatron.solo.haplo.release_layout import megatron_to_release, release_config
from megatron.solo.tokenizer import SoloTokenizer


def hf_haplo_config(cfg: HaploConfig, tokenizer: SoloTokenizer):
    """hf_haplo's ``HaploConfig`` of a Megatron ``HaploConfig`` with the stack's tokenizer."""
    from megatron.solo.haplo.hf_haplo import HaploConfig as HFHaploConfig

    return HFHaploConfig(
        **release_config(
            cfg.pre_decoder,
            cfg,
            vocab_size=cfg.vocab_size,
            max_position_embeddings=cfg.max_sequence_length,
            image_token_index=tokenizer.vision_patch_id,
            patch_size=cfg.patch_size,
            default_image_size=cfg.tile_size,
            image_grid_pinpoints=[list(p) for p in cfg.image_grid_pinpoints],
            image_aspect_ratio=f"anyres_max_{cfg.anyres_max_tiles}",
            pre_norm_eps=cfg.pre_norm_epsilon,
            bos_token_id=tokenizer.bos_id,
            eos_token_id=tokenizer.eos_id,
            pad_token_id=tokenizer.pad_id,
        )
    )


def haplo_processor(cfg: HaploConfig, tokenizer: SoloTokenizer):
    """``HaploProcessor`` around the HF twin of ``tokenizer``, with ``cfg``'s tiling."""
    from megatron.solo.convert.hf_tokenizer import build_hf_tokenizer
    from megatron.solo.haplo.anyres import CLIP_MEAN, CLIP_STD
    from megatron.solo.haplo.hf_haplo import HaploProcessor

    return HaploProcessor(
        build_hf_tokenizer(tokenizer),
        tile_size=cfg.tile_size,
        patch_size=cfg.patch_size,
        image_grid_pinpoints=[list(p) for p in cfg.image_grid_pinpoints],
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
    )


def haplo_megatron_to_hf(
    load_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    iteration: int | None | str = "latest",
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> Path:
    """Export a Megatron HaploVL checkpoint (any iteration, stage 1 or 2) as an HF ``HaploForCausalLM`` directory
    in ``dtype`` (default: the checkpoint's own)."""
    from transformers import GenerationConfig

    from megatron.solo.haplo.hf_haplo import AUTO_MAP, MODELING_FILES

    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} exists; pass overwrite=True to replace it")
    cfg = CheckpointMetadata.read(load_dir).model
    if not isinstance(cfg, HaploConfig):
        raise ValueError(f"{load_dir}: a {cfg.family} checkpoint, not HaploVL")
    dtype = dtype or checkpoint_dtype(load_dir, iteration)
    model, metadata = load_full_model(load_dir, iteration=iteration, dtype=dtype)
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    hf_sd = megatron_to_release(state, pre=cfg.pre_decoder, llm=cfg, vocab_size=cfg.vocab_size)
    tokenizer = SoloTokenizer.from_pretrained(load_dir)
    config = hf_haplo_config(cfg, tokenizer)
    config.architectures = ["HaploForCausalLM"]
    config.auto_map = dict(AUTO_MAP)
    config.dtype = dtype
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        _write_weights(tmp, hf_sd, dtype, max_shard_bytes)
        config.to_json_file(tmp / "config.json", use_diff=True)
        GenerationConfig(
            bos_token_id=tokenizer.bos_id,
            eos_token_id=tokenizer.eos_id,
            pad_token_id=tokenizer.pad_id,
            suppress_tokens=list(tokenizer.vision_token_ids),
        ).save_pretrained(tmp)
        for source in MODELING_FILES:
            shutil.copyfile(source, tmp / source.name)
        haplo_processor(cfg, tokenizer).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)  # after HF's files: tokenizer.model must be SoloTokenizer's bytes
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
