"""tools/convert_checkpoint.py end to end: HF Mistral → Megatron (TP=2 padding) → SoloModel → HF export."""

import shutil
import sys
from pathlib import Path

import pytest
import torch
from tiny_models import TINY, random_mistral

from megatron.solo.tokenizer import default_tokenizer_model

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
import convert_checkpoint  # noqa: E402

pytestmark = pytest.mark.timeout(300)
MISTRAL_VOCAB, SOLO_VOCAB = 32000, 33029


@pytest.fixture(scope="module")
def hf_mistral(tmp_path_factory):
    """A tiny plain Mistral with the real 32000-token vocabulary and tokenizer, as on the Hub."""
    model = random_mistral(vocab_size=MISTRAL_VOCAB)
    directory = tmp_path_factory.mktemp("hf") / "mistral-tiny"
    model.save_pretrained(directory)
    shutil.copyfile(default_tokenizer_model(), directory / "tokenizer.model")
    return model, directory


@pytest.fixture(scope="module")
def megatron_dir(hf_mistral, megatron_world, tmp_path_factory):
    out = tmp_path_factory.mktemp("mg") / "ckpt"
    assert (
        convert_checkpoint.main(
            ["hf-to-megatron", "--hf-model", str(hf_mistral[1]), "--out", str(out), "--tensor-model-parallel-size", "2"]
        )
        == 0
    )
    return out


def text_batch(b=2, s=10, seed=0):
    ids = torch.randint(3, MISTRAL_VOCAB, (b, s), generator=torch.Generator().manual_seed(seed))
    return ids, torch.arange(s).expand(b, s), torch.arange(0, (b + 1) * s, s, dtype=torch.int32)


def test_megatron_checkpoint_layout_and_metadata(megatron_dir):
    from megatron.solo.checkpointing import CheckpointMetadata, latest_iteration

    meta = CheckpointMetadata.read(megatron_dir)
    assert latest_iteration(megatron_dir) is None  # a release checkpoint
    assert meta.model.vocab_size == SOLO_VOCAB and meta.padded_vocab_size == 33280  # 128·TP=2 padding
    assert (meta.model.num_layers, meta.model.hidden_size) == (TINY["num_hidden_layers"], TINY["hidden_size"])
    assert {p.name for p in megatron_dir.iterdir()} >= {
        "release",
        "solo_config.json",
        "tokenizer.model",
        "solo_tokenizer.json",
        "latest_checkpointed_iteration.txt",
    }


def test_converted_megatron_model_equals_hf_mistral_on_text(hf_mistral, megatron_dir):
    from megatron.solo.convert.checkpoint import load_full_model

    hf, _ = hf_mistral
    model, meta = load_full_model(megatron_dir)  # saved with TP=2 padding, loaded at TP=1
    ids, pos, cu = text_batch()
    with torch.no_grad():
        want = hf(ids).logits
        got = model(ids, pos, cu, ids.shape[1])
    assert (got[..., :MISTRAL_VOCAB] - want).abs().max() <= 1e-5
    emb = model.embedding.word_embeddings.weight
    torch.testing.assert_close(emb[MISTRAL_VOCAB:SOLO_VOCAB], emb[:MISTRAL_VOCAB].mean(0).expand(1029, -1))
    assert torch.count_nonzero(emb[SOLO_VOCAB:]) == 0


def test_round_trip_to_hf_solo_is_exact_and_matches_megatron_with_an_image(
    hf_mistral, megatron_dir, tmp_path, tokenizer
):
    from megatron.solo.convert.checkpoint import load_full_model
    from megatron.solo.convert.hf_solo import SoloForCausalLM

    hf, _ = hf_mistral
    out = tmp_path / "hf-solo"
    # No --dtype: the export keeps the checkpoint's own (fp32 here), so the round trip is bit-exact.
    assert convert_checkpoint.main(["megatron-to-hf", "--load", str(megatron_dir), "--out", str(out)]) == 0
    solo = SoloForCausalLM.from_pretrained(out, dtype="auto").eval()
    assert solo.dtype == torch.float32
    assert solo.config.model_type == "solo" and solo.config.vocab_size == SOLO_VOCAB
    exported = solo.state_dict()
    for name, tensor in hf.state_dict().items():
        got = exported[name][:MISTRAL_VOCAB] if "embed_tokens" in name or "lm_head" in name else exported[name]
        assert torch.equal(got, tensor), name

    model, _ = load_full_model(megatron_dir)
    ids = torch.tensor([tokenizer.image_layout_ids(2, 3) + tokenizer.encode("a red square", bos=True)])
    indices = torch.full_like(ids, -1)
    is_patch = ids == tokenizer.vision_patch_id
    indices[is_patch] = torch.arange(6)
    patches = torch.randn(6, 3072, generator=torch.Generator().manual_seed(1))
    s = ids.shape[1]
    with torch.no_grad():
        want = solo(ids, vision_patch_indices=indices, vision_patches=patches).logits
        got = model(
            ids,
            torch.arange(s)[None],
            torch.tensor([0, s], dtype=torch.int32),
            s,
            patches,
            torch.nonzero(is_patch.reshape(-1)).squeeze(1),
        )
    assert (got[..., :SOLO_VOCAB] - want).abs().max() <= 1e-5


def test_layout_errors_name_the_flag(hf_mistral, megatron_world, tmp_path):
    with pytest.raises(ValueError, match="^tensor_model_parallel_size:"):
        convert_checkpoint.main(
            [
                "hf-to-megatron",
                "--hf-model",
                str(hf_mistral[1]),
                "--out",
                str(tmp_path / "x"),
                "--tensor-model-parallel-size",
                "3",
            ]
        )
    assert not (tmp_path / "x").exists()


def test_an_llm_with_a_tokenizer_json_converts_and_one_without_a_tokenizer_is_refused(megatron_world, tmp_path):
    """hf-to-megatron finds a tokenizer.json (Llama-3's kind) as well as a tokenizer.model; with neither it
    asks for --tokenizer-model."""
    from tiny_llama3 import llama3_tokenizer_dir

    from megatron.solo.checkpointing import CheckpointMetadata
    from megatron.solo.tokenizer import JsonSoloTokenizer, SoloTokenizer

    directory = tmp_path / "llm"
    _, base_ids = llama3_tokenizer_dir(directory)
    random_mistral(vocab_size=base_ids).save_pretrained(directory)
    out = tmp_path / "mg"
    assert convert_checkpoint.main(["hf-to-megatron", "--hf-model", str(directory), "--out", str(out)]) == 0
    tokenizer = SoloTokenizer.from_pretrained(out)
    assert (
        isinstance(tokenizer, JsonSoloTokenizer) and tokenizer.fingerprint() == SoloTokenizer(directory).fingerprint()
    )
    assert CheckpointMetadata.read(out).model.vocab_size == tokenizer.vocab_size

    for name in ("tokenizer.json", "tokenizer_config.json"):
        (directory / name).unlink()
    with pytest.raises(FileNotFoundError, match="no tokenizer .* pass --tokenizer-model"):
        convert_checkpoint.main(["hf-to-megatron", "--hf-model", str(directory), "--out", str(tmp_path / "none")])
