"""A Megatron HaploVL checkpoint → an HF directory in the released layout, with our remote code.

The directory (written atomically, as SOLO's export)::

    config.json                  hf_haplo's HaploConfig (the release's nesting: LLM fields on top, pre_config),
                                 model_type "haplo", architectures, auto_map → the three files below
    configuration_haplo.py       copies of megatron/solo/haplo/hf_haplo/*: model, config and processor load with
    modeling_haplo.py            trust_remote_code=True where solo-megatron is not installed
    processing_haplo.py
    processor_config.json        HaploProcessor's settings (tile, patch, pinpoints, CLIP mean/std)
    chat_template.jinja          the Mistral [INST] … [/INST] template preprocessing writes (or Llama-3's)
    generation_config.json       bos/eos/pad ids (llama3: EOS and <|eot_id|>); the vision ids are suppressed (a
                                 generated <vpatch> has no image)
    model.safetensors            the release's names (``haplo/release_layout.py``), or shards + index
    tokenizer.json, tokenizer_config.json, tokenizer.model, solo_tokenizer.json   as SOLO's export; for a
                                 tokenizer.json base (Llama-3) solo_base_tokenizer*.json instead of tokenizer.model

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
from megatron.solo.tokenizer import SoloTokenizer, check_chat_template, has_tokenizer


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


def stop_token_ids(tokenizer: SoloTokenizer, chat_template: str = "mistral") -> list[int]:
    """The ids generation stops at: EOS, and for the ``llama3`` chat layout also ``<|eot_id|>`` (the end of an
    assistant turn; the base Llama-3 config's EOS is ``<|end_of_text|>``), as Meta's ``generation_config.json``
    lists ``[128001, 128009]``."""
    ids = [tokenizer.eos_id]
    if chat_template == "llama3":
        ids.append(tokenizer.token_to_id("<|eot_id|>"))
    return list(dict.fromkeys(ids))


def haplo_processor(cfg: HaploConfig, tokenizer: SoloTokenizer, chat_template: str = "mistral"):
    """``HaploProcessor`` around the HF twin of ``tokenizer``, with ``cfg``'s tiling and the chat layout
    preprocessing's ``--chat-template`` gave the training data (``mistral`` or ``llama3``)."""
    from megatron.solo.convert.hf_tokenizer import build_hf_tokenizer
    from megatron.solo.haplo.anyres import CLIP_MEAN, CLIP_STD
    from megatron.solo.haplo.hf_haplo import HaploProcessor

    check_chat_template(tokenizer, chat_template)  # preprocessing's check: llama3 needs Llama-3's tokens
    return HaploProcessor(
        build_hf_tokenizer(tokenizer),
        tile_size=cfg.tile_size,
        patch_size=cfg.patch_size,
        image_grid_pinpoints=[list(p) for p in cfg.image_grid_pinpoints],
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
        chat_format=chat_template,
    )


def haplo_megatron_to_hf(
    load_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    iteration: int | None | str = "latest",
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    chat_template: str = "mistral",
) -> Path:
    """Export a Megatron HaploVL checkpoint (any iteration, stage 1 or 2) as an HF ``HaploForCausalLM`` directory
    in ``dtype`` (default: the checkpoint's own); ``chat_template``: the processor's chat layout (``mistral``,
    or ``llama3`` for a model trained on ``--chat-template llama3`` data)."""
    from transformers import GenerationConfig

    from megatron.solo.haplo.hf_haplo import AUTO_MAP, MODELING_FILES

    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} exists; pass overwrite=True to replace it")
    cfg = CheckpointMetadata.read(load_dir).model
    if not isinstance(cfg, HaploConfig):
        raise ValueError(f"{load_dir}: a {cfg.family} checkpoint, not HaploVL")
    tokenizer = SoloTokenizer.from_pretrained(load_dir)
    processor = haplo_processor(cfg, tokenizer, chat_template)  # before the weights: a bad template fails fast
    dtype = dtype or checkpoint_dtype(load_dir, iteration)
    model, metadata = load_full_model(load_dir, iteration=iteration, dtype=dtype)
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    hf_sd = megatron_to_release(state, pre=cfg.pre_decoder, llm=cfg, vocab_size=cfg.vocab_size)
    config = hf_haplo_config(cfg, tokenizer)
    config.architectures = ["HaploForCausalLM"]
    config.auto_map = dict(AUTO_MAP)
    config.dtype = dtype
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        _write_weights(tmp, hf_sd, dtype, max_shard_bytes)
        config.to_json_file(tmp / "config.json", use_diff=True)
        stop = stop_token_ids(tokenizer, chat_template)
        GenerationConfig(
            bos_token_id=tokenizer.bos_id,
            eos_token_id=stop if len(stop) > 1 else stop[0],
            pad_token_id=tokenizer.pad_id,
            suppress_tokens=list(tokenizer.vision_token_ids),
        ).save_pretrained(tmp)
        for source in MODELING_FILES:
            shutil.copyfile(source, tmp / source.name)
        processor.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)  # after HF's files: tokenizer.model must be SoloTokenizer's bytes
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def detect_llm_bias(state_dict, pre_layers: int, llm_layers: int) -> str:
    """``HaploConfig.llm_bias`` of a released-layout state dict: ``"all"`` when any LLM o_proj/MLP bias is
    non-zero, ``"qkv"`` when only q/k/v biases are, else ``"none"`` (the exported zeros of a bias-free LLM)."""
    layers = [f"model.layers.{pre_layers + j}." for j in range(llm_layers)]

    def nonzero(names: tuple[str, ...]) -> bool:
        return any(bool(state_dict[p + n].any()) for p in layers for n in names if p + n in state_dict)

    if nonzero(("self_attn.o_proj.bias", "mlp.gate_proj.bias", "mlp.up_proj.bias", "mlp.down_proj.bias")):
        return "all"
    return "qkv" if nonzero(("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias")) else "none"


def haplo_config_from_release(config: dict, llm_bias: str) -> HaploConfig:
    """Our ``HaploConfig`` of a released-layout ``config.json`` (the release's nesting or hf_haplo's)."""
    from megatron.solo.haplo.release_layout import configs_from_release

    pre, llm, image = configs_from_release(config)
    ratio = image.get("image_aspect_ratio", "anyres_max_6")
    extra = {}
    if "image_grid_pinpoints" in image:
        extra["image_grid_pinpoints"] = tuple(tuple(int(v) for v in p) for p in image["image_grid_pinpoints"])
    if "anyres_max_" in ratio:
        extra["anyres_max_tiles"] = int(ratio.split("anyres_max_")[-1])
    return HaploConfig(
        **llm,
        pre_decoder=pre,
        patch_size=image.get("patch_size", 14),
        tile_size=image.get("default_image_size", 336),
        llm_bias=llm_bias,
        pre_norm_epsilon=float(config.get("pre_norm_eps", 1e-5)),
        **extra,
    )


def haplo_hf_to_megatron(
    hf_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    tensor_parallel: int = 1,
    pipeline_parallel: int = 1,
    tokenizer_model: str | os.PathLike | None = None,
    dtype: torch.dtype | None = None,
) -> CheckpointMetadata:
    """A directory in the released HaploVL layout (``config.json`` with ``pre_config``, the release's tensor names)
    → a Megatron release checkpoint (layout-free). The LLM's biases are kept as the checkpoint has them
    (:func:`detect_llm_bias`); the tokenizer is the stack's (``tokenizer.model``, or an export's
    ``solo_base_tokenizer.json`` / a ``tokenizer.json`` without the stack's tokens) and must give the checkpoint's
    vocabulary size (the released Qwen2-based model's tokenizer, which carries them differently, is not supported)."""
    import json

    from megatron.solo.convert.checkpoint import save_converted
    from megatron.solo.convert.hf_export import _read_weights
    from megatron.solo.haplo.release_layout import release_to_megatron

    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    if (out_dir / "latest_checkpointed_iteration.txt").exists():
        raise FileExistsError(f"{out_dir} already holds a checkpoint; choose an empty --out")
    config = json.loads((hf_dir / "config.json").read_text())
    if tokenizer_model is None and not has_tokenizer(hf_dir):
        raise FileNotFoundError(f"{hf_dir}: no tokenizer (tokenizer.model or tokenizer.json); pass --tokenizer-model")
    tokenizer = SoloTokenizer(tokenizer_model if tokenizer_model is not None else hf_dir)
    sd = dict(_read_weights(hf_dir).items())
    pre_layers = int((config.get("pre_config") or {})["num_hidden_layers"])
    llm_layers = int({**(config.get("base_config") or {}), **config}["num_hidden_layers"])
    cfg = haplo_config_from_release(config, detect_llm_bias(sd, pre_layers, llm_layers))
    if cfg.vocab_size != tokenizer.vocab_size:
        raise ValueError(
            f"{hf_dir}: config.json's vocab_size {cfg.vocab_size} is not the tokenizer's {tokenizer.vocab_size}"
        )
    cfg.validate_parallel(tensor_parallel=tensor_parallel, pipeline_parallel=pipeline_parallel)
    metadata = CheckpointMetadata(cfg, cfg.padded_vocab_size(tensor_parallel))
    dtype = dtype or sd["lm_head.weight"].dtype
    m_sd = release_to_megatron(
        sd, pre=cfg.pre_decoder, llm=cfg, llm_bias=cfg.llm_bias, padded_vocab_size=metadata.padded_vocab_size
    )
    save_converted(out_dir, cfg, m_sd, metadata, tokenizer, dtype)
    return metadata
