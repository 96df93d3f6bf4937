"""Atomic writes: the usual permissions, nothing left behind on failure, directories swapped whole."""

import os
import stat

import pytest

from lens_bias.core.files import (
    FILE_MODE,
    _umask,
    atomic_write,
    replace_dir,
    write_text,
)


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


def test_move_into_keeps_other_files(tmp_path):
    from lens_bias.core.files import move_into

    final, tmp = tmp_path / "out", tmp_path / ".out.tmp"
    final.mkdir()
    (final / "mine.txt").write_text("the user's")
    (final / "report.txt").write_text("old report")
    (final / "model").mkdir()
    (final / "model" / "stale.bin").write_text("stale")
    tmp.mkdir()
    (tmp / "report.txt").write_text("new report")
    (tmp / "model").mkdir()
    (tmp / "model" / "config.json").write_text("{}")
    move_into(tmp, final)
    assert (final / "mine.txt").read_text() == "the user's" and (final / "report.txt").read_text() == "new report"
    assert os.listdir(final / "model") == ["config.json"] and sorted(os.listdir(tmp_path)) == ["out"]



def test_atomic_dir_replaces_merges_or_leaves_the_folder_as_it_was(tmp_path):
    from lens_bias.core.files import atomic_dir

    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("the user's")
    with pytest.raises(RuntimeError):  # a failure half-way: nothing changes, no temp folder stays
        with atomic_dir(out) as tmp:
            assert tmp.parent == tmp_path and tmp.name.startswith(".out.tmp-")
            (tmp / "report.txt").write_text("half")
            raise RuntimeError("killed")
    assert os.listdir(out) == ["mine.txt"] and sorted(os.listdir(tmp_path)) == ["out"]
    with pytest.raises(OSError) as e:  # an OSError about a temp file names it where it was to go
        with atomic_dir(out, merge=True) as tmp:
            raise OSError(27, "File too large", str(tmp / "model" / "model.safetensors"))
    assert e.value.filename == str(out / "model" / "model.safetensors") and os.listdir(out) == ["mine.txt"]
    with atomic_dir(out, merge=True) as tmp:  # merge: the user's file stays
        (tmp / "report.txt").write_text("new")
    assert sorted(os.listdir(out)) == ["mine.txt", "report.txt"]
    with atomic_dir(out) as tmp:  # replace: the folder is the new one, whole
        (tmp / "model.bin").write_text("weights")
    assert os.listdir(out) == ["model.bin"] and sorted(os.listdir(tmp_path)) == ["out"]
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~_umask()
    with atomic_dir(tmp_path / "new" / "deep") as tmp:  # a missing parent is made
        (tmp / "a.txt").write_text("a")
    assert os.listdir(tmp_path / "new" / "deep") == ["a.txt"]


LOCKER = """
import sys, time
from lens_bias.core.files import file_lock
with file_lock(sys.argv[1]) as held:
    print("held", held, flush=True)
    time.sleep(float(sys.argv[2]))
"""


def test_file_lock_excludes_other_processes(tmp_path):
    import subprocess
    import sys
    import time

    from lens_bias.core.files import file_lock

    lock = tmp_path / ".lock"
    p = subprocess.Popen([sys.executable, "-c", LOCKER, str(lock), "3"], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held True"
    with file_lock(lock, blocking=False) as held:
        assert held is False  # the other process holds it
    t0 = time.monotonic()
    with file_lock(lock) as held:  # waits for it
        assert held is True and lock.exists()
    assert time.monotonic() - t0 > 0.5
    assert not lock.exists()  # removed on release
    p.wait()


def test_check_output_dir_refuses_before_work(tmp_path):
    from lens_bias.core import LensBiasError
    from lens_bias.core.files import check_output_dir

    (tmp_path / "f").write_text("x")
    with pytest.raises(LensBiasError, match="f is a file, not a folder"):
        check_output_dir(tmp_path / "f" / "out", overwrite=False)
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.txt").write_text("x")
    with pytest.raises(LensBiasError, match="not empty"):
        check_output_dir(tmp_path / "d", overwrite=False)
    assert check_output_dir(tmp_path / "d", overwrite=True) == tmp_path / "d"
    assert not [p for p in tmp_path.rglob(".*")]  # the write probe leaves nothing
