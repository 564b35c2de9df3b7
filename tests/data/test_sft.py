"""SOLO's released SFT layout (``sft`` format): rows as the released set has them → exactly the recipe's
targets (answers and their ``</s>`` only, ``[INST] … [/INST]`` around questions, one image first), the odd
rows, and per-sample truncation that is counted and named."""

import json

import pytest
from data_helpers import output_bytes, write_jsonl

from megatron.solo import image as im
from megatron.solo.data import sources
from megatron.solo.data.encode import EncodeConfig
from megatron.solo.data.errors import Origin, SampleError
from megatron.solo.data.packed_format import PackedDataset
from megatron.solo.data.samples import parse_record
from megatron.solo.data.sources import RawRecord


class Doc:
    """Expected (tokens, targets) of one document, built piece by piece from the documented layout."""

    def __init__(self, tok):
        self.tok, self.tokens, self.targets = tok, [tok.bos_id], [False]

    def ask(self, text, image=None):
        self._add(self.tok.encode("[INST]"), False)
        if image is not None:
            self._add(self.tok.image_token_ids(*im.process_image(image).original_size), False)
        self._add(self.tok.encode(text), False)
        self._add(self.tok.encode("[/INST]"), False)
        return self

    def answer(self, text):
        self._add(self.tok.encode(text) if text else [], True)
        self._add([self.tok.eos_id], True)  # every answer's </s> is learnt, an empty answer's too
        return self

    def _add(self, ids, target):
        self.tokens += ids
        self.targets += [target] * len(ids)


def documents(prefix):
    out = []
    for view in PackedDataset(prefix):
        b = view.doc_offsets.tolist()
        out += [(view.tokens[x:y].tolist(), view.targets[x:y].tolist()) for x, y in zip(b, b[1:])]
    return out


def released_rows(photos):
    """Rows exactly in the released layout, odd ones included (the first has string turns: auto-detected)."""
    return [
        {"conversations": ["Say hi.", "Hi!"]},  # plain-string turns, no image: text-only
        {
            "id": "x1",
            "image": photos[1].name,
            "conversations": [
                {"from": "human", "value": "<image>\nWhat is shown?"},
                {"from": "gpt", "value": "A tall photo."},
                {"from": "human", "value": "Colour?"},
                {"from": "gpt", "value": "Mostly grey."},
            ],
        },
        {
            "image": photos[2].name,
            "conversations": [  # tag after the text; odd number of turns
                {"from": "human", "value": "Describe.\n<image>"},
                {"from": "gpt", "value": "Wide."},
                {"from": "human", "value": "Anything else?"},
            ],
        },
        {
            "conversations": [  # an empty answer; role names are not read (parity decides)
                {"from": "gpt", "value": "Nothing to say?"},
                {"from": "human", "value": ""},
                "And now?",
                {"from": "gpt", "value": "Now yes."},
            ]
        },
        {"conversations": ["Last one empty?", ""]},  # the final answer is empty: only its </s> is learnt
        {"image": photos[0].name, "conversations": ["<image> Just a question."]},  # nothing to learn
    ]


def expected_documents(tok, photos):
    return [
        Doc(tok).ask("Say hi.").answer("Hi!"),
        Doc(tok).ask("What is shown?", photos[1]).answer("A tall photo.").ask("Colour?").answer("Mostly grey."),
        Doc(tok).ask("Describe.", photos[2]).answer("Wide."),
        Doc(tok).ask("Nothing to say?").answer("").ask("And now?").answer("Now yes."),
        Doc(tok).ask("Last one empty?").answer(""),
    ]


def test_released_rows_give_exactly_the_recipes_targets(tmp_path, small_photos, tokenizer, run_preprocess):
    path = write_jsonl(tmp_path / "all_data.jsonl", released_rows(small_photos))
    prefix, stats = run_preprocess([path], image_root=str(small_photos[0].parent))  # format auto-detected
    assert stats["input_format"] == "sft"
    assert stats["skipped"] == {"no_targets": 1} and stats["truncated_samples"] == 0
    got = documents(prefix)
    want = expected_documents(tokenizer, small_photos)
    assert [g[0] for g in got] == [w.tokens for w in want]
    assert [g[1] for g in got] == [w.targets for w in want]
    (error,) = map(json.loads, open(prefix + ".errors.jsonl"))
    assert (error["line"], error["reason"]) == (6, "no_targets")


def test_detection_tells_sft_from_llava_and_chat():
    assert sources.classify({"conversations": ["q", {"from": "gpt", "value": "a"}]}) == "sft"
    assert sources.classify({"image": "a.jpg", "conversations": [{"from": "human", "value": "<image>\nq"}]}) == "llava"
    assert sources.classify({"conversations": [{"role": "user", "content": "q"}]}) == "chat"


@pytest.mark.parametrize(
    "row, reason",
    [
        ({"conversations": "q"}, "bad_field"),
        ({"conversations": []}, "bad_field"),
        ({"conversations": ["q", 3]}, "bad_field"),
        ({"conversations": ["q", {"from": "gpt"}]}, "missing_field"),
        ({"conversations": ["q", {"from": "gpt", "value": ["a"]}]}, "bad_field"),
        ({"image": 5, "conversations": ["q", "a"]}, "bad_field"),
        ({"image": "../x.jpg", "conversations": ["q", "a"]}, "outside_root"),
        ({"messages": ["q", "a"]}, "missing_field"),
    ],
)
def test_bad_sft_rows_have_named_reasons(row, reason, tmp_path):
    record = RawRecord(Origin("sft.jsonl", line=3), json.dumps(row).encode())
    with pytest.raises(SampleError) as err:
        parse_record(record, "sft", image_root=str(tmp_path))
    assert err.value.reason == reason and "sft.jsonl:3" in str(err.value)


def test_truncation_is_counted_named_and_keeps_images_whole(tmp_path, small_photos, tokenizer, run_preprocess):
    long_answer = " ".join(f"word{i}" for i in range(200))
    rows = [
        {"conversations": ["Count.", long_answer]},  # cut inside the answer
        {"conversations": ["Short.", "Fine."]},  # fits
        {"image": small_photos[5].name, "conversations": ["<image>\nLook.", "Done."]},  # cut would split the image
    ]
    path = write_jsonl(tmp_path / "sft.jsonl", rows)
    limit = 40
    prefix, stats = run_preprocess(
        [path],
        input_format="sft",
        image_root=str(small_photos[0].parent),
        encode=EncodeConfig(image_format="png", max_sample_length=limit),
    )
    full = Doc(tokenizer).ask("Count.").answer(long_answer)
    assert stats["truncated_samples"] == 1 and stats["truncated_sample_tokens"] == len(full.tokens) - limit
    assert stats["skipped"] == {"too_long": 1} and stats["max_sample_length"] == limit
    got = documents(prefix)
    assert got[0] == (full.tokens[:limit], full.targets[:limit])  # no </s>: the sample did not end
    short = Doc(tokenizer).ask("Short.").answer("Fine.")
    assert got[1] == (short.tokens, short.targets)
    lines = [json.loads(line) for line in open(prefix + ".errors.jsonl")]
    assert [(e["line"], e["reason"]) for e in lines] == [(1, "truncated"), (3, "too_long")]
    assert f"{len(full.tokens)} tokens > --max-sample-length {limit}: kept the first {limit}" == lines[0]["detail"]


def test_sft_output_is_byte_identical_across_worker_counts(tmp_path, small_photos, run_preprocess):
    rows = released_rows(small_photos) * 3 + [{"conversations": ["Long?", " ".join(["yes"] * 100)]}]
    path = write_jsonl(tmp_path / "sft.jsonl", rows)
    enc = EncodeConfig(image_format="png", max_sample_length=48)
    kw = dict(image_root=str(small_photos[0].parent), encode=enc, seq_length=128)
    in_process, stats = run_preprocess([path], "w0", workers=0, **kw)
    two, _ = run_preprocess([path], "w2", workers=2, **kw)
    assert stats["truncated_samples"] >= 1
    assert output_bytes(in_process) == output_bytes(two)


def test_max_sample_length_above_seq_length_is_refused(tmp_path):
    from megatron.solo.data.packing import PackConfig
    from megatron.solo.data.pipeline import PreprocessConfig

    with pytest.raises(ValueError, match="--max-sample-length 8192 exceeds --seq-length 4096"):
        PreprocessConfig(
            inputs=("x.jsonl",),
            output_prefix=str(tmp_path / "o"),
            pack=PackConfig(seq_length=4096),
            encode=EncodeConfig(max_sample_length=8192),
        )
