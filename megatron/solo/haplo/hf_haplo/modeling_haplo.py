"""HaploForCausalLM: HaploVL in the released checkpoint layout, as self-contained remote code.

Imports only torch and transformers (plus the configuration beside it), so it ships inside an export and loads
with ``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)``. Written from ``haplovl_spec.md``
(§2.1–2.4, §2.9), independently of the megatron-core model, so that it can serve as that model's reference.

Parameters (released names): ``model.embed_tokens`` [V, pre], ``model.patch_embed.proj`` (Conv2d 3→pre,
kernel = stride = P, no bias), ``model.pre_pos_embed`` [1, T², pre], ``model.image_newline`` [pre],
``model.pre_norm`` (LayerNorm), ``model.layers.{i}`` (the ``pre_config.num_hidden_layers`` pre-decoder layers,
then the LLM's), ``model.pre_connector`` [H, pre] (no bias), ``model.norm``, ``lm_head`` [V, H]. Every layer:
``input_layernorm``/``post_attention_layernorm`` (HaploNorm: ``weight``, plus ``bias`` in layernorm mode),
``self_attn.{q,k,v,o}_proj`` with biases, ``mlp.{gate,up,down}_proj`` with biases.

Forward: embed ids at the pre width; the ``<image>`` positions take the images' embeddings in order (tiles →
patch embedding + per-tile position table → reassembled grid → unpadded → a newline after every row); the
pre-norm over the whole sequence; the pre-decoder; the connector; the LLM; the final norm; the head. Attention
follows the release's ``attention_start_ids`` rule: query i sees key j iff ``start[j] ≤ i`` (causal, and
bidirectional inside an image block), and not padding. Without ``attention_start_ids``, every maximal run of
``<image>`` ids is one block (adjacent images then merge: pass the ids to keep them apart).

Images come as in the release: ``pixel_values`` [N tiles, 3, T, T] (CLIP-normalised, all images' tiles in order,
row-major within an image) with ``image_sizes`` [n images, 2] = (height, width) of the originals.

There is no KV cache: ``generate`` recomputes the whole sequence at every step (exact; fine for evaluation at
small scale). The release's downscaling of grids above ``anyres_max_N`` (never reached with its 336 grid) is
refused rather than reproduced.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.modeling_outputs import CausalLMOutput

from .configuration_haplo import PER_MODEL_DEFAULTS, HaploConfig


class HaploNorm(nn.Module):
    """RMSNorm (``weight``) or LayerNorm (``weight``, ``bias``), computed in the input dtype as the release's."""

    def __init__(self, hidden_size: int, mode: str, eps: float):
        super().__init__()
        self.mode, self.eps = mode, eps
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.bias = nn.Parameter(torch.zeros(hidden_size)) if mode == "layernorm" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "layernorm":
            return F.layer_norm(x, (x.shape[-1],), self.weight, self.bias, self.eps)
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def rotary_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos, sin [b, 1, s, d] for position ids [b, s] (HF's non-interleaved RoPE)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    freqs = positions[..., None].float() * inv_freq  # [b, s, d/2]
    emb = torch.cat([freqs, freqs], dim=-1)[:, None]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _fields(config: HaploConfig, pre: bool) -> dict:
    if pre:
        return config.pre_config
    return {name: getattr(config, name) for name in PER_MODEL_DEFAULTS}


class HaploAttention(nn.Module):
    def __init__(self, fields: dict):
        super().__init__()
        h, heads, kv = fields["hidden_size"], fields["num_attention_heads"], fields["num_key_value_heads"]
        self.heads, self.kv_heads = heads, kv
        self.head_dim = fields.get("head_dim") or h // heads
        self.q_proj = nn.Linear(h, heads * self.head_dim)
        self.k_proj = nn.Linear(h, kv * self.head_dim)
        self.v_proj = nn.Linear(h, kv * self.head_dim)
        self.o_proj = nn.Linear(heads * self.head_dim, h)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor, cos_sin) -> torch.Tensor:
        """x [b, s, h]; allowed [b, s, s] bool (True = may attend); cos_sin (cos, sin) or None (no RoPE)."""
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
        if cos_sin is not None:
            cos, sin = cos_sin
            q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        repeat = self.heads // self.kv_heads
        k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
        scores = (q @ k.transpose(-1, -2)) * self.head_dim**-0.5
        scores = scores.masked_fill(~allowed[:, None], torch.finfo(scores.dtype).min)
        probs = scores.softmax(-1, dtype=torch.float32).to(q.dtype)
        return self.o_proj((probs @ v).transpose(1, 2).reshape(b, s, -1))


class HaploMLP(nn.Module):
    def __init__(self, fields: dict):
        super().__init__()
        h, f = fields["hidden_size"], fields["intermediate_size"]
        self.gate_proj, self.up_proj, self.down_proj = nn.Linear(h, f), nn.Linear(h, f), nn.Linear(f, h)
        self.act_fn = ACT2FN[fields["hidden_act"]]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class HaploDecoderLayer(nn.Module):
    def __init__(self, fields: dict):
        super().__init__()
        h = fields["hidden_size"]
        self.self_attn = HaploAttention(fields)
        self.mlp = HaploMLP(fields)
        self.input_layernorm = HaploNorm(h, fields["norm_mode"], fields["rms_norm_eps"])
        self.post_attention_layernorm = HaploNorm(h, fields["norm_mode"], fields["rms_norm_eps"])

    def forward(self, x: torch.Tensor, allowed: torch.Tensor, cos_sin) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), allowed, cos_sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class PatchEmbed(nn.Module):
    def __init__(self, hidden_size: int, patch_size: int):
        super().__init__()
        self.proj = nn.Conv2d(3, hidden_size, kernel_size=patch_size, stride=patch_size, bias=False)

    def forward(self, tiles: torch.Tensor) -> torch.Tensor:
        """[n, 3, T, T] → [n, (T/P)², hidden], patches row-major."""
        return self.proj(tiles).flatten(2).transpose(1, 2)


# --- anyres (written from the spec, independently of megatron.solo.haplo.anyres) ----------------------------


def select_best_resolution(height: int, width: int, pinpoints) -> tuple[int, int]:
    best, best_effective, best_waste = None, 0, math.inf
    for h, w in pinpoints:
        scale = min(w / width, h / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        if effective > best_effective or (effective == best_effective and w * h - effective < best_waste):
            best, best_effective, best_waste = (h, w), effective, w * h - effective
    return best


def unpad_grid(grid: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Crop the rows or columns of a [C, gh, gw] patch grid that show the letterbox padding of an image of
    original (height, width)."""
    gh, gw = grid.shape[1:]
    if width / height > gw / gh:
        pad = (gh - int(round(height * gw / width, 7))) // 2
        return grid[:, pad : gh - pad]
    pad = (gw - int(round(width * gh / height, 7))) // 2
    return grid[:, :, pad : gw - pad]


class HaploPreTrainedModel(PreTrainedModel):
    config_class = HaploConfig
    base_model_prefix = "model"
    _no_split_modules = ["HaploDecoderLayer"]

    @torch.no_grad()
    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            nn.init.normal_(module.weight, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=std)
        elif isinstance(module, HaploModel):
            nn.init.normal_(module.pre_pos_embed, std=0.02)
            nn.init.zeros_(module.image_newline)


class HaploModel(HaploPreTrainedModel):
    def __init__(self, config: HaploConfig):
        super().__init__(config)
        pre = config.pre_config
        pre_h = pre["hidden_size"]
        self.num_pre_layers = config.num_pre_layers
        self.embed_tokens = nn.Embedding(config.vocab_size, pre_h)
        self.patch_embed = PatchEmbed(pre_h, pre["patch_size"])
        self.side = pre["default_image_size"] // pre["patch_size"]
        self.pre_pos_embed = nn.Parameter(torch.zeros(1, self.side * self.side, pre_h))
        self.image_newline = nn.Parameter(torch.zeros(pre_h))
        self.pre_norm = nn.LayerNorm(pre_h, eps=config.pre_norm_eps)
        self.layers = nn.ModuleList(
            [HaploDecoderLayer(_fields(config, pre=True)) for _ in range(self.num_pre_layers)]
            + [HaploDecoderLayer(_fields(config, pre=False)) for _ in range(config.num_hidden_layers)]
        )
        self.pre_connector = nn.Linear(pre_h, config.hidden_size, bias=False)
        self.norm = HaploNorm(config.hidden_size, config.norm_mode, config.rms_norm_eps)
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def image_embeddings(self, pixel_values: torch.Tensor, image_sizes) -> torch.Tensor:
        """All images' token embeddings in sequence order [Σ tokens, pre] (patches and row newlines)."""
        cfg = self.config
        tile = cfg.pre_config["default_image_size"]
        embeds = self.patch_embed(pixel_values.to(self.patch_embed.proj.weight.dtype)) + self.pre_pos_embed
        out, start = [], 0
        max_tiles = (
            int(cfg.image_aspect_ratio.split("anyres_max_")[-1]) if "anyres_max_" in cfg.image_aspect_ratio else None
        )
        for height, width in (tuple(int(v) for v in size) for size in image_sizes):
            bh, bw = select_best_resolution(height, width, cfg.image_grid_pinpoints)
            th, tw = bh // tile, bw // tile
            e = embeds[start : start + th * tw]
            start += th * tw
            grid = (
                e.view(th, tw, self.side, self.side, -1)
                .permute(4, 0, 2, 1, 3)
                .reshape(-1, th * self.side, tw * self.side)
            )
            grid = unpad_grid(grid, height, width)
            if max_tiles is not None and math.sqrt(grid.shape[1] * grid.shape[2] / (max_tiles * self.side**2)) > 1.1:
                raise ValueError(
                    f"a {width}x{height} image exceeds anyres_max_{max_tiles}: downscaling is not supported"
                )
            newline = self.image_newline[:, None, None].expand(-1, grid.shape[1], 1).to(grid.dtype)
            out.append(torch.cat([grid, newline], dim=2).flatten(1).t())
        if start != pixel_values.shape[0]:
            raise ValueError(f"pixel_values holds {pixel_values.shape[0]} tiles, image_sizes account for {start}")
        return torch.cat(out) if out else embeds.new_zeros(0, embeds.shape[-1])

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_sizes=None,
        attention_start_ids: torch.LongTensor | None = None,
    ) -> torch.Tensor:
        """Final hidden states [b, s, H]."""
        b, s = input_ids.shape
        x = self.embed_tokens(input_ids)
        is_image = input_ids == self.config.image_token_index
        if pixel_values is not None:
            images = self.image_embeddings(pixel_values, image_sizes).to(x.dtype)
            if images.shape[0] != int(is_image.sum()):
                raise ValueError(
                    f"{int(is_image.sum())} <image> tokens but the images give {images.shape[0]} embeddings"
                )
            x = x.masked_scatter(is_image[..., None], images)
        elif is_image.any():
            raise ValueError("<image> tokens without pixel_values")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if position_ids is None:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        if attention_start_ids is None:
            attention_start_ids = image_block_starts(is_image)
        allowed = attention_allowed(attention_start_ids, attention_mask)
        x = self.pre_norm(x)
        pre, cfg = self.config.pre_config, self.config
        llm_rope = (
            rotary_cos_sin(position_ids, self.layers[-1].self_attn.head_dim, cfg.rope_theta, x.dtype)
            if self.layers[self.num_pre_layers :]
            else None
        )
        if not pre.get("rope", True):
            pre_rope = None
        elif pre.get("attention_rope"):
            pre_rope = rotary_cos_sin(position_ids, self.layers[0].self_attn.head_dim, pre["rope_theta"], x.dtype)
        else:
            pre_rope = llm_rope  # the release's shared table (needs equal head dims)
        for i, layer in enumerate(self.layers):
            if i == self.num_pre_layers:
                x = self.pre_connector(x)
            x = layer(x, allowed, pre_rope if i < self.num_pre_layers else llm_rope)
        if self.num_pre_layers == len(self.layers):
            x = self.pre_connector(x)
        return self.norm(x)


def image_block_starts(is_image: torch.Tensor) -> torch.Tensor:
    """The release's ``attention_start_ids`` [b, s] when each maximal run of image tokens is one block: a token's
    own index, or for an image token the index of its run's first token."""
    b, s = is_image.shape
    index = torch.arange(s, device=is_image.device).expand(b, s)
    run_start = is_image & ~F.pad(is_image, (1, 0))[:, :-1]
    marks = torch.where(run_start | ~is_image, index, torch.zeros_like(index))
    return torch.cummax(marks, dim=1).values


def attention_allowed(start_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """bool [b, s, s]: query i may see key j iff ``start[j] ≤ i`` and j is not padding (and always itself)."""
    s = start_ids.shape[1]
    i = torch.arange(s, device=start_ids.device)
    allowed = (start_ids[:, None, :] <= i[None, :, None]) & attention_mask.bool()[:, None, :]
    return allowed | torch.eye(s, dtype=torch.bool, device=start_ids.device)


class HaploForCausalLM(HaploPreTrainedModel, GenerationMixin):
    def __init__(self, config: HaploConfig):
        super().__init__(config)
        self.model = HaploModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # no KV cache: see the module docstring

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_sizes=None,
        attention_start_ids: torch.LongTensor | None = None,
        labels: torch.LongTensor | None = None,
        **kwargs,
    ) -> CausalLMOutput:
        """Logits [b, s, V]; with ``labels`` the next-token cross-entropy (ignore index -100)."""
        hidden = self.model(input_ids, attention_mask, position_ids, pixel_values, image_sizes, attention_start_ids)
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutput(loss=loss, logits=logits)

    def prepare_inputs_for_generation(
        self, input_ids, attention_mask=None, pixel_values=None, image_sizes=None, attention_start_ids=None, **kwargs
    ):
        """The whole sequence at every step (no cache); ``attention_start_ids`` extended with each new token's
        own index, as the release does during generation."""
        if attention_start_ids is not None and attention_start_ids.shape[1] < input_ids.shape[1]:
            s0, s = attention_start_ids.shape[1], input_ids.shape[1]
            new = torch.arange(s0, s, device=input_ids.device).expand(input_ids.shape[0], -1)
            attention_start_ids = torch.cat([attention_start_ids, new], dim=1)
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "pixel_values": pixel_values,
            "image_sizes": image_sizes,
            "attention_start_ids": attention_start_ids,
        }


__all__ = ["HaploForCausalLM", "HaploModel"]
