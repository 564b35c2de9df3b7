"""The HF remote-code HaploForCausalLM on a tiny random config: released parameter names, the images' token
embeddings against megatron.solo.haplo.anyres's layout, the attention rule against a naive construction,
greedy generation, the loss, and loading as remote code in a fresh process."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from megatron.solo.haplo.anyres import (
    AnyresConfig,
    anyres_grid,
    image_layout,
    image_tiles,
    normalize_tile_patches,
    patches_to_tiles,
    tile_patches,
)
from megatron.solo.haplo.hf_haplo import AUTO_MAP, MODELING_FILES, HaploConfig, HaploForCausalLM
from megatron.solo.haplo.hf_haplo.modeling_haplo import attention_allowed, image_block_starts

IMAGE = 49
PINPOINTS = [[28, 28], [28, 56], [56, 28], [56, 56]]
TILE = AnyresConfig(tile_size=28, patch_size=14, pinpoints=tuple(map(tuple, PINPOINTS)), anyres_max=4)


def tiny_config(**pre):
    return HaploConfig(
        vocab_size=50,
        hidden_size=24,
        intermediate_size=40,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        rope_theta=1000.0,
        image_token_index=IMAGE,
        patch_size=14,
        default_image_size=28,
        image_grid_pinpoints=PINPOINTS,
        image_aspect_ratio="anyres_max_4",
        pre_config=dict(
            hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, attention_rope=True, **pre
        ),
    )


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = HaploForCausalLM(tiny_config()).eval()
    with torch.no_grad():  # the default init leaves biases, newline and norms trivial: make every term count
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m


def pixels_for(sizes, seed=0):
    rng = np.random.default_rng(seed)
    tiles = [image_tiles(Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)), TILE) for h, w in sizes]
    patches = normalize_tile_patches(np.concatenate([tile_patches(t, TILE) for t in tiles]), TILE)
    return patches_to_tiles(torch.from_numpy(patches), TILE).contiguous(), torch.tensor(sizes)


def test_parameter_names_are_the_released_layout(model):
    names = set(model.state_dict())
    stem = {
        "model.embed_tokens.weight",
        "model.patch_embed.proj.weight",
        "model.pre_pos_embed",
        "model.image_newline",
        "model.pre_norm.weight",
        "model.pre_norm.bias",
        "model.pre_connector.weight",
        "model.norm.weight",
        "lm_head.weight",
    }
    per_layer = {f"self_attn.{p}_proj.{t}" for p in "qkvo" for t in ("weight", "bias")}
    per_layer |= {f"mlp.{p}_proj.{t}" for p in ("gate", "up", "down") for t in ("weight", "bias")}
    per_layer |= {"input_layernorm.weight", "post_attention_layernorm.weight"}
    layernorm_bias = {"input_layernorm.bias", "post_attention_layernorm.bias"}  # layernorm mode: the pre-decoder
    expected = stem | {f"model.layers.{i}.{n}" for i in range(4) for n in per_layer}
    expected |= {f"model.layers.{i}.{n}" for i in range(2) for n in layernorm_bias}
    assert names == expected
    sd = model.state_dict()
    assert sd["model.patch_embed.proj.weight"].shape == (16, 3, 14, 14)
    assert sd["model.pre_pos_embed"].shape == (1, 4, 16) and sd["model.pre_connector.weight"].shape == (24, 16)
    assert sd["model.layers.0.mlp.gate_proj.weight"].shape == (32, 16) and sd[
        "model.layers.2.self_attn.k_proj.weight"
    ].shape == (12, 24)


@pytest.mark.parametrize("sizes", [[(40, 20)], [(20, 56), (28, 28)], [(30, 90), (90, 30), (5, 5)]])
def test_image_embeddings_follow_the_anyres_layout(model, sizes):
    pixel_values, image_sizes = pixels_for(sizes)
    with torch.no_grad():
        got = model.model.image_embeddings(pixel_values, image_sizes)
        per_tile = model.model.patch_embed(pixel_values) + model.model.pre_pos_embed  # [tiles, 4, pre]
    rows, tile_offset = [], 0
    for h, w in sizes:
        layout = image_layout(anyres_grid(h, w, TILE))
        for newline, tile, position in zip(layout.is_newline, layout.tile, layout.position, strict=True):
            rows.append(model.model.image_newline if newline else per_tile[tile_offset + tile, position])
        tile_offset += layout.num_tiles
    torch.testing.assert_close(got, torch.stack(rows))


def test_attention_rule_against_a_naive_construction():
    rng = np.random.default_rng(0)
    for _ in range(20):
        is_image = torch.from_numpy(rng.random((2, 12)) < 0.5)
        pad = torch.from_numpy(rng.random((2, 12)) < 0.2)
        starts = image_block_starts(is_image)
        allowed = attention_allowed(starts, ~pad)
        for b in range(2):
            for i in range(12):
                for j in range(12):
                    block_start = j
                    while is_image[b, j] and block_start > 0 and is_image[b, block_start - 1]:
                        block_start -= 1
                    want = (block_start <= i and not pad[b, j]) or i == j
                    assert bool(allowed[b, i, j]) == want, (b, i, j)


def test_bidirectional_inside_an_image_and_causal_text(model):
    pixel_values, image_sizes = pixels_for([(28, 28)])  # one tile: 4 patches + 2 newlines = 6 tokens
    ids = torch.tensor([[1, 2] + [IMAGE] * 6 + [3, 4]])
    pv = pixel_values.clone().requires_grad_(True)
    logits = model(ids, pixel_values=pv, image_sizes=image_sizes).logits
    logits[0, 2].sum().backward()  # the first image token sees the whole image (its last patch too)
    assert pv.grad[0, :, 14:, 14:].abs().max() > 0
    text = model(ids, pixel_values=pixel_values, image_sizes=image_sizes).logits
    changed = ids.clone()
    changed[0, 9] = 7
    after = model(changed, pixel_values=pixel_values, image_sizes=image_sizes).logits
    torch.testing.assert_close(after[0, :9], text[0, :9])  # nothing sees a later text token


def test_loss_is_the_shifted_cross_entropy(model):
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    labels = torch.tensor([[-100, 6, -100, 8, 9]])
    out = model(ids, labels=labels)
    want = F.cross_entropy(out.logits[0, :-1], labels[0, 1:], ignore_index=-100)
    torch.testing.assert_close(out.loss, want)


def test_greedy_generate_equals_argmax_full_forwards(model):
    pixel_values, image_sizes = pixels_for([(20, 56)])
    n = anyres_grid(20, 56, TILE).num_tokens
    ids = torch.tensor([[1] + [IMAGE] * n + [2, 3]])
    out = model.generate(ids, pixel_values=pixel_values, image_sizes=image_sizes, max_new_tokens=5, do_sample=False)
    seq = ids
    for _ in range(5):
        with torch.no_grad():
            nxt = model(seq, pixel_values=pixel_values, image_sizes=image_sizes).logits[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], dim=1)
    assert torch.equal(out, seq)


def test_a_cached_step_equals_the_full_forward(model):
    pixel_values, image_sizes = pixels_for([(40, 20)])
    n = anyres_grid(40, 20, TILE).num_tokens
    ids = torch.tensor([[1] + [IMAGE] * n + [2, 3, 4]])
    with torch.no_grad():
        full = model(ids, pixel_values=pixel_values, image_sizes=image_sizes).logits
        first = model(ids[:, :-2], pixel_values=pixel_values, image_sizes=image_sizes, use_cache=True)
        second = model(ids[:, -2:], cache=first.cache)
    torch.testing.assert_close(torch.cat([first.logits, second.logits], dim=1), full, rtol=1e-5, atol=1e-5)
    assert second.cache.get_seq_length() == ids.shape[1]


def test_batched_generate_with_padding_and_cache_equals_each_row_alone(model):
    """Two prompts of different lengths (left-padded), different images: the cached batch decode gives what each
    prompt gives alone, and what the uncached full recomputation gives."""
    sizes = [(40, 20), (20, 56)]
    prompts = [
        [1] + [IMAGE] * anyres_grid(*sizes[0], TILE).num_tokens + [2],
        [5, 6, 7] + [IMAGE] * anyres_grid(*sizes[1], TILE).num_tokens + [8],
    ]
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    pixel_values, image_sizes = pixels_for(sizes)
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    inputs = dict(attention_mask=mask, pixel_values=pixel_values, image_sizes=image_sizes)
    scored = dict(return_dict_in_generate=True, output_logits=True)
    cached = model.generate(ids, **inputs, **kw, **scored)
    uncached = model.generate(ids, **inputs, use_cache=False, **kw, **scored)
    assert torch.equal(cached.sequences, uncached.sequences)
    torch.testing.assert_close(torch.stack(cached.logits), torch.stack(uncached.logits), rtol=1e-4, atol=1e-5)
    cached = cached.sequences
    for row, (prompt, size) in enumerate(zip(prompts, sizes, strict=True)):
        pv = pixel_values[:2] if row == 0 else pixel_values[2:]  # each image has 2 tiles
        alone = model.generate(torch.tensor([prompt]), pixel_values=pv, image_sizes=torch.tensor([size]), **kw)
        assert cached[row, width:].tolist() == alone[0, len(prompt) :].tolist()


def test_beams_repeat_each_rows_images(model):
    sizes = [(20, 56), (20, 50)]  # 2 tiles and 10 tokens each: rows of equal length, no padding
    assert [anyres_grid(*size, TILE).num_tokens for size in sizes] == [10, 10]
    ids = torch.tensor([[1] + [IMAGE] * 10, [3] + [IMAGE] * 10])
    pixel_values, image_sizes = pixels_for(sizes)
    kw = dict(max_new_tokens=3, do_sample=False, num_beams=2, num_return_sequences=2)
    batch = model.generate(ids, pixel_values=pixel_values, image_sizes=image_sizes, **kw)
    for row, size in enumerate(sizes):
        pv = pixel_values[2 * row : 2 * row + 2]
        alone = model.generate(ids[row : row + 1], pixel_values=pv, image_sizes=torch.tensor([size]), **kw)
        assert torch.equal(batch[2 * row : 2 * row + 2], alone)
    no_cache = model.generate(ids, pixel_values=pixel_values, image_sizes=image_sizes, use_cache=False, **kw)
    assert torch.equal(batch, no_cache)


def test_bad_inputs_are_explained(model):
    pixel_values, image_sizes = pixels_for([(28, 28)])
    with pytest.raises(ValueError, match="<image> tokens"):
        model(torch.tensor([[IMAGE] * 5]), pixel_values=pixel_values, image_sizes=image_sizes)
    with pytest.raises(ValueError, match="without pixel_values"):
        model(torch.tensor([[IMAGE, 1]]))
    with pytest.raises(ValueError, match="tiles"):
        model(torch.tensor([[IMAGE] * 6]), pixel_values=pixel_values.repeat(2, 1, 1, 1), image_sizes=image_sizes)


def test_release_style_config_json_and_round_trip(tmp_path):
    """The release's config.json nests the LLM's fields in base_config (and copies them up); both read the same."""
    cfg = tiny_config()
    released = HaploConfig(
        base_config=dict(
            hidden_size=24, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
        ),
        pre_config=cfg.pre_config,
    )
    assert (released.hidden_size, released.num_key_value_heads, released.num_pre_layers) == (24, 2, 2)
    assert released.pre_config["norm_mode"] == "layernorm" and released.norm_mode == "rmsnorm"
    cfg.save_pretrained(tmp_path)
    again = HaploConfig.from_pretrained(tmp_path)
    assert again.pre_config == cfg.pre_config and again.image_grid_pinpoints == PINPOINTS
    with pytest.raises(ValueError, match="norm_mode"):
        HaploConfig(norm_mode="batchnorm")


REMOTE_LOAD = """
import json, sys, torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True, dtype=torch.float32).eval()
ids, pixel_values, image_sizes = torch.load(sys.argv[2])
with torch.no_grad():
    torch.save(model(ids, pixel_values=pixel_values, image_sizes=image_sizes).logits, sys.argv[3])
out = model.generate(ids, pixel_values=pixel_values, image_sizes=image_sizes, max_new_tokens=3, do_sample=False)
print(json.dumps({"class": type(model).__name__, "module": type(model).__module__, "generated": out[0].tolist(),
                  "solo_loaded": sorted(m for m in sys.modules if m.startswith("megatron.solo"))}))
"""


def test_loads_as_remote_code_in_a_fresh_process(model, tmp_path):
    export = tmp_path / "export"
    model.config.auto_map = AUTO_MAP
    model.save_pretrained(export)
    for source in MODELING_FILES:
        shutil.copy(source, export / source.name)
    pixel_values, image_sizes = pixels_for([(28, 28)])
    ids = torch.tensor([[1, 2] + [IMAGE] * 6 + [3]])
    torch.save((ids, pixel_values, image_sizes), tmp_path / "inputs.pt")
    (tmp_path / "remote_load.py").write_text(REMOTE_LOAD)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HOME=str(tmp_path / "hf_home"), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    run = subprocess.run(
        [
            sys.executable,
            str(tmp_path / "remote_load.py"),
            str(export),
            str(tmp_path / "inputs.pt"),
            str(tmp_path / "logits.pt"),
        ],
        cwd=tmp_path,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert report["class"] == "HaploForCausalLM" and report["module"].startswith("transformers_modules.")
    assert report["solo_loaded"] == []
    with torch.no_grad():
        want = model(ids, pixel_values=pixel_values, image_sizes=image_sizes).logits
    assert torch.equal(torch.load(tmp_path / "logits.pt"), want)
    want_ids = model.generate(
        ids, pixel_values=pixel_values, image_sizes=image_sizes, max_new_tokens=3, do_sample=False
    )
    assert report["generated"] == want_ids[0].tolist()


def test_bf16_model_takes_float32_pixels(model):
    half = HaploForCausalLM(model.config).eval()
    half.load_state_dict(model.state_dict())
    half = half.to(torch.bfloat16)
    pixel_values, image_sizes = pixels_for([(28, 28)])
    ids = torch.tensor([[1, 2] + [IMAGE] * 6 + [3]])
    with torch.no_grad():
        low = half(ids, pixel_values=pixel_values, image_sizes=image_sizes).logits
        full = model(ids, pixel_values=pixel_values, image_sizes=image_sizes).logits
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), full, rtol=0.1, atol=0.1)
    out = half.generate(ids, pixel_values=pixel_values, image_sizes=image_sizes, max_new_tokens=2, do_sample=False)
    assert out.shape == (1, ids.shape[1] + 2)
