"""A Llama-3-8B start, in miniature and offline: a tiny random ``LlamaForCausalLM`` beside a byte-level BPE
``tokenizer.json`` with Llama-3's special-token names (tests/convert/tiny_llama3.py) → ``haplo-init`` (the LLM's
rows, the stack's ids after the base's 16 added tokens, the tokenizer carried) → data preprocessed with that
tokenizer → ``pretrain_solo.py`` trains two iterations (data made with another tokenizer is refused) → the export
loads with ``AutoModelForCausalLM``/``AutoProcessor`` (trust_remote_code), its processor gives preprocessing's ids
and it generates; ``hf-to-megatron`` reads the export back with the same tokenizer."""

import io
import json
import re
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "convert"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "training"))
from pretrain_helpers import losses, recipe_args, run_pretrain  # noqa: E402
from test_convert_export import chat_sample  # noqa: E402
from test_convert_export import test_chat_messages_and_a_padded_batch_are_preprocessings as check_chat  # noqa: E402
from test_convert_init import hf_weights, plain  # noqa: E402
from tiny_llama3 import SPECIAL_NAMES, llama3_dir  # noqa: E402

from megatron.solo import image as im  # noqa: E402

pytestmark = pytest.mark.timeout(600)
SEQ_LENGTH = 160


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    return llama3_dir(tmp_path_factory.mktemp("llama3") / "llm")


@pytest.fixture(scope="module")
def llama_tokenizer(llama):
    from megatron.solo.tokenizer import SoloTokenizer

    return SoloTokenizer(llama)


@pytest.fixture(scope="module")
def checkpoint(llama, tmp_path_factory, megatron_world) -> Path:
    from tools.convert_checkpoint import main

    out = tmp_path_factory.mktemp("llama3-init") / "ckpt"
    argv = ["haplo-init", "--llm", str(llama), "--pre-decoder-init", "random", "--preset", "haplo-tiny"]
    assert main([*argv, "--out", str(out)]) == 0
    return out


def preprocess(prefix: Path, records: list[dict], tokenizer_model: Path | None) -> str:
    from megatron.solo.data.encode import EncodeConfig
    from megatron.solo.data.packing import PackConfig
    from megatron.solo.data.pipeline import PreprocessConfig
    from megatron.solo.data.pipeline import preprocess as run
    from tools.preprocess_mm_data import haplo_tiling

    source = prefix.with_suffix(".jsonl")
    source.write_text("".join(json.dumps(r) + "\n" for r in records))
    config = PreprocessConfig(
        inputs=(str(source),),
        output_prefix=str(prefix),
        encode=EncodeConfig(layout="haplo", anyres=haplo_tiling(56), image_format="png"),
        pack=PackConfig(seq_length=SEQ_LENGTH),
        tokenizer_model=None if tokenizer_model is None else str(tokenizer_model),
        workers=0,
        progress=False,
    )
    run(config, stream=io.StringIO())
    return str(prefix)


@pytest.fixture(scope="module")
def records(tmp_path_factory, sample_photos) -> tuple[Path, list[dict]]:
    root = tmp_path_factory.mktemp("llama3-data")
    records = []
    for i, size in enumerate([(96, 64), (64, 96), (70, 50), (120, 120)]):
        path = root / f"photo{i}.png"
        im.load_image(sample_photos[i % len(sample_photos)]).resize(size).save(path)
        records.append({"image": path.name, "caption": f"photo number {i} of a series — Größe 😀"})
    return root, records


def test_init_carries_the_llms_rows_and_tokenizer(llama, llama_tokenizer, checkpoint):
    from megatron.solo.checkpointing import CheckpointMetadata
    from megatron.solo.tokenizer import JsonSoloTokenizer, SoloTokenizer

    hf_vocab = json.loads((llama / "config.json").read_text())["vocab_size"]
    assert llama_tokenizer.base_vocab_size == hf_vocab  # the 16 added tokens are base ids
    assert llama_tokenizer.vision_start_id == hf_vocab and llama_tokenizer.bos_id == hf_vocab - len(SPECIAL_NAMES)
    cfg = CheckpointMetadata.read(checkpoint).model
    assert cfg.vocab_size == hf_vocab + 1029
    saved = SoloTokenizer.from_pretrained(checkpoint)
    assert isinstance(saved, JsonSoloTokenizer) and saved.fingerprint() == llama_tokenizer.fingerprint()
    got, hf = plain(checkpoint), hf_weights(llama)
    for name, hf_name in (
        ("llm_embedding.weight", "model.embed_tokens.weight"),
        ("output_layer.weight", "lm_head.weight"),
    ):
        assert torch.equal(got[name][:hf_vocab], hf[hf_name]), name
        assert torch.allclose(got[name][hf_vocab : cfg.vocab_size], hf[hf_name].mean(0).expand(1029, -1))
    assert torch.equal(got["decoder.layers.1.mlp.linear_fc2.weight"], hf["model.layers.1.mlp.down_proj.weight"])


def test_stage2_trains_on_data_of_that_tokenizer_and_refuses_anothers(records, llama, checkpoint, tmp_path):
    from megatron.solo.data.packed_format import PackedDataset
    from megatron.solo.tokenizer import SoloTokenizer

    root, recs = records
    prefix = preprocess(root / "llama", recs, llama)
    mistral = preprocess(root / "mistral", recs, None)
    fingerprint = SoloTokenizer.from_pretrained(checkpoint).fingerprint()
    PackedDataset(prefix).check_tokenizer(fingerprint)
    # the trainer compares the data with the checkpoint's tokenizer before building the model (seconds)
    refused = run_pretrain(recipe_args(["1.0", mistral], str(checkpoint), SEQ_LENGTH, 2), expect_rc=None)
    assert refused.returncode != 0 and mistral in refused.stderr, refused.stderr[-3000:]
    assert re.search(r"mistral\.pack\.json: tokenizer\.\w+ is .*, but the run's tokenizer", refused.stderr)

    args = recipe_args(["1.0", prefix], str(checkpoint), SEQ_LENGTH, 2, "--metrics-file", str(tmp_path / "m"))
    run_pretrain([*args, "--save", str(tmp_path / "s2")])
    got = losses(tmp_path / "m")
    assert sorted(got) == [1, 2] and all(v == v and v > 0 for v in got.values()), got
    # the run found the checkpoint's tokenizer (so it checked the data's fingerprint) and saved it with its own
    assert SoloTokenizer.from_pretrained(tmp_path / "s2").fingerprint() == fingerprint


def test_the_export_loads_processes_like_preprocessing_and_generates(checkpoint, llama_tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM, AutoProcessor

    from megatron.solo.tokenizer import SoloTokenizer
    from tools.convert_checkpoint import main

    out = tmp_path / "hf"
    assert main(["megatron-to-hf", "--load", str(checkpoint), "--out", str(out), "--chat-template", "llama3"]) == 0
    assert not (out / "tokenizer.model").exists() and (out / "solo_base_tokenizer.json").is_file()
    processor = AutoProcessor.from_pretrained(out, trust_remote_code=True)
    assert processor.chat_format == "llama3" and "<|start_header_id|>" in processor.chat_template
    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32).eval()
    text = "Größe 😀 photo number"
    inputs = processor(text=text)
    assert inputs["input_ids"][0].tolist() == llama_tokenizer.encode(text, bos=True)
    assert processor.tokenizer.convert_tokens_to_ids("<vpatch>") == llama_tokenizer.vision_patch_id
    chat = processor.apply_chat_template([{"role": "user", "content": text}], tokenize=True)
    assert chat["input_ids"][0].tolist() == _llama3_prompt(llama_tokenizer, text)
    with torch.no_grad():
        generated = model.generate(**chat, max_new_tokens=4, do_sample=False)
    new = generated[0, chat["input_ids"].shape[1] :].tolist()
    assert 1 <= len(new) <= 4 and all(0 <= t < llama_tokenizer.vocab_size for t in new)
    assert not set(new) & set(llama_tokenizer.vision_token_ids)  # suppressed by the generation config
    # the base config's EOS is <|end_of_text|>; a llama3 chat answer ends with <|eot_id|>: both stop generation
    eot = llama_tokenizer.token_to_id("<|eot_id|>")
    assert llama_tokenizer.eos_id != eot and model.generation_config.eos_token_id == [llama_tokenizer.eos_id, eot]

    back = tmp_path / "back"
    assert main(["hf-to-megatron", "--hf-model", str(out), "--out", str(back)]) == 0
    assert SoloTokenizer.from_pretrained(back).fingerprint() == llama_tokenizer.fingerprint()
    before, after = plain(checkpoint), plain(back)
    assert torch.equal(before["output_layer.weight"], after["output_layer.weight"])


def test_the_processors_chat_and_batches_are_preprocessings(llama_tokenizer, sample_photos, tmp_path):
    """The Mistral-layout chat test of the SentencePiece export, with the Llama-3 tokenizer's HF twin: its
    BOS/EOS names (<|begin_of_text|>, <|end_of_text|>) replace <s>/</s> in the template and the processor."""
    check_chat(llama_tokenizer, sample_photos, tmp_path)


def test_llama3_generation_stops_at_the_end_of_a_turn(llama_tokenizer):
    """The export's stop ids and the evaluation runner's (also for an export whose generation config lists only
    EOS) include ``<|eot_id|>`` with the llama3 layout; the Mistral layout stops at EOS alone."""
    from transformers import GenerationConfig

    from megatron.solo.convert.haplo_export import haplo_processor, stop_token_ids
    from megatron.solo.evaluation.hf_runner import stop_token_ids as runner_stop_ids
    from megatron.solo.families import get_preset

    eos, eot = llama_tokenizer.eos_id, llama_tokenizer.token_to_id("<|eot_id|>")
    assert stop_token_ids(llama_tokenizer, "llama3") == [eos, eot]
    assert stop_token_ids(llama_tokenizer, "mistral") == [eos]
    cfg = get_preset("haplo-tiny")
    only_eos = GenerationConfig(eos_token_id=eos)
    assert runner_stop_ids(haplo_processor(cfg, llama_tokenizer, "llama3"), only_eos) == [eos, eot]
    assert runner_stop_ids(haplo_processor(cfg, llama_tokenizer, "mistral"), only_eos) == [eos]
    assert runner_stop_ids(
        haplo_processor(cfg, llama_tokenizer, "mistral"), GenerationConfig(eos_token_id=[eos, 7])
    ) == [
        eos,
        7,
    ]


def test_an_llm_with_more_rows_than_its_tokenizer_is_refused(llama, tmp_path):
    """The stack's ids would start inside the LLM's own rows (e.g. a padded embedding): refused, naming both."""
    import shutil

    from transformers import LlamaForCausalLM

    from megatron.solo.convert.haplo_init import haplo_init_checkpoint
    from megatron.solo.convert.name_table import ConversionError
    from megatron.solo.families import get_preset

    padded = tmp_path / "padded"
    model = LlamaForCausalLM.from_pretrained(llama)
    model.resize_token_embeddings(model.config.vocab_size + 8)
    model.save_pretrained(padded)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(llama / name, padded / name)
    with pytest.raises(ConversionError, match=r"the LLM has \d+ vocabulary rows but its tokenizer \d+ ids"):
        haplo_init_checkpoint(padded, tmp_path / "out", base=get_preset("haplo-tiny"))


def _llama3_prompt(tokenizer, text: str) -> list[int]:
    from megatron.solo.data.encode import EncodeConfig, encode_turns
    from megatron.solo.data.errors import Origin
    from megatron.solo.data.samples import Turn

    config = EncodeConfig(layout="haplo", chat_template="llama3", append_eod=False)
    return encode_turns((Turn("user", (text,)),), tokenizer, config, Origin("<test>"))[0].tolist()


def test_the_llama3_chat_layout_is_preprocessings_and_llama3s(llama, llama_tokenizer, sample_photos, tmp_path):
    """``chat_format="llama3"``: a system turn, images inside turns and a follow-up give preprocessing's
    ``--chat-template llama3`` ids; the text of a text-only chat is Llama-3-Instruct's own template's."""
    from tiny_llama3 import LLAMA3_CHAT_TEMPLATE
    from transformers import AutoTokenizer

    from megatron.solo.convert.haplo_export import haplo_processor
    from megatron.solo.data.encode import EncodeConfig, encode_turns
    from megatron.solo.data.errors import Origin
    from megatron.solo.families import get_preset
    from tools.preprocess_mm_data import haplo_tiling

    cfg = get_preset("haplo-tiny")
    processor = haplo_processor(cfg, llama_tokenizer, "llama3")
    messages, turns, (a, b) = chat_sample(sample_photos, tmp_path)
    out = processor.apply_chat_template(messages, tokenize=True)
    config = EncodeConfig(
        layout="haplo", anyres=haplo_tiling(cfg.tile_size), image_format="raw", chat_template="llama3", append_eod=False
    )
    ids, _, _ = encode_turns(turns, llama_tokenizer, config, Origin("<test>"))
    assert out["input_ids"][0].tolist() == ids.tolist()
    assert out["image_sizes"].tolist() == [[60, 150], [130, 40]]

    text_chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": " Größe? "}]
    official = AutoTokenizer.from_pretrained(str(llama)).apply_chat_template(
        text_chat, chat_template=LLAMA3_CHAT_TEMPLATE, add_generation_prompt=True, tokenize=False
    )
    assert processor.apply_chat_template(text_chat) == official
