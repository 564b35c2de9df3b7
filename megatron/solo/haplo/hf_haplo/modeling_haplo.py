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

``generate`` keeps a KV cache of its own (:class:`HaploCache`: every layer's keys and values, and the attention
start ids), made in ``prepare_inputs_for_generation`` and returned as the output's ``cache``, the name
transformers ≥ 5.24 hands on between steps (where it is not handed on, every step recomputes the whole
sequence: slower, the same tokens). Beams and ``num_return_sequences`` repeat each sample's images. The
release's downscaling of grids above ``anyres_max_N`` (never reached with its 336 grid) is refused rather than
reproduced.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.utils import ModelOutput

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

    def forward(self, x: torch.Tensor, allowed: torch.Tensor, cos_sin, kv=None) -> torch.Tensor:
        """x [b, s, h] (the new tokens); allowed [b, s, past + s] bool (True = may attend); cos_sin (cos, sin) or
        None (no RoPE); kv: stores this layer's new keys/values and returns all of them (a cache), or None."""
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
        if cos_sin is not None:
            cos, sin = cos_sin
            q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        if kv is not None:
            k, v = kv(k, v)
        repeat = self.heads // self.kv_heads
        k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
        # SDPA with a boolean mask (True = may attend): memory-efficient kernels take arbitrary masks on GPUs.
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed[:, None], scale=self.head_dim**-0.5)
        return self.o_proj(out.transpose(1, 2).reshape(b, s, -1))


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

    def forward(self, x: torch.Tensor, allowed: torch.Tensor, cos_sin, kv=None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), allowed, cos_sin, kv)
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
    if best is None:
        raise ValueError(f"no pinpoint keeps any pixel of a {width}x{height} image")
    return best


def unpad_crop(gh: int, gw: int, height: int, width: int) -> tuple[int, int]:
    """(rows, columns) cropped at *each* end of a gh × gw patch grid that shows an image of original (height,
    width) letterboxed: those that show only padding."""
    if width / height > gw / gh:
        return (gh - int(round(height * gw / width, 7))) // 2, 0
    return 0, (gw - int(round(width * gh / height, 7))) // 2


def image_grid(config: HaploConfig, height: int, width: int) -> tuple[int, int, int, int]:
    """(tiles_h, tiles_w, top, left): an image's tiling and the crop of its (tiles_h·side) × (tiles_w·side) grid."""
    tile = config.pre_config["default_image_size"]
    side = tile // config.pre_config["patch_size"]
    bh, bw = select_best_resolution(height, width, config.image_grid_pinpoints)
    th, tw = bh // tile, bw // tile
    return (th, tw, *unpad_crop(th * side, tw * side, height, width))


def num_image_tokens(config: HaploConfig, height: int, width: int) -> int:
    """Sequence positions of an image: its unpadded patches plus one newline per row."""
    side = config.pre_config["default_image_size"] // config.pre_config["patch_size"]
    th, tw, top, left = image_grid(config, height, width)
    rows, cols = th * side - 2 * top, tw * side - 2 * left
    return rows * cols + rows


class HaploCache:
    """Generation state: per layer the keys and values [b, kv heads, past, d] of every processed token, and the
    attention start ids [b, past] (the release's rule, :func:`attention_allowed`)."""

    def __init__(self):
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.start_ids: torch.Tensor | None = None

    def get_seq_length(self) -> int:
        return 0 if self.start_ids is None else self.start_ids.shape[1]

    def layer(self, index: int):
        """The ``kv`` callable of layer ``index``: append the new keys/values, return all of them."""

        def update(k: torch.Tensor, v: torch.Tensor):
            if index == len(self.keys):
                self.keys.append(k)
                self.values.append(v)
            else:
                self.keys[index] = torch.cat([self.keys[index], k], dim=2)
                self.values[index] = torch.cat([self.values[index], v], dim=2)
            return self.keys[index], self.values[index]

        return update

    def reorder_cache(self, index: torch.LongTensor) -> None:
        """Keep the rows ``index`` (beam search)."""
        self.keys = [k.index_select(0, index.to(k.device)) for k in self.keys]
        self.values = [v.index_select(0, index.to(v.device)) for v in self.values]
        if self.start_ids is not None:
            self.start_ids = self.start_ids.index_select(0, index.to(self.start_ids.device))


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
        cfg, side = self.config, self.side
        embeds = self.patch_embed(pixel_values.to(self.patch_embed.proj.weight.dtype)) + self.pre_pos_embed
        ratio = cfg.image_aspect_ratio
        max_tiles = int(ratio.split("anyres_max_")[-1]) if "anyres_max_" in ratio else None
        out, start = [], 0
        for height, width in (tuple(int(v) for v in size) for size in image_sizes):
            th, tw, top, left = image_grid(cfg, height, width)
            grid = embeds[start : start + th * tw].view(th, tw, side, side, -1)
            start += th * tw
            grid = grid.permute(4, 0, 2, 1, 3).reshape(-1, th * side, tw * side)  # [C, rows, cols] of the canvas
            grid = grid[:, top : th * side - top, left : tw * side - left]
            if max_tiles is not None and grid.shape[1] * grid.shape[2] > 1.21 * max_tiles * side * side:
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
        cache: HaploCache | None = None,
    ) -> torch.Tensor:
        """Final hidden states [b, s, H] of the s new tokens ``input_ids`` (after the ``cache``'s, if any).

        attention_mask [b, past + s] (1 = a token, 0 = padding); attention_start_ids [b, past + s] or [b, s] (the
        new tokens'), default: each run of ``<image>`` ids is one block; position_ids [b, s], default: counted
        over the attention mask.
        """
        b, s = input_ids.shape
        past = cache.get_seq_length() if cache is not None else 0
        x = self.embed_tokens(input_ids)
        is_image = input_ids == self.config.image_token_index
        if pixel_values is not None:
            images = self.image_embeddings(pixel_values, image_sizes).to(x.dtype)
            if images.shape[0] != int(is_image.sum()):
                raise ValueError(
                    f"{int(is_image.sum())} <image> tokens but the images give {images.shape[0]} embeddings"
                )
            x = x.masked_scatter(is_image[..., None], images)
        elif is_image.any() and past == 0:
            raise ValueError("<image> tokens without pixel_values")
        if attention_mask is None:
            attention_mask = torch.ones(b, past + s, dtype=torch.long, device=input_ids.device)
        if position_ids is None:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:]
        if attention_start_ids is None:
            attention_start_ids = image_block_starts(is_image) + past
        if attention_start_ids.shape[1] == s and past:
            attention_start_ids = torch.cat([cache.start_ids, attention_start_ids], dim=1)
        if cache is not None:
            cache.start_ids = attention_start_ids
        allowed = attention_allowed(attention_start_ids, attention_mask, past)
        x = self.pre_norm(x)
        pre, cfg = self.config.pre_config, self.config
        llm_rope = rotary_cos_sin(position_ids, self.layers[-1].self_attn.head_dim, cfg.rope_theta, x.dtype)
        if not pre.get("rope", True):
            pre_rope = None
        elif pre.get("attention_rope"):
            pre_rope = rotary_cos_sin(position_ids, self.layers[0].self_attn.head_dim, pre["rope_theta"], x.dtype)
        else:
            pre_rope = llm_rope  # the release's shared table (needs equal head dims)
        for i, layer in enumerate(self.layers):
            if i == self.num_pre_layers:
                x = self.pre_connector(x)
            kv = cache.layer(i) if cache is not None else None
            x = layer(x, allowed, pre_rope if i < self.num_pre_layers else llm_rope, kv)
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


def attention_allowed(start_ids: torch.Tensor, attention_mask: torch.Tensor, past: int = 0) -> torch.Tensor:
    """bool [b, s, past + s] for the queries past..past+s-1: query i may see key j iff ``start[j] ≤ i`` and j is
    not padding, and always itself. start_ids, attention_mask: [b, past + s]."""
    total = start_ids.shape[1]
    i = torch.arange(past, total, device=start_ids.device)
    j = torch.arange(total, device=start_ids.device)
    allowed = (start_ids[:, None, :] <= i[None, :, None]) & attention_mask.bool()[:, None, :]
    return allowed | (i[:, None] == j[None, :])


@dataclass
class HaploCausalLMOutput(ModelOutput):
    """logits [b, s, V]; loss (with labels); cache (when ``use_cache``)."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    cache: HaploCache | None = None


class HaploForCausalLM(HaploPreTrainedModel, GenerationMixin):
    def __init__(self, config: HaploConfig):
        super().__init__(config)
        self.model = HaploModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the cache is a HaploCache, made in prepare_inputs_for_generation

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
        cache: HaploCache | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> HaploCausalLMOutput:
        """Logits [b, s, V]; with ``labels`` the next-token cross-entropy (ignore index -100). ``cache``: continue
        after the tokens it holds (``use_cache`` without one starts one); it is returned in the output."""
        if cache is None and use_cache:
            cache = HaploCache()
        hidden = self.model(
            input_ids, attention_mask, position_ids, pixel_values, image_sizes, attention_start_ids, cache
        )
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        return HaploCausalLMOutput(loss=loss, logits=logits, cache=cache)

    def prepare_inputs_for_generation(
        self,
        input_ids,
        attention_mask=None,
        pixel_values=None,
        image_sizes=None,
        attention_start_ids=None,
        cache=None,
        use_cache=True,
        **kwargs,
    ):
        """The tokens the cache does not hold yet (all of them at first, with the images); without a cache
        (``use_cache=False``) the whole sequence every step. ``attention_start_ids`` is extended with each new
        token's own index, as the release does during generation."""
        if attention_start_ids is not None and attention_start_ids.shape[1] < input_ids.shape[1]:
            s0, s = attention_start_ids.shape[1], input_ids.shape[1]
            new = torch.arange(s0, s, device=input_ids.device).expand(input_ids.shape[0], -1)
            attention_start_ids = torch.cat([attention_start_ids, new], dim=1)
        if use_cache and cache is None:
            cache = HaploCache()
        past = cache.get_seq_length() if use_cache else 0
        if past:
            input_ids, pixel_values, image_sizes = input_ids[:, past:], None, None
            attention_start_ids = None if attention_start_ids is None else attention_start_ids[:, past:]
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "pixel_values": pixel_values,
            "image_sizes": image_sizes,
            "attention_start_ids": attention_start_ids,
            "cache": cache if use_cache else None,
            "use_cache": use_cache,
        }

    def _reorder_cache(self, cache: HaploCache, beam_idx: torch.LongTensor) -> HaploCache:
        cache.reorder_cache(beam_idx)
        return cache

    def _expand_inputs_for_generation(self, expand_size=1, is_encoder_decoder=False, input_ids=None, **model_kwargs):
        """Beams / ``num_return_sequences``: every row is repeated, so every row's images must be too (the
        base class would repeat the batch-flat ``pixel_values``/``image_sizes`` row by row, mixing images up)."""
        pixel_values, image_sizes = model_kwargs.pop("pixel_values", None), model_kwargs.pop("image_sizes", None)
        if expand_size > 1 and pixel_values is not None:
            pixel_values, image_sizes = self._repeat_images(input_ids, pixel_values, image_sizes, expand_size)
        input_ids, model_kwargs = super()._expand_inputs_for_generation(
            expand_size=expand_size, is_encoder_decoder=is_encoder_decoder, input_ids=input_ids, **model_kwargs
        )
        model_kwargs.update(pixel_values=pixel_values, image_sizes=image_sizes)
        return input_ids, model_kwargs

    def _repeat_images(self, input_ids, pixel_values, image_sizes, times):
        """Each row's tiles and sizes ``times`` times, rows in order (rows are told apart by image-token counts)."""
        cfg = self.config
        sizes = [tuple(int(v) for v in size) for size in image_sizes]
        tokens = [num_image_tokens(cfg, h, w) for h, w in sizes]
        side = cfg.pre_config["default_image_size"]
        tiles = [
            (bh // side) * (bw // side)
            for bh, bw in (select_best_resolution(h, w, cfg.image_grid_pinpoints) for h, w in sizes)
        ]
        tile_start = [0]
        for n in tiles:
            tile_start.append(tile_start[-1] + n)
        pixels, out_sizes, image = [], [], 0
        for row in (input_ids == cfg.image_token_index).sum(-1).tolist():
            first = image
            while row > 0:
                row -= tokens[image]
                image += 1
            if row:
                raise ValueError("a row's <image> tokens do not add up to whole images")
            for _ in range(times):
                pixels.append(pixel_values[tile_start[first] : tile_start[image]])
                out_sizes.extend(sizes[first:image])
        return torch.cat(pixels), torch.tensor(
            out_sizes, device=image_sizes.device if torch.is_tensor(image_sizes) else None
        )


__all__ = ["HaploCache", "HaploForCausalLM", "HaploModel"]
