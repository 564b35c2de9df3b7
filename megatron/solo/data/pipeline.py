"""The preprocessing driver: inputs → worker pool → packer → writer, resumable, with atomic outputs.

Outputs for ``output_prefix=OUT`` (see :mod:`~megatron.solo.data.packed_format` for the byte layout):
``OUT.bin/.idx``, ``OUT.pack.bin/.idx``, ``OUT.errors.jsonl`` (one line per skipped sample: file, line or
key, reason, detail; and one per sample cut to ``--max-sample-length``, reason ``truncated``) and
``OUT.stats.json`` (renamed into place last: its presence means complete).

Everything is built in the work directory ``OUT.partial/`` (:mod:`~megatron.solo.data.workdir`) and
renamed into place only when complete. Every ``checkpoint_interval`` seconds the driver
flushes the data files and saves, atomically, what it needs to go on: the input position, the packer's
open packs, the files' sizes and the counters. ``resume=True`` truncates the files back to the last
checkpoint and continues from there; since workers return results in input order and packing happens
here, the output is byte-identical to an uninterrupted run, and to a run with any number of workers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import sys
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import islice
from typing import TextIO

from megatron.solo import faults
from megatron.solo.data import packed_format, sources
from megatron.solo.data.encode import Document, EncodeConfig, check_template
from megatron.solo.data.errors import TRUNCATED, SampleError
from megatron.solo.data.packing import Pack, PackConfig, Packer
from megatron.solo.data.progress import Progress, ordered_map
from megatron.solo.data.workdir import WorkDir, read_stats, write_atomic
from megatron.solo.data.worker import WorkerConfig, init_worker, process_batch
from megatron.solo.tokenizer import SoloTokenizer

FORMAT_VERSION = packed_format.FORMAT_VERSION  # recorded in the stats too


def default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@dataclass(frozen=True, kw_only=True)
class PreprocessConfig:
    """One preprocessing run (``tools/preprocess_mm_data.py`` builds it from its flags)."""

    inputs: tuple[str, ...]
    """Files, directories (ImageNet roots) or globs."""
    output_prefix: str
    input_format: str = "auto"
    image_root: str | None = None
    """Where relative image paths point (default: each input file's directory, or the ImageNet root). Every
    image path must resolve (symlinks included) inside it, else the sample is skipped as ``outside_root``."""
    allow_outside_root: bool = False
    """Read image paths that resolve outside the image root too."""
    class_names: str | None = None
    """ImageNet: the wnid → class name file."""
    shuffle_seed: int | None = 0
    """ImageNet: the seed of the order images are read in (None: sorted, class by class, so that every
    pack holds a single class)."""
    tokenizer_model: str | None = None
    """tokenizer.model, or a directory holding one or an HF tokenizer.json; None: Mistral-7B-v0.1's."""
    encode: EncodeConfig = EncodeConfig()
    pack: PackConfig = PackConfig()
    workers: int = field(default_factory=default_workers)
    """Worker processes; 0 encodes in this process. The output does not depend on it."""
    resume: bool = False
    strict: bool = False
    """Fail on the first bad sample instead of skipping it."""
    checkpoint_interval: float = 60.0
    """Seconds between checkpoints (0: after every sample)."""
    log_interval: float = 30.0
    """Seconds between progress lines when stderr is not a terminal."""
    progress: bool = True

    def __post_init__(self):
        if isinstance(self.inputs, str) or not self.inputs:
            raise ValueError(f"PreprocessConfig.inputs must be a non-empty sequence of paths, got {self.inputs!r}")
        object.__setattr__(self, "inputs", tuple(self.inputs))
        if not self.output_prefix or self.output_prefix.endswith(os.sep):
            raise ValueError(f"PreprocessConfig.output_prefix must name a file prefix, got {self.output_prefix!r}")
        if self.input_format not in ("auto",) + sources.FORMATS:
            raise ValueError(
                f"PreprocessConfig.input_format must be auto or one of {', '.join(sources.FORMATS)}, "
                f"got {self.input_format!r}"
            )
        if not (isinstance(self.workers, int) and self.workers >= 0):
            raise ValueError(f"PreprocessConfig.workers must be an int >= 0, got {self.workers!r}")
        limit = self.encode.max_sample_length
        if limit is not None and limit > self.pack.seq_length:
            raise ValueError(
                f"--max-sample-length {limit} exceeds --seq-length {self.pack.seq_length}: a sample "
                "would be split over packs"
            )
        for name in ("checkpoint_interval", "log_interval"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"PreprocessConfig.{name} must be >= 0, got {getattr(self, name)!r}")


# ---------------------------------------------------------------------------------------------
# Counters


@dataclass
class Stats:
    samples: int = 0
    documents: int = 0
    packs: int = 0
    text_tokens: int = 0
    vision_tokens: int = 0
    patch_tokens: int = 0
    loss_tokens: int = 0
    images: int = 0
    image_bytes: int = 0
    record_bytes: int = 0
    encoded_tokens: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    truncated_samples: int = 0
    """Samples cut to --max-sample-length (kept; each listed in errors.jsonl as ``truncated``)."""
    truncated_sample_tokens: int = 0

    def add_pack(self, pack: Pack, record_bytes: int) -> None:
        self.packs += 1
        self.record_bytes += record_bytes
        for doc in pack.documents:
            vision = sum(im.num_tokens for im in doc.images)
            self.vision_tokens += vision
            self.text_tokens += len(doc) - vision
            self.patch_tokens += sum(im.n_patches for im in doc.images)
            self.images += len(doc.images)
            self.image_bytes += sum(len(im.data) for im in doc.images)
            self.loss_tokens += int(doc.targets[1:].sum())  # a document's first token is never predicted

    def to_json(self, seq_length: int, packer: Packer, meta: dict) -> dict:
        slots = self.packs * seq_length
        padding = slots - self.text_tokens - self.vision_tokens
        return {
            "samples": self.samples,
            "documents": self.documents,
            "packs": self.packs,
            "text_tokens": self.text_tokens,
            "vision_tokens": self.vision_tokens,
            "images": self.images,
            "padding_fraction": padding / slots if slots else 0.0,
            "bytes_per_vision_token": self.image_bytes / self.vision_tokens if self.vision_tokens else 0.0,
            "skipped": dict(sorted(self.skipped.items())),
            "seq_length": seq_length,
            "padding_tokens": padding,
            "loss_tokens": self.loss_tokens,
            "patch_tokens": self.patch_tokens,
            "image_bytes": self.image_bytes,
            "bytes_per_patch": self.image_bytes / self.patch_tokens if self.patch_tokens else 0.0,
            "record_bytes": self.record_bytes,
            "truncated_samples": self.truncated_samples,
            "truncated_sample_tokens": self.truncated_sample_tokens,
            "truncated_documents": packer.truncated_documents,
            "truncated_tokens": packer.truncated_tokens,
            "split_documents": packer.split_documents,
            "continuation_chunks": packer.continuation_chunks,
            **meta,
        }


# ---------------------------------------------------------------------------------------------
# The run


@dataclass
class _State:
    """Everything a checkpoint holds (with the writer's file sizes)."""

    fingerprint: str
    position: tuple[int, int] = (0, 0)
    packer: Packer = None
    stats: Stats = field(default_factory=Stats)
    errors_bytes: int = 0
    writer: dict | None = None
    finalizing: bool = False


def preprocess(config: PreprocessConfig, *, stream: TextIO | None = None) -> dict:
    """Run (or resume) one preprocessing job; returns the stats written to ``OUT.stats.json``.

    Raises :class:`SampleError` on a bad sample with ``strict``, ValueError/FileNotFoundError for bad
    inputs or flags, RuntimeError when the prefix is busy or a leftover run needs ``resume``.
    """
    stream = stream if stream is not None else sys.stderr
    files = sources.resolve_inputs(config.inputs)
    fmt = config.input_format if config.input_format != "auto" else sources.detect_format(files)
    class_names = _class_names(config, fmt)
    tokenizer = SoloTokenizer(config.tokenizer_model)
    check_template(tokenizer, config.encode.chat_template)
    meta = _metadata(config, fmt, files, tokenizer)
    with WorkDir(config.output_prefix) as work:
        state = _start(work, config, meta["fingerprint"])
        if state is None:
            print(f"preprocess: {config.output_prefix} is already complete", file=stream)
            return read_stats(config.output_prefix)
        try:
            if not state.finalizing:  # else: killed while renaming the finished files into place
                run = _Run(config, work, state, _header(config, tokenizer), stream)
                run.consume(files, fmt, class_names)
                run.finish(meta)
        except SampleError:
            work.discard()  # --strict: the data must change, so nothing here can be resumed
            raise
        except BaseException:
            print(f"preprocess: stopped; `--resume` continues from the last checkpoint in {work.path}", file=stream)
            raise
        return work.install()


def _start(work: WorkDir, config: PreprocessConfig, fingerprint: str) -> _State | None:
    """The state to run from: fresh, or the checkpoint of an interrupted run; None if already complete."""
    if (
        config.resume
        and not work.exists()
        and (read_stats(config.output_prefix) or {}).get("fingerprint") == fingerprint
    ):
        return None
    state = work.load() if work.claim(config.resume) else None
    if state is None:
        work.reset()
        return _State(fingerprint, packer=Packer(config.pack))
    if state.fingerprint != fingerprint:
        raise RuntimeError(
            f"{work.path} was made from other inputs or settings (input files, their sizes or times, "
            "tokenizer, image/template/packing flags changed): delete it or rerun with the original ones"
        )
    return state


def _class_names(config: PreprocessConfig, fmt: str) -> dict[str, str] | None:
    if fmt != "imagenet":
        return None
    if config.class_names is None:
        raise ValueError("the imagenet format needs --class-names (a wnid → class name file)")
    return sources.load_class_names(config.class_names)


def _metadata(config: PreprocessConfig, fmt: str, files: list[str], tokenizer: SoloTokenizer) -> dict:
    """What the output depends on (hashed into the resume fingerprint) and is recorded in the stats."""
    meta = {
        "format_version": FORMAT_VERSION,
        "input_format": fmt,
        "input_files": len(files),
        "image_format": config.encode.image_format,
        "image_quality": config.encode.image_quality,
        "chat_template": config.encode.chat_template,
        "append_eod": config.encode.append_eod,
        "max_sample_length": config.encode.max_sample_length,
        "pack_buffer_size": config.pack.buffer_size,
        "tokenizer_sha256": tokenizer.metadata()["tokenizer_model_sha256"],
        "vocab_size": tokenizer.vocab_size,
    }
    inputs = [(f, *_file_signature(f)) for f in files]
    if fmt == "imagenet":
        meta["shuffle_seed"] = config.shuffle_seed
    extra = [
        inputs,
        config.image_root,
        config.allow_outside_root,
        config.class_names,
        dataclasses.asdict(config.encode),
        config.pack.seq_length,
    ]
    if tokenizer.kind != "sentencepiece":
        # A tokenizer.json's BOS/EOS come from its tokenizer_config.json, not from the bytes hashed above (a
        # SentencePiece model fixes them itself, so its fingerprint stays what earlier runs recorded).
        extra.append(tokenizer.fingerprint())
    blob = json.dumps([meta, extra], sort_keys=True, default=str).encode()
    return {**meta, "fingerprint": hashlib.sha256(blob).hexdigest()}


def _header(config: PreprocessConfig, tokenizer: SoloTokenizer) -> dict:
    """The prefix's header: what its bytes mean (patch size, normalisation, codec, tokenizer)."""
    return packed_format.make_header(
        packed_format.token_dtype(tokenizer.vocab_size),
        config.encode.image,
        image_codec=config.encode.image_format,
        image_quality=config.encode.image_quality,
        tokenizer=tokenizer.fingerprint(),
        layout=config.encode.layout,
    )


def _file_signature(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns


class _Run:
    def __init__(self, config: PreprocessConfig, work: WorkDir, state: _State, header: dict, stream: TextIO):
        self.config = config
        self.work = work
        self.state = state
        dtype = packed_format.token_dtype(header["tokenizer"]["vocab_size"])
        self.writer = packed_format.PackWriter(work.data_prefix, dtype, state.writer, header)
        self.errors = work.open_errors(state.errors_bytes)
        self.progress = Progress(stream, config.log_interval, enabled=config.progress)
        self.last_checkpoint = time.monotonic()
        self.packs_this_process = 0

    def consume(self, files: list[str], fmt: str, class_names) -> None:
        """Read, encode (in workers), pack and write every record from the current position on."""
        worker_config = WorkerConfig(
            fmt,
            self.config.image_root,
            self.config.allow_outside_root,
            self.config.tokenizer_model,
            self.config.encode,
            parent_pid=os.getpid(),
        )
        records = sources.iter_records(
            files,
            fmt,
            start=self.state.position,
            class_names=class_names,
            shuffle_seed=self.config.shuffle_seed,
            allow_outside_root=self.config.allow_outside_root,
        )
        batches = _batches(records, 64 if fmt == "text" else 8)
        positions: deque = deque()

        def work_items() -> Iterator[list]:
            for batch in batches:
                positions.append([pos for pos, _ in batch])
                yield [record for _, record in batch]

        results = ordered_map(
            process_batch,
            work_items(),
            workers=self.config.workers,
            initializer=init_worker,
            initargs=(worker_config,),
            preload=("megatron.solo.data.worker",),
        )
        with contextlib.closing(results):
            for batch_results in results:
                for (file_index, k), result in zip(positions.popleft(), batch_results):
                    self._handle(result)
                    self.state.position = (file_index, k + 1)
                    self._maybe_checkpoint()

    def finish(self, meta: dict) -> None:
        for pack in self.state.packer.flush():
            self._write(pack)
        self.writer.finalize()
        self.errors.close()
        stats = self.state.stats.to_json(self.config.pack.seq_length, self.state.packer, meta)
        write_atomic(self.work.file("stats.json"), (json.dumps(stats, indent=2) + "\n").encode())
        self._update_progress(final=True)
        self.state.finalizing = True
        self.work.save(self.state)

    def _handle(self, result: Document | SampleError) -> None:
        stats = self.state.stats
        stats.samples += 1
        if isinstance(result, Document):
            stats.encoded_tokens += len(result)
            if result.truncated:
                self._note_truncation(result)
            try:
                packs = self.state.packer.add(result)
            except SampleError as e:
                result = e
            else:
                stats.documents += 1
                for pack in packs:
                    self._write(pack)
        if isinstance(result, SampleError):
            if self.config.strict:
                raise result
            stats.skipped[result.reason] = stats.skipped.get(result.reason, 0) + 1
            self.errors.write(json.dumps(result.to_json(), ensure_ascii=False) + "\n")
        self._update_progress()

    def _note_truncation(self, doc: Document) -> None:
        """Count a sample cut to --max-sample-length and name it in errors.jsonl (kept, so not "skipped")."""
        stats = self.state.stats
        stats.truncated_samples += 1
        stats.truncated_sample_tokens += doc.truncated
        limit = self.config.encode.max_sample_length
        line = {
            **doc.origin.to_json(),
            "reason": TRUNCATED,
            "detail": f"{len(doc) + doc.truncated} tokens > --max-sample-length {limit}: kept the first {len(doc)}",
        }
        self.errors.write(json.dumps(line, ensure_ascii=False) + "\n")

    def _write(self, pack: Pack) -> None:
        self.state.stats.add_pack(pack, self.writer.write(pack))
        self.packs_this_process += 1
        faults.kill_at("preprocess.kill_after_packs", self.packs_this_process)  # tests only

    def _maybe_checkpoint(self) -> None:
        if time.monotonic() - self.last_checkpoint < self.config.checkpoint_interval:
            return
        self.errors.flush()
        os.fsync(self.errors.fileno())
        self.state.errors_bytes = self.errors.tell()
        self.state.writer = self.writer.checkpoint()
        self.work.save(self.state)
        self.last_checkpoint = time.monotonic()

    def _update_progress(self, final: bool = False) -> None:
        s = self.state.stats
        self.progress.update(s.samples, s.encoded_tokens, s.packs, sum(s.skipped.values()), final=final)


def _batches(items, size: int) -> Iterator[list]:
    it = iter(items)
    while batch := list(islice(it, size)):
        yield batch


__all__ = ["FORMAT_VERSION", "PreprocessConfig", "Stats", "default_workers", "preprocess"]
