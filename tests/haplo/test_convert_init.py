"""HaploVL's stage-1 starting checkpoint from public weights (``tools/convert_checkpoint.py haplo-init``): a tiny
random HF Mistral (the real 32000-token tokenizer) and a tiny random CLIP vision tower → a Megatron checkpoint
whose tensors are the sources' (checked against the HF tensors themselves, not the converter's functions), and
which ``pretrain_solo.py`` stage 1 trains from, keeping those weights (fp32, bf16, bf16 + distributed optimizer:
weights loaded are weights trained)."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "convert"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "training"))
from pretrain_helpers import losses, recipe_args, run_pretrain  # noqa: E402
from test_training_haplo import SEQ_LENGTH, SIZES, preprocess  # noqa: E402

from megatron.solo import image as im  # noqa: E402

pytestmark = pytest.mark.timeout(600)
HF_VOCAB = 32000


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> tuple[Path, Path]:
    """(a tiny HF Mistral with the real tokenizer, a tiny CLIP vision tower on 56-px tiles of 14-px patches)."""
    from tiny_models import random_mistral
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from megatron.solo.tokenizer import default_tokenizer_model

    root = tmp_path_factory.mktemp("haplo-sources")
    random_mistral(vocab_size=HF_VOCAB, max_position_embeddings=4096).save_pretrained(root / "llm")
    shutil.copyfile(default_tokenizer_model(), root / "llm" / "tokenizer.model")
    torch.manual_seed(0)
    config = CLIPVisionConfig(
        image_size=56, patch_size=14, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4
    )
    clip = CLIPVisionModel(config)
    with torch.no_grad():  # LayerNorms away from their 1/0 init: a swapped norm shows
        for name, p in clip.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    clip.save_pretrained(root / "clip")
    return root / "llm", root / "clip"


def init(sources, out: Path, *extra: str) -> Path:
    from tools.convert_checkpoint import main

    llm, clip = sources
    argv = ["haplo-init", "--llm", str(llm), "--clip", str(clip), "--preset", "haplo-tiny", "--out", str(out)]
    assert main([*argv, *extra]) == 0
    return out


@pytest.fixture(scope="module")
def checkpoint(sources, tmp_path_factory, megatron_world) -> Path:
    return init(sources, tmp_path_factory.mktemp("haplo-init") / "ckpt", "--clip-layers", "2")


def plain(root: Path, iteration: int | None = None) -> dict[str, torch.Tensor]:
    from megatron.core import dist_checkpointing

    from megatron.solo.checkpointing import iteration_dir

    tensors = dist_checkpointing.load_plain_tensors(str(iteration_dir(root, iteration)))
    out = {}
    for key, value in tensors.items():
        if key.startswith(("decoder.layers.", "pre_decoder.layers.")):  # stacked over the layers: one per layer
            stack, rest = key.split(".layers.", 1)
            out.update({f"{stack}.layers.{i}.{rest}": layer for i, layer in enumerate(value)})
        elif not key.startswith("optimizer"):
            out[key] = value
    return out


def hf_weights(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(directory / "model.safetensors"))


def test_the_checkpoint_holds_the_llm_and_clip_weights(sources, checkpoint):
    from megatron.solo.checkpointing import CheckpointMetadata

    meta = CheckpointMetadata.read(checkpoint)
    cfg = meta.model
    assert cfg.family == "haplo" and cfg.sliding_window is None and cfg.llm_bias == "none"
    assert (cfg.pre_decoder.num_layers, cfg.pre_decoder.hidden_size, cfg.tile_size) == (2, 32, 56)
    got, llm, clip = plain(checkpoint), hf_weights(sources[0]), hf_weights(sources[1])
    assert not [k for k in got if k.startswith("distill_heads.")]

    for name, hf in (("output_layer.weight", "lm_head.weight"), ("llm_embedding.weight", "model.embed_tokens.weight")):
        assert torch.equal(got[name][:HF_VOCAB], llm[hf]), name
        assert torch.allclose(
            got[name][HF_VOCAB : cfg.vocab_size], llm[hf].mean(0).expand(cfg.vocab_size - HF_VOCAB, -1)
        )
        assert not got[name][cfg.vocab_size :].any()  # TP padding
    assert torch.equal(got["decoder.final_layernorm.weight"], llm["model.norm.weight"])
    g, d = cfg.num_query_groups, cfg.head_dim
    for i in range(cfg.num_layers):
        m, h = f"decoder.layers.{i}.", f"model.layers.{i}."
        qkv = got[m + "self_attention.linear_qkv.weight"].reshape(g, -1, d, cfg.hidden_size)
        q = llm[h + "self_attn.q_proj.weight"].reshape(g, -1, d, cfg.hidden_size)
        assert torch.equal(qkv[:, :-2], q)
        assert torch.equal(qkv[:, -2], llm[h + "self_attn.k_proj.weight"].reshape(g, d, -1))
        assert torch.equal(qkv[:, -1], llm[h + "self_attn.v_proj.weight"].reshape(g, d, -1))
        assert torch.equal(got[m + "self_attention.linear_proj.weight"], llm[h + "self_attn.o_proj.weight"])
        gate_up = torch.cat([llm[h + "mlp.gate_proj.weight"], llm[h + "mlp.up_proj.weight"]])
        assert torch.equal(got[m + "mlp.linear_fc1.weight"], gate_up)
        assert torch.equal(got[m + "mlp.linear_fc2.weight"], llm[h + "mlp.down_proj.weight"])
        assert torch.equal(got[m + "self_attention.linear_qkv.layer_norm_weight"], llm[h + "input_layernorm.weight"])
        assert torch.equal(got[m + "mlp.linear_fc1.layer_norm_weight"], llm[h + "post_attention_layernorm.weight"])

    c = "vision_model." if any(k.startswith("vision_model.") for k in clip) else ""
    assert torch.equal(got["patch_embed.weight"], clip[c + "embeddings.patch_embedding.weight"].reshape(32, -1))
    assert torch.equal(got["pos_embed"], clip[c + "embeddings.position_embedding.weight"][1:])
    assert torch.equal(got["pre_norm.weight"], clip[c + "pre_layrnorm.weight"])
    heads, hd = cfg.pre_decoder.num_attention_heads, cfg.pre_decoder.head_dim
    for i in range(2):  # --clip-layers 2 of CLIP's 3
        m, h = f"pre_decoder.layers.{i}.", f"{c}encoder.layers.{i}."
        qkv = got[m + "self_attention.linear_qkv.weight"].reshape(heads, 3, hd, -1)
        for j, p in enumerate("qkv"):
            assert torch.equal(qkv[:, j], clip[f"{h}self_attn.{p}_proj.weight"].reshape(heads, hd, -1))
        assert torch.equal(got[m + "self_attention.linear_proj.bias"], clip[h + "self_attn.out_proj.bias"])
        assert torch.equal(got[m + "mlp.linear_fc1.weight"][:64], clip[h + "mlp.fc1.weight"])
        assert torch.equal(got[m + "mlp.linear_fc2.weight"], clip[h + "mlp.fc2.weight"])
        assert torch.equal(got[m + "self_attention.linear_qkv.layer_norm_weight"], clip[h + "layer_norm1.weight"])
        assert torch.equal(got[m + "mlp.linear_fc1.layer_norm_bias"], clip[h + "layer_norm2.bias"])
    assert "pre_decoder.layers.2.mlp.linear_fc2.weight" not in got

    # the pre-width text table is the LLM's table times a matrix with orthonormal columns (found by least squares)
    e_llm, e_pre = got["llm_embedding.weight"][:HF_VOCAB].double(), got["embedding.word_embeddings.weight"].double()
    w = torch.linalg.lstsq(e_llm, e_pre[:HF_VOCAB]).solution  # [H, pre]
    assert torch.allclose(e_llm @ w, e_pre[:HF_VOCAB], atol=1e-5)
    assert torch.allclose(w.t() @ w, torch.eye(32, dtype=torch.float64), atol=1e-4)
    assert 0.01 < got["connector.weight"].std() < 0.03  # the model's own init (std 0.02)


def test_text_embedding_and_connector_settings(sources, tmp_path, megatron_world):
    out = init(sources, tmp_path / "c", "--text-embedding-init", "random", "--seed", "3")
    got = plain(out)
    assert 0.015 < got["embedding.word_embeddings.weight"].std() < 0.025  # normal(0, 0.02), not the LLM's rows
    out = init(sources, tmp_path / "p", "--connector-init", "projection")
    got = plain(out)
    e_llm, e_pre = got["llm_embedding.weight"][:HF_VOCAB], got["embedding.word_embeddings.weight"][:HF_VOCAB]
    assert torch.allclose(e_llm @ got["connector.weight"], e_pre, atol=1e-5)  # the connector is W [H, pre]
    with pytest.raises(ValueError, match="needs text_embedding='project'"):
        init(sources, tmp_path / "x", "--text-embedding-init", "random", "--connector-init", "projection")


def test_a_tensor_missing_from_the_conversion_is_refused_by_name(sources, tmp_path, monkeypatch, megatron_world):
    """Only the parts meant to keep the model's own initialisation may be absent from the converted weights:
    any other missing tensor fails the conversion, naming it, before anything is written."""
    from megatron.solo.convert import haplo_init
    from megatron.solo.convert.name_table import ConversionError
    from megatron.solo.families import get_preset

    convert, dropped = haplo_init.hf_to_megatron, []

    def lossy(*args, **kwargs):
        converted = convert(*args, **kwargs)
        dropped.append(sorted(k for k in converted if k.startswith("decoder.layers."))[-1])
        del converted[dropped[-1]]
        return converted

    monkeypatch.setattr(haplo_init, "hf_to_megatron", lossy)
    llm, clip = sources
    with pytest.raises(ConversionError) as refused:
        haplo_init.haplo_init_checkpoint(llm, tmp_path / "c", base=get_preset("haplo-tiny"), clip_dir=clip)
    assert dropped and dropped[0] in str(refused.value) and "missing" in str(refused.value)
    assert not (tmp_path / "c").exists()


def test_random_pre_decoder_takes_the_presets_geometry(sources, tmp_path, megatron_world):
    from tools.convert_checkpoint import main

    out = tmp_path / "r"
    argv = ["haplo-init", "--llm", str(sources[0]), "--pre-decoder-init", "random", "--preset", "haplo-tiny"]
    assert main([*argv, "--out", str(out)]) == 0
    from megatron.solo.checkpointing import CheckpointMetadata
    from megatron.solo.families import get_preset

    assert CheckpointMetadata.read(out).model.pre_decoder == get_preset("haplo-tiny").pre_decoder
    got = plain(out)
    assert torch.equal(
        got["decoder.layers.1.mlp.linear_fc2.weight"], hf_weights(sources[0])["model.layers.1.mlp.down_proj.weight"]
    )
    assert 0.015 < got["pre_decoder.layers.0.mlp.linear_fc1.weight"].std() < 0.025


@pytest.fixture(scope="module")
def data(tmp_path_factory, sample_photos) -> list[str]:
    root = tmp_path_factory.mktemp("haplo-init-data")
    records = []
    for i in range(8):
        path = root / f"photo{i}.png"
        im.load_image(sample_photos[i % len(sample_photos)]).resize(SIZES[i % len(SIZES)]).save(path)
        records.append({"image": path.name, "caption": f"photo number {i} of a series"})
    return ["1.0", preprocess(root / "captions", records)]


FROZEN = ("decoder.", "output_layer.", "connector.", "llm_embedding.")


# bf16, as users run it (fp32 stage 1 from a checkpoint is the stage1_reference runs of test_training_haplo)
@pytest.mark.parametrize("precision", [["--bf16"], ["--bf16", "--use-distributed-optimizer"]])
def test_stage1_trains_from_the_init_checkpoint_keeping_its_weights(data, sources, checkpoint, precision, tmp_path):
    """Two stage-1 steps at a tiny learning rate: the frozen LLM side is saved exactly as loaded (in the run's
    dtype), the trained pre-decoder side within the steps' reach of what was loaded, never re-initialised."""
    args = recipe_args(data, str(checkpoint), SEQ_LENGTH, 2, "--distill-teacher", str(sources[1]))
    args = [a for a in args if a != "--use-distributed-optimizer"]
    lr = args.index("--lr")
    args[lr + 1], args[args.index("--min-lr") + 1] = "1e-6", "1e-7"
    proc = run_pretrain([*args, *precision, "--save", str(tmp_path / "s1"), "--metrics-file", str(tmp_path / "m")])
    assert "llm_embedding" not in proc.stdout + proc.stderr  # loaded, not left at its initialisation (logged)
    got = losses(tmp_path / "m")
    assert sorted(got) == [1, 2] and all(v == v and v > 0 for v in got.values()), got
    start, trained = plain(checkpoint), plain(tmp_path / "s1", 2)
    dtype = torch.bfloat16
    for name, value in start.items():
        saved = trained[name]
        assert saved.dtype == dtype, name
        if name.startswith(FROZEN):
            assert torch.equal(saved, value.to(dtype)), name
        else:  # Adam moves a weight by at most ~lr per step
            torch.testing.assert_close(saved.float(), value.to(dtype).float(), atol=1e-5, rtol=1e-2, msg=name)


def test_a_llama_layout_llm_and_its_export(sources, tmp_path, megatron_world):
    """Vicuna / Llama-3's HF layout (``LlamaForCausalLM``) converts as Mistral's does; the init checkpoint exports
    to the released layout with the LLM's own weights (the stage-1 text targets are not exported)."""
    from safetensors.torch import load_file
    from tiny_models import TINY
    from transformers import LlamaConfig, LlamaForCausalLM

    from tools.convert_checkpoint import main

    llama = tmp_path / "llama"
    torch.manual_seed(3)
    model = LlamaForCausalLM(LlamaConfig(**{**TINY, "vocab_size": HF_VOCAB, "max_position_embeddings": 4096}))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.model_type == "llama"
    model.save_pretrained(llama)
    shutil.copyfile(sources[0] / "tokenizer.model", llama / "tokenizer.model")
    out = tmp_path / "init"
    argv = ["haplo-init", "--llm", str(llama), "--pre-decoder-init", "random", "--preset", "haplo-tiny"]
    assert main([*argv, "--out", str(out)]) == 0
    hf, got = hf_weights(llama), plain(out)
    assert torch.equal(got["decoder.layers.0.mlp.linear_fc2.weight"], hf["model.layers.0.mlp.down_proj.weight"])
    assert torch.equal(got["llm_embedding.weight"][:HF_VOCAB], hf["model.embed_tokens.weight"])

    assert main(["megatron-to-hf", "--load", str(out), "--out", str(tmp_path / "hf")]) == 0
    exported = load_file(str(tmp_path / "hf" / "model.safetensors"))
    n = 2  # haplo-tiny's pre-decoder layers come first in the released layout
    assert torch.equal(
        exported[f"model.layers.{n + 1}.mlp.down_proj.weight"], hf["model.layers.1.mlp.down_proj.weight"]
    )
    assert torch.equal(exported["lm_head.weight"][:HF_VOCAB], hf["lm_head.weight"])
    assert not exported[f"model.layers.{n}.self_attn.o_proj.bias"].any()  # a bias-free LLM exports zeros
    assert not [k for k in exported if "distill" in k or "llm_embedding" in k]


def test_an_llm_without_a_tokenizer_is_refused_by_name(sources, tmp_path):
    from megatron.solo.convert.haplo_init import haplo_init_checkpoint
    from megatron.solo.families import get_preset

    llm = tmp_path / "llm"
    shutil.copytree(sources[0], llm)
    (llm / "tokenizer.model").unlink()
    with pytest.raises(FileNotFoundError, match=r"no tokenizer.model \(SentencePiece\) or tokenizer.json \(HF\)"):
        haplo_init_checkpoint(llm, tmp_path / "out", base=get_preset("haplo-tiny"))


def test_a_full_clip_model_directory_gives_its_vision_tower(sources, tmp_path, megatron_world):
    """openai/clip-vit-large-patch14-336 is a ``CLIPModel`` (text tower too, ``vision_model.`` names): only its
    vision tower is read, with the vision config's geometry."""
    from safetensors.torch import load_file
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(4)
    vision = dict(image_size=56, patch_size=14, hidden_size=32, intermediate_size=64, num_hidden_layers=2)
    text = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=99)
    config = CLIPConfig(text_config=text, vision_config={**vision, "num_attention_heads": 4}, projection_dim=8)
    CLIPModel(config).save_pretrained(tmp_path / "clip-full")
    clip = load_file(str(tmp_path / "clip-full" / "model.safetensors"))
    assert any(k.startswith("text_model.") for k in clip)
    out = tmp_path / "init"
    argv = ["haplo-init", "--llm", str(sources[0]), "--clip", str(tmp_path / "clip-full"), "--preset", "haplo-tiny"]
    from tools.convert_checkpoint import main

    assert main([*argv, "--out", str(out)]) == 0
    got = plain(out)
    v = "vision_model."
    assert torch.equal(got["patch_embed.weight"], clip[v + "embeddings.patch_embedding.weight"].reshape(32, -1))
    assert torch.equal(got["pre_decoder.layers.1.mlp.linear_fc2.weight"], clip[v + "encoder.layers.1.mlp.fc2.weight"])
