"""A run folder: manifest.json (the run's arguments, each finished chunk's index, rows and sha256,
starts) and chunks/chunk-NNNNN.pt (each finished chunk's sums), every file written to a temp name
and renamed.

A chunk is trusted only when its bytes match the sha256 the manifest records for that index and the
record inside names the same index and run: a chunk changed on disk, or copied over another, is
computed again (with a warning). Processes sharing a folder coordinate with advisory locks: one lock
for the manifest and the outputs (held for a moment), one per chunk while it is computed, and one
claim per run (a shared lock on .lens-bias.run-<key>, held while the process runs): a folder belongs
to one run's arguments, so a second run with other arguments is refused while the first lives.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import time
import warnings
from pathlib import Path

import torch

from ..core.errors import DataError, LensBiasError
from ..core.files import SharedLock, atomic_write, file_lock, held_elsewhere
from ..core.models import HookedModel
from ..core.prompts import PromptSet

MANIFEST = "manifest.json"
CHUNKS = "chunks"
LOCK = ".lens-bias.lock"
CLAIM = ".lens-bias.run-"
FORMAT = 2
OUTPUTS = ("scores.csv", "scores.parquet", MANIFEST)


def chunk_path(out_dir: Path, i: int) -> Path:
    return out_dir / CHUNKS / f"chunk-{i:05d}.pt"


def chunk_lock_path(out_dir: Path, i: int) -> Path:
    return out_dir / CHUNKS / f".lock-chunk-{i:05d}"


def run_lock(out_dir: Path):
    """The folder's lock for the manifest and the outputs (hold it only for a moment)."""
    return file_lock(Path(out_dir) / LOCK)


def read_manifest(out_dir: str | Path) -> dict | None:
    """The manifest of a run directory (arguments, finished chunks, starts), or None."""
    path = Path(out_dir) / MANIFEST
    if not path.is_file():
        return None
    try:
        m = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path} is not valid JSON ({e}); delete it to start over") from None
    if not isinstance(m, dict):
        raise DataError(f"{path} is not a lens-bias run manifest; delete it to start over")
    return m


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def finished_chunks(out_dir: Path, manifest: dict | None, n_chunks: int | None = None) -> list[int]:
    """Indices the manifest records as finished whose chunk file is on disk (contents not yet checked)."""
    entries = (manifest or {}).get("chunks") or {}
    out = sorted(int(i) for i in entries if chunk_path(out_dir, int(i)).is_file())
    return [i for i in out if n_chunks is None or i < n_chunks]


def write_manifest(out_dir: Path, args: dict, key: str, n_chunks: int, starts: int | None = None, *,
                   chunk: tuple[int, dict] | None = None, locked: bool = False, **extra):
    """Rewrite the manifest under the folder's lock: arguments, the chunk entries (`chunk` = (index,
    entry) adds one), the finished chunks on disk, and `extra`."""
    if not locked:
        with run_lock(out_dir):
            return write_manifest(out_dir, args, key, n_chunks, starts, chunk=chunk, locked=True, **extra)
    old = read_manifest(out_dir) or {}
    entries = dict(old.get("chunks") or {}) if old.get("key") == key else {}
    if chunk is not None:
        entries[str(chunk[0])] = chunk[1]
    m = {"format": FORMAT, "args": args, "key": key, "n_chunks": n_chunks,
         "chunks": {k: entries[k] for k in sorted(entries, key=int)},
         "starts": old.get("starts", 0) if starts is None else starts,
         "updated": time.strftime("%Y-%m-%dT%H:%M:%S"),
         **{k: v for k, v in old.items() if k in ("model", "data", "outputs", "last_start", "history")}, **extra}
    finished = finished_chunks(out_dir, m, n_chunks)
    m["finished"], m["complete"] = finished, len(finished) == n_chunks
    atomic_write(out_dir / MANIFEST, lambda f: f.write((json.dumps(m, indent=1) + "\n").encode()))
    return m


def clean_temp_files(out_dir: Path) -> None:
    """Remove the temp files a killed run left beside the manifest and outputs (call with the
    folder's lock held; chunk temps are removed by whoever claims the chunk)."""
    for p in out_dir.glob(".*"):
        if p.is_file() and p.name.endswith(".tmp") and (
                p.name.startswith(".heatmap-") or any(p.name.startswith(f".{n}.") for n in OUTPUTS)):
            p.unlink(missing_ok=True)


def clean_stale_locks(out_dir: Path) -> None:
    """Remove chunk lock files a killed process left (a lock another process holds stays)."""
    for p in (out_dir / CHUNKS).glob(".lock-chunk-*") if (out_dir / CHUNKS).is_dir() else ():
        with file_lock(p, blocking=False):
            pass  # taken: nobody holds it; released: the file is removed


def clean_chunk_temps(out_dir: Path, i: int) -> None:
    """Remove chunk i's temp files (call holding chunk i's lock)."""
    for p in (out_dir / CHUNKS).glob(f".{chunk_path(out_dir, i).name}.*.tmp"):
        p.unlink(missing_ok=True)


def read_record(path: Path, data: bytes, key: str) -> dict | None:
    """The torch record in `data` (read from `path`) when it was made with arguments `key`; None when it is
    unreadable (a warning names the file: it is computed again) or from other arguments."""
    try:
        rec = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - an unreadable record is recomputed
        warnings.warn(f"{path} is unreadable ({type(e).__name__}); computing it again", stacklevel=3)
        return None
    return rec if isinstance(rec, dict) and rec.get("key") == key else None


def load_chunk(path: Path, key: str, entry: dict | None = None, index: int | None = None) -> dict | None:
    """A finished chunk's record, or None when absent, unreadable, from other arguments, or — with its
    manifest `entry` — not the bytes the manifest recorded for chunk `index` (a warning says which)."""
    if not path.is_file():
        return None
    data = path.read_bytes()
    if entry is not None and _sha256(data) != entry.get("sha256"):
        warnings.warn(f"{path} does not match the checksum the manifest recorded for it (changed on disk); "
                      "computing it again", stacklevel=2)
        return None
    rec = read_record(path, data, key)
    if rec is None:
        return None
    if index is not None and rec.get("index") != index:
        warnings.warn(f"{path} holds chunk {rec.get('index')}, not chunk {index} (copied over?); computing it again", stacklevel=2)
        return None
    return rec


def model_fingerprint(model: HookedModel) -> str:
    """sha256 of every parameter's name, shape, dtype and (sum, L1, L2) — any weight edit changes it."""
    h = hashlib.sha256()
    with torch.no_grad():
        for name, p in model.named_parameters():
            s = torch.stack([p.sum(dtype=torch.float64), torch.linalg.vector_norm(p, 1, dtype=torch.float64),
                             torch.linalg.vector_norm(p, 2, dtype=torch.float64)]).tolist()
            h.update(f"{name}{tuple(p.shape)}{p.dtype}{s[0]:.9e},{s[1]:.9e},{s[2]:.9e};".encode())
    return h.hexdigest()


def data_fingerprint(data) -> str:
    """sha256 of a data file's bytes, a PromptSet's tensors and metadata, or a list of items."""
    h = hashlib.sha256()
    if isinstance(data, (str, Path)):
        h.update(Path(data).read_bytes())
    elif isinstance(data, PromptSet):
        for t in (data.tokens, data.attention_mask, data.answer_pos, data.answer_ids, data.corrupted_tokens,
                  data.subject_spans):
            h.update(b"-" if t is None else t.cpu().numpy().tobytes() + str(tuple(t.shape)).encode())
        h.update(json.dumps(data.metadata, sort_keys=True, default=str).encode())
    else:
        h.update(json.dumps(list(data), sort_keys=True, default=str).encode())
    return h.hexdigest()


_LABELS = {"method": "method", "model_sha256": "model weights", "data_sha256": "data",
           "n_prompts": "number of prompts", "chunk_size": "chunk size", "seed": "seed", "options": "options"}


def run_differences(manifest: dict | None, args: dict) -> list[str]:
    """What differs between a manifest's arguments and `args` ('chunk size: 16 there, 8 now', ...)."""
    if manifest is None:
        return []
    old = manifest.get("args", {})
    return [f"{_LABELS.get(k, k)}: {old.get(k)!r} there, {args[k]!r} now" for k in args if old.get(k) != args[k]]


def check_same_run(out_dir: Path, manifest: dict | None, args: dict) -> None:
    """Refuse a folder holding finished chunks of a run with other arguments (a manifest without
    finished chunks — a run that failed before its first chunk — binds nothing)."""
    diff = run_differences(manifest, args)
    if diff and finished_chunks(out_dir, manifest):
        raise LensBiasError(f"{out_dir} holds a run with other arguments ({'; '.join(diff)}); use another output "
                            "folder, or pass overwrite=True (--overwrite) to discard it and start over")


def claim_run(out_dir: Path, key: str, args: dict) -> SharedLock:
    """This process's claim on `out_dir` for the run `key` (call holding run_lock; release with
    `release_claim`). Processes of one run share the claim; a live run with other arguments is refused
    — the two would overwrite each other's manifest and one run's chunks would be lost —, the claim of
    a run that died is dropped."""
    for path in sorted(out_dir.glob(f"{CLAIM}*")):
        other = path.name[len(CLAIM):]
        if other != key and held_elsewhere(path):
            manifest = read_manifest(out_dir)
            diff = run_differences(manifest, args) if (manifest or {}).get("key") == other else []
            raise LensBiasError(f"{out_dir} is in use by another lens-bias run with other arguments"
                                f"{' (' + '; '.join(diff) + ')' if diff else ''}, running now: wait for it to finish, "
                                "or use another output folder")
    return SharedLock(out_dir / f"{CLAIM}{key}").acquire()


def release_claim(out_dir: Path, claim: SharedLock) -> None:
    """Give up this process's claim (once: a claim already released — e.g. before its folder was removed
    — is left alone)."""
    if claim.fd is None:
        return
    with run_lock(out_dir):
        claim.release()


def save_chunk(out_dir: Path, index: int, record: dict, manifest_args: tuple) -> Path:
    """Write one finished chunk: its sha256 and rows go into the manifest first, then the file is
    written (temp name, then rename) — a chunk file on disk always has its manifest entry."""
    buf = io.BytesIO()
    torch.save(record, buf)
    data = buf.getvalue()
    entry = {"sha256": _sha256(data), "lo": record["lo"], "hi": record["hi"], "bytes": len(data)}
    args, key, n_chunks = manifest_args
    write_manifest(out_dir, args, key, n_chunks, chunk=(index, entry))
    path = atomic_write(chunk_path(out_dir, index), lambda f: f.write(data))
    write_manifest(out_dir, args, key, n_chunks)  # its list of finished chunks now holds this one
    return path


def chunk_entry(manifest: dict | None, index: int) -> dict | None:
    return ((manifest or {}).get("chunks") or {}).get(str(index))


def discard_run(out_dir: Path) -> None:
    """Remove a run's manifest, chunks and outputs (overwrite=True on a folder holding another run)."""
    for i in finished_chunks(out_dir, read_manifest(out_dir)):
        chunk_path(out_dir, i).unlink(missing_ok=True)
    for p in (out_dir / CHUNKS).glob("chunk-*.pt") if (out_dir / CHUNKS).is_dir() else ():
        p.unlink(missing_ok=True)
    for name in OUTPUTS:
        (out_dir / name).unlink(missing_ok=True)
    for p in out_dir.glob("heatmap-*.html"):
        p.unlink(missing_ok=True)
    if (out_dir / CHUNKS).is_dir() and not any((out_dir / CHUNKS).iterdir()):
        os.rmdir(out_dir / CHUNKS)
