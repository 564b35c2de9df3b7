"""The base encoder of an HF ``tokenizer.json`` (the ``tokenizers`` library): Llama-3's byte-level BPE and alike.

:class:`SoloTokenizer` uses it for a directory that has no SentencePiece ``tokenizer.model`` but a
``tokenizer.json`` (Llama-3-8B's: 128000 BPE pieces + 256 added special tokens, 128256 ids). The base vocabulary
is *every* id the file defines, its added tokens included, so the stack's special ids start after them (Llama-3:
``<vision>`` = 128256). BOS/EOS/PAD are ``tokenizer_config.json``'s ``bos_token``/``eos_token``/``pad_token``
(Llama-3-8B: ``<|begin_of_text|>`` = 128000 and ``<|end_of_text|>`` = 128001; the Instruct model's config names
``<|eot_id|>`` = 128009 as EOS), else the first of ``<|begin_of_text|>``/``<s>`` and ``<|end_of_text|>``/``</s>``
the vocabulary has. PAD defaults to EOS, as for SentencePiece.

Text never becomes a special id: the encoder runs with ``encode_special_tokens`` (the base's own special tokens,
e.g. ``<|eot_id|>``, in user text are split as ordinary text, as SentencePiece does with ``<s>``), and the stack's
tokens are not in it at all. A ``tokenizer.json`` that already carries the stack's tokens (an export's HF twin) is
refused: its base is the ``solo_base_tokenizer.json`` beside it.

Files (``save``): ``solo_base_tokenizer.json`` and ``solo_base_tokenizer_config.json``, the bytes loaded,
unchanged; they take precedence over a ``tokenizer.json`` in the same directory (an export's is the HF twin).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from pathlib import Path

from megatron.solo.io import write_atomic

JSON_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
BASE_JSON_FILE = "solo_base_tokenizer.json"
BASE_CONFIG_FILE = "solo_base_tokenizer_config.json"
_BOS_NAMES = ("<|begin_of_text|>", "<s>")
_EOS_NAMES = ("<|end_of_text|>", "</s>")


def json_tokenizer_files(path: Path) -> tuple[Path, Path] | None:
    """(tokenizer.json, tokenizer_config.json — may not exist) that ``path`` names, or None if it names none.

    ``path``: a ``*.json`` file (its config: ``solo_base_tokenizer_config.json`` beside ``solo_base_tokenizer.json``,
    else ``tokenizer_config.json``), or a directory with ``solo_base_tokenizer.json`` (preferred) or ``tokenizer.json``.
    """
    if path.is_file():
        if path.suffix != ".json":
            return None
        return path, path.with_name(BASE_CONFIG_FILE if path.name == BASE_JSON_FILE else CONFIG_FILE)
    for json_file, config in ((BASE_JSON_FILE, BASE_CONFIG_FILE), (JSON_FILE, CONFIG_FILE)):
        if (path / json_file).is_file():
            return path / json_file, path / config
    return None


class JsonEncoder:
    """A ``tokenizers.Tokenizer`` read from ``tokenizer.json`` bytes, with the BOS/EOS/PAD of its config."""

    def __init__(self, json_path: Path, config_path: Path, special_tokens: Sequence[str]):
        self.json_path, self.config_path = json_path, config_path
        self.json_bytes = json_path.read_bytes()
        self.config_bytes = config_path.read_bytes() if config_path.is_file() else None
        try:
            self._tok = _load(self.json_bytes)
        except Exception as e:  # tokenizers raises a bare Exception on a malformed file
            raise ValueError(f"{json_path}: not an HF tokenizer.json: {e}") from e
        vocab = self._tok.get_vocab(with_added_tokens=True)
        clash = [t for t in special_tokens if t in vocab]
        if clash:
            raise ValueError(
                f"{json_path}: already has the stack's special token {clash[0]!r} (id {vocab[clash[0]]}): an export's "
                f"HF tokenizer; load the directory's {BASE_JSON_FILE} (or the checkpoint) instead"
            )
        self.size = max(vocab.values()) + 1
        config = self._read_config()
        self.bos_token = _token_name(config.get("bos_token")) or _first_known(_BOS_NAMES, vocab)
        self.eos_token = _token_name(config.get("eos_token")) or _first_known(_EOS_NAMES, vocab)
        self.pad_token = _token_name(config.get("pad_token")) or self.eos_token
        for field, name in (
            ("bos_token", self.bos_token),
            ("eos_token", self.eos_token),
            ("pad_token", self.pad_token),
        ):
            if name is None:
                raise ValueError(f"{config_path}: no {field} (and {json_path} has none of the usual names)")
            if name not in vocab:
                raise ValueError(f"{config_path}: {field} {name!r} is not in {json_path}'s vocabulary")
        self.bos_id, self.eos_id, self.pad_id = (vocab[t] for t in (self.bos_token, self.eos_token, self.pad_token))
        unk = getattr(self._tok.model, "unk_token", None)
        self.unk_id = vocab.get(unk) if unk else None

    def __getstate__(self) -> dict:
        # A pickled tokenizers.Tokenizer forgets encode_special_tokens (DataLoader workers, deepcopy): rebuilt.
        return {k: v for k, v in self.__dict__.items() if k != "_tok"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._tok = _load(self.json_bytes)

    def _read_config(self) -> dict:
        if self.config_bytes is None:
            return {}
        try:
            config = json.loads(self.config_bytes)
        except json.JSONDecodeError as e:
            raise ValueError(f"{self.config_path}: not JSON: {e}") from e
        if not isinstance(config, dict):
            raise ValueError(f"{self.config_path}: not a JSON object")
        return config

    @property
    def sha256(self) -> str:
        """sha256 of the ``tokenizer.json`` bytes: what its ids mean (BOS/EOS are recorded beside it)."""
        return hashlib.sha256(self.json_bytes).hexdigest()

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        """Ids → text; byte-level pieces are joined before UTF-8 decoding (a character split over tokens is whole).
        The base's special tokens (BOS, EOS, reserved) are skipped, as SentencePiece skips its control pieces."""
        return self._tok.decode(list(ids), skip_special_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, idx: int) -> str | None:
        return self._tok.id_to_token(idx)

    def save(self, directory: Path) -> None:
        write_atomic(directory / BASE_JSON_FILE, self.json_bytes)
        if self.config_bytes is not None:
            write_atomic(directory / BASE_CONFIG_FILE, self.config_bytes)
        else:  # another tokenizer's config left there would give this one its BOS/EOS when loaded
            (directory / BASE_CONFIG_FILE).unlink(missing_ok=True)


def _load(json_bytes: bytes):
    """The ``tokenizers.Tokenizer`` of ``tokenizer.json`` bytes, with ``encode_special_tokens`` set: text never
    becomes a special id (module docstring)."""
    from tokenizers import Tokenizer  # a dependency of the package; imported only for this kind

    tok = Tokenizer.from_str(json_bytes.decode("utf-8"))
    tok.encode_special_tokens = True
    return tok


def _token_name(value) -> str | None:
    """A tokenizer_config.json token entry: a string or an AddedToken dict (``{"content": …}``)."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def _first_known(names: Iterable[str], vocab: dict[str, int]) -> str | None:
    return next((n for n in names if n in vocab), None)


__all__ = ["BASE_CONFIG_FILE", "BASE_JSON_FILE", "JsonEncoder", "json_tokenizer_files"]
