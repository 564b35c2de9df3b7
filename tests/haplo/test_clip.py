"""CLIP → stem + pre-decoder: with RoPE off and full attention over one tile, our computation is CLIP's own
(its patch conv + position embeddings without CLS, pre_layrnorm, encoder layers), layer by layer."""

import pytest
import torch
import torch.nn.functional as F
from transformers import CLIPConfig, CLIPModel, CLIPVisionConfig, CLIPVisionModel

from megatron.solo.config import get_preset
from megatron.solo.haplo.anyres import AnyresConfig, patches_to_tiles
from megatron.solo.haplo.clip import (
    ClipConversionError,
    clip_to_haplo,
    load_pre_decoder,
    pre_decoder_config_from_clip,
    pre_decoder_weights,
)
from megatron.solo.haplo.pre_decoder import build_pre_decoder, make_pre_decoder_transformer_config
from megatron.solo.model import make_transformer_config

VISION = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=42, patch_size=14
)
TILE = AnyresConfig(tile_size=42, patch_size=14, pinpoints=((42, 42),), anyres_max=1)


def _clip(seed=0):
    torch.manual_seed(seed)
    model = CLIPVisionModel(CLIPVisionConfig(**VISION)).eval()
    with torch.no_grad():  # HF's init leaves biases at zero and LayerNorms at 1/0: make every term count
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


def _clip_reference(model, tiles):
    """CLIP's own modules, driven without the CLS token: per-layer outputs [n, T², C] (index 0: pre_layrnorm)."""
    emb = model.embeddings
    x = emb.patch_embedding(tiles).flatten(2).transpose(1, 2)  # [n, T², C], row-major patches
    x = x + emb.position_embedding.weight[1:]
    x = model.pre_layrnorm(x)
    outs = [x]
    hooks = [
        layer.register_forward_hook(lambda m, i, o: outs.append(o[0] if isinstance(o, tuple) else o))
        for layer in model.encoder.layers
    ]
    final = model.encoder(inputs_embeds=x).last_hidden_state
    for h in hooks:
        h.remove()
    assert torch.equal(final, outs[-1])
    return outs


def _ours(converted, block, patches):
    """Stem + pre-decoder as the HaploVL model runs them on one tile's patch tokens, full attention."""
    x = F.linear(patches, converted["patch_embed.weight"]) + converted["pos_embed"]
    x = F.layer_norm(x, (x.shape[-1],), converted["pre_norm.weight"], converted["pre_norm.bias"], 1e-5)
    outs = [x]
    hooks = [
        layer.register_forward_hook(lambda m, i, o: outs.append(o[0] if isinstance(o, tuple) else o))
        for layer in block.layers
    ]
    n, s = x.shape[:2]
    no_mask = torch.zeros(n, 1, s, s, dtype=torch.bool)  # bidirectional: the whole tile is one image block
    block(x.transpose(0, 1).contiguous(), no_mask, rotary_pos_emb=None)
    for h in hooks:
        h.remove()
    return [outs[0]] + [o.transpose(0, 1) for o in outs[1:]]


@pytest.mark.parametrize("num_layers", [3, 2])
def test_stem_and_pre_decoder_reproduce_clip_layer_by_layer(megatron_world, num_layers):
    model = _clip()
    cfg = pre_decoder_config_from_clip(model.config, num_layers=num_layers, rope=False)
    assert (cfg.hidden_size, cfg.num_attention_heads, cfg.ffn_hidden_size, cfg.activation) == (32, 4, 64, "quick_gelu")
    converted = clip_to_haplo(model.state_dict(), cfg, tile_positions=TILE.positions_per_tile)
    block = build_pre_decoder(
        make_pre_decoder_transformer_config(cfg, make_transformer_config(get_preset("tiny"), backend="local"))
    )
    load_pre_decoder(block.eval(), pre_decoder_weights(converted))
    # Two tiles of pixels, flattened into our C×P×P patch vectors and back (so the patch order is tested too).
    tiles = torch.randn(2, 3, 42, 42)
    patches = tiles.reshape(2, 3, 3, 14, 3, 14).permute(0, 2, 4, 1, 3, 5).reshape(2, 9, 3 * 14 * 14)
    assert torch.equal(patches_to_tiles(patches.reshape(18, -1), TILE), tiles)
    with torch.no_grad():
        expected = _clip_reference(model, tiles)
        got = _ours(converted, block, patches)
    assert len(got) == num_layers + 1
    for k, out in enumerate(got):  # pre-decoder layer k-1's output is CLIP's hidden_states[k]
        torch.testing.assert_close(out, expected[k], rtol=1e-5, atol=1e-5)


def test_rope_makes_it_differ(megatron_world):
    """A control: with the released model's RoPE on, the same weights no longer compute CLIP's function."""
    model = _clip()
    cfg = pre_decoder_config_from_clip(model.config, rope=True)
    converted = clip_to_haplo(model.state_dict(), cfg, tile_positions=9)
    tc = make_pre_decoder_transformer_config(cfg, make_transformer_config(get_preset("tiny"), backend="local"))
    block = build_pre_decoder(tc).eval()
    load_pre_decoder(block, pre_decoder_weights(converted))
    from megatron.solo.haplo.pre_decoder import build_pre_decoder_rotary

    x = torch.randn(9, 1, 32)
    mask = torch.zeros(1, 1, 9, 9, dtype=torch.bool)
    with torch.no_grad():
        plain = block(x, mask, rotary_pos_emb=None)
        roped = block(x, mask, rotary_pos_emb=build_pre_decoder_rotary(cfg, tc)(9))
    assert (plain - roped).abs().max() > 1e-3


def test_a_full_clip_model_checkpoint_is_read_through_its_vision_tower():
    torch.manual_seed(0)
    full = CLIPModel(
        CLIPConfig(
            vision_config=VISION,
            text_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2),
        )
    )
    vision = CLIPVisionModel(CLIPVisionConfig(**VISION))
    vision.load_state_dict(
        {k[len("vision_model.") :]: v for k, v in full.state_dict().items() if k.startswith("vision_model.")}
    )
    cfg = pre_decoder_config_from_clip(full.config, rope=False)
    a = clip_to_haplo(full.state_dict(), cfg, tile_positions=9)
    b = clip_to_haplo(vision.state_dict(), cfg, tile_positions=9)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert a["patch_embed.weight"].shape == (32, 3 * 14 * 14) and a["pos_embed"].shape == (9, 32)


def test_bad_checkpoints_are_refused():
    model = _clip()
    cfg = pre_decoder_config_from_clip(model.config, rope=False)
    sd = model.state_dict()
    with pytest.raises(ClipConversionError, match="unexpected"):
        clip_to_haplo({**sd, "encoder.layers.0.bogus": torch.zeros(1)}, cfg, tile_positions=9)
    with pytest.raises(ClipConversionError, match="lacks"):
        clip_to_haplo({k: v for k, v in sd.items() if k != "encoder.layers.1.mlp.fc2.bias"}, cfg, tile_positions=9)
    with pytest.raises(ClipConversionError, match="positions"):
        clip_to_haplo(sd, cfg, tile_positions=576)
    with pytest.raises(ClipConversionError, match="needs"):
        clip_to_haplo(sd, cfg.replace(num_layers=4), tile_positions=9)
    with pytest.raises(ClipConversionError, match="gated"):
        clip_to_haplo(sd, cfg.replace(gated=False), tile_positions=9)
    with pytest.raises(ClipConversionError, match="num_layers"):
        pre_decoder_config_from_clip(model.config, num_layers=5)
