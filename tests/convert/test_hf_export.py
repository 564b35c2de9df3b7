"""HF export directories: remote-code loading without this package, tokenizer ids, atomicity, reading back."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from tiny_models import TINY, random_mistral
from transformers import MistralConfig

from megatron.solo.convert.hf_export import read_hf_checkpoint, write_hf_export
from megatron.solo.convert.hf_solo import MODELING_FILES, SoloConfig, SoloForCausalLM
from megatron.solo.convert.name_table import (
    HF_PATCH,
    MEGATRON_PATCH,
    ConversionError,
    hf_to_megatron,
    model_config_from_hf,
)

SOLO_VOCAB = 33029


@pytest.fixture(scope="module")
def solo():
    """A tiny SOLO model with the real 33029-token vocabulary and 4x4 patches (patch_dim 48)."""
    return random_mistral(SoloConfig, vocab_size=SOLO_VOCAB, vision_patch_size=4)


@pytest.fixture(scope="module")
def export_dir(solo, tokenizer, tmp_path_factory):
    return write_hf_export(
        tmp_path_factory.mktemp("export") / "solo-tiny", solo.state_dict(), solo.config, tokenizer, torch.float32
    )


def image_inputs(tokenizer):
    """A SOLO-layout prompt: a 2x2-patch image block, then text; returns (ids, indices, patches)."""
    ids = tokenizer.image_layout_ids(2, 2) + tokenizer.encode("What is in the image?", bos=True)
    ids = torch.tensor([ids])
    indices = torch.full_like(ids, -1)
    indices[ids == tokenizer.vision_patch_id] = torch.arange(4)
    return ids, indices, torch.randn(4, 48, generator=torch.Generator().manual_seed(0))


REMOTE_LOAD = textwrap.dedent('''
    import importlib.abc, json, sys

    class BlockSoloMegatron(importlib.abc.MetaPathFinder):
        """Makes this interpreter one where solo-megatron is not installed."""
        def find_spec(self, name, path=None, target=None):
            if name == "megatron.solo" or name.startswith("megatron.solo."):
                raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)")

    sys.meta_path.insert(0, BlockSoloMegatron())
    try:
        import megatron.solo
    except ModuleNotFoundError:
        pass
    else:
        raise SystemExit("megatron.solo is still importable")

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    export_dir, inputs_path, out_path = sys.argv[1:]
    model = AutoModelForCausalLM.from_pretrained(export_dir, trust_remote_code=True, dtype=torch.float32,
                                                 attn_implementation="eager").eval()
    # trust_remote_code for the tokenizer too: AutoTokenizer first reads config.json, whose class is remote code.
    tok = AutoTokenizer.from_pretrained(export_dir, trust_remote_code=True)
    ids, indices, patches = torch.load(inputs_path)
    with torch.no_grad():
        logits = model(ids, vision_patch_indices=indices, vision_patches=patches).logits
    torch.save(logits, out_path)
    print(json.dumps({
        "class": type(model).__name__,
        "module": type(model).__module__,
        "model_type": model.config.model_type,
        "solo_loaded": sorted(m for m in sys.modules if m.startswith("megatron.solo")),
        "ids": tok.convert_tokens_to_ids(["<vision>", "</vision>", "<loc_1>"]),
        "text": tok("What is in the image?").input_ids,
    }))
''')


def test_export_loads_as_remote_code_where_the_package_is_not_importable(export_dir, solo, tokenizer, tmp_path):
    ids, indices, patches = image_inputs(tokenizer)
    torch.save((ids, indices, patches), tmp_path / "inputs.pt")
    (tmp_path / "remote_load.py").write_text(REMOTE_LOAD)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HOME=str(tmp_path / "hf_home"), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    run = subprocess.run(
        [
            sys.executable,
            str(tmp_path / "remote_load.py"),
            str(export_dir),
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

    assert report["class"] == "SoloForCausalLM" and report["module"].startswith("transformers_modules.")
    assert report["model_type"] == "solo"
    assert report["solo_loaded"] == []
    assert report["ids"] == [32000, 32004, 32005]
    assert report["text"] == tokenizer.encode("What is in the image?", bos=True)
    with torch.no_grad():
        want = solo(ids, vision_patch_indices=indices, vision_patches=patches).logits
    assert torch.equal(torch.load(tmp_path / "logits.pt"), want)


def test_export_layout(export_dir):
    names = sorted(p.name for p in export_dir.iterdir())
    assert names == sorted(
        [
            "config.json",
            "configuration_solo.py",
            "modeling_solo.py",
            "processing_solo.py",
            "processor_config.json",
            "chat_template.jinja",
            "generation_config.json",
            "model.safetensors",
            "tokenizer.model",
            "solo_tokenizer.json",
            "tokenizer.json",
            "tokenizer_config.json",
        ]
    )
    for source in MODELING_FILES:
        assert (export_dir / source.name).read_bytes() == source.read_bytes()
    config = json.loads((export_dir / "config.json").read_text())
    assert config["model_type"] == "solo" and config["architectures"] == ["SoloForCausalLM"]
    assert config["auto_map"] == {
        "AutoConfig": "configuration_solo.SoloConfig",
        "AutoModelForCausalLM": "modeling_solo.SoloForCausalLM",
        "AutoProcessor": "processing_solo.SoloProcessor",
    }
    assert config["vocab_size"] == SOLO_VOCAB and config["vision_patch_size"] == 4
    generation = json.loads((export_dir / "generation_config.json").read_text())
    assert generation["suppress_tokens"] == [32000, 32001, 32002, 32003, 32004]
    assert generation["eos_token_id"] == 2 and generation["pad_token_id"] == 2


def test_auto_tokenizer_has_solo_ids_and_sentencepiece_text_ids(export_dir, tokenizer):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(export_dir)
    assert len(hf) == SOLO_VOCAB
    names = ["<vision>", "<vpatch>", "<vrow_sep>", "<vframe_sep>", "</vision>", "<loc_1>", "<loc_1024>"]
    assert hf.convert_tokens_to_ids(names) == [tokenizer.token_to_id(n) for n in names]
    assert hf.convert_tokens_to_ids(names) == [32000, 32001, 32002, 32003, 32004, 32005, 33028]
    # Runs of spaces are where a naive conversion of Mistral's tokenizer.model parts from SentencePiece.
    for text in [
        "Hello world",
        " leading space",
        "two  spaces and   three",
        "code:\n        indented\n\ttab",
        "ünïcödé 漢字 😀",
        "[INST] What is it? [/INST]",
        "trailing  ",
    ]:
        assert hf(text).input_ids == tokenizer.encode(text, bos=True), text
    image_and_text = tokenizer.image_layout_ids(1, 2) + tokenizer.encode("a cat <loc_5>")
    image_and_text.append(tokenizer.loc_token_id(5))
    assert hf.decode(image_and_text, skip_special_tokens=True) == tokenizer.decode(image_and_text)


def test_auto_tokenizer_matches_sentencepiece_on_random_text(export_dir, tokenizer):
    """Seeded random strings, heavy in runs of spaces, tabs, newlines, digits, accents, CJK and emoji."""
    import random

    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(export_dir)
    rng = random.Random(0)
    alphabet = list("ab cde") + ["  ", "   ", "\n", "\t", "é", "漢", "😀", "X", "0", "12", ".", ",", "?"]
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40))) for _ in range(1500)]
    mismatches = [t for t in texts if hf(t).input_ids != tokenizer.encode(t, bos=True)]
    assert mismatches == []


def test_auto_model_resolves_solo_locally_once_the_package_is_imported(export_dir, solo):
    from transformers import AutoConfig, AutoModelForCausalLM

    assert type(AutoConfig.from_pretrained(export_dir)) is SoloConfig
    model = AutoModelForCausalLM.from_pretrained(export_dir, dtype=torch.float32)
    assert type(model) is SoloForCausalLM
    assert all(torch.equal(model.state_dict()[k], v) for k, v in solo.state_dict().items())


def test_sharded_export_reads_back_bit_exact(solo, tokenizer, tmp_path):
    out = write_hf_export(
        tmp_path / "sharded", solo.state_dict(), solo.config, tokenizer, torch.bfloat16, max_shard_bytes=2 * 2**20
    )
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    sd, config = read_hf_checkpoint(out)
    assert type(config) is SoloConfig and config.patch_dim == 48
    assert set(sd) == set(solo.state_dict())
    for name, tensor in solo.state_dict().items():
        assert sd[name].dtype == torch.bfloat16 and torch.equal(sd[name], tensor.bfloat16()), name


def test_a_failure_midway_leaves_no_out_dir(solo, tokenizer, tmp_path, monkeypatch):
    import megatron.solo.convert.hf_export as hf_export

    def broken(*args, **kwargs):
        assert (next(tmp_path.glob(".solo.tmp-*")) / "model.safetensors").is_file()  # weights already written
        raise OSError("disk full")

    monkeypatch.setattr(hf_export, "_write_tokenizer", broken)
    with pytest.raises(OSError, match="disk full"):
        write_hf_export(tmp_path / "solo", solo.state_dict(), solo.config, tokenizer, torch.float32)
    assert list(tmp_path.iterdir()) == []


def test_existing_out_dir_is_kept_unless_overwrite(solo, tokenizer, tmp_path):
    out = tmp_path / "solo"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(FileExistsError):
        write_hf_export(out, solo.state_dict(), solo.config, tokenizer, torch.float32)
    assert (out / "old.txt").is_file()
    write_hf_export(out, solo.state_dict(), solo.config, tokenizer, torch.float32, overwrite=True)
    assert not (out / "old.txt").exists() and (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["solo"]


def test_export_checks_its_inputs_before_writing(solo, tokenizer, tmp_path):
    out = tmp_path / "solo"
    sd = solo.state_dict()
    with pytest.raises(ConversionError, match="missing \\['model.norm.weight'\\]"):
        write_hf_export(out, {k: v for k, v in sd.items() if k != "model.norm.weight"}, solo.config, tokenizer)
    with pytest.raises(ConversionError, match="'lm_head.weight' has shape \\[33029, 32\\]"):
        write_hf_export(out, dict(sd, **{"lm_head.weight": torch.zeros(SOLO_VOCAB, 32)}), solo.config, tokenizer)
    with pytest.raises(ValueError, match="tokenizer has 33029 tokens but solo_config.vocab_size is 300"):
        write_hf_export(out, sd, SoloConfig(**TINY), tokenizer)
    with pytest.raises(TypeError, match="must be a SoloConfig"):
        write_hf_export(out, sd, MistralConfig(**{**TINY, "vocab_size": SOLO_VOCAB}), tokenizer)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("sharded", [False, True])
def test_solo7b_style_checkpoint_keeps_its_patch_projection(tmp_path, sharded):
    """SOLO-7B's release: model_type "mistral", vocab 33029, model.embed_vision_patch.weight; here as .bin files."""
    mistral = random_mistral(vocab_size=SOLO_VOCAB)
    sd = dict(mistral.state_dict())
    sd[HF_PATCH] = torch.randn(TINY["hidden_size"], 3072, generator=torch.Generator().manual_seed(7))
    mistral.config.vision_patch_size = 32
    mistral.config.save_pretrained(tmp_path)
    if sharded:
        keys = sorted(sd)
        weight_map = {k: f"pytorch_model-0000{1 + (i % 2)}-of-00002.bin" for i, k in enumerate(keys)}
        for file_name in set(weight_map.values()):
            torch.save({k: sd[k] for k in keys if weight_map[k] == file_name}, tmp_path / file_name)
        (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    else:
        torch.save(sd, tmp_path / "pytorch_model.bin")

    hf_sd, config = read_hf_checkpoint(tmp_path)
    assert config.model_type == "mistral" and set(hf_sd) == set(sd)
    arch = model_config_from_hf(config)
    m_sd = hf_to_megatron(hf_sd, arch, padded_vocab_size=33152)

    assert torch.equal(m_sd[MEGATRON_PATCH], sd[HF_PATCH])  # loaded, not re-initialised
    assert torch.equal(m_sd["embedding.word_embeddings.weight"][:SOLO_VOCAB], sd["model.embed_tokens.weight"])
    assert torch.count_nonzero(m_sd["output_layer.weight"][SOLO_VOCAB:]) == 0


def test_reader_errors(tmp_path, solo, tokenizer):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        read_hf_checkpoint(tmp_path)
    MistralConfig(**TINY).save_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        read_hf_checkpoint(tmp_path)

    out = write_hf_export(tmp_path / "sharded", solo.state_dict(), solo.config, tokenizer, max_shard_bytes=2**20)
    index_path = out / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["model.norm.weight"] = "model-00001-of-00099.safetensors"
    index_path.write_text(json.dumps(index))
    with pytest.raises(FileNotFoundError, match="model-00001-of-00099.safetensors"):
        read_hf_checkpoint(out)

    from transformers import LlamaConfig

    LlamaConfig(hidden_size=64, num_attention_heads=4).save_pretrained(tmp_path / "llama")
    with pytest.raises(ConversionError, match="model_type 'llama'"):
        read_hf_checkpoint(tmp_path / "llama")
