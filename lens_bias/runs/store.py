"""A run folder: manifest.json (the run's arguments, finished chunks, starts) and chunks/chunk-NNNNN.pt
(each finished chunk's sums), every file written to a temp name and renamed."""

from __future__ import annotations

import hashlib
import json
import time
import warnings
from pathlib import Path

import torch

from ..core.errors import DataError, LensBiasError
from ..core.files import atomic_write
from ..core.prompts import PromptSet

MANIFEST = "manifest.json"
CHUNKS = "chunks"
FORMAT = 1
OUTPUTS = ("scores.csv", "scores.parquet", MANIFEST)


def chunk_path(out_dir: Path, i: int) -> Path:
    return out_dir / CHUNKS / f"chunk-{i:05d}.pt"


def read_manifest(out_dir: str | Path) -> dict | None:
    """The manifest of a run directory (arguments, finished chunks, starts), or None."""
    path = Path(out_dir) / MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path} is not valid JSON ({e}); delete it to start over") from None


def write_manifest(out_dir: Path, args: dict, key: str, n_chunks: int, starts: int | None = None, **extra):
    """Rewrite the manifest: arguments, the finished chunks found on disk, and `extra`."""
    old = read_manifest(out_dir) or {}
    finished = sorted(i for i in range(n_chunks) if chunk_path(out_dir, i).is_file())
    m = {"format": FORMAT, "args": args, "key": key, "n_chunks": n_chunks, "finished": finished,
         "complete": len(finished) == n_chunks, "starts": old.get("starts", 0) if starts is None else starts,
         "updated": time.strftime("%Y-%m-%dT%H:%M:%S"), **{k: v for k, v in old.items() if k in ("model", "data")},
         **extra}
    atomic_write(out_dir / MANIFEST, lambda f: f.write((json.dumps(m, indent=1) + "\n").encode()))


def clean_temp_files(out_dir: Path) -> None:
    """Remove temp files a killed run left (final names are never half-written)."""
    for folder in (out_dir, out_dir / CHUNKS):
        for p in folder.glob(".*"):
            if p.is_file() and (p.name.startswith(".chunk-") or p.name.startswith(".heatmap-")
                                or any(p.name.startswith(f".{n}.") for n in OUTPUTS)):
                p.unlink(missing_ok=True)


def load_chunk(path: Path, key: str) -> dict | None:
    """A finished chunk's record, or None when absent, unreadable or from other arguments."""
    if not path.is_file():
        return None
    try:
        rec = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - an unreadable chunk is recomputed
        warnings.warn(f"{path} is unreadable ({type(e).__name__}); computing it again")
        return None
    return rec if isinstance(rec, dict) and rec.get("key") == key else None


def model_fingerprint(model) -> str:
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


def check_same_run(out_dir: Path, manifest: dict | None, args: dict) -> None:
    if manifest is None:
        return
    old = manifest.get("args", {})
    diff = [f"{_LABELS.get(k, k)}: {old.get(k)!r} there, {args[k]!r} now" for k in args if old.get(k) != args[k]]
    if diff:
        raise LensBiasError(f"{out_dir} holds a run with other arguments ({'; '.join(diff)}); "
                            "use another output folder, or delete this one to start over")


def save_chunk(out_dir: Path, index: int, record: dict) -> Path:
    """Write one finished chunk's record (temp name, then rename)."""
    return atomic_write(chunk_path(out_dir, index), lambda f: torch.save(record, f))

