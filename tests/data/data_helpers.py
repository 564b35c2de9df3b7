"""Plain helpers shared by the preprocessing tests (fixtures live in conftest.py)."""

import io
import json
import tarfile
from pathlib import Path

import numpy as np


def write_jsonl(path: Path, records, raw_lines=()) -> Path:
    """Records as JSON lines, then ``raw_lines`` (bytes) verbatim."""
    with open(path, "wb") as f:
        for r in records:
            f.write(json.dumps(r).encode() + b"\n")
        for line in raw_lines:
            f.write(line + b"\n")
    return path


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 0
            tar.addfile(info, io.BytesIO(data))
    return path


def output_bytes(prefix: str) -> dict[str, bytes]:
    """Every output file of a prefix, by suffix."""
    suffixes = [".bin", ".idx", ".pack.bin", ".pack.idx", ".pack.json", ".stats.json", ".errors.jsonl"]
    return {s: Path(prefix + s).read_bytes() for s in suffixes}


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def sleepy_identity(x):
    """For the ordered-map test: finishes in an order unrelated to the input's."""
    import time

    time.sleep(((x * 7919) % 13) / 1000)
    return x


def no_setup(*args):
    pass
