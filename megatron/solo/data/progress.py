"""Ordered parallel map over worker processes, and the progress line.

Results come back in submission order whatever the workers' timing, so the parent (which packs and
writes) sees exactly the sequence a single process would: the output is byte-identical for any worker
count. At most ``window`` batches are in flight, so memory stays bounded on inputs of any size.
"""

from __future__ import annotations

import multiprocessing
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from typing import TextIO

# forkserver: workers fork from a clean server process (no torch, no threads of the parent), which is
# safe with torch loaded in the parent and starts workers faster than spawn; spawn where unavailable.
START_METHOD = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"


def ordered_map(
    fn: Callable,
    items: Iterable,
    *,
    workers: int,
    initializer: Callable,
    initargs: tuple,
    window: int | None = None,
    preload: tuple[str, ...] = (),
) -> Iterator:
    """``map(fn, items)`` in order; ``workers=0`` runs in this process (after ``initializer(*initargs)``).

    ``preload``: modules the forkserver imports once, so that each worker forks with them loaded.
    """
    if workers == 0:
        initializer(*initargs)
        yield from map(fn, items)
        return
    window = window or 4 * workers
    context = multiprocessing.get_context(START_METHOD)
    if START_METHOD == "forkserver" and preload:
        context.set_forkserver_preload(["__main__", *preload])
    pool = ProcessPoolExecutor(workers, mp_context=context, initializer=initializer, initargs=initargs)
    pending: deque = deque()
    try:
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= window:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


class Progress:
    """samples/s and tokens/s on one line: redrawn in place on a terminal, a plain line every
    ``interval`` seconds otherwise (logs, CI)."""

    def __init__(self, stream: TextIO | None = None, interval: float = 30.0, enabled: bool = True):
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.interval = 0.2 if self.tty else interval
        self.enabled = enabled
        self.start = self._last = time.monotonic()
        self.base_samples = self.base_tokens = None

    def update(self, samples: int, tokens: int, packs: int, skipped: int, *, final: bool = False) -> None:
        if self.base_samples is None:  # rates count this process's work (a resumed run starts mid-way)
            self.base_samples, self.base_tokens = samples, tokens
        now = time.monotonic()
        if not self.enabled or (not final and now - self._last < self.interval):
            return
        self._last = now
        elapsed = max(now - self.start, 1e-9)
        line = (
            f"preprocess: {samples:,} samples ({(samples - self.base_samples) / elapsed:,.1f}/s) | "
            f"{_si(tokens)} tokens ({_si((tokens - self.base_tokens) / elapsed)}/s) | {packs:,} packs | "
            f"{skipped:,} skipped | {elapsed:,.0f} s"
        )
        if self.tty:
            self.stream.write("\r\x1b[K" + line + ("\n" if final else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()


def _si(x: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.2f}{unit}"
    return f"{x:.0f}"


__all__ = ["START_METHOD", "Progress", "ordered_map"]
