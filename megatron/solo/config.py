"""Model presets as typed, validated dataclasses.

``ModelConfig`` holds only the architecture (what a checkpoint needs to be rebuilt); how it is laid out
over devices is checked against it with :meth:`ModelConfig.validate_parallel`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

from megatron.solo.image import PATCH_SIZE
from megatron.solo.tokenizer import padded_vocab_size


def _require(condition: bool, field: str, message: str) -> None:
    if not condition:
        raise ValueError(f"{field}: {message}")


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """A Mistral-style decoder that also reads pixel patches.

    ``vocab_size`` is the tokenizer's (33029 for SOLO); the embedding is padded per tensor-parallel size.
    ``sliding_window`` follows HF Mistral: a query attends to the previous ``sliding_window`` keys, itself
    included (``q - k < sliding_window``); ``None`` disables it.

    ``family`` names the model family a saved config rebuilds (``to_dict`` writes it; a dict without one is
    SOLO's, as every checkpoint written before the field existed): subclasses are the other families
    (``megatron.solo.haplo.config.HaploConfig``), chosen by ``megatron.solo.families``.
    """

    family: ClassVar[str] = "solo"

    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    kv_channels: int | None = None
    vocab_size: int = 33029
    max_sequence_length: int = 32768
    rotary_base: float = 10000.0
    norm_epsilon: float = 1e-5
    sliding_window: int | None = 4096
    patch_size: int = PATCH_SIZE
    init_method_std: float = 0.02
    make_vocab_size_divisible_by: int = 128

    def __post_init__(self) -> None:
        for name in (
            "num_layers",
            "hidden_size",
            "ffn_hidden_size",
            "num_attention_heads",
            "num_query_groups",
            "vocab_size",
            "max_sequence_length",
            "patch_size",
            "make_vocab_size_divisible_by",
        ):
            value = getattr(self, name)
            _require(isinstance(value, int) and value > 0, name, f"must be a positive int, got {value!r}")
        _require(
            self.num_attention_heads % self.num_query_groups == 0,
            "num_query_groups",
            f"{self.num_query_groups} does not divide num_attention_heads={self.num_attention_heads}",
        )
        if self.kv_channels is None:
            _require(
                self.hidden_size % self.num_attention_heads == 0,
                "hidden_size",
                f"{self.hidden_size} is not a multiple of num_attention_heads={self.num_attention_heads}"
                " (or set kv_channels)",
            )
        else:
            _require(self.kv_channels > 0, "kv_channels", f"must be positive, got {self.kv_channels}")
        if self.sliding_window is not None:
            _require(
                isinstance(self.sliding_window, int) and self.sliding_window > 0,
                "sliding_window",
                f"must be a positive int or None, got {self.sliding_window!r}",
            )
        _require(self.rotary_base > 0, "rotary_base", f"must be positive, got {self.rotary_base}")
        _require(self.norm_epsilon > 0, "norm_epsilon", f"must be positive, got {self.norm_epsilon}")
        _require(self.init_method_std > 0, "init_method_std", f"must be positive, got {self.init_method_std}")

    @property
    def head_dim(self) -> int:
        return self.kv_channels or self.hidden_size // self.num_attention_heads

    @property
    def patch_dim(self) -> int:
        """Input size of the patch projection: 3·P·P."""
        return 3 * self.patch_size * self.patch_size

    def padded_vocab_size(self, tensor_parallel_size: int = 1) -> int:
        return padded_vocab_size(self.vocab_size, tensor_parallel_size, self.make_vocab_size_divisible_by)

    def validate_parallel(
        self,
        *,
        tensor_parallel: int = 1,
        pipeline_parallel: int = 1,
        sequence_parallel: bool = False,
        seq_length: int | None = None,
    ) -> None:
        """Raise ``ValueError`` naming the flag when this architecture cannot be laid out so."""
        tp, pp = tensor_parallel, pipeline_parallel
        _require(tp >= 1, "tensor_model_parallel_size", f"must be ≥ 1, got {tp}")
        _require(pp >= 1, "pipeline_model_parallel_size", f"must be ≥ 1, got {pp}")
        for name in ("num_attention_heads", "num_query_groups", "ffn_hidden_size"):
            _require(
                getattr(self, name) % tp == 0,
                "tensor_model_parallel_size",
                f"{tp} does not divide {name}={getattr(self, name)}",
            )
        _require(
            self.num_layers % pp == 0,
            "pipeline_model_parallel_size",
            f"{pp} does not divide num_layers={self.num_layers}",
        )
        _require(not sequence_parallel or tp > 1, "sequence_parallel", "needs tensor_model_parallel_size > 1")
        if seq_length is not None:
            _require(
                seq_length <= self.max_sequence_length,
                "seq_length",
                f"{seq_length} exceeds max_sequence_length={self.max_sequence_length}",
            )
            _require(
                not sequence_parallel or seq_length % tp == 0,
                "seq_length",
                f"{seq_length} is not a multiple of tensor_model_parallel_size={tp} (sequence parallel)",
            )

    def num_parameters(self, tensor_parallel_size: int = 1) -> int:
        """Parameter count of the full model (embedding and output padded for ``tensor_parallel_size``)."""
        h, d = self.hidden_size, self.head_dim
        qkv = h * d * (self.num_attention_heads + 2 * self.num_query_groups)
        layer = qkv + self.num_attention_heads * d * h + 3 * h * self.ffn_hidden_size + 2 * h
        vocab = self.padded_vocab_size(tensor_parallel_size)
        return self.num_layers * layer + 2 * vocab * h + h + self.patch_dim * h

    @property
    def linear_biases(self) -> tuple[bool, bool]:
        """(q/k/v biases, biases on every other linear layer) of the decoder: Mistral has none."""
        return False, False

    def to_dict(self) -> dict[str, Any]:
        return {"family": self.family, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        data = dict(data)
        family = data.pop("family", "solo")
        if family != cls.family:
            raise ValueError(f"family: {family!r} is not {cls.__name__}'s ({cls.family!r})")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown model config field(s): {', '.join(unknown)}")
        return cls(**cls._fields_from_json(data))

    @classmethod
    def _fields_from_json(cls, data: dict[str, Any]) -> dict[str, Any]:
        """Field values as JSON gives them back, turned into the field types (subclasses with nested fields)."""
        return data

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)


PRESETS: dict[str, ModelConfig] = {
    # Mistral-7B-v0.1 exactly (config.json of mistralai/Mistral-7B-v0.1), with SOLO's vocabulary.
    "mistral-7b": ModelConfig(
        num_layers=32,
        hidden_size=4096,
        ffn_hidden_size=14336,
        num_attention_heads=32,
        num_query_groups=8,
        max_sequence_length=32768,
        rotary_base=10000.0,
        norm_epsilon=1e-5,
        sliding_window=4096,
    ),
    # Tests and the CPU demo: the same shape of network, small enough for 2 CPU cores.
    "tiny": ModelConfig(
        num_layers=2,
        hidden_size=64,
        ffn_hidden_size=128,
        num_attention_heads=4,
        num_query_groups=2,
        max_sequence_length=4096,
        sliding_window=None,
    ),
}


def get_preset(name: str) -> ModelConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"model preset: unknown {name!r}; choose from {', '.join(sorted(PRESETS))}") from None
