"""The one atomic writer (megatron/solo/io.py): unique temp name, fsync of the file and of its directory."""

import os
import stat

import pytest

from megatron.solo import io as solo_io
from megatron.solo.tokenizer import SoloTokenizer


def fsync_kinds(monkeypatch) -> list[str]:
    """Patch os.fsync to record 'file' or 'dir' for each call (and still sync)."""
    kinds, real = [], os.fsync

    def spy(fd):
        kinds.append("dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        real(fd)

    monkeypatch.setattr(os, "fsync", spy)
    return kinds


def test_write_atomic_fsyncs_file_then_directory(tmp_path, monkeypatch):
    kinds = fsync_kinds(monkeypatch)
    target = tmp_path / "x.json"
    target.write_text("old")
    solo_io.write_atomic(target, "new")
    assert target.read_text() == "new" and kinds == ["file", "dir"]
    assert os.listdir(tmp_path) == ["x.json"]  # no temporary file left
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~solo_io._UMASK


def test_write_atomic_uses_unique_temp_names_and_cleans_up_on_failure(tmp_path, monkeypatch):
    names = []
    real_replace = os.replace

    def failing_replace(src, dst):
        names.append(os.path.basename(src))
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", failing_replace)
    for _ in range(2):
        with pytest.raises(OSError, match="disk full"):
            solo_io.write_atomic(tmp_path / "a", b"data")
    assert len(set(names)) == 2 and all(n.startswith(".a.") for n in names)  # never a fixed "a.tmp"
    assert os.listdir(tmp_path) == []
    monkeypatch.setattr(os, "replace", real_replace)


def test_tokenizer_and_workdir_use_the_durable_writer(tmp_path, monkeypatch, tokenizer):
    from megatron.solo.data import workdir

    assert workdir.write_atomic is solo_io.write_atomic
    kinds = fsync_kinds(monkeypatch)
    tokenizer.save_pretrained(tmp_path / "tok")
    assert kinds == ["file", "dir"] * 2  # tokenizer.model and solo_tokenizer.json
    assert SoloTokenizer.from_pretrained(tmp_path / "tok").vocab_size == tokenizer.vocab_size
