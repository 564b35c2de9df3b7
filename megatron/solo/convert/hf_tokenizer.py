"""An HF fast tokenizer with :class:`SoloTokenizer`'s ids, built offline from its ``tokenizer.model``.

``AutoTokenizer.from_pretrained(export_dir)`` then gives SOLO's ids (``<vision>`` = 32000 … ``<loc_1024>`` =
33028) and the same text ids as SentencePiece. Two details make the text ids match:

* merges are ranked by SentencePiece *score*, not by id. transformers 5's own conversion of a
  ``tokenizer.model`` ranks by id, which in Mistral's vocabulary puts the whitespace pieces (``▁▁``, score
  -1e9) first and splits text differently from SentencePiece wherever two spaces meet;
* the normaliser is SentencePiece's (prepend ``▁``, spaces → ``▁``) and nothing is pre-split, and the
  tokenizer is saved as a plain ``PreTrainedTokenizerFast``: ``LlamaTokenizer`` would rebuild its own
  Metaspace pre-tokenizer on load, which drops the dummy prefix before a leading space.

Differences that remain, by design: this tokenizer turns the literal text ``<vision>`` into the special id
(SoloTokenizer never does; it encodes specials by id only), and, like every HF tokenizer, it encodes a
string that follows an added token as a new segment with its own ``▁`` prefix.
``<loc_k>`` tokens are added as *non-special* tokens so ``decode(..., skip_special_tokens=True)`` keeps
them and drops only the vision tokens, like ``SoloTokenizer.decode``.

A tokenizer of the ``tokenizers`` kind (Llama-3's ``tokenizer.json``) needs no rebuilding: its twin is the base
``tokenizer.json`` itself (its normaliser, pre-tokeniser, post-processor and added tokens unchanged) with the
stack's tokens added after it, so text ids are the base's. Unlike ``SoloTokenizer`` it maps the base's special
tokens written in text (``<|eot_id|>``) to their ids, as every HF tokenizer of that base does.
"""

from __future__ import annotations

from tokenizers import AddedToken, Tokenizer, decoders, normalizers, processors
from tokenizers.models import BPE
from transformers import PreTrainedTokenizerFast

from megatron.solo.tokenizer import VISION_TOKENS, SoloTokenizer


def build_hf_tokenizer(tokenizer: SoloTokenizer) -> PreTrainedTokenizerFast:
    """The fast-tokenizer twin of ``tokenizer``; raises if any special id would differ."""
    if tokenizer.kind == "tokenizers":
        return _json_twin(tokenizer)
    pieces = _base_pieces(tokenizer)
    vocab = {piece: i for i, (piece, _) in enumerate(pieces)}
    backend = Tokenizer(BPE(vocab=vocab, merges=_merges_by_score(pieces, vocab), fuse_unk=True, byte_fallback=True))
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    bos, eos, unk = (tokenizer.id_to_token(i) for i in (tokenizer.bos_id, tokenizer.eos_id, tokenizer.unk_id))
    # Mistral's HF tokenizer adds <s> in front of every encoded text (add_special_tokens=True).
    backend.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tokenizer.bos_id)]
    )
    specials = [tokenizer.id_to_token(i) for i in range(tokenizer.base_vocab_size, tokenizer.vocab_size)]
    backend.add_tokens([AddedToken(t, special=t in VISION_TOKENS, normalized=False) for t in specials])
    hf = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=bos,
        eos_token=eos,
        unk_token=unk,
        pad_token=tokenizer.id_to_token(tokenizer.pad_id),
        additional_special_tokens=list(VISION_TOKENS),
        clean_up_tokenization_spaces=False,
    )
    _check_special_ids(hf, tokenizer, specials)
    return hf


def _json_twin(tokenizer: SoloTokenizer) -> PreTrainedTokenizerFast:
    backend = Tokenizer.from_str(tokenizer.base_json())
    specials = [tokenizer.id_to_token(i) for i in range(tokenizer.base_vocab_size, tokenizer.vocab_size)]
    backend.add_tokens([AddedToken(t, special=t in VISION_TOKENS, normalized=False) for t in specials])
    names = {"bos_token": tokenizer.bos_id, "eos_token": tokenizer.eos_id, "pad_token": tokenizer.pad_id}
    if tokenizer.unk_id is not None:
        names["unk_token"] = tokenizer.unk_id
    hf = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        **{key: tokenizer.id_to_token(idx) for key, idx in names.items()},
        additional_special_tokens=list(VISION_TOKENS),
        clean_up_tokenization_spaces=False,
    )
    _check_special_ids(hf, tokenizer, specials)
    return hf


def _base_pieces(tokenizer: SoloTokenizer) -> list[tuple[str, float]]:
    """(piece, score) of the SentencePiece vocabulary without SOLO's specials (a SOLO-7B model has them)."""
    from sentencepiece import sentencepiece_model_pb2  # protobuf: a dependency of the package

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(tokenizer.model_path.read_bytes())
    if proto.trainer_spec.model_type != sentencepiece_model_pb2.TrainerSpec.BPE:
        raise ValueError(f"{tokenizer.model_path}: only BPE SentencePiece models (Mistral's) are supported")
    return [(p.piece, p.score) for p in proto.pieces[: tokenizer.base_vocab_size]]


def _merges_by_score(pieces: list[tuple[str, float]], vocab: dict[str, int]) -> list[tuple[str, str]]:
    """BPE merges ranked like SentencePiece applies them: by the merged piece's score, highest first.

    Ties (Mistral's whitespace pieces all score -1e9) go to the longer left part, then to vocabulary order:
    the ranking of ``transformers``' ``generate_merges(vocab, scores)``, which matches SentencePiece on runs
    of spaces where other tie orders do not.
    """
    merges = []
    for piece, score in pieces:
        splits = [(piece[:cut], piece[cut:]) for cut in range(1, len(piece))]
        splits = [(left, right) for left, right in splits if left in vocab and right in vocab]
        splits.sort(key=lambda lr: (vocab[lr[0]], vocab[lr[1]]))
        merges.extend((left, right, score) for left, right in splits)
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)  # stable: ties keep vocabulary order
    return [(left, right) for left, right, _ in merges]


def _check_special_ids(hf: PreTrainedTokenizerFast, tokenizer: SoloTokenizer, specials: list[str]) -> None:
    for name in specials:
        got, want = hf.convert_tokens_to_ids(name), tokenizer.token_to_id(name)
        if got != want:
            raise ValueError(f"HF tokenizer gives {name!r} id {got}, SoloTokenizer {want}")
    if len(hf) != tokenizer.vocab_size:
        raise ValueError(f"HF tokenizer has {len(hf)} tokens, SoloTokenizer {tokenizer.vocab_size}")


__all__ = ["build_hf_tokenizer"]
