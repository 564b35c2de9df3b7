"""HF checkpoint directories: write a SOLO export atomically; read a Mistral/SOLO checkpoint.

An export (``write_hf_export``) holds::

    config.json                  model_type "solo", architectures, auto_map → the three files below
    configuration_solo.py        copies of megatron/solo/convert/hf_solo/*: the model and processor load with
    modeling_solo.py             trust_remote_code=True where solo-megatron is not installed
    processing_solo.py
    processor_config.json        SoloProcessor's settings (patch size, image end token, …) and its auto_map
    chat_template.jinja          the Mistral [INST] … [/INST] template (processor and tokenizer read it)
    generation_config.json       bos/eos/pad ids; the five vision ids are suppressed (they carry no patch)
    model.safetensors            or model-0000k-of-0000n.safetensors + model.safetensors.index.json
    tokenizer.model              SoloTokenizer.save_pretrained: the SentencePiece model, unchanged,
    solo_tokenizer.json          and SOLO's id layout
    tokenizer.json               an HF fast tokenizer with the same ids (hf_tokenizer.py),
    tokenizer_config.json        so AutoTokenizer.from_pretrained(dir) works offline

It is written into a temporary sibling directory and renamed into place, so a failure never leaves a
partial ``out_dir``.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from megatron.solo.convert.hf_solo import AUTO_MAP, MODELING_FILES, SoloConfig
from megatron.solo.convert.name_table import ConversionError, hf_shapes, model_config_from_hf
from megatron.solo.image import DEFAULT_CONFIG as DEFAULT_IMAGE_CONFIG
from megatron.solo.image import ImageConfig
from megatron.solo.tokenizer import VISION_END, SoloTokenizer

if TYPE_CHECKING:
    from transformers import PreTrainedConfig

SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
BIN_WEIGHTS = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 2**30
SUPPORTED_MODEL_TYPES = ("mistral", "solo")


def write_hf_export(
    out_dir: str | os.PathLike,
    hf_state_dict: Mapping[str, Tensor],
    solo_config: SoloConfig,
    tokenizer: SoloTokenizer,
    dtype: torch.dtype = torch.bfloat16,
    *,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    overwrite: bool = False,
    image_config: ImageConfig | None = None,
    image_end_token: str = VISION_END,
) -> Path:
    """Write an HF SOLO directory (see the module docstring) from a full HF state dict; returns ``out_dir``.

    The state dict must hold exactly the tensors of ``solo_config`` (names and shapes of ``hf_shapes``);
    tensors are cast to ``dtype``. Above ``max_shard_bytes`` the weights are sharded with an index.
    ``image_config`` (default: SOLO's, at the model's patch size) and ``image_end_token`` (``"<vision>"``
    for the released SOLO-7B's quirk) are the processor's settings.
    """
    out_dir = Path(out_dir)
    _check_export_inputs(hf_state_dict, solo_config, tokenizer, dtype)
    image_config = image_config or _default_image_config(solo_config.vision_patch_size)
    if image_config.patch_size != solo_config.vision_patch_size:
        raise ValueError(
            f"image_config.patch_size {image_config.patch_size} != solo_config.vision_patch_size "
            f"{solo_config.vision_patch_size}"
        )
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} exists; pass overwrite=True to replace it")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        _write_weights(tmp, hf_state_dict, dtype, max_shard_bytes)
        _write_config(tmp, solo_config, tokenizer, dtype)
        for source in MODELING_FILES:
            shutil.copyfile(source, tmp / source.name)
        _write_tokenizer(tmp, tokenizer, image_config, image_end_token)
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def read_hf_checkpoint(directory: str | os.PathLike) -> tuple[Mapping[str, Tensor], PreTrainedConfig]:
    """``(state_dict, config)`` of an HF Mistral or SOLO directory: safetensors (single or sharded with an
    index) or ``pytorch_model*.bin``. ``config`` is a ``MistralConfig`` or ``SoloConfig``. Safetensors
    weights are read lazily, tensor by tensor, as the mapping is indexed."""
    from transformers import AutoConfig

    directory = Path(directory)
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(f"{directory}: no config.json, not a Hugging Face model directory")
    config = AutoConfig.from_pretrained(directory)  # "solo" resolves to our SoloConfig (registered on import)
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise ConversionError(f"{directory}: model_type {config.model_type!r} is not one of {SUPPORTED_MODEL_TYPES}")
    return _read_weights(directory), config


# --- writing -------------------------------------------------------------------------------------


def _check_export_inputs(sd: Mapping[str, Tensor], cfg: SoloConfig, tokenizer: SoloTokenizer, dtype: torch.dtype):
    if getattr(cfg, "model_type", None) != SoloConfig.model_type:
        raise TypeError(f"solo_config must be a SoloConfig (model_type 'solo'), got {type(cfg).__name__}")
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating-point dtype, got {dtype}")
    if tokenizer.vocab_size != cfg.vocab_size:
        raise ValueError(f"tokenizer has {tokenizer.vocab_size} tokens but solo_config.vocab_size is {cfg.vocab_size}")
    want = hf_shapes(model_config_from_hf(cfg))
    missing, unexpected = sorted(set(want) - set(sd)), sorted(set(sd) - set(want))
    if missing or unexpected:
        raise ConversionError(
            f"state dict does not match solo_config: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    for name, shape in want.items():
        if tuple(sd[name].shape) != shape:
            raise ConversionError(f"{name!r} has shape {list(sd[name].shape)}, solo_config needs {list(shape)}")


def _write_weights(directory: Path, sd: Mapping[str, Tensor], dtype: torch.dtype, max_shard_bytes: int) -> None:
    """The layout of ``huggingface_hub.save_torch_state_dict`` (shards + index), written one shard at a time.

    Not the library call itself: it needs the whole state dict already cast to ``dtype`` (a second full copy
    of a 7B model) and sizes shards by the tensors' current dtype rather than the exported one.
    """
    from safetensors.torch import save_file

    shards = _plan_shards(sd, dtype, max_shard_bytes)
    names = (
        [SAFE_WEIGHTS]
        if len(shards) == 1
        else [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))]
    )
    for file_name, keys in zip(names, shards):
        # A fresh contiguous copy per tensor: views of one fused tensor (q/k/v) may share storage,
        # which safetensors refuses; one shard at a time bounds the extra memory.
        tensors = {k: sd[k].detach().to(dtype=dtype, copy=True).contiguous() for k in keys}
        save_file(tensors, str(directory / file_name), metadata={"format": "pt"})
    if len(shards) > 1:
        index = {
            "metadata": {"total_size": sum(sd[k].numel() for k in sd) * dtype.itemsize},
            "weight_map": {k: name for name, keys in zip(names, shards) for k in sorted(keys)},
        }
        (directory / SAFE_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def _plan_shards(sd: Mapping[str, Tensor], dtype: torch.dtype, max_shard_bytes: int) -> list[list[str]]:
    """Keys per shard, in state-dict order; a tensor larger than the limit gets a shard of its own."""
    shards: list[list[str]] = [[]]
    size = 0
    for key, tensor in sd.items():
        nbytes = tensor.numel() * dtype.itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += nbytes
    return shards


def _write_config(directory: Path, solo_config: SoloConfig, tokenizer: SoloTokenizer, dtype: torch.dtype) -> None:
    from transformers import GenerationConfig

    cfg = copy.deepcopy(solo_config)
    cfg.architectures = ["SoloForCausalLM"]
    cfg.auto_map = dict(AUTO_MAP)
    cfg.bos_token_id, cfg.eos_token_id = tokenizer.bos_id, tokenizer.eos_id
    cfg.dtype = dtype
    cfg.to_json_file(directory / "config.json", use_diff=True)
    generation = GenerationConfig(
        bos_token_id=tokenizer.bos_id,
        eos_token_id=tokenizer.eos_id,
        pad_token_id=tokenizer.pad_id,
        suppress_tokens=list(tokenizer.vision_token_ids),  # a generated <vpatch> would have no patch
    )
    generation.save_pretrained(directory)


def _default_image_config(patch_size: int) -> ImageConfig:
    """SOLO's front end at ``patch_size``: the long side capped near 1024 px (a multiple of the patch)."""
    return ImageConfig(patch_size=patch_size, max_size=patch_size * max(1, DEFAULT_IMAGE_CONFIG.max_size // patch_size))


def _write_tokenizer(directory: Path, tokenizer: SoloTokenizer, image_config: ImageConfig, end_token: str) -> None:
    """The HF tokenizer, ``SoloProcessor`` around it (processor_config.json, chat_template.jinja), and
    SoloTokenizer's own files."""
    from megatron.solo.convert.hf_solo import SoloProcessor
    from megatron.solo.convert.hf_tokenizer import build_hf_tokenizer

    processor = SoloProcessor(
        build_hf_tokenizer(tokenizer),
        image_end_token=end_token,
        patch_size=image_config.patch_size,
        max_size=image_config.max_size,
        image_mean=image_config.mean,
        image_std=image_config.std,
        max_pixels=image_config.max_pixels,
    )
    processor.save_pretrained(directory)
    tokenizer.save_pretrained(directory)  # after HF's files: tokenizer.model must be SoloTokenizer's bytes


def _replace_dir(tmp: Path, out_dir: Path) -> None:
    """Rename ``tmp`` to ``out_dir``; an existing ``out_dir`` is moved aside first and removed after."""
    old = None
    if out_dir.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
        os.replace(out_dir, old / out_dir.name)
    os.replace(tmp, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# --- reading -------------------------------------------------------------------------------------


class LazyTensors(Mapping):
    """Name → tensor over safetensors files, read on access: converting a 7B model holds its tensors once
    (as they are transformed) instead of the whole source checkpoint plus its converted copy."""

    def __init__(self, files: Mapping[str, Path]):
        self._files = dict(files)

    def __getitem__(self, name: str) -> Tensor:
        from safetensors import safe_open

        with safe_open(str(self._files[name]), framework="pt") as f:
            return f.get_tensor(name)

    def __iter__(self):
        return iter(self._files)

    def __len__(self) -> int:
        return len(self._files)


def _read_weights(directory: Path) -> Mapping[str, Tensor]:
    for index_name, single_name in ((SAFE_INDEX, SAFE_WEIGHTS), (BIN_INDEX, BIN_WEIGHTS)):
        if (directory / index_name).is_file():
            return _read_sharded(directory, index_name)
        if (directory / single_name).is_file():
            return _load_file(directory / single_name)
    raise FileNotFoundError(f"{directory}: no {SAFE_WEIGHTS}, {SAFE_INDEX}, {BIN_WEIGHTS} or {BIN_INDEX}")


def _read_sharded(directory: Path, index_name: str) -> Mapping[str, Tensor]:
    weight_map: dict[str, str] = json.loads((directory / index_name).read_text())["weight_map"]
    shards = []
    for file_name in sorted(set(weight_map.values())):
        shard = _load_file(directory / file_name)
        listed = {k for k, f in weight_map.items() if f == file_name}
        if set(shard) != listed:
            raise ConversionError(
                f"{directory / file_name} holds {sorted(set(shard) ^ listed)[:5]} contrary to {index_name}"
            )
        shards.append(shard)
    if all(isinstance(shard, LazyTensors) for shard in shards):
        return LazyTensors({name: path for shard in shards for name, path in shard._files.items()})
    return {name: tensor for shard in shards for name, tensor in shard.items()}


def _load_file(path: Path) -> Mapping[str, Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: listed in the index but missing")
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return LazyTensors({name: path for name in f.keys()})
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


__all__ = ["DEFAULT_MAX_SHARD_BYTES", "read_hf_checkpoint", "write_hf_export"]
