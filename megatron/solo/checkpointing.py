"""Megatron checkpoints of SOLO models: layout, metadata, atomic save and load.

A checkpoint root looks like Megatron-LM's::

    ROOT/
      latest_checkpointed_iteration.txt   "release" (a converted model) or the last saved iteration
      release/ | iter_0000050/            megatron-core dist_checkpointing (torch_dist), layout-free:
                                          loads at any TP/PP/DP (the optimizer as "fully_reshardable")
      solo_config.json                    architecture (ModelConfig, or a family's subclass: its "family"
                                          field picks the model) + padded vocabulary size
      tokenizer.model, solo_tokenizer.json   the SoloTokenizer the model was trained with

The padded vocabulary is a property of the checkpoint (33152 from TP=1, 33280 from TP=2): a model loading
it keeps that size, which works at any tensor-parallel size dividing it. Iteration directories are written
under a temporary name and renamed when complete; the tracker file is replaced atomically afterwards, so a
crash mid-save leaves the previous checkpoint the latest.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing

from megatron.solo.checksums import MANIFEST, verify_manifest, write_manifest
from megatron.solo.config import ModelConfig
from megatron.solo.families import build_model, config_from_dict
from megatron.solo.io import write_atomic
from megatron.solo.model import make_transformer_config
from megatron.solo.parallel import ensure_model_parallel_of_one

log = logging.getLogger(__name__)

TRACKER_FILE = "latest_checkpointed_iteration.txt"
METADATA_FILE = "solo_config.json"
FORMAT_VERSION = 1
RELEASE = "release"


@dataclass(frozen=True)
class CheckpointMetadata:
    """What a model needs to be rebuilt from a checkpoint before its tensors are loaded."""

    model: ModelConfig
    padded_vocab_size: int

    def __post_init__(self) -> None:
        if self.padded_vocab_size < self.model.vocab_size:
            raise ValueError(f"padded_vocab_size: {self.padded_vocab_size} < vocab_size {self.model.vocab_size}")

    def to_json(self) -> str:
        return (
            json.dumps(
                {
                    "format_version": FORMAT_VERSION,
                    "model": self.model.to_dict(),
                    "padded_vocab_size": self.padded_vocab_size,
                },
                indent=2,
            )
            + "\n"
        )

    @classmethod
    def read(cls, root: str | os.PathLike) -> CheckpointMetadata:
        path = Path(root) / METADATA_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path}: not a SOLO checkpoint (no {METADATA_FILE})")
        data = json.loads(path.read_text())
        if data.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{path}: format_version {data.get('format_version')!r}, expected {FORMAT_VERSION}")
        return cls(config_from_dict(data["model"]), int(data["padded_vocab_size"]))

    def write(self, root: str | os.PathLike) -> None:
        write_atomic(Path(root) / METADATA_FILE, self.to_json())


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def iteration_dir(root: str | os.PathLike, iteration: int | None) -> Path:
    return Path(root) / (RELEASE if iteration is None else f"iter_{iteration:07d}")


def latest_iteration(root: str | os.PathLike) -> int | None:
    """The tracker's iteration (``None`` for a release checkpoint); FileNotFoundError when there is none."""
    tracker = Path(root) / TRACKER_FILE
    if not tracker.is_file():
        raise FileNotFoundError(f"{root}: no checkpoint ({TRACKER_FILE} is missing)")
    text = tracker.read_text().strip()
    if text == RELEASE:
        return None
    if not text.isdigit():
        raise ValueError(f"{tracker}: expected an iteration number or {RELEASE!r}, got {text!r}")
    return int(text)


def save_sharded(
    root: str | os.PathLike,
    iteration: int | None,
    sharded_state: dict[str, Any],
    metadata: CheckpointMetadata,
    content_metadata: dict | None = None,
) -> Path:
    """Collectively save ``sharded_state`` as ``root``'s checkpoint for ``iteration`` and mark it latest."""
    root = Path(root)
    final = iteration_dir(root, iteration)
    tmp = final.with_name(f".{final.name}.incomplete")
    if _rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    _barrier()
    dist_checkpointing.save(
        sharded_state, str(tmp), sharded_strategy=("torch_dist", 1), content_metadata=content_metadata
    )
    _barrier()
    write_manifest(tmp)  # before the rename: a directory under its final name always has its checksums
    _barrier()
    if _rank() == 0:
        old = final.with_name(f".{final.name}.old")
        if final.exists():  # re-saving an iteration: never a moment where the tracker names a missing dir
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(tmp, final)
        metadata.write(root)
        write_atomic(root / TRACKER_FILE, f"{RELEASE if iteration is None else iteration}\n")
        shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def verify_checkpoint(root: str | os.PathLike, iteration: int | None) -> None:
    """Collectively check ``root``'s checkpoint of ``iteration`` against its checksums (``ChecksumError``
    naming the file and the iteration); a checkpoint written before checksums existed loads with a warning."""
    path = iteration_dir(root, iteration)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: checkpoint directory is missing")
    what = RELEASE if iteration is None else f"iteration {iteration}"
    if not verify_manifest(path, what) and _rank() == 0:
        log.warning("%s: no %s (written before checksums existed): loaded unverified", path, MANIFEST)


def load_sharded(
    root: str | os.PathLike, sharded_state: dict[str, Any], iteration: int | None | str = "latest", verify: bool = True
):
    """Collectively load ``sharded_state``'s tensors from ``root`` (the tracker's iteration by default),
    after checking its files against their checksums unless ``verify`` is false."""
    if iteration == "latest":
        iteration = latest_iteration(root)
    path = iteration_dir(root, iteration)
    if verify:
        verify_checkpoint(root, iteration)
    elif not path.is_dir():
        raise FileNotFoundError(f"{path}: checkpoint directory is missing")
    return dist_checkpointing.load(sharded_state, str(path))


def model_sharded_state_dict(model) -> dict[str, Any]:
    """``model.sharded_state_dict()`` minus megatron-core's ``_extra_state`` entries: backend-neutral.

    Both backends already use Transformer Engine's tensor names (the local spec maps its norms onto them:
    ``input_layernorm`` → ``self_attention.linear_qkv.layer_norm_weight``). ``_extra_state`` holds only TE's
    FP8 metadata, which this project does not use, and the two specs disagree on it (TE's attention has
    one, the local one has none), so it is left out of every save and every load: a checkpoint then moves
    between the local and the TE model in both directions.
    """
    return {k: v for k, v in model.sharded_state_dict().items() if not k.endswith("_extra_state")}


def check_finite_parameters(model) -> None:
    """Collectively refuse to go on when any rank's weights hold NaN or inf (``NonFiniteParametersError``
    naming them): a checkpoint must never carry them, even in rows the loss never reads."""
    names, params = zip(*model.named_parameters())
    flags = torch.stack([torch.isfinite(p).all().logical_not() for p in params])  # one sync below, not one per param
    bad = [name for name, flag in zip(names, flags.tolist()) if flag]
    count = torch.tensor([float(len(bad))], device=flags.device)
    if dist.is_initialized():
        dist.all_reduce(count, op=dist.ReduceOp.MAX)
    if count.item():
        raise NonFiniteParametersError(
            f"parameters hold NaN/inf ({', '.join(bad[:5]) or 'on another rank'}): not saved"
        )


class NonFiniteParametersError(RuntimeError):
    pass


def save_model(root: str | os.PathLike, model, metadata: CheckpointMetadata, iteration: int | None = None) -> Path:
    """Save one pipeline stage's ``SoloModel`` weights (collective over all ranks)."""
    check_finite_parameters(model)
    return save_sharded(root, iteration, {"model": model_sharded_state_dict(model)}, metadata)


def load_model_state(
    model, state_dict: dict[str, torch.Tensor], assign: bool = False, optional: tuple[str, ...] = ()
) -> None:
    """``load_state_dict`` that tolerates only megatron-core's ``_extra_state`` entries (and the ``optional``
    names: entries a new stage may start without) being absent.

    ``assign=True`` makes the given tensors the parameters (a model built on the meta device).
    """
    result = model.load_state_dict(state_dict, strict=False, assign=assign)
    missing = [k for k in result.missing_keys if not k.endswith("_extra_state") and k not in optional]
    unexpected = [k for k in result.unexpected_keys if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise KeyError(f"checkpoint does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")


def load_model(root: str | os.PathLike, model, iteration: int | None | str = "latest") -> None:
    """Load one pipeline stage's ``SoloModel`` weights from ``root`` (collective)."""
    loaded = load_sharded(root, {"model": model_sharded_state_dict(model)}, iteration)
    load_model_state(model, loaded["model"])


def checkpoint_dtype(root: str | os.PathLike, iteration: int | None | str = "latest") -> torch.dtype:
    """The dtype the model weights of ``root``'s checkpoint were saved in (from its metadata; no tensor is read)."""
    if iteration == "latest":
        iteration = latest_iteration(root)
    metadata = dist_checkpointing.load_tensors_metadata(str(iteration_dir(root, iteration)))
    return metadata["embedding.word_embeddings.weight"].dtype


def load_full_model(
    load_dir: str | os.PathLike,
    *,
    iteration: int | None | str = "latest",
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
):
    """(model, metadata): the whole SOLO model of a Megatron checkpoint in this process (TP=PP=1), in eval
    mode, on ``device`` (default: the CPU). Needs no transformers: generation and the demo use it as well as
    the HF export.

    The model is megatron-core's local spec on any machine: checkpoints are backend-neutral, and its plain
    parameter names are what the HF name table maps. Forms TP=PP=1 groups if the process has none.
    """
    metadata = CheckpointMetadata.read(load_dir)
    cfg = metadata.model
    ensure_model_parallel_of_one()
    tc = make_transformer_config(
        cfg, params_dtype=dtype, perform_initialization=False, backend="local", cpu_initialization=True
    )
    model = build_model(cfg, tc, padded_vocab_size=metadata.padded_vocab_size)
    load_model(load_dir, model, iteration)
    return model.to(device).eval(), metadata
