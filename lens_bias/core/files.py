"""Atomic file writes: write beside the target, fsync, rename — nothing half-written on disk. Output
folders checked before any work (writable, not holding a user's files); advisory file locks."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no advisory locks
    fcntl = None

from .errors import DataError, LensBiasError

#: The project's data folder: shipped checkpoints (the organism), data sets and the GPT-2 tokenizer.
DATA_DIR = Path(os.environ.get("LENS_BIAS_DATA", Path(__file__).resolve().parents[2] / "data"))


def shipped(*parts: str) -> Path:
    """A file or folder shipped in the project's data/ folder; a clear error when it is missing."""
    path = DATA_DIR.joinpath(*parts)
    if not path.exists():
        raise DataError(f"shipped data {'/'.join(parts)!r} is missing at {path}; set LENS_BIAS_DATA to the folder "
                        "holding the project's data/")
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


FILE_MODE = 0o666 & ~_umask()  # mkstemp creates 0600; outputs get the usual permissions


def atomic_write(path: str | os.PathLike, write: Callable) -> Path:
    """`write(binary file)` into a temp file beside `path`, fsync, then rename over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        named = writing_error(e, path)
        if named is not None and named is not e:
            raise named from None
        raise
    return path


def writing_error(e: BaseException, path: str | os.PathLike) -> OSError | None:
    """An error met while writing `path` as an OSError that names the file (a full disk or `ulimit -f`
    says only 'File too large'; safetensors raises its own SafetensorError '... (os error 27)'); `e`
    itself when it names a file already; None when it is not an I/O error."""
    if isinstance(e, OSError):
        return e if e.filename is not None else OSError(e.errno, e.strerror or str(e), str(path))
    if type(e).__name__ == "SafetensorError":
        code = re.search(r"os error (\d+)", str(e))
        n = int(code.group(1)) if code else errno.EIO
        return OSError(n, os.strerror(n) if code else str(e).strip().splitlines()[0], str(path))
    return None


def renamed_error(e: BaseException, tmp: str | os.PathLike, final: str | os.PathLike) -> BaseException:
    """An OSError about a file under the temp folder `tmp` as one about the same file under `final`
    (where it was to go: the name the user knows); other errors as they are."""
    name = getattr(e, "filename", None)
    if isinstance(e, OSError) and isinstance(name, str) and name.startswith(str(tmp)):
        return OSError(e.errno, e.strerror, str(final) + name[len(str(tmp)):])
    return e


def write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def write_jsonl(path: str | os.PathLike, rows) -> Path:
    """One JSON object a line."""
    return write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def write_csv(path: str | os.PathLike, df) -> Path:
    """A pandas DataFrame as CSV (no index)."""
    return write_text(path, df.to_csv(index=False))


def check_writable(path: str | os.PathLike) -> Path:
    """A LensBiasError, before any work, when the output folder `path` (existing or to be created)
    cannot be written: a file in the way, or no permission (tried by creating a file, not guessed)."""
    path = Path(path)
    probe = path
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise LensBiasError(f"cannot use output folder {path}: {probe} is a file, not a folder")
    try:
        fd, tmp = tempfile.mkstemp(dir=probe, prefix=".lens-bias-write-test-")
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        why = e.strerror or type(e).__name__
        raise LensBiasError(f"cannot write to output folder {path}: {probe} is not writable ({why})") from None
    return path


def check_output_dir(path: str | os.PathLike, overwrite: bool) -> Path:
    """Refuse, before any work, an output directory that exists and is not empty unless `overwrite`,
    and one that cannot be written."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise LensBiasError(f"output path {path} exists and is not a directory")
    if path.exists() and any(path.iterdir()) and not overwrite:
        raise LensBiasError(f"output directory {path} exists and is not empty; pass overwrite=True "
                            "(--overwrite) to replace it")
    return check_writable(path)


def move_into(tmp: str | os.PathLike, final: str | os.PathLike) -> Path:
    """Move a finished temp directory's entries into `final` (created when missing): each file is
    renamed over its namesake, each sub-folder replaced whole; other entries of `final` stay."""
    tmp, final = Path(tmp), Path(final)
    if not final.exists():
        return replace_dir(tmp, final)
    for entry in sorted(tmp.iterdir()):
        if entry.is_dir():
            replace_dir(entry, final / entry.name)
        else:
            os.chmod(entry, FILE_MODE)
            os.replace(entry, final / entry.name)
    shutil.rmtree(tmp, ignore_errors=True)
    return final


@contextlib.contextmanager
def file_lock(path: str | os.PathLike, *, blocking: bool = True) -> Iterator[bool]:
    """Hold an exclusive advisory lock (flock) on the file `path` within the block. Yields True when
    held; with `blocking=False`, False at once when another process holds it. The lock file is
    removed on release (a waiter that got the removed file's lock notices and retries)."""
    path = Path(path)
    if fcntl is None:  # pragma: no cover
        yield True
        return
    while True:
        fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                yield False
                return
            raise
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the previous holder removed it while we waited: lock the new one
    try:
        yield True
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        os.close(fd)


def held_elsewhere(path: str | os.PathLike) -> bool:
    """True when another process holds a lock (flock) on the file `path`; a lock file nobody holds is
    removed (its holder died: the kernel released its lock). Call it holding a lock that orders the
    callers (e.g. a folder's run lock), so nobody opens `path` meanwhile."""
    if fcntl is None:  # pragma: no cover
        return False
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return True
        raise
    finally:
        os.close(fd)  # (releases the lock just taken, if taken)
    Path(path).unlink(missing_ok=True)
    return False


class SharedLock:
    """A shared lock (flock) on the file `path`, held from `acquire()` until `release()`, which removes
    the file when no other process holds it. Take and release it holding a lock that orders the
    callers (see held_elsewhere)."""

    def __init__(self, path: str | os.PathLike):
        self.path, self.fd = Path(path), None

    def acquire(self) -> "SharedLock":
        if fcntl is not None:
            self.fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o666)
            fcntl.flock(self.fd, fcntl.LOCK_SH)
        return self

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the last holder: the file goes
            self.path.unlink(missing_ok=True)
        except OSError:
            pass  # another process holds it still
        finally:
            os.close(self.fd)
            self.fd = None


def replace_dir(tmp: str | os.PathLike, final: str | os.PathLike) -> Path:
    """Move a finished temp directory into place; an old directory goes only once the new one is whole."""
    tmp, final = Path(tmp), Path(final)
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp creates 0700
    trash = None
    if final.exists():
        trash = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, trash)
    os.replace(tmp, final)
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)
    return final


def write_table(path: str | os.PathLike, df) -> list[Path]:
    """A pandas DataFrame as `path`.csv and, when pyarrow is installed, `path`.parquet."""
    path = Path(path)
    written = [write_csv(path.with_suffix(".csv"), df)]
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        return written
    written.append(atomic_write(path.with_suffix(".parquet"), lambda f: df.to_parquet(f, index=False)))
    return written
