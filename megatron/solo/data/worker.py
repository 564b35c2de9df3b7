"""What a preprocessing worker process runs: RawRecord → parse → encode → Document or SampleError.

Kept free of torch and megatron-core so that a spawned worker starts in a fraction of a second.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass

from megatron.solo.data.encode import Document, EncodeConfig, encode_sample
from megatron.solo.data.errors import SampleError, record_failure
from megatron.solo.data.samples import parse_record
from megatron.solo.data.sources import RawRecord


@dataclass(frozen=True)
class WorkerConfig:
    input_format: str
    image_root: str | None
    allow_outside_root: bool
    tokenizer_model: str | None
    encode: EncodeConfig
    parent_pid: int
    """The driver's pid: a worker exits when it is gone (killed), instead of waiting forever on its queue."""


_state: tuple | None = None  # (config, tokenizer), set once per process by init_worker


def init_worker(config: WorkerConfig) -> None:
    from megatron.solo.tokenizer import SoloTokenizer

    global _state
    _state = (config, SoloTokenizer(config.tokenizer_model))
    if config.parent_pid != os.getpid():
        threading.Thread(target=_exit_with_parent, args=(config.parent_pid,), daemon=True).start()


def _exit_with_parent(pid: int, period: float = 1.0) -> None:
    # A pool worker holds both ends of its task pipe, so it never sees EOF when the driver is SIGKILLed;
    # and with forkserver its parent is the server, which lives as long as any worker does.
    while True:
        time.sleep(period)
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            os._exit(1)
        except PermissionError:  # the pid exists (owned by someone else): keep waiting
            pass


def process_batch(records: list[RawRecord | SampleError]) -> list[Document | SampleError]:
    """Encode records in order; a bad one becomes its SampleError (errors found while reading pass through).

    Any exception inside one record's processing is that record's skip (:func:`record_failure`), except
    a disk error, which stops the run (:class:`~megatron.solo.data.errors.InputError`).
    """
    config, tokenizer = _state
    out: list[Document | SampleError] = []
    for record in records:
        if isinstance(record, SampleError):
            out.append(record)
            continue
        try:
            sample = parse_record(record, config.input_format, config.image_root, config.allow_outside_root)
            out.append(encode_sample(sample, tokenizer, config.encode))
        except MemoryError:  # the machine's, not the record's
            raise
        except Exception as e:
            out.append(record_failure(e, record.origin))
    return out


__all__ = ["WorkerConfig", "init_worker", "process_batch"]
