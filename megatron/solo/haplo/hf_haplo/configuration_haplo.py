"""HaploConfig: the released HaploVL checkpoint's configuration layout, for our remote-code model.

Self-contained (imports only transformers) so it ships inside an exported checkpoint. As in the release
(``haplovl_spec.md`` §2.1, §6), the top level holds the LLM's (post-decoder's) hyper-parameters and the image
settings, and ``pre_config`` the pre-decoder's; ``post_config`` is accepted and ignored (the release does not
use it either). Field names and defaults follow the release's ``HaploPerModelConfig`` where one exists.

Our additions, all defaulting to the release's behaviour:

* ``pre_config["rope"]`` (default True): False turns RoPE off in the pre-decoder (a CLIP-exact pre-decoder);
  the release always applies it (its own table when ``attention_rope``, else the LLM's);
* ``pre_norm_eps`` (default 1e-5, torch LayerNorm's, which the release uses without setting it).
"""

from __future__ import annotations

from transformers import PretrainedConfig

DEFAULT_PINPOINTS = [
    [336, 336],
    [336, 672],
    [336, 1008],
    [336, 1344],
    [336, 1680],
    [336, 2016],
    [672, 336],
    [672, 672],
    [672, 1008],
    [1008, 336],
    [1008, 672],
    [1344, 336],
    [1680, 336],
    [2016, 336],
]

# The per-model fields (top level for the LLM, pre_config for the pre-decoder) and the release's defaults.
PER_MODEL_DEFAULTS = {
    "hidden_size": 4096,
    "intermediate_size": 22016,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": None,
    "head_dim": None,
    "hidden_act": "silu",
    "rms_norm_eps": 1e-6,
    "norm_mode": "rmsnorm",
    "rope_theta": 10000.0,
    "attention_rope": False,
    "rope": True,
}


class HaploConfig(PretrainedConfig):
    """The LLM's fields at the top level, the pre-decoder's in ``pre_config`` (a dict, as in the release's JSON)."""

    model_type = "haplo"

    def __init__(
        self,
        vocab_size: int = 152064,
        max_position_embeddings: int = 32768,
        initializer_range: float = 0.02,
        image_token_index: int = 151646,
        patch_size: int = 14,
        default_image_size: int = 336,
        image_aspect_ratio: str = "anyres_max_6",
        image_grid_pinpoints: list | None = None,
        pre_norm_eps: float = 1e-5,
        pre_config: dict | None = None,
        base_config: dict | None = None,
        post_config: dict | None = None,
        tie_word_embeddings: bool = False,
        **kwargs,
    ):
        # The release's JSON nests the LLM's fields in base_config and copies them to the top level; either works.
        llm = {**(base_config or {})}
        for name in PER_MODEL_DEFAULTS:
            if name in kwargs:
                llm[name] = kwargs.pop(name)
        for name, default in PER_MODEL_DEFAULTS.items():
            setattr(self, name, llm.get(name, default))
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        pre = {**PER_MODEL_DEFAULTS, "norm_mode": "layernorm", "hidden_act": "quick_gelu", **(pre_config or {})}
        if pre.get("num_key_value_heads") is None:
            pre["num_key_value_heads"] = pre["num_attention_heads"]
        pre.setdefault("patch_size", patch_size)
        pre.setdefault("default_image_size", default_image_size)
        self.pre_config = {k: v for k, v in pre.items() if not (k == "head_dim" and v is None)}
        self.post_config = dict(post_config or {})
        self.vocab_size = vocab_size
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.image_token_index = image_token_index
        self.patch_size = patch_size
        self.default_image_size = default_image_size
        self.image_aspect_ratio = image_aspect_ratio
        self.image_grid_pinpoints = [list(p) for p in (image_grid_pinpoints or DEFAULT_PINPOINTS)]
        self.pre_norm_eps = pre_norm_eps
        kwargs.pop("use_cache", None)  # no KV cache in this model (see modeling_haplo.py)
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
        self._validate()

    def _validate(self) -> None:
        for where, fields in (("", self.__dict__), ("pre_config.", self.pre_config)):
            if fields["norm_mode"] not in ("rmsnorm", "layernorm"):
                raise ValueError(
                    f"HaploConfig.{where}norm_mode must be rmsnorm or layernorm, got {fields['norm_mode']!r}"
                )
            if fields["num_attention_heads"] % fields["num_key_value_heads"]:
                raise ValueError(f"HaploConfig.{where}num_key_value_heads must divide num_attention_heads")
        if self.default_image_size % self.patch_size:
            raise ValueError("HaploConfig.default_image_size must be a multiple of patch_size")
        if self.tie_word_embeddings:
            raise ValueError(
                "HaploConfig.tie_word_embeddings: the embedding is at the pre-decoder width, lm_head at the LLM's"
            )

    @property
    def num_pre_layers(self) -> int:
        return int(self.pre_config["num_hidden_layers"])


__all__ = ["HaploConfig"]
