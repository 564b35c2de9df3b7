"""SoloTokenizer: the id layout of the released SOLO-7B, text safety, image layout, persistence."""

import hashlib

import pytest
from hypothesis import given
from hypothesis import strategies as st
from sentencepiece import sentencepiece_model_pb2

from megatron.solo import tokenizer as T
from megatron.solo.image import num_image_tokens
from megatron.solo.tokenizer import SoloTokenizer, padded_vocab_size

# fmt: off
# A 64x96 image (2 columns x 3 rows of patches), then "<s>[INST] What is in the image? [/INST]":
# the released model's inference prompt order (image block first, reference spec §8.1), with </vision>.
GOLDEN_IMAGE_PROMPT = [
    32000, 32001, 32001, 32002, 32001, 32001, 32002, 32001, 32001, 32004,
    1, 733, 16289, 28793, 1824, 349, 297, 272, 3469, 28804, 733, 28748, 16289, 28793,
]
# fmt: on


def test_golden_image_and_prompt(tokenizer):
    ids = tokenizer.image_token_ids(64, 96) + tokenizer.encode("[INST] What is in the image? [/INST]", bos=True)
    assert ids == GOLDEN_IMAGE_PROMPT


def test_default_is_real_mistral_v01_tokenizer(tokenizer):
    assert hashlib.sha256(T.default_tokenizer_model().read_bytes()).hexdigest() == T.MISTRAL_V01_SHA256
    assert (tokenizer.base_vocab_size, tokenizer.unk_id, tokenizer.bos_id, tokenizer.eos_id) == (32000, 0, 1, 2)
    assert tokenizer.pad_id == tokenizer.eos_id  # Mistral has no pad piece; the reference pads with EOS


def test_reference_id_layout(tokenizer):
    expected = {
        "<vision>": 32000,
        "<vpatch>": 32001,
        "<vrow_sep>": 32002,
        "<vframe_sep>": 32003,
        "</vision>": 32004,
        "<loc_1>": 32005,
        "<loc_512>": 32516,
        "<loc_1024>": 33028,
    }
    for token, idx in expected.items():
        assert tokenizer.token_to_id(token) == idx
        assert tokenizer.id_to_token(idx) == token
    assert (
        tokenizer.vision_start_id,
        tokenizer.vision_patch_id,
        tokenizer.vision_row_sep_id,
        tokenizer.vision_frame_sep_id,
        tokenizer.vision_end_id,
    ) == (32000, 32001, 32002, 32003, 32004)
    assert tokenizer.loc_token_id(1) == 32005 and tokenizer.loc_token_id(1024) == 33028
    assert tokenizer.vocab_size == len(tokenizer) == 33029
    assert tokenizer.token_to_id("▁the") == 272 and tokenizer.token_to_id("<s>") == 1
    with pytest.raises(KeyError, match="unknown token"):
        tokenizer.token_to_id("<not a piece>")
    with pytest.raises(ValueError, match="location bin"):
        tokenizer.loc_token_id(1025)


def test_padded_vocab_size(tokenizer):
    assert tokenizer.padded_vocab_size(1) == 33152
    assert tokenizer.padded_vocab_size(2) == 33280
    assert tokenizer.padded_vocab_size(8) == 33792
    assert padded_vocab_size(32000, 1) == 32000 and padded_vocab_size(32001, 1) == 32128


@pytest.mark.parametrize("text", ["<vision>", "look: <vision><vpatch><vrow_sep></vision> <loc_7> done", "</s><s>"])
def test_text_never_becomes_special_ids(tokenizer, text):
    ids = tokenizer.encode(text)
    assert all(0 <= i < 32000 for i in ids)
    assert tokenizer.decode(ids) == text


@given(st.text(max_size=200).filter(lambda s: "\u2581" not in s))  # "▁" is SentencePiece's space symbol
def test_encode_decode_round_trip(tokenizer, text):
    ids = tokenizer.encode(text)
    assert all(i < tokenizer.base_vocab_size for i in ids)
    assert tokenizer.decode(ids) == text


def test_decode_skips_vision_tokens_and_keeps_spacing(tokenizer):
    ids = tokenizer.encode("A cat") + tokenizer.image_token_ids(100, 50) + tokenizer.encode("and a dog", eos=True)
    assert tokenizer.decode(ids) == "A cat and a dog"
    after_bos = tokenizer.encode("hi") + tokenizer.image_token_ids(64, 64) + tokenizer.encode("there", bos=True)
    assert tokenizer.decode(after_bos) == "hi there"
    assert tokenizer.decode(tokenizer.image_token_ids(64, 64)) == ""
    assert tokenizer.decode(tokenizer.encode("box") + [tokenizer.loc_token_id(3)]) == "box<loc_3>"
    with pytest.raises(ValueError, match="cannot decode id 33100"):
        tokenizer.decode([1, 33100])


@given(st.integers(1, 32), st.integers(1, 32))
def test_image_layout(tokenizer, rows, cols):
    ids = tokenizer.image_layout_ids(rows, cols)
    assert ids[0] == 32000 and ids[-1] == 32004
    assert ids.count(32001) == rows * cols and ids.count(32002) == rows - 1
    body = ids[1:-1]
    for r in range(rows):  # each row is `cols` patches, separated (not terminated) by <vrow_sep>
        assert body[r * (cols + 1) : r * (cols + 1) + cols] == [32001] * cols
        if r < rows - 1:
            assert body[r * (cols + 1) + cols] == 32002
    assert len(ids) == num_image_tokens(cols * 32, rows * 32)


def test_image_token_ids_apply_the_size_rule(tokenizer):
    assert tokenizer.image_token_ids(1920, 1080) == tokenizer.image_layout_ids(18, 32)
    assert tokenizer.image_token_ids(300, 2000) == tokenizer.image_layout_ids(32, 5)
    assert len(tokenizer.image_token_ids(1024, 1024)) == 1057


def test_sft_closer_quirk_is_opt_in(tokenizer):
    ids = tokenizer.image_token_ids(64, 64, end_token="<vision>")
    assert ids[-1] == 32000 and ids[:-1] == tokenizer.image_token_ids(64, 64)[:-1]
    with pytest.raises(ValueError, match="end_token"):
        tokenizer.image_token_ids(64, 64, end_token="<vpatch>")


def test_save_and_load(tokenizer, tmp_path):
    out = tokenizer.save_pretrained(tmp_path / "tok")
    assert sorted(p.name for p in out.iterdir()) == ["solo_tokenizer.json", "tokenizer.model"]
    loaded = SoloTokenizer.from_pretrained(out)
    assert loaded.metadata() == tokenizer.metadata()
    assert SoloTokenizer(out).encode("Hello world") == tokenizer.encode("Hello world")
    assert loaded.image_token_ids(640, 480) == tokenizer.image_token_ids(640, 480)


def test_load_rejects_metadata_of_another_layout(tokenizer, tmp_path):
    out = tokenizer.save_pretrained(tmp_path / "tok")
    (out / "solo_tokenizer.json").write_text('{"vocab_size": 40000, "vision_start_id": 1}')
    with pytest.raises(ValueError, match="does not match"):
        SoloTokenizer.from_pretrained(out)


def test_missing_model_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer model not found"):
        SoloTokenizer(tmp_path / "nothing.model")


# --- tokenizers that already carry SOLO's pieces (the released SOLO-7B has 33029) ---------------


def _extended_model(tmp_path, names, piece_type="NORMAL"):
    """Append pieces to Mistral's proto the way the reference's create_solo.py does."""
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(T.default_tokenizer_model().read_bytes())
    kind = getattr(sentencepiece_model_pb2.ModelProto.SentencePiece, piece_type)
    for name in names:
        piece = proto.pieces.add()
        piece.piece, piece.score, piece.type = name, 0.0, kind
    path = tmp_path / f"{piece_type}-{len(names)}.model"
    path.write_bytes(proto.SerializeToString())
    return path


@pytest.mark.parametrize("piece_type", ["NORMAL", "USER_DEFINED"])
def test_solo7b_style_tokenizer_has_the_same_ids(tokenizer, tmp_path, piece_type):
    solo = SoloTokenizer(_extended_model(tmp_path, T.SPECIAL_TOKENS, piece_type))
    assert solo.vocab_size == 33029 and solo.base_vocab_size == 32000
    assert solo.image_token_ids(64, 96) == tokenizer.image_token_ids(64, 96)
    text = "see <vision><vpatch></vision> here"
    # USER_DEFINED pieces would otherwise match inside text; the encoder only knows the base pieces.
    assert solo.encode(text) == tokenizer.encode(text)


def test_extra_pieces_after_the_solo_block_are_kept(tmp_path):
    solo = SoloTokenizer(_extended_model(tmp_path, T.SPECIAL_TOKENS + ("<|im_start|>", "<|im_end|>")))
    assert solo.vocab_size == 33031
    assert solo.token_to_id("<|im_start|>") == 33029 and solo.token_to_id("<|im_end|>") == 33030
    assert solo.metadata()["extra_special_tokens"] == ["<|im_start|>", "<|im_end|>"]


def test_broken_special_block_is_rejected(tmp_path):
    path = _extended_model(tmp_path, ("<vision>", "<vpatch>", "<oops>"))
    with pytest.raises(ValueError, match=r"id 32002 is '<oops>', expected '<vrow_sep>'"):
        SoloTokenizer(path)
