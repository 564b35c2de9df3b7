"""HaploVL's stage-1 starting checkpoint from public weights: an HF LLM (+ a CLIP vision tower) → Megatron.

What each tensor of the written ``HaploModel`` checkpoint starts from:

==============================================  ==================================================================
``decoder.*``, ``output_layer.weight``          the HF LLM (Mistral / Llama layout: Mistral-7B, Vicuna-7B,
                                                Llama-3-8B), through SOLO's name table (``convert/name_table.py``:
                                                the tokenizer's extra ids get the mean row, TP padding zeros)
``llm_embedding.weight`` [V', H]                the LLM's input embedding, the same rows: stage 1's frozen text
                                                targets (a stage-2 model ignores it)
``patch_embed``, ``pos_embed``, ``pre_norm``,   CLIP's vision tower (``haplo/clip.py``: exactly CLIP's blocks) with
``pre_decoder.layers.*``                        ``--clip``; otherwise the model's own random initialisation
``embedding.word_embeddings.weight`` [V', pre]  ``text_embedding="project"`` (default): the LLM's embedding × a
                                                seeded random matrix ``W`` [H, pre] with orthonormal columns
                                                (``H ≥ pre``; orthonormal rows scaled by ``sqrt(pre/H)``
                                                otherwise), which keeps each row's per-coordinate RMS and the
                                                tokens' inner products up to a random projection: the paper's
                                                "LLM word embeddings followed by a linear projection" (spec §2.5)
                                                folded into one table, as the release holds it.
                                                ``"random"``: the model's own init (normal, ``init_method_std``)
``connector.weight`` [H, pre]                   ``connector="random"`` (default): the model's own init (normal,
                                                ``init_method_std``); ``"projection"``: ``W`` itself, the
                                                transpose map of the text projection (a text position's
                                                embedding, if the pre-decoder passed it through unchanged, would
                                                reach the LLM as its own embedding projected onto ``W``'s span);
                                                needs ``text_embedding="project"``
``image_newline``                               zeros (the released code's init)
==============================================  ==================================================================

The stage-1 heads (``distill_heads.*``) are not written: the trainer initialises them (they are optional
entries of a stage-1 model). The LLM's geometry, vocabulary and RoPE come from the HF config; the image
settings (tiles, pinpoints) and, without CLIP, the pre-decoder's geometry from ``base`` (a HaploVL preset);
with CLIP, the patch and tile size are CLIP's. HaploVL attends to whole documents: Mistral's sliding window is
dropped. The tokenizer is the stack's (the LLM's own, SentencePiece ``tokenizer.model`` or HF ``tokenizer.json``,
with SOLO's extra ids appended, which start at the mean row): Vicuna's and Mistral's ``tokenizer.model``, Llama-3's
byte-level ``tokenizer.json`` (the extra ids from 128256, after its 256 special tokens).
Random parts are drawn from ``seed`` (megatron's model-parallel RNG), so a conversion is reproducible.
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import Literal

import torch
from megatron.core import tensor_parallel

from megatron.solo.checkpointing import CheckpointMetadata, load_model_state, save_model
from megatron.solo.convert.hf_export import _read_weights
from megatron.solo.convert.name_table import ConversionError, hf_to_megatron, model_config_from_hf
from megatron.solo.families import build_model
from megatron.solo.haplo.clip import clip_to_haplo, pre_decoder_config_from_clip
from megatron.solo.haplo.config import HaploConfig
from megatron.solo.model import make_transformer_config
from megatron.solo.parallel import ensure_model_parallel_of_one, tensor_parallel_seed
from megatron.solo.tokenizer import SoloTokenizer, has_tokenizer

TextEmbeddingInit = Literal["project", "random"]
ConnectorInit = Literal["random", "projection"]
LLM_MODEL_TYPES = ("mistral", "llama")
_PRE_DECODER_SIDE = ("patch_embed.", "pos_embed", "pre_norm.", "pre_decoder.")  # from CLIP, or the model's init
_LLM_FIELDS = (
    "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups", "kv_channels",
    "max_sequence_length", "rotary_base", "norm_epsilon",
)  # fmt: skip


def read_llm(llm_dir: Path):
    """(lazy state dict, HF config) of a Mistral/Llama ``*ForCausalLM`` directory, checked to be bias-free."""
    from transformers import AutoConfig

    if not (llm_dir / "config.json").is_file():
        raise FileNotFoundError(f"{llm_dir}: no config.json, not a Hugging Face model directory")
    config = AutoConfig.from_pretrained(llm_dir)
    if config.model_type not in LLM_MODEL_TYPES:
        raise ConversionError(
            f"{llm_dir}: model_type {config.model_type!r} is not one of {LLM_MODEL_TYPES} (Qwen2 LLMs: not supported)"
        )
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise ConversionError(f"{llm_dir}: a biased Llama (attention_bias/mlp_bias) is not supported")
    return _read_weights(llm_dir), config


def text_projection(llm_hidden: int, pre_hidden: int, generator: torch.Generator) -> torch.Tensor:
    """[H, pre] float32: orthonormal columns (H ≥ pre) or rows scaled by sqrt(pre/H) (H < pre), so that
    ``e @ W`` keeps a row's per-coordinate RMS."""
    rows, cols = max(llm_hidden, pre_hidden), min(llm_hidden, pre_hidden)
    q, r = torch.linalg.qr(torch.randn(rows, cols, generator=generator, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r))[None, :]  # the unique (Haar) orthonormal factor
    w = q if llm_hidden >= pre_hidden else q.t() * math.sqrt(pre_hidden / llm_hidden)
    return w.float()


def haplo_config_for(base: HaploConfig, llm_config, vocab_size: int, clip_config=None, **pre_changes) -> HaploConfig:
    """``base`` with the LLM's geometry (``llm_config``: the HF config) and, given ``clip_config``, CLIP's
    pre-decoder geometry, patch and tile size. ``pre_changes``: ``num_layers`` (CLIP layers taken), ``rope``."""
    llm = model_config_from_hf(llm_config, vocab_size=vocab_size)
    changes = {name: getattr(llm, name) for name in _LLM_FIELDS}
    if clip_config is not None:
        vision = getattr(clip_config, "vision_config", clip_config)
        pre_changes.setdefault("rope", base.pre_decoder.rope)
        changes.update(
            pre_decoder=pre_decoder_config_from_clip(vision, **pre_changes),
            patch_size=vision.patch_size,
            tile_size=vision.image_size,
        )
    elif pre_changes:
        changes["pre_decoder"] = dataclasses.replace(base.pre_decoder, **pre_changes)
    return base.replace(**changes, vocab_size=vocab_size, sliding_window=None, llm_bias="none")


def haplo_init_checkpoint(
    llm_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    base: HaploConfig,
    clip_dir: str | os.PathLike | None = None,
    clip_layers: int | None = None,
    text_embedding: TextEmbeddingInit = "project",
    connector: ConnectorInit = "random",
    tensor_parallel_size: int = 1,
    pipeline_parallel_size: int = 1,
    tokenizer_model: str | os.PathLike | None = None,
    dtype: torch.dtype | None = None,
    seed: int = 0,
) -> CheckpointMetadata:
    """Write HaploVL's stage-1 starting checkpoint (a layout-free release checkpoint: any TP/PP/DP loads it;
    ``tensor_parallel_size`` fixes only the vocabulary padding). See the module docstring for each tensor."""
    llm_dir, out_dir = Path(llm_dir), Path(out_dir)
    if text_embedding not in ("project", "random"):
        raise ValueError(f"text_embedding: unknown {text_embedding!r}; project or random")
    if connector not in ("random", "projection"):
        raise ValueError(f"connector: unknown {connector!r}; random or projection")
    if connector == "projection" and text_embedding != "project":
        raise ValueError("connector='projection' is the text projection's transpose: needs text_embedding='project'")
    if (out_dir / "latest_checkpointed_iteration.txt").exists():
        raise FileExistsError(f"{out_dir} already holds a checkpoint; choose an empty --output")
    if tokenizer_model is None and not has_tokenizer(llm_dir):
        raise FileNotFoundError(
            f"{llm_dir}: no tokenizer.model (SentencePiece) or tokenizer.json (HF); pass --tokenizer-model PATH"
        )
    tokenizer = SoloTokenizer(tokenizer_model if tokenizer_model is not None else llm_dir)
    hf_sd, llm_config = read_llm(llm_dir)
    if llm_config.vocab_size > tokenizer.base_vocab_size:
        raise ConversionError(
            f"{llm_dir}: the LLM has {llm_config.vocab_size} vocabulary rows but its tokenizer "
            f"{tokenizer.base_vocab_size} ids: the stack's tokens (from id {tokenizer.base_vocab_size}) would take "
            "the LLM's own rows; pass the tokenizer that has them (--tokenizer-model)"
        )
    clip_sd = clip_config = None
    if clip_dir is not None:
        from transformers import AutoConfig

        clip_config = AutoConfig.from_pretrained(clip_dir)
        clip_sd = _read_weights(Path(clip_dir))
    elif clip_layers is not None:
        raise ValueError("clip_layers: only with a CLIP directory")
    pre_changes = {} if clip_layers is None else {"num_layers": clip_layers}
    cfg = haplo_config_for(base, llm_config, tokenizer.vocab_size, clip_config, **pre_changes)
    cfg.validate_parallel(tensor_parallel=tensor_parallel_size, pipeline_parallel=pipeline_parallel_size)
    padded = cfg.padded_vocab_size(tensor_parallel_size)
    dtype = dtype or next(t.dtype for t in (hf_sd[k] for k in hf_sd) if t.is_floating_point())

    llm = model_config_from_hf(llm_config, vocab_size=tokenizer.vocab_size)
    llm_sd = hf_to_megatron(hf_sd, dataclasses.replace(llm, sliding_window=None), padded_vocab_size=padded)
    llm_embedding = llm_sd.pop("embedding.word_embeddings.weight")
    llm_sd.pop("patch_embedding.weight")  # SOLO's patch projection: no HaploVL counterpart
    weights = dict(llm_sd)
    if clip_sd is not None:
        weights.update(clip_to_haplo(clip_sd, cfg.pre_decoder, tile_positions=cfg.tile_positions))
    generator = torch.Generator().manual_seed(seed)
    if text_embedding == "project":
        w = text_projection(cfg.hidden_size, cfg.pre_decoder.hidden_size, generator)
        weights["embedding.word_embeddings.weight"] = llm_embedding.float() @ w
        if connector == "projection":
            weights["connector.weight"] = w

    ensure_model_parallel_of_one()
    tensor_parallel_seed(seed)
    tc = make_transformer_config(cfg, params_dtype=dtype, backend="local", cpu_initialization=True)
    model = build_model(cfg, tc, padded_vocab_size=padded)
    model.llm_embedding = tensor_parallel.VocabParallelEmbedding(
        num_embeddings=padded, embedding_dim=cfg.hidden_size, init_method=tc.init_method, config=tc
    )  # stage 1's frozen text targets, under the name the stage-1 model gives them
    weights["llm_embedding.weight"] = llm_embedding
    own_init = ("image_newline",) + (() if clip_sd is not None else _PRE_DECODER_SIDE)
    own_init += ("embedding.word_embeddings.",) if text_embedding == "random" else ()
    own_init += ("connector.",) if connector == "random" else ()
    _copy_into(model, weights, own_init)
    tokenizer.save_pretrained(out_dir)  # before the tracker file marks the checkpoint complete
    metadata = CheckpointMetadata(cfg, padded)
    save_model(out_dir, model, metadata)
    return metadata


def _copy_into(model: torch.nn.Module, weights: dict[str, torch.Tensor], own_init: tuple[str, ...]) -> None:
    """Load ``weights`` into ``model``: every tensor of the model must be given but those under the
    ``own_init`` prefixes (which keep the model's own initialisation); a missing, unknown or misshapen
    tensor is a ConversionError naming it."""
    optional = tuple(name for name in model.state_dict() if name.startswith(own_init))
    try:
        load_model_state(model, weights, optional=optional)
    except (KeyError, RuntimeError) as e:  # KeyError: missing/unexpected names; RuntimeError: shapes
        raise ConversionError(f"the converted weights do not fit the HaploVL model: {e}") from e
