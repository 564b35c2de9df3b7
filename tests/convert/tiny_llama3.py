"""A tiny Llama-3-style HF directory, built offline: a byte-level BPE ``tokenizer.json`` trained on a few
sentences with Llama-3's special-token names appended as added tokens (``<|begin_of_text|>`` first,
``<|eot_id|>`` at offset 9, reserved names filling the block), its ``tokenizer_config.json`` (BOS/EOS as the
base Llama-3-8B names them), and optionally a tiny random ``LlamaForCausalLM`` with that vocabulary."""

from __future__ import annotations

import json
from pathlib import Path

import torch

SENTENCES = [
    "photo number one of a series of sixteen",
    "The quick brown fox jumps over the lazy dog.",
    "Document 3: word1 word8 word15 word22 and more words",
    "Ein Bild sagt mehr als tausend Worte. Größe, Übung, café, naïve.",
    "日本語のテキストも少し。東京は大きい。",
    "numbers 0123456789 and symbols !?.,;:()[]<>",
]
# Llama-3's pre-tokenizer split (its tokenizer.json), then byte-level pieces without GPT-2's own split
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Llama-3-8B-Instruct's chat template (its tokenizer_config.json), the reference the "llama3" layout is checked on
LLAMA3_CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
NUM_SPECIALS = 16  # Llama-3 has 256; the names that matter keep their offsets
SPECIAL_NAMES = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|reserved_special_token_2|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
    "<|python_tag|>",
] + [f"<|reserved_special_token_{i}|>" for i in range(3, 3 + NUM_SPECIALS - 11)]


def llama3_tokenizer_dir(out: Path, vocab_size: int = 400) -> tuple[int, int]:
    """Write tokenizer.json + tokenizer_config.json into ``out``; returns (BPE pieces, total ids)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(SENTENCES, trainer)
    base = tok.get_vocab_size()
    tok.add_special_tokens(SPECIAL_NAMES)
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A",
        pair="<|begin_of_text|> $A <|begin_of_text|> $B",
        special_tokens=[("<|begin_of_text|>", base)],
    )
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    config = {
        "bos_token": "<|begin_of_text|>",
        "eos_token": "<|end_of_text|>",
        "clean_up_tokenization_spaces": True,
        "model_max_length": 131072,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return base, base + len(SPECIAL_NAMES)


def llama3_dir(out: Path, seed: int = 3) -> Path:
    """A tiny random ``LlamaForCausalLM`` (fp32) beside the tokenizer: a Llama-3-8B-shaped source, miniature."""
    from tiny_models import TINY
    from transformers import LlamaConfig, LlamaForCausalLM

    _, total = llama3_tokenizer_dir(out)
    config = LlamaConfig(
        **{
            **TINY,
            "vocab_size": total,
            "max_position_embeddings": 4096,
            "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0},
        },
        bos_token_id=total - len(SPECIAL_NAMES),
        eos_token_id=total - len(SPECIAL_NAMES) + 1,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    model.save_pretrained(out)
    return out
