"""The released HaploVL checkpoint layout into this stack (``tools/convert_checkpoint.py hf-to-megatron`` on a
directory whose config.json nests the LLM's fields in ``base_config`` and the pre-decoder's in ``pre_config``):
a tiny checkpoint built and saved with hf_haplo (biases everywhere, as released) converts to a Megatron
checkpoint whose ``HaploModel`` gives hf_haplo's logits; Megatron → HF → Megatron keeps every weight."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_convert_export import _megatron_logits, haplo_checkpoint, randomise  # noqa: E402

pytestmark = pytest.mark.timeout(600)


def explicit(cfg):
    """``cfg`` with the defaulted head dims and query groups written out (a converted config spells them)."""
    import dataclasses

    pre = cfg.pre_decoder
    pre = dataclasses.replace(pre, kv_channels=pre.head_dim, num_query_groups=pre.query_groups)
    return cfg.replace(kv_channels=cfg.head_dim, pre_decoder=pre)


def plain(root: Path) -> dict[str, torch.Tensor]:
    from megatron.core import dist_checkpointing

    from megatron.solo.checkpointing import iteration_dir

    return dist_checkpointing.load_plain_tensors(str(iteration_dir(root, None)))


@pytest.fixture(scope="module")
def released(tmp_path_factory, tokenizer):
    """A tiny HaploForCausalLM saved in the release's layout, its config.json rewritten in the release's nesting."""
    from megatron.solo.families import get_preset
    from megatron.solo.haplo.hf_haplo import HaploConfig, HaploForCausalLM
    from megatron.solo.haplo.release_layout import release_config

    cfg = get_preset("haplo-tiny")
    pinpoints = [list(p) for p in cfg.image_grid_pinpoints]
    config = HaploConfig(
        **release_config(
            cfg.pre_decoder, cfg, vocab_size=tokenizer.vocab_size, image_token_index=tokenizer.vision_patch_id,
            patch_size=14, default_image_size=cfg.tile_size, image_grid_pinpoints=pinpoints,
        )
    )  # fmt: skip
    model = HaploForCausalLM(config).eval()
    randomise(model, 11)  # the LLM's biases non-zero: the released model's
    root = tmp_path_factory.mktemp("released") / "haplo"
    model.save_pretrained(root)
    tokenizer.save_pretrained(root)
    data = json.loads((root / "config.json").read_text())
    llm = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads")
    data["base_config"] = {k: data.pop(k) for k in llm}  # the release nests them (and copies them up; either reads)
    (root / "config.json").write_text(json.dumps(data))
    return root, model


@pytest.fixture(scope="module")
def converted(released, tmp_path_factory, megatron_world) -> Path:
    from tools.convert_checkpoint import main

    out = tmp_path_factory.mktemp("released-mg") / "ckpt"
    assert main(["hf-to-megatron", "--hf-model", str(released[0]), "--out", str(out)]) == 0
    return out


def test_the_released_layout_gives_hf_haplos_logits(released, converted, tmp_path, sample_photos, tokenizer):
    from megatron.solo import image as im
    from megatron.solo.checkpointing import CheckpointMetadata, load_full_model
    from megatron.solo.convert.haplo_export import haplo_processor
    from megatron.solo.haplo.anyres import AnyresConfig

    cfg = CheckpointMetadata.read(converted).model
    assert cfg.family == "haplo" and cfg.llm_bias == "all" and cfg.pre_decoder.num_layers == 2
    photo = tmp_path / "p.png"
    im.load_image(sample_photos[2]).resize((70, 100)).save(photo)
    inputs = haplo_processor(cfg, tokenizer)(images=str(photo), text="what is it?")
    with torch.no_grad():
        want = released[1](**inputs).logits[0]

    # the same sample on the Megatron side: the processor's pixels as the model's patches and table rows
    from megatron.solo.haplo import anyres

    tiling = AnyresConfig(tile_size=cfg.tile_size, patch_size=14, pinpoints=cfg.image_grid_pinpoints)
    h, w = inputs["image_sizes"][0].tolist()
    layout = anyres.image_layout(anyres.anyres_grid(h, w, tiling))
    ids = inputs["input_ids"][0]
    first = int((ids == tokenizer.vision_patch_id).nonzero()[0])
    side, p = tiling.positions_per_side, 14
    patches = inputs["pixel_values"].reshape(-1, 3, side, p, side, p).permute(0, 2, 4, 1, 3, 5).reshape(-1, 3 * p * p)
    keep = ~layout.is_newline
    blocks = torch.full((1, len(ids)), -1)
    blocks[0, first : first + len(layout)] = 0

    class Batch:
        image_block_ids = blocks
        patch_index = torch.from_numpy(first + keep.nonzero()[0])
        patch_table_index = torch.from_numpy(layout.position[keep])

    Batch.patches = patches[torch.from_numpy(layout.patch[keep])]
    model, _ = load_full_model(converted)
    got = _megatron_logits(model, Batch, ids)[:, : cfg.vocab_size]
    torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-4)


def test_megatron_to_hf_to_megatron_keeps_every_weight(tmp_path, megatron_world, tokenizer):
    from tools.convert_checkpoint import main

    for bias in ("none", "all"):
        start = haplo_checkpoint(tmp_path / f"start-{bias}", tokenizer, llm_bias=bias)
        assert main(["megatron-to-hf", "--load", str(start), "--out", str(tmp_path / f"hf-{bias}")]) == 0
        back = tmp_path / f"back-{bias}"
        assert main(["hf-to-megatron", "--hf-model", str(tmp_path / f"hf-{bias}"), "--out", str(back)]) == 0
        from megatron.solo.checkpointing import CheckpointMetadata

        assert explicit(CheckpointMetadata.read(back).model) == explicit(CheckpointMetadata.read(start).model)
        want, got = plain(start), plain(back)
        assert got.keys() == want.keys()
        vocab = tokenizer.vocab_size
        for name in want:
            if name in ("embedding.word_embeddings.weight", "output_layer.weight"):  # TP padding rows: not weights
                assert torch.equal(got[name][:vocab], want[name][:vocab]) and not got[name][vocab:].any(), name
            else:
                assert torch.equal(got[name], want[name]), name
