"""``HaploConfig``: the HaploVL architecture as a typed, validated dataclass, and its presets.

A ``HaploConfig`` *is* a ``ModelConfig`` (family ``"haplo"``): its own fields (``num_layers``,
``hidden_size``, …, ``vocab_size``, ``rotary_base``) describe the LLM (the post-decoder), so everything in
the stack that sizes, lays out or counts the LLM reads it unchanged; what HaploVL adds is here:

- ``pre_decoder``: the pre-decoder's geometry (``megatron.solo.haplo.pre_decoder.PreDecoderConfig``; CLIP-ViT-L
  by default: 24 × 1024, 16 heads, LayerNorm, biased gated quick_gelu MLP, RoPE);
- ``patch_size`` 14 and ``tile_size`` 336: a tile is 24 × 24 patches, one learned position per patch
  (``tile_positions`` = 576), shared by every tile of an image (spec §2.3);
- ``image_grid_pinpoints`` (``(height, width)`` canvases for anyres, spec §3.1) and ``anyres_max_tiles``;
- ``llm_bias``: which of the LLM's linear layers carry a bias. The released HaploVL has biases on q/k/v, o and
  the MLP of every layer (``"all"``, spec §2.2/§2.8); the pre-trained Vicuna/Llama-3/Mistral it starts from
  have none (``"none"``, the presets). ``"qkv"`` is Qwen2's form.

Choices where the spec says "unknown" (written down in docs/architecture.md):
- the LLM's sliding window is off (``use_sliding_window=False`` in the released configs): ``sliding_window``
  must be ``None``;
- the connector is initialised like every other weight (normal, ``init_method_std``); the patch embedding
  too; positions ``randn·0.02`` and the newline embedding zeros, as the released code.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from megatron.solo.config import ModelConfig, _require
from megatron.solo.haplo.anyres import DEFAULT_PINPOINTS
from megatron.solo.haplo.pre_decoder import PreDecoderConfig

LlmBias = Literal["none", "qkv", "all"]


@dataclass(frozen=True, kw_only=True)
class HaploConfig(ModelConfig):
    """HaploVL: multimodal embedding at the pre-decoder width → pre-norm → pre-decoder → connector → the LLM.

    The inherited fields are the LLM's (post-decoder); ``vocab_size`` is shared by the text embedding (at the
    pre-decoder width) and the output layer.
    """

    family: ClassVar[str] = "haplo"

    pre_decoder: PreDecoderConfig = PreDecoderConfig()
    patch_size: int = 14
    tile_size: int = 336
    image_grid_pinpoints: tuple[tuple[int, int], ...] = DEFAULT_PINPOINTS
    anyres_max_tiles: int = 6
    llm_bias: LlmBias = "none"
    pre_norm_epsilon: float = 1e-5
    sliding_window: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        _require(isinstance(self.pre_decoder, PreDecoderConfig), "pre_decoder", "must be a PreDecoderConfig")
        _require(
            self.tile_size % self.patch_size == 0,
            "tile_size",
            f"{self.tile_size} is not a multiple of patch_size={self.patch_size}",
        )
        _require(self.llm_bias in ("none", "qkv", "all"), "llm_bias", f"unknown {self.llm_bias!r}; none, qkv or all")
        _require(
            self.sliding_window is None,
            "sliding_window",
            "HaploVL's LLM attends to the whole document (use_sliding_window=False in the released configs)",
        )
        _require(self.pre_norm_epsilon > 0, "pre_norm_epsilon", f"must be positive, got {self.pre_norm_epsilon}")
        _require(
            isinstance(self.anyres_max_tiles, int) and self.anyres_max_tiles > 0,
            "anyres_max_tiles",
            f"must be a positive int, got {self.anyres_max_tiles!r}",
        )
        _require(len(self.image_grid_pinpoints) > 0, "image_grid_pinpoints", "needs at least one canvas")
        for h, w in self.image_grid_pinpoints:
            _require(
                h > 0 and w > 0 and h % self.tile_size == 0 and w % self.tile_size == 0,
                "image_grid_pinpoints",
                f"({h}, {w}) is not a grid of {self.tile_size}-pixel tiles",
            )

    @property
    def tile_patches(self) -> int:
        """Patches along one side of a tile (24 for 336 / 14)."""
        return self.tile_size // self.patch_size

    @property
    def tile_positions(self) -> int:
        """Rows of the learned per-tile position table (576)."""
        return self.tile_patches**2

    @property
    def linear_biases(self) -> tuple[bool, bool]:
        return self.llm_bias in ("qkv", "all"), self.llm_bias == "all"

    def validate_parallel(self, *, tensor_parallel: int = 1, **kwargs: Any) -> None:
        super().validate_parallel(tensor_parallel=tensor_parallel, **kwargs)
        try:
            self.pre_decoder.validate_parallel(tensor_parallel=tensor_parallel)
        except ValueError:
            raise ValueError(
                f"tensor_model_parallel_size: {tensor_parallel} does not divide the pre-decoder's heads, "
                f"query groups and ffn ({self.pre_decoder.num_attention_heads}, {self.pre_decoder.query_groups}, "
                f"{self.pre_decoder.ffn_hidden_size})"
            ) from None

    def num_parameters(self, tensor_parallel_size: int = 1) -> int:
        """The whole model: LLM layers + output layer, embedding at the pre-decoder width, stem, pre-decoder."""
        h, d, pre = self.hidden_size, self.head_dim, self.pre_decoder.hidden_size
        qkv_rows = d * (self.num_attention_heads + 2 * self.num_query_groups)
        layer = qkv_rows * h + self.num_attention_heads * d * h + 3 * h * self.ffn_hidden_size + 2 * h
        qkv_bias, other_bias = self.linear_biases
        layer += qkv_rows * qkv_bias + (h + 2 * self.ffn_hidden_size + h) * other_bias
        vocab = self.padded_vocab_size(tensor_parallel_size)
        llm = self.num_layers * layer + h + vocab * h
        stem = self.patch_dim * pre + self.tile_positions * pre + pre + 2 * pre  # patches, positions, newline, norm
        return llm + vocab * pre + stem + self.pre_decoder.num_parameters() + pre * h

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out["image_grid_pinpoints"] = [list(p) for p in self.image_grid_pinpoints]
        return out

    @classmethod
    def _fields_from_json(cls, data: dict[str, Any]) -> dict[str, Any]:
        data = dict(data)
        if isinstance(data.get("pre_decoder"), dict):
            data["pre_decoder"] = PreDecoderConfig.from_dict(data["pre_decoder"])
        if "image_grid_pinpoints" in data:
            data["image_grid_pinpoints"] = tuple(tuple(p) for p in data["image_grid_pinpoints"])
        return data

    def replace(self, **changes: Any) -> HaploConfig:
        return dataclasses.replace(self, **changes)


HAPLO_PRESETS: dict[str, HaploConfig] = {
    # HaploVL-7B (spec §2.8, §5.2): Vicuna-7B v1.5 (Llama-2-7B geometry, 32000 tokens, 4096 context).
    "haplo-vicuna-7b": HaploConfig(
        num_layers=32,
        hidden_size=4096,
        ffn_hidden_size=11008,
        num_attention_heads=32,
        num_query_groups=32,
        vocab_size=32000,
        max_sequence_length=4096,
        rotary_base=10000.0,
        norm_epsilon=1e-5,
    ),
    # HaploVL-8B (spec §4.4): Llama-3-8B (GQA 8, 128256 tokens, rope_theta 500000, 8192 context).
    "haplo-llama3-8b": HaploConfig(
        num_layers=32,
        hidden_size=4096,
        ffn_hidden_size=14336,
        num_attention_heads=32,
        num_query_groups=8,
        vocab_size=128256,
        max_sequence_length=8192,
        rotary_base=500000.0,
        norm_epsilon=1e-5,
    ),
    # Mistral-7B-v0.1 as the post-decoder (the first LLM; SOLO's base), full attention.
    "haplo-mistral-7b": HaploConfig(
        num_layers=32,
        hidden_size=4096,
        ffn_hidden_size=14336,
        num_attention_heads=32,
        num_query_groups=8,
        vocab_size=32000,
        max_sequence_length=32768,
        rotary_base=10000.0,
        norm_epsilon=1e-5,
    ),
    # Tests and the CPU miniature: the same shape of network, small enough for 2 CPU cores.
    "haplo-tiny": HaploConfig(
        num_layers=2,
        hidden_size=64,
        ffn_hidden_size=128,
        num_attention_heads=4,
        num_query_groups=2,
        vocab_size=512,
        max_sequence_length=4096,
        pre_decoder=PreDecoderConfig(num_layers=2, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64),
        patch_size=14,
        tile_size=56,  # 4 × 4 patches a tile; the released grid's shape: every canvas of at most 6 tiles
        image_grid_pinpoints=tuple((56 * h, 56 * w) for h in range(1, 7) for w in range(1, 7) if h * w <= 6),
    ),
}
