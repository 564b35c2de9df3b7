"""SoloTokenizer over an HF tokenizer.json (Llama-3's byte-level BPE kind), on a tiny Llama-3-style tokenizer
built offline: the text ids are transformers' ``AutoTokenizer``'s, the stack's specials follow the base's own
added tokens, text never becomes a special id, decoding is byte-exact, and persistence and the data fingerprint
round-trip and tell the two kinds apart."""

import json
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parent / "convert"))
from tiny_llama3 import SENTENCES, SPECIAL_NAMES, llama3_tokenizer_dir  # noqa: E402

from megatron.solo.tokenizer import (  # noqa: E402
    LOC_TOKENS,
    SPECIAL_TOKENS,
    VISION_TOKENS,
    JsonSoloTokenizer,
    SoloTokenizer,
    has_tokenizer,
)

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "  leading and  double  spaces\tand tabs\nand lines  ",
    "Größe, Übung, café, naïve — “quotes” 😀 and 日本語のテキスト",
    "photo number 12 of a series",
]


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("llama3-tok")
    llama3_tokenizer_dir(out)
    return out


@pytest.fixture(scope="module")
def tok(llama_dir) -> SoloTokenizer:
    return SoloTokenizer(llama_dir)


def test_a_tokenizer_json_directory_gives_the_json_kind(tok, llama_dir):
    assert isinstance(tok, JsonSoloTokenizer) and tok.kind == "tokenizers"
    assert has_tokenizer(llama_dir) and not has_tokenizer(llama_dir / "nothing")
    assert isinstance(SoloTokenizer(llama_dir / "tokenizer.json"), JsonSoloTokenizer)  # the file itself


def test_ids_equal_autotokenizers_for_plain_text(tok, llama_dir):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(llama_dir))
    for text in TEXTS + SENTENCES:
        assert tok.encode(text) == hf(text, add_special_tokens=False)["input_ids"], text
        assert tok.encode(text, bos=True) == hf(text)["input_ids"], text  # HF's post-processor adds BOS only
    assert (tok.bos_id, tok.eos_id) == (hf.bos_token_id, hf.eos_token_id)


def test_specials_follow_the_bases_own_added_tokens(tok, llama_dir):
    from tokenizers import Tokenizer

    backend = Tokenizer.from_file(str(llama_dir / "tokenizer.json"))
    total = backend.get_vocab_size(with_added_tokens=True)
    first = total - len(SPECIAL_NAMES)
    assert tok.base_vocab_size == total  # the base's special tokens are base ids
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (first, first + 1, first + 1)  # Llama-3's offsets: 0, 1
    assert tok.token_to_id("<|eot_id|>") == first + 9
    assert tok.vision_start_id == total and tok.vision_end_id == total + 4
    assert tok.loc_token_id(1) == total + 5 and tok.loc_token_id(1024) == total + len(SPECIAL_TOKENS) - 1
    assert tok.vocab_size == total + 1029
    for i, name in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(name) == total + i and tok.id_to_token(total + i) == name
    assert tok.id_to_token(first) == "<|begin_of_text|>"
    with pytest.raises(KeyError, match="outside the vocabulary"):
        tok.id_to_token(tok.vocab_size)
    with pytest.raises(KeyError, match="unknown token"):
        tok.token_to_id("<not a token>")


def test_text_never_becomes_a_special_id(tok):
    specials = set(range(tok.base_vocab_size, tok.vocab_size))
    base_specials = set(range(tok.bos_id, tok.base_vocab_size))
    for text in ["<vision>", "look: <vision><vpatch></vision> <loc_5>", "<|begin_of_text|>hi<|eot_id|>"]:
        ids = tok.encode(text)
        assert not specials & set(ids) and not base_specials & set(ids), (text, ids)
        assert tok.decode(ids) == text  # spelt out as ordinary text, byte for byte


@settings(max_examples=60, deadline=None)
@given(st.text(max_size=40))
def test_decode_inverts_encode_for_any_text(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_decode_joins_bytes_split_across_tokens_and_skips_vision_tokens(tok):
    text = "😀日本"  # multi-byte characters: unseen or rare, so split into byte pieces
    ids = tok.encode(text)
    assert len(ids) > len(text)  # some character spans several tokens
    assert tok.decode(ids) == text
    image = tok.image_layout_ids(2, 3)
    mixed = [tok.bos_id, *image, *tok.encode("a cat"), tok.loc_token_id(7), *tok.encode(" 😀"), tok.eos_id]
    assert tok.decode(mixed) == "a cat<loc_7> 😀"  # BOS/EOS and vision tokens are not text
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([tok.vocab_size])


def test_save_and_load_round_trip(tok, tmp_path):
    tok.save_pretrained(tmp_path)
    assert not (tmp_path / "tokenizer.model").exists() and not (tmp_path / "tokenizer.json").exists()
    assert (tmp_path / "solo_base_tokenizer.json").read_bytes() == tok.model_path.read_bytes()
    again = SoloTokenizer.from_pretrained(tmp_path)
    assert isinstance(again, JsonSoloTokenizer)
    assert again.metadata() == tok.metadata() and again.fingerprint() == tok.fingerprint()
    assert again.encode(TEXTS[2]) == tok.encode(TEXTS[2])
    meta = json.loads((tmp_path / "solo_tokenizer.json").read_text())
    assert meta["kind"] == "tokenizers" and meta["vision_start_id"] == tok.vision_start_id
    assert (meta["bos_token"], meta["eos_token"]) == ("<|begin_of_text|>", "<|end_of_text|>")

    # an HF tokenizer.json already there (an export's) is kept, and the saved base is what loads
    (tmp_path / "tokenizer.json").write_text("{}")
    tok.save_pretrained(tmp_path)
    assert (tmp_path / "tokenizer.json").read_text() == "{}"
    assert SoloTokenizer.from_pretrained(tmp_path).fingerprint() == tok.fingerprint()


def test_a_tampered_metadata_file_is_refused(tok, tmp_path):
    tok.save_pretrained(tmp_path)
    meta = json.loads((tmp_path / "solo_tokenizer.json").read_text())
    (tmp_path / "solo_tokenizer.json").write_text(json.dumps({**meta, "vision_start_id": 5}))
    with pytest.raises(ValueError, match="does not match"):
        SoloTokenizer.from_pretrained(tmp_path)


def test_fingerprints_tell_tokenizers_apart(tok, llama_dir, tmp_path, tokenizer):
    assert tok.fingerprint() != tokenizer.fingerprint()  # the SentencePiece kind (Mistral's)
    other = tmp_path / "other"
    llama3_tokenizer_dir(other, vocab_size=380)  # another vocabulary, same layout of names
    assert SoloTokenizer(other).fingerprint()["encoder_sha256"] != tok.fingerprint()["encoder_sha256"]
    # the instruct model's EOS (<|eot_id|>): the same encoder, another EOS, another fingerprint
    instruct = tmp_path / "instruct"
    instruct.mkdir()
    (instruct / "tokenizer.json").write_bytes((llama_dir / "tokenizer.json").read_bytes())
    config = json.loads((llama_dir / "tokenizer_config.json").read_text())
    (instruct / "tokenizer_config.json").write_text(json.dumps({**config, "eos_token": {"content": "<|eot_id|>"}}))
    chat = SoloTokenizer(instruct)
    assert chat.eos_id == tok.token_to_id("<|eot_id|>") and chat.fingerprint() != tok.fingerprint()


def test_bos_eos_without_a_config_and_bad_configs(llama_dir, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "tokenizer.json").write_bytes((llama_dir / "tokenizer.json").read_bytes())
    tok = SoloTokenizer(bare)  # no tokenizer_config.json: Llama-3's names are found in the vocabulary
    assert (tok.id_to_token(tok.bos_id), tok.id_to_token(tok.eos_id)) == ("<|begin_of_text|>", "<|end_of_text|>")
    (bare / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|nope|>"}))
    with pytest.raises(ValueError, match="eos_token '<|nope|>' is not in"):
        SoloTokenizer(bare)


def test_an_export_tokenizer_json_with_the_stacks_tokens_is_refused(llama_dir, tmp_path):
    from tokenizers import AddedToken, Tokenizer

    backend = Tokenizer.from_file(str(llama_dir / "tokenizer.json"))
    backend.add_tokens([AddedToken(t, special=t in VISION_TOKENS) for t in VISION_TOKENS + LOC_TOKENS[:2]])
    (tmp_path / "tokenizer.json").write_text(backend.to_str())
    with pytest.raises(ValueError, match="already has the stack's special token '<vision>'"):
        SoloTokenizer(tmp_path)


def test_a_directory_with_both_files_stays_sentencepiece(tokenizer, llama_dir, tmp_path):
    """A SOLO export holds tokenizer.model and its HF twin tokenizer.json: the SentencePiece model wins."""
    tokenizer.save_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").write_bytes((llama_dir / "tokenizer.json").read_bytes())
    again = SoloTokenizer.from_pretrained(tmp_path)
    assert type(again) is SoloTokenizer and again.fingerprint() == tokenizer.fingerprint()


def _instruct_dir(llama_dir: Path, out: Path) -> Path:
    """The same tokenizer.json with an Instruct config: EOS ``<|eot_id|>``."""
    out.mkdir()
    (out / "tokenizer.json").write_bytes((llama_dir / "tokenizer.json").read_bytes())
    config = json.loads((llama_dir / "tokenizer_config.json").read_text())
    (out / "tokenizer_config.json").write_text(json.dumps({**config, "eos_token": "<|eot_id|>"}))
    return out


def test_pickled_and_copied_tokenizers_keep_text_from_becoming_special_ids(tok):
    """DataLoader workers get a pickled tokenizer: text naming a base special token must stay text there too."""
    import copy
    import pickle

    text = "hello <|eot_id|> world <|begin_of_text|>"
    ids = tok.encode(text)
    assert tok.token_to_id("<|eot_id|>") not in ids and tok.bos_id not in ids
    for clone in (pickle.loads(pickle.dumps(tok)), copy.deepcopy(tok)):
        assert clone.encode(text) == ids and clone.fingerprint() == tok.fingerprint()


def test_saving_a_tokenizer_without_a_config_over_one_with_leaves_no_stale_config(llama_dir, tmp_path):
    instruct = SoloTokenizer(_instruct_dir(llama_dir, tmp_path / "instruct"))
    bare_dir = tmp_path / "bare"
    bare_dir.mkdir()
    (bare_dir / "tokenizer.json").write_bytes((llama_dir / "tokenizer.json").read_bytes())
    bare = SoloTokenizer(bare_dir)
    assert bare.eos_id != instruct.eos_id
    out = tmp_path / "ckpt"
    instruct.save_pretrained(out)
    bare.save_pretrained(out)
    assert not (out / "solo_base_tokenizer_config.json").exists()
    again = SoloTokenizer.from_pretrained(out)
    assert again.eos_id == bare.eos_id and again.fingerprint() == bare.fingerprint()


@pytest.mark.parametrize(
    "field, value", [("eos_id", 3), ("eos_token", "<|eot_id|>"), ("tokenizer_model_sha256", "0" * 64), ("kind", "x")]
)
def test_metadata_that_disagrees_in_any_field_is_refused(tok, tmp_path, field, value):
    tok.save_pretrained(tmp_path)
    meta = json.loads((tmp_path / "solo_tokenizer.json").read_text())
    (tmp_path / "solo_tokenizer.json").write_text(json.dumps({**meta, field: value}))
    with pytest.raises(ValueError, match=f"does not match .*{field} is"):
        SoloTokenizer.from_pretrained(tmp_path)


def test_sentencepiece_metadata_naming_the_json_kind_is_refused(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    assert SoloTokenizer.from_pretrained(tmp_path).fingerprint() == tokenizer.fingerprint()
    meta = json.loads((tmp_path / "solo_tokenizer.json").read_text())
    (tmp_path / "solo_tokenizer.json").write_text(json.dumps({**meta, "kind": "tokenizers"}))
    with pytest.raises(ValueError, match="kind is 'tokenizers' there but 'sentencepiece' here"):
        SoloTokenizer.from_pretrained(tmp_path)


def test_a_saved_base_file_named_directly_takes_its_own_config(llama_dir, tmp_path):
    """``ckpt/solo_base_tokenizer.json`` as a path: BOS/EOS from ``solo_base_tokenizer_config.json`` beside it,
    not from an HF twin's ``tokenizer_config.json`` there."""
    instruct = SoloTokenizer(_instruct_dir(llama_dir, tmp_path / "instruct"))
    out = tmp_path / "ckpt"
    instruct.save_pretrained(out)
    (out / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|end_of_text|>"}))  # the twin's
    direct = SoloTokenizer(out / "solo_base_tokenizer.json")
    assert direct.eos_id == instruct.eos_id and direct.fingerprint() == instruct.fingerprint()
