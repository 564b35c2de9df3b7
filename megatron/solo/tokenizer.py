"""SoloTokenizer: the base SentencePiece model plus SOLO's vision and location tokens, by id.

Id layout (reference spec §2.1), identical to the released SOLO-7B tokenizer so its checkpoints stay usable::

    0 … 31999        Mistral-7B-v0.1 SentencePiece vocabulary (<unk>=0, <s>=1, </s>=2)
    32000            <vision>       image start
    32001            <vpatch>       one per patch (its embedding is added to the projected patch)
    32002            <vrow_sep>     between patch rows
    32003            <vframe_sep>   reserved for video, never emitted
    32004            </vision>      image end
    32005 … 33028    <loc_1> … <loc_1024>   reserved location bins
    vocab size 33029, padded per TP degree to a multiple of 128·TP (33152 at TP1, 33280 at TP2)

Special tokens live *outside* the SentencePiece encoder, so user text that literally contains
"<vision>" is encoded as ordinary text and can never turn into a special id. A ``tokenizer.model`` that
already carries these pieces (SOLO-7B's, 33029 pieces) is accepted: its encoder is rebuilt from the base
pieces only, for the same guarantee. With another base vocabulary of N pieces the layout starts at N.

A directory with no ``tokenizer.model`` but an HF ``tokenizer.json`` (Llama-3-8B's byte-level BPE) gives the same
interface over that encoder (``kind == "tokenizers"``, ``tokenizer_json.py``): the layout starts after every id
the file defines, its own added tokens included (Llama-3: ``<vision>`` = 128256, vocab size 129285).

Image layout (``image_token_ids``)::

    <vision> <vpatch>×cols <vrow_sep> <vpatch>×cols … <vpatch>×cols </vision>

``rows - 1`` separators sit *between* rows; none follows the last row.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path

import sentencepiece as spm

from megatron.solo import image as _image
from megatron.solo.io import write_atomic
from megatron.solo.tokenizer_json import JsonEncoder, json_tokenizer_files

VISION_START = "<vision>"
VISION_PATCH = "<vpatch>"
VISION_ROW_SEP = "<vrow_sep>"
VISION_FRAME_SEP = "<vframe_sep>"
VISION_END = "</vision>"
VISION_TOKENS = (VISION_START, VISION_PATCH, VISION_ROW_SEP, VISION_FRAME_SEP, VISION_END)
NUM_LOC_TOKENS = 1024
LOC_TOKENS = tuple(f"<loc_{i}>" for i in range(1, NUM_LOC_TOKENS + 1))
SPECIAL_TOKENS = VISION_TOKENS + LOC_TOKENS

MODEL_FILE = "tokenizer.model"
METADATA_FILE = "solo_tokenizer.json"
MISTRAL_V01_SHA256 = "dadfd56d766715c61d2ef780a525ab43b8e6da4de6865bda3d95fdef5e134055"


def default_tokenizer_model() -> Path:
    """The Mistral-7B-v0.1 ``tokenizer.model`` shipped inside the ``mistral-common`` package."""
    try:
        import importlib.resources

        path = Path(str(importlib.resources.files("mistral_common") / "data" / "tokenizer.model.v1"))
    except ModuleNotFoundError as e:
        raise FileNotFoundError(
            "no tokenizer model given and mistral-common is not installed: pass model_path= "
            "(the tokenizer.model of your checkpoint) or `pip install mistral-common`"
        ) from e
    if not path.is_file():
        raise FileNotFoundError(f"mistral-common is installed but {path} is missing")
    return path


def padded_vocab_size(
    vocab_size: int, tensor_model_parallel_size: int = 1, make_vocab_size_divisible_by: int = 128
) -> int:
    """Megatron's padding: the next multiple of ``make_vocab_size_divisible_by · TP``."""
    if tensor_model_parallel_size < 1 or make_vocab_size_divisible_by < 1:
        raise ValueError("tensor_model_parallel_size and make_vocab_size_divisible_by must be >= 1")
    multiple = make_vocab_size_divisible_by * tensor_model_parallel_size
    return -(-vocab_size // multiple) * multiple


class SoloTokenizer:
    """SentencePiece text tokenizer with SOLO's special-token id layout.

    ``model_path``: a ``tokenizer.model`` file, a directory holding one (e.g. one written by
    :meth:`save_pretrained` or a SOLO-7B checkpoint), or None for Mistral-7B-v0.1's from mistral-common.
    """

    kind = "sentencepiece"

    def __new__(cls, model_path: str | os.PathLike | None = None):
        # A directory (or file) with an HF tokenizer.json and no tokenizer.model: the tokenizers-library kind.
        if cls is SoloTokenizer and model_path is not None and _is_json_tokenizer(Path(model_path)):
            cls = JsonSoloTokenizer
        return super().__new__(cls)

    def __init__(self, model_path: str | os.PathLike | None = None):
        path = Path(model_path) if model_path is not None else default_tokenizer_model()
        if path.is_dir():
            path = path / MODEL_FILE
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer model not found: {path}")
        self.model_path = path
        self._model_bytes = path.read_bytes()
        full = spm.SentencePieceProcessor(model_proto=self._model_bytes)
        self.base_vocab_size = _find_special_block(full, path)
        # Pieces after our block (e.g. ChatML tokens added to SOLO-7B later) are kept as extra specials.
        extra = [full.id_to_piece(i) for i in range(self.base_vocab_size + len(SPECIAL_TOKENS), full.get_piece_size())]
        if self.base_vocab_size < full.get_piece_size():
            full = spm.SentencePieceProcessor(model_proto=_truncate_pieces(self._model_bytes, self.base_vocab_size))
        self._sp = full

        self._set_special_ids(list(SPECIAL_TOKENS) + extra)
        self.unk_id = self._sp.unk_id()
        self.bos_id = self._sp.bos_id()
        self.eos_id = self._sp.eos_id()
        # Mistral has no pad piece; like the reference, pad with EOS (padding is never a target).
        self.pad_id = self._sp.pad_id() if self._sp.pad_id() >= 0 else self.eos_id

    def _set_special_ids(self, names: list[str]) -> None:
        """``names`` (the stack's tokens, then any extra) take the ids from ``base_vocab_size`` on."""
        self._special_to_id = {name: self.base_vocab_size + i for i, name in enumerate(names)}
        self._id_to_special = {i: name for name, i in self._special_to_id.items()}
        self.vocab_size = self.base_vocab_size + len(names)
        (
            self.vision_start_id,
            self.vision_patch_id,
            self.vision_row_sep_id,
            self.vision_frame_sep_id,
            self.vision_end_id,
        ) = (self._special_to_id[t] for t in VISION_TOKENS)

    # -- the base encoder (SentencePiece here; JsonSoloTokenizer overrides these four) ------------------

    def _base_encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def _base_decode(self, run: list[int], follows_text: bool) -> str:
        text = self._sp.decode(run)
        # SentencePiece drops the leading space of what it decodes; keep it between segments.
        first = next((i for i in run if not self._sp.is_control(i)), None)
        if follows_text and first is not None and self._sp.id_to_piece(first).startswith("▁"):
            text = " " + text
        return text

    def _base_token(self, idx: int) -> str | None:
        return self._sp.id_to_piece(idx)

    def _encoder_digest(self) -> str:
        """sha256 of the encoder's model proto (base pieces only)."""
        if not hasattr(self, "_encoder_sha256"):
            self._encoder_sha256 = hashlib.sha256(self._sp.serialized_model_proto()).hexdigest()
        return self._encoder_sha256

    # -- ids ------------------------------------------------------------------------------------

    @property
    def vision_token_ids(self) -> range:
        """The five vision ids (<vision> … </vision>), never loss targets."""
        return range(self.vision_start_id, self.vision_end_id + 1)

    def loc_token_id(self, k: int) -> int:
        """Id of ``<loc_k>``, k in 1…1024."""
        if not 1 <= k <= NUM_LOC_TOKENS:
            raise ValueError(f"location bin must be in 1..{NUM_LOC_TOKENS}, got {k}")
        return self._special_to_id[f"<loc_{k}>"]

    def token_to_id(self, token: str) -> int:
        """Id of a special token or a SentencePiece piece (e.g. "▁the"); KeyError if unknown."""
        if token in self._special_to_id:
            return self._special_to_id[token]
        idx = self._sp.piece_to_id(token)
        if idx == self.unk_id and token != self._sp.id_to_piece(self.unk_id):
            raise KeyError(f"unknown token {token!r}")
        return idx

    def id_to_token(self, idx: int) -> str:
        if idx in self._id_to_special:
            return self._id_to_special[idx]
        token = self._base_token(idx) if 0 <= idx < self.base_vocab_size else None
        if token is None:
            raise KeyError(f"token id {idx} is outside the vocabulary (size {self.vocab_size})")
        return token

    def padded_vocab_size(self, tensor_model_parallel_size: int = 1, make_vocab_size_divisible_by: int = 128) -> int:
        """Embedding rows for a TP degree: 33152 at TP1, 33280 at TP2 for SOLO's 33029."""
        return padded_vocab_size(self.vocab_size, tensor_model_parallel_size, make_vocab_size_divisible_by)

    # -- text -----------------------------------------------------------------------------------

    def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
        """Text → base ids (no BOS/EOS unless asked). Never yields a special id (nor, for a tokenizer.json, one
        of the base's own special tokens)."""
        ids = self._base_encode(text)
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids: Iterable[int]) -> str:
        """Ids → text. Vision tokens (and a tokenizer.json's own special tokens) are skipped; other specials
        (``<loc_k>``) are written out."""
        pieces: list[str] = []
        run: list[int] = []

        def flush():
            if run:
                pieces.append(self._base_decode(run, follows_text=bool(pieces)))
                run.clear()

        for idx in ids:
            idx = int(idx)
            if 0 <= idx < self.base_vocab_size:
                run.append(idx)
                continue
            flush()
            if idx not in self._id_to_special:
                raise ValueError(f"cannot decode id {idx}: outside the vocabulary (size {self.vocab_size})")
            if idx not in self.vision_token_ids:
                pieces.append(self._id_to_special[idx])
        flush()
        return "".join(pieces)

    # -- images ---------------------------------------------------------------------------------

    def image_layout_ids(self, n_rows: int, n_cols: int, *, end_token: str = VISION_END) -> list[int]:
        """Ids of one image with an (n_rows × n_cols) patch grid.

        ``end_token="<vision>"`` reproduces the released SFT model's closer (reference spec §2.2 quirk).
        """
        if n_rows < 1 or n_cols < 1:
            raise ValueError(f"patch grid must be at least 1x1, got {n_rows}x{n_cols}")
        if end_token not in (VISION_END, VISION_START):
            raise ValueError(f"end_token must be {VISION_END!r} or {VISION_START!r}, got {end_token!r}")
        row = [self.vision_patch_id] * n_cols
        body = row + ([self.vision_row_sep_id] + row) * (n_rows - 1)
        return [self.vision_start_id] + body + [self._special_to_id[end_token]]

    def image_token_ids(
        self,
        width: int,
        height: int,
        *,
        patch_size: int = _image.PATCH_SIZE,
        max_size: int = _image.MAX_SIZE,
        end_token: str = VISION_END,
    ) -> list[int]:
        """Ids of an image of *original* size (width, height), resized by the SOLO size rule."""
        n_rows, n_cols = _image.grid_size(width, height, patch_size, max_size)
        return self.image_layout_ids(n_rows, n_cols, end_token=end_token)

    # -- persistence ----------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> SoloTokenizer:
        """Load from a directory written by :meth:`save_pretrained` (or any holding a tokenizer.model)."""
        directory = Path(directory)
        tok = cls(directory if _is_json_tokenizer(directory) else directory / MODEL_FILE)
        meta_path = directory / METADATA_FILE
        if meta_path.is_file():
            saved, now = json.loads(meta_path.read_text()), {"kind": "sentencepiece", **tok.metadata()}
            saved.setdefault("kind", "sentencepiece")  # a SentencePiece tokenizer's metadata has no kind
            # Every field both have (kind, hash, BOS/EOS/PAD, the special ids); an older file may lack some.
            wrong = sorted(k for k in saved.keys() & now.keys() if saved[k] != now[k])
            if wrong:
                raise ValueError(
                    f"{meta_path} does not match {tok.model_path}: "
                    + ", ".join(f"{k} is {saved[k]!r} there but {now[k]!r} here" for k in wrong)
                )
        return tok

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write ``tokenizer.model`` (the bytes loaded, unchanged) and ``solo_tokenizer.json`` atomically."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        write_atomic(directory / MODEL_FILE, self._model_bytes)
        write_atomic(directory / METADATA_FILE, (json.dumps(self.metadata(), indent=2) + "\n").encode())
        return directory

    def fingerprint(self) -> dict:
        """What the token ids of data made with this tokenizer mean, cheaply (recorded in each preprocessed
        prefix and compared by the loader): sha256 of the encoder's model proto (base pieces only, so a
        SOLO-7B ``tokenizer.model`` that carries the special pieces matches its base), the vocabulary size,
        BOS/EOS and the vision ids."""
        return {
            "encoder_sha256": self._encoder_digest(),
            "vocab_size": self.vocab_size,
            "bos_id": self.bos_id,
            "eos_id": self.eos_id,
            "vision_ids": list(self.vision_token_ids),
        }

    def metadata(self) -> dict:
        """The id layout, as written next to the model."""
        return {
            "format_version": 1,
            "tokenizer_model_sha256": hashlib.sha256(self._model_bytes).hexdigest(),
            "base_vocab_size": self.base_vocab_size,
            "vocab_size": self.vocab_size,
            "bos_id": self.bos_id,
            "eos_id": self.eos_id,
            "pad_id": self.pad_id,
            "unk_id": self.unk_id,
            "vision_start_id": self.vision_start_id,
            "vision_patch_id": self.vision_patch_id,
            "vision_row_sep_id": self.vision_row_sep_id,
            "vision_frame_sep_id": self.vision_frame_sep_id,
            "vision_end_id": self.vision_end_id,
            "loc_token_ids": [self.loc_token_id(1), self.loc_token_id(NUM_LOC_TOKENS)],
            "extra_special_tokens": [
                self._id_to_special[i] for i in range(self.base_vocab_size + len(SPECIAL_TOKENS), self.vocab_size)
            ],
        }

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"SoloTokenizer({str(self.model_path)!r}, vocab_size={self.vocab_size})"


class JsonSoloTokenizer(SoloTokenizer):
    """:class:`SoloTokenizer` over an HF ``tokenizer.json`` (``tokenizer_json.py``): Llama-3-8B's byte-level BPE.

    ``model_path``: a directory with ``tokenizer.json`` (+ ``tokenizer_config.json`` for BOS/EOS/PAD) or one
    written by :meth:`save_pretrained` (``solo_base_tokenizer*.json``), or a ``tokenizer.json`` file.
    """

    kind = "tokenizers"

    def __init__(self, model_path: str | os.PathLike):
        path = Path(model_path)
        files = json_tokenizer_files(path)
        if files is None:
            raise FileNotFoundError(f"no tokenizer.json in {path}")
        self._encoder = JsonEncoder(*files, special_tokens=SPECIAL_TOKENS)
        self.model_path = files[0]
        self._model_bytes = self._encoder.json_bytes  # what metadata()'s tokenizer_model_sha256 hashes
        self.base_vocab_size = self._encoder.size
        self._set_special_ids(list(SPECIAL_TOKENS))
        self.unk_id, self.bos_id, self.eos_id, self.pad_id = (
            self._encoder.unk_id,
            self._encoder.bos_id,
            self._encoder.eos_id,
            self._encoder.pad_id,
        )

    def token_to_id(self, token: str) -> int:
        """Id of a special token or a base token (a byte-level piece, e.g. "Ġthe", or an added token)."""
        idx = self._special_to_id.get(token, self._encoder.token_to_id(token))
        if idx is None:
            raise KeyError(f"unknown token {token!r}")
        return idx

    def _base_encode(self, text: str) -> list[int]:
        return self._encoder.encode(text)

    def _base_decode(self, run: list[int], follows_text: bool) -> str:
        return self._encoder.decode(run)  # byte-level: spaces are part of the pieces

    def _base_token(self, idx: int) -> str | None:
        return self._encoder.id_to_token(idx)

    def _encoder_digest(self) -> str:
        """sha256 of the ``tokenizer.json`` bytes."""
        return self._encoder.sha256

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write ``solo_base_tokenizer.json`` (+ ``solo_base_tokenizer_config.json``), the bytes loaded, and
        ``solo_tokenizer.json`` atomically; a ``tokenizer.json`` already there (an export's HF twin) is kept."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self._encoder.save(directory)
        write_atomic(directory / METADATA_FILE, (json.dumps(self.metadata(), indent=2) + "\n").encode())
        return directory

    def metadata(self) -> dict:
        """The id layout; ``tokenizer_model_sha256`` is the ``tokenizer.json``'s."""
        return {
            **super().metadata(),
            "kind": self.kind,
            "bos_token": self._encoder.bos_token,
            "eos_token": self._encoder.eos_token,
            "pad_token": self._encoder.pad_token,
        }

    def base_json(self) -> str:
        """The base ``tokenizer.json`` as loaded (for the HF export's tokenizer)."""
        return self._encoder.json_bytes.decode("utf-8")


LLAMA3_CHAT_TOKENS = ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")


def check_chat_template(tokenizer: SoloTokenizer, template: str) -> None:
    """ValueError if the chat ``template`` needs base special tokens ``tokenizer`` lacks (``llama3`` with
    Mistral's): preprocessing and the export refuse the same combinations."""
    if template != "llama3":
        return
    for name in LLAMA3_CHAT_TOKENS:
        try:
            tokenizer.token_to_id(name)
        except KeyError:
            raise ValueError(
                f"chat template llama3 needs the tokenizer's {name} token, which {tokenizer!r} does not have "
                "(Llama-3's tokenizer.json has it)"
            ) from None


def has_tokenizer(directory: str | os.PathLike) -> bool:
    """Whether ``directory`` holds a tokenizer :class:`SoloTokenizer` reads (either kind)."""
    directory = Path(directory)
    return (directory / MODEL_FILE).is_file() or _is_json_tokenizer(directory)


def _is_json_tokenizer(path: Path) -> bool:
    """A ``*.json`` file, or a directory with no ``tokenizer.model`` but a tokenizer.json (or our saved base)."""
    if path.is_dir() and (path / MODEL_FILE).is_file():
        return False
    return json_tokenizer_files(path) is not None


def _find_special_block(sp: spm.SentencePieceProcessor, path: Path) -> int:
    """Index where SOLO's 1029 special pieces start inside the model, or its size if it has none."""
    size = sp.get_piece_size()
    start = sp.piece_to_id(VISION_START)
    if start == sp.unk_id() or sp.id_to_piece(start) != VISION_START:
        return size
    for offset, name in enumerate(SPECIAL_TOKENS):
        if start + offset >= size or sp.id_to_piece(start + offset) != name:
            found = sp.id_to_piece(start + offset) if start + offset < size else "end of vocabulary"
            raise ValueError(
                f"{path}: has {VISION_START} at id {start} but id {start + offset} is {found!r}, "
                f"expected {name!r}: not SOLO's special-token layout"
            )
    return start


def _truncate_pieces(model_bytes: bytes, keep: int) -> bytes:
    """A SentencePiece model proto with only its first ``keep`` pieces."""
    from sentencepiece import sentencepiece_model_pb2  # needs protobuf; only for models with SOLO pieces

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model_bytes)
    del proto.pieces[keep:]
    return proto.SerializeToString()


__all__ = [
    "LOC_TOKENS",
    "MISTRAL_V01_SHA256",
    "SPECIAL_TOKENS",
    "VISION_END",
    "VISION_FRAME_SEP",
    "VISION_PATCH",
    "VISION_ROW_SEP",
    "VISION_START",
    "VISION_TOKENS",
    "LLAMA3_CHAT_TOKENS",
    "JsonSoloTokenizer",
    "SoloTokenizer",
    "check_chat_template",
    "default_tokenizer_model",
    "has_tokenizer",
    "padded_vocab_size",
]
