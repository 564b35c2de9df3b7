"""The ``llama3`` chat template: a text conversation's ids are what transformers gives with Llama-3-Instruct's own
chat template on the same tokenizer (a tiny Llama-3-style one, tests/convert/tiny_llama3.py); the targets are the
assistant turns' text and their ``<|eot_id|>``; Mistral's tokenizer is refused for it."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "convert"))
from tiny_llama3 import LLAMA3_CHAT_TEMPLATE, llama3_tokenizer_dir  # noqa: E402

from megatron.solo.data.encode import EncodeConfig, check_template, encode_sample  # noqa: E402
from megatron.solo.data.errors import Origin  # noqa: E402
from megatron.solo.data.samples import ImageRef, Sample, Turn  # noqa: E402

ORIGIN = Origin("in.jsonl", line=3)
LLAMA3 = EncodeConfig(chat_template="llama3", image_format="png")
CHATS = [
    [("user", "What is in the photo?"), ("assistant", "A brown fox.")],
    [("system", "Answer briefly."), ("user", "Größe?"), ("assistant", "Groß 😀"), ("user", "And two plus two?")],
    [("user", "Hi"), ("assistant", "Hello there."), ("user", "numbers 0123456789"), ("assistant", "ok")],
]


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    from megatron.solo.tokenizer import SoloTokenizer

    out = tmp_path_factory.mktemp("llama3-tok")
    llama3_tokenizer_dir(out)
    return SoloTokenizer(out), out


def doc(turns, tokenizer, config=LLAMA3):
    return encode_sample(Sample(tuple(Turn(r, (t,)) for r, t in turns), ORIGIN), tokenizer, config)


@pytest.mark.parametrize("chat", [0, 2])  # conversations ending with an answer (a prompt: the next test)
def test_ids_are_transformers_llama3_chat_template(llama, chat):
    from transformers import AutoTokenizer

    tok, directory = llama
    want = AutoTokenizer.from_pretrained(str(directory)).apply_chat_template(
        [{"role": r, "content": t} for r, t in CHATS[chat]],
        chat_template=LLAMA3_CHAT_TEMPLATE,
        tokenize=True,
        return_dict=False,
    )
    got = doc(CHATS[chat], tok, EncodeConfig(chat_template="llama3", append_eod=False))
    assert got.tokens.tolist() == list(want)


def test_a_generation_prompt_ends_with_the_assistant_header(llama):
    from transformers import AutoTokenizer

    from megatron.solo.data.encode import encode_turns

    tok, directory = llama
    turns = CHATS[1]
    want = AutoTokenizer.from_pretrained(str(directory)).apply_chat_template(
        [{"role": r, "content": t} for r, t in turns],
        chat_template=LLAMA3_CHAT_TEMPLATE,
        add_generation_prompt=True,
        tokenize=True,
        return_dict=False,
    )
    ids, targets, _ = encode_turns(tuple(Turn(r, (t,)) for r, t in turns), tok, LLAMA3, ORIGIN)
    assert ids.tolist() == list(want) and tok.decode(ids[-3:]).endswith("\n\n")
    answer = tok.encode("Groß 😀") + [tok.token_to_id("<|eot_id|>")]
    assert tok.decode(ids[targets]) == tok.decode(answer)  # only the assistant turn (and its <|eot_id|>) is learnt


def test_targets_are_the_answers_and_their_end_of_turn(llama):
    tok, _ = llama
    got = doc(CHATS[2], tok)
    eot, eos = tok.token_to_id("<|eot_id|>"), tok.eos_id
    assert got.tokens[-1] == eos and got.tokens[-2] == eot and got.targets[-1]  # --append-eod after the last turn
    learnt = got.tokens[got.targets].tolist()
    assert learnt == tok.encode("Hello there.") + [eot] + tok.encode("ok") + [eot, eos]
    assert not got.targets[: len(tok.encode("Hi")) + 6].any()  # BOS, the user header and turn: context only


def test_an_instruct_eos_is_not_doubled(llama, tmp_path):
    from megatron.solo.tokenizer import SoloTokenizer

    _, directory = llama
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((directory / name).read_bytes())
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "eos_token": "<|eot_id|>"}))
    tok = SoloTokenizer(tmp_path)
    got = doc(CHATS[0], tok)
    assert got.tokens[-1] == tok.eos_id and got.tokens[-2] != tok.eos_id


def test_images_sit_in_their_turn_and_are_not_targets(llama, tmp_path):
    from PIL import Image

    tok, _ = llama
    path = tmp_path / "a.png"
    Image.new("RGB", (64, 32), (200, 30, 30)).save(path)
    sample = Sample((Turn("user", (ImageRef(str(path)), "Color?")), Turn("assistant", ("Red.",))), ORIGIN)
    got = encode_sample(sample, tok, LLAMA3)
    (image,) = got.images
    header = [tok.bos_id, tok.token_to_id("<|start_header_id|>"), *tok.encode("user")]
    header += [tok.token_to_id("<|end_header_id|>"), *tok.encode("\n\n")]
    assert got.tokens[: len(header)].tolist() == header and image.position == len(header)
    after = image.position + image.num_tokens
    assert got.tokens[after : after + len(tok.encode("Color?"))].tolist() == tok.encode("Color?")
    assert not got.targets[: after + len(tok.encode("Color?")) + 1].any()
    assert np.array_equal(got.tokens[got.targets], tok.encode("Red.") + [tok.token_to_id("<|eot_id|>"), tok.eos_id])


def test_mistrals_tokenizer_is_refused_for_llama3(tokenizer, llama):
    check_template(tokenizer, "mistral")
    check_template(llama[0], "llama3")
    with pytest.raises(ValueError, match=r"llama3 needs the tokenizer's <\|start_header_id\|>"):
        check_template(tokenizer, "llama3")


def test_a_resumed_run_sees_a_changed_tokenizer_config(llama, tmp_path):
    """An Instruct config (EOS ``<|eot_id|>``) beside the same tokenizer.json changes the resume fingerprint: a
    ``--resume`` rerun remakes the data (whose header then names the Instruct EOS) instead of keeping the base's."""
    import io
    import shutil

    from megatron.solo.data.packed_format import PackedDataset
    from megatron.solo.data.packing import PackConfig
    from megatron.solo.data.pipeline import PreprocessConfig, preprocess
    from megatron.solo.tokenizer import SoloTokenizer

    _, base = llama
    instruct = tmp_path / "instruct"
    instruct.mkdir()
    shutil.copyfile(base / "tokenizer.json", instruct / "tokenizer.json")
    config = json.loads((base / "tokenizer_config.json").read_text())
    (instruct / "tokenizer_config.json").write_text(json.dumps({**config, "eos_token": "<|eot_id|>"}))
    source = tmp_path / "in.jsonl"
    source.write_text('{"text": "The quick brown fox."}\n')

    def run(tokenizer_dir):
        cfg = PreprocessConfig(
            inputs=(str(source),),
            output_prefix=str(tmp_path / "out"),
            tokenizer_model=str(tokenizer_dir),
            pack=PackConfig(seq_length=64),
            workers=0,
            resume=True,
            progress=False,
        )
        return preprocess(cfg, stream=io.StringIO())

    first = run(base)
    second = run(instruct)
    assert first["fingerprint"] != second["fingerprint"]
    fingerprint = SoloTokenizer(instruct).fingerprint()
    assert fingerprint["eos_id"] == SoloTokenizer(instruct).token_to_id("<|eot_id|>")
    data = PackedDataset(str(tmp_path / "out"))  # held: a pack's view reads the dataset's memory map
    data.check_tokenizer(fingerprint)
    assert data[0].tokens.tolist()[-1] == fingerprint["eos_id"]


def test_inspecting_a_pack_names_the_tokenizers_own_bos_eos_and_chat_markers(llama, tmp_path):
    import io

    from megatron.solo.data.describe import describe_pack
    from megatron.solo.data.packed_format import PackedDataset
    from megatron.solo.data.packing import PackConfig
    from megatron.solo.data.pipeline import PreprocessConfig, preprocess

    tok, directory = llama
    source = tmp_path / "in.jsonl"
    chat = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "A fox."}]}
    source.write_text(json.dumps(chat) + "\n")
    cfg = PreprocessConfig(
        inputs=(str(source),),
        output_prefix=str(tmp_path / "out"),
        tokenizer_model=str(directory),
        encode=EncodeConfig(chat_template="llama3"),
        pack=PackConfig(seq_length=64),
        workers=0,
        progress=False,
    )
    preprocess(cfg, stream=io.StringIO())
    data = PackedDataset(str(tmp_path / "out"))
    text = describe_pack(data[0], tok).replace("\n  ", "\n")  # the document's lines are indented
    user = "<|begin_of_text|><|start_header_id|>⟦user⟧<|end_header_id|>⟦\n\nHi⟧<|eot_id|>"
    assistant = "<|start_header_id|>⟦assistant⟧<|end_header_id|>⟦\n\n⟧A fox.<|eot_id|><|end_of_text|>"
    assert user + assistant in text and "<s>" not in text
