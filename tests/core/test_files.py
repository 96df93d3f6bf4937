"""Atomic writes: the usual permissions, nothing left behind on failure, directories swapped whole."""

import os
import stat

import pytest

from lens_bias.core.files import FILE_MODE, _umask, atomic_write, replace_dir, write_text


def test_atomic_write_permissions_and_failure(tmp_path):
    path = write_text(tmp_path / "a" / "report.txt", "hello\n")
    assert path.read_text() == "hello\n" and stat.S_IMODE(path.stat().st_mode) == FILE_MODE

    def boom(f):
        f.write(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(path, boom)
    assert path.read_text() == "hello\n" and os.listdir(path.parent) == ["report.txt"]


def test_replace_dir(tmp_path):
    old, new = tmp_path / "model", tmp_path / ".model.tmp"
    old.mkdir()
    (old / "old.txt").write_text("old")
    new.mkdir(mode=0o700)
    (new / "new.txt").write_text("new")
    replace_dir(new, old)
    assert os.listdir(old) == ["new.txt"] and sorted(os.listdir(tmp_path)) == ["model"]
    assert stat.S_IMODE(old.stat().st_mode) == 0o777 & ~_umask()  # not mkdtemp's 0700
