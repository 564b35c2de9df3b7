"""Checksums of checkpoint directories: a per-file manifest written with every save, verified at load.

``CHECKSUMS`` lists ``sha256  name`` per file, the format of ``sha256sum``, so a copy can also be checked
with ``sha256sum -c CHECKSUMS`` from inside the directory; each line also records the size, so a truncated
file is named before any hashing. The work is shared: every rank hashes a round-robin share of the files
(a 7B checkpoint with its optimizer is ~100 GB), and rank 0 writes the manifest. Both functions are
collective when a process group exists.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch.distributed as dist

from megatron.solo.io import write_atomic

MANIFEST = "CHECKSUMS"
_CHUNK = 16 << 20


class ChecksumError(RuntimeError):
    """A checkpoint file that does not match its manifest (or a manifest that does not match the files)."""


def _world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def _gather(value) -> list:
    if not dist.is_initialized():
        return [value]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.is_file() and p.name != MANIFEST)


def _my_share(names: list[str]) -> list[str]:
    rank, world = _world()
    return names[rank::world]


def write_manifest(directory: str | os.PathLike) -> None:
    """Hash every file of ``directory`` (shared over ranks) and write ``CHECKSUMS`` there (rank 0, durable)."""
    directory = Path(directory)
    names = _files(directory)
    mine = {name: (sha256_file(directory / name), (directory / name).stat().st_size) for name in _my_share(names)}
    entries = {name: entry for part in _gather(mine) for name, entry in part.items()}
    if _world()[0] == 0:
        text = "".join(f"{entries[n][0]}  {n}\n" for n in names)
        sizes = "".join(f"# size {entries[n][1]} {n}\n" for n in names)
        write_atomic(directory / MANIFEST, text + sizes)


def read_manifest(directory: Path) -> dict[str, tuple[str, int]]:
    """name → (sha256, size) from ``directory``'s manifest."""
    digests, sizes = {}, {}
    for line in (directory / MANIFEST).read_text().splitlines():
        if line.startswith("# size "):
            size, name = line[len("# size ") :].split(" ", 1)
            sizes[name] = int(size)
        elif line.strip():
            digest, name = line.split("  ", 1)
            digests[name] = digest
    if set(digests) != set(sizes):
        raise ChecksumError(f"{directory / MANIFEST}: digests and sizes list different files")
    return {name: (digests[name], sizes[name]) for name in digests}


def verify_manifest(directory: str | os.PathLike, what: str) -> bool:
    """Check ``directory``'s files against its manifest (shared over ranks); False when it has none.

    Raises :class:`ChecksumError` on every rank, naming ``what`` (e.g. "iteration 50") and each bad file.
    """
    directory = Path(directory)
    if not (directory / MANIFEST).is_file():
        return False
    expected = read_manifest(directory)
    present = set(_files(directory))
    problems = [f"{name}: missing" for name in sorted(set(expected) - present)]
    problems += [f"{name}: not in the manifest" for name in sorted(present - set(expected))]
    for name in _my_share(sorted(set(expected) & present)):
        digest, size = expected[name]
        actual = (directory / name).stat().st_size
        if actual != size:
            problems.append(f"{name}: {actual} bytes, the manifest says {size} (truncated or extended)")
        elif sha256_file(directory / name) != digest:
            problems.append(f"{name}: sha256 differs from the manifest (corrupted)")
    found = sorted({p for part in _gather(problems) for p in part})
    if found:
        raise ChecksumError(
            f"checkpoint {directory} ({what}) is damaged: "
            + "; ".join(found)
            + " (restore it from a copy, or load an earlier iteration)"
        )
    return True
