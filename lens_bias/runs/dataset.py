"""Resumable, chunked and data-parallel runs of the locate methods over a whole data set.

The data set is cut into chunks of `chunk_size` prompts. Each finished chunk's aggregate — the
sums of its per-prompt scores and its prompt count, so chunks combine exactly — is written
atomically (temp file + rename) to `out_dir/chunks/chunk-00007.pt`, and `out_dir/manifest.json`
records the run's arguments and finished chunks. Starting again with the same arguments skips
finished chunks; other arguments on the same `out_dir` are an error naming the difference.
The result is the combination of all chunks (mean = sum / count), of the type the method
returns (ComponentScores per component, NASResult, ComponentScores), written as a tidy table
(CSV, and Parquet when pyarrow is present) and plotly heatmaps.

Data-parallel: under torch.distributed (torchrun, accelerate launch; gloo on CPU, nccl on GPU)
rank r takes the chunks i with i % world_size == r, and the sums and counts are all-reduced, so
every rank returns the same result; rank 0 writes the table and figures. Without a process
group, `rank`/`world_size` split the chunks between independent jobs sharing `out_dir` (e.g. a
job array); a job that finds every chunk done returns and writes the combined result.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
import warnings
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..core.checks import check_finite, check_seed
from ..core.errors import DataError, LensBiasError
from ..core.files import atomic_write, check_writable, file_lock, write_table
from ..core.hooks import device_of
from ..core.methods import ChunkSums, LocateMethod
from ..core.models import HookedModel, load_model
from ..core.prompts import PromptSet
from ..core.viz import heatmap
from ..locate.nas import NASResult, nas_heatmap
from .parallel import all_reduce, process_group
from .registry import expects_prompt_set, get_method, load_run_data, method_options
from .store import (
    CHUNKS,
    CLAIM,
    LOCK,
    MANIFEST,
    check_same_run,
    claim_run,
    chunk_entry,
    chunk_lock_path,
    chunk_path,
    clean_chunk_temps,
    clean_stale_locks,
    clean_temp_files,
    data_fingerprint,
    discard_run,
    finished_chunks,
    load_chunk,
    model_fingerprint,
    read_manifest,
    release_claim,
    run_differences,
    run_lock,
    save_chunk,
    write_manifest,
)


def result_frame(result):
    """The tidy table of a run's result (one row per component; NAS: one per head, ranked)."""
    import pandas as pd

    if isinstance(result, dict):
        return pd.concat([r.to_frame() for r in result.values()], ignore_index=True)
    if isinstance(result, NASResult):
        return result.ranking()
    return result.to_frame()


def write_outputs(out_dir: Path, spec: LocateMethod, result) -> list[Path]:
    """scores.csv / scores.parquet (tidy) and one self-contained heatmap-*.html per result."""
    df = result_frame(result)
    for col in ("layer", "pos", "head", "neuron"):
        if col in df:
            df[col] = df[col].astype("Int64")  # NaN where a component has no such axis
    written = write_table(out_dir / "scores", df)
    title = spec.summary.split(":")[0]
    if isinstance(result, NASResult):
        figs = {"nas": nas_heatmap(result)}
    elif isinstance(result, dict):
        figs = {k: heatmap(r, title=f"{title} — {k}") for k, r in result.items()}
    else:
        figs = {result.component: heatmap(result, title=f"{title} per {result.component}")}
    for k, fig in figs.items():
        html = fig.to_html(include_plotlyjs=True).encode()
        written.append(atomic_write(out_dir / f"heatmap-{k}.html", lambda f: f.write(html)))
    return written


def _user_files(out_dir: Path) -> list[str]:
    """Entries of an existing folder that no lens-bias run wrote (a run's own: its manifest, chunks,
    lock and temp files)."""
    if not out_dir.is_dir():
        return []
    ours = {MANIFEST, CHUNKS, LOCK}
    return sorted(p.name for p in out_dir.iterdir() if p.name not in ours and not p.name.startswith(CLAIM)
                  and not (p.name.startswith(f".{MANIFEST}.") and p.name.endswith(".tmp")))


def _pad_positions(rec: dict, width: int | None) -> dict:
    """A chunk whose prompts are all shorter than the data set's longest has fewer positions (a
    PromptSet slice drops all-padding columns): its per-position sums are padded to `width` with what
    a position after a prompt's end scores — no effect: the corrupted metric for patching and tracing
    (their values are metrics), 0 for attribution (its values are effects)."""
    if width is None:
        return rec
    for key, m in (rec.get("meta") or {}).items():
        if not isinstance(m, dict) or "pos" not in (m.get("dims") or ()):
            continue
        axis = list(m["dims"]).index("pos")
        values = rec["sums"][f"{key}/values"]
        short = width - values.shape[axis]
        if short <= 0:
            continue
        fill = rec["sums"][f"{key}/corrupted"].double() if m.get("method") in ("activation", "tracing") else 0.0
        shape = list(values.shape)
        shape[axis] = short
        rec["sums"][f"{key}/values"] = torch.cat([values, torch.zeros(shape, dtype=values.dtype) + fill], axis)
    return rec


def attribute_dataset(
    model: HookedModel,
    method: str,
    data,
    out_dir: str | Path,
    *,
    chunk_size: int = 32,
    batch_size: int | None = None,
    seed: int = 0,
    options: dict | None = None,
    device=None,
    dtype=None,
    rank: int | None = None,
    world_size: int | None = None,
    progress: bool = True,
    write: bool = True,
    overwrite: bool = False,
):
    """Run `method` over `data` in resumable chunks of `chunk_size` prompts; the combined result.

    method: a name in lens_bias.runs.REGISTRY (patching, attribution, tracing, nas, crispr).
    model: a hooked model, or a name/directory for load_model(device, dtype). data: a file (see
    load_run_data), a PromptSet (patching, attribution, tracing, nas) or multiple-choice items
    (crispr). batch_size: prompts per forward (rows of (component, prompt) for patching and
    tracing; the method's default when None). options: the method's options (REGISTRY[method].options).
    Returns dict[str, ComponentScores] (patching, attribution, tracing), NASResult (nas) or
    ComponentScores (crispr), without per-prompt values except NAS's; None for a job
    (rank/world_size without torch.distributed) that finds other jobs' chunks still missing.
    Finished chunks on disk whose checksum matches the manifest are skipped; `write` adds the table
    and heatmaps to out_dir. An existing out_dir that holds no run, or a run with other arguments
    and finished chunks, is refused unless `overwrite` (which discards that run's chunks and
    outputs). Processes sharing out_dir never compute the same chunk (a lock per chunk).
    """
    spec = get_method(method)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise LensBiasError(f"chunk_size must be ≥ 1, got {chunk_size}")
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise LensBiasError(f"batch_size must be ≥ 1, got {batch_size}")
    check_seed(seed)
    opts = method_options(spec, options)
    if isinstance(data, (str, Path)) and not Path(data).is_file():
        raise DataError(f"data file {data} {'is a directory' if Path(data).is_dir() else 'does not exist'}")
    out_dir = Path(out_dir)
    # the output folder, before any work: a folder, writable, and not a user's folder
    if out_dir.exists() and not out_dir.is_dir():
        raise LensBiasError(f"{out_dir} is a file; the output must be a folder")
    if read_manifest(out_dir) is None and _user_files(out_dir) and not overwrite:
        shown = ", ".join(_user_files(out_dir)[:3])
        raise LensBiasError(f"{out_dir} holds files but no lens-bias run ({shown}, ...): its files would be "
                            "overwritten; use another folder, or pass overwrite=True (--overwrite)")
    check_writable(out_dir)
    if isinstance(model, (str, Path)):
        model_name = str(model)
        model = load_model(model, device=device, dtype=dtype)
    else:
        model_name = str(getattr(model, "lens_bias_source", None) or getattr(model.cfg, "model_name", "model"))
    data_name = str(data) if isinstance(data, (str, Path)) else type(data).__name__
    data_hash = data_fingerprint(data)
    if isinstance(data, (str, Path)):
        data = load_run_data(model, method, data, opts)
    if isinstance(data, PromptSet) != expects_prompt_set(spec):
        want = "a PromptSet" if expects_prompt_set(spec) else "multiple-choice items"
        raise LensBiasError(f"{method} runs on {want}, got {type(data).__name__}")
    n = len(data)
    if n == 0:
        raise DataError("no prompts to run on")
    width = data.tokens.shape[1] if isinstance(data, PromptSet) else None

    dist = process_group()
    if dist is not None:
        rank, world_size = dist.get_rank(), dist.get_world_size()
    rank, world_size = rank or 0, world_size or 1
    if not 0 <= rank < world_size:
        raise LensBiasError(f"rank {rank} is not in 0..{world_size - 1}")
    torch.manual_seed(seed)
    args = {"method": method, "model_sha256": model_fingerprint(model), "data_sha256": data_hash,
            "n_prompts": n, "chunk_size": chunk_size, "seed": seed, "options": opts}
    key = hashlib.sha256(json.dumps(args, sort_keys=True).encode()).hexdigest()[:16]
    n_chunks = math.ceil(n / chunk_size)
    if not overwrite:
        check_same_run(out_dir, read_manifest(out_dir), args)
    # bad input the method finds in the whole data set fails here, before anything is written
    state = spec.prepare(model, data, opts, seed) if spec.prepare is not None else None

    created = not out_dir.exists()
    (out_dir / CHUNKS).mkdir(parents=True, exist_ok=True)
    with run_lock(out_dir):
        try:
            claim = claim_run(out_dir, key, args)  # a live run with other arguments is refused
        except LensBiasError:
            _remove_if_empty(out_dir, created)
            raise
        try:
            if rank == 0:
                _start(out_dir, args, key, n_chunks, overwrite, model_name, data_name)
        except BaseException:
            claim.release()
            raise
    try:
        return _run(model, spec, data, out_dir, args=args, key=key, n_chunks=n_chunks, chunk_size=chunk_size,
                    batch_size=batch_size, opts=opts, state=state, rank=rank, world_size=world_size, dist=dist,
                    width=width, progress=progress, write=write, created=created, claim=claim)
    finally:
        release_claim(out_dir, claim)


def _start(out_dir: Path, args: dict, key: str, n_chunks: int, overwrite: bool, model_name: str, data_name: str):
    """Rank 0, holding the folder's lock: the manifest of this start (an earlier run with other arguments
    discarded with `overwrite`, refused when it has finished chunks)."""
    old = read_manifest(out_dir)
    if run_differences(old, args):
        if finished_chunks(out_dir, old) and not overwrite:
            check_same_run(out_dir, old, args)  # another process started another run meanwhile
        if overwrite:
            discard_run(out_dir)
            (out_dir / CHUNKS).mkdir(parents=True, exist_ok=True)
    clean_temp_files(out_dir)
    clean_stale_locks(out_dir)
    starts = ((read_manifest(out_dir) or {}).get("starts", 0) if not run_differences(old, args) else 0) + 1
    write_manifest(out_dir, args, key, n_chunks, starts, model=model_name, data=data_name, locked=True)


def _run(model, spec: LocateMethod, data, out_dir: Path, *, args: dict, key: str, n_chunks: int, chunk_size: int,
         batch_size, opts: dict, state, rank: int, world_size: int, dist, width, progress: bool, write: bool,
         created: bool, claim):
    """attribute_dataset once this process holds its claim on the folder: its chunks, then the result."""
    method, n = spec.name, len(data)
    writes_manifest = dist is None or rank == 0
    if dist is not None:
        keys = [None] * world_size
        dist.all_gather_object(keys, key)  # also the barrier after rank 0's manifest
        if len(set(keys)) > 1:
            raise LensBiasError(f"the ranks were given different arguments (run keys {sorted(set(keys))})")
    (out_dir / CHUNKS).mkdir(parents=True, exist_ok=True)
    start_no = (read_manifest(out_dir) or {}).get("starts", 1)

    def load(i: int, manifest: dict | None):
        entry = chunk_entry(manifest, i)
        return load_chunk(chunk_path(out_dir, i), key, entry, i) if entry is not None else None

    mine = [i for i in range(n_chunks) if i % world_size == rank]
    bar = tqdm(total=len(mine), disable=not progress, unit="chunk",
               desc=f"{method}" + (f" rank {rank}" if world_size > 1 else ""),
               position=rank if world_size > 1 else None)
    computed: list[int] = []

    def compute(i: int) -> None:
        """Chunk i, computed and saved (call holding its lock)."""
        clean_chunk_temps(out_dir, i)
        lo, hi = i * chunk_size, min(n, (i + 1) * chunk_size)
        t0 = time.perf_counter()
        part = spec.run(model, data, lo, hi, opts, batch_size, state)
        # the values (clean/corrupted are NaN by design for methods without a counterfactual)
        check_finite({k: v for k, v in part.sums.items() if k.endswith("/values")},
                     f"{method} sums of chunk {i} (prompts {lo}..{hi - 1})", model)
        rec = {"key": key, "index": i, "lo": lo, "hi": hi, "count": part.count, "sums": part.sums, "meta": part.meta,
               "rows": part.rows, "start": start_no, "rank": rank, "pid": os.getpid(), "seconds": time.perf_counter() - t0}
        save_chunk(out_dir, i, rec, (args, key, n_chunks))
        computed.append(i)

    try:
        manifest = read_manifest(out_dir)
        busy = []
        for i in mine:
            if load(i, manifest) is not None:
                bar.update(1)
                continue
            with file_lock(chunk_lock_path(out_dir, i), blocking=False) as held:
                if not held:  # another process is computing it
                    busy.append(i)
                    continue
                if load(i, read_manifest(out_dir)) is None:  # it may have finished it just now
                    compute(i)
            bar.update(1)
        for i in busy:  # wait for the other process; compute what it left (it may have died)
            with file_lock(chunk_lock_path(out_dir, i)):
                if load(i, read_manifest(out_dir)) is None:
                    compute(i)
            bar.update(1)
    except BaseException:
        if writes_manifest and not finished_chunks(out_dir, read_manifest(out_dir)):
            release_claim(out_dir, claim)
            _undo_start(out_dir, created)  # nothing finished: leave the folder as it was
        raise
    finally:
        bar.close()

    owned = mine if dist is not None else range(n_chunks)
    manifest = read_manifest(out_dir)
    total, rows, missing = ChunkSums({}, 0), {}, []
    for i in owned:
        rec = load(i, manifest)
        if rec is None:
            missing.append(i)
            continue
        rec = _pad_positions(rec, width)
        for k, v in rec["sums"].items():
            total.sums[k] = total.sums[k] + v.double() if k in total.sums else v.double().clone()
        total.meta, total.count = rec["meta"] or total.meta, total.count + rec["count"]
        if rec["rows"]:
            rows[i] = rec["rows"]
    if dist is not None:
        total, rows, computed = all_reduce(dist, total, rows, computed, device_of(model))
    elif missing:
        warnings.warn(f"{len(missing)} of {n_chunks} chunks are not finished yet (e.g. chunk {missing[0]}); "
                      "the job that finishes the last one combines them")
        return None
    for k in sorted({k for r in rows.values() for k in r}):
        total.rows[k] = torch.cat([rows[i][k] for i in sorted(rows)])
    result = spec.finalize(model, data, total, opts)
    if write and (dist is None or rank == 0):
        with run_lock(out_dir):
            clean_temp_files(out_dir)
            clean_stale_locks(out_dir)
            write_outputs(out_dir, spec, result)
            outputs = sorted(p.name for p in out_dir.glob("*") if p.is_file() and not p.name.startswith("."))
            entry = {"start": start_no, "pid": os.getpid(), "world_size": world_size, "computed": computed,
                     "skipped": [i for i in range(n_chunks) if i not in set(computed)]}
            history = (read_manifest(out_dir) or {}).get("history", [])[-49:] + [entry]
            write_manifest(out_dir, args, key, n_chunks, outputs=outputs, locked=True, last_start=entry,
                           history=history)
    if dist is not None:
        dist.barrier()  # every rank returns once rank 0's outputs are on disk
    return result


def _undo_start(out_dir: Path, created: bool) -> None:
    """After a run failed before any chunk finished: remove its manifest (it binds nothing) and, when
    this run created the folder, the folder."""
    with run_lock(out_dir):
        (out_dir / MANIFEST).unlink(missing_ok=True)
        clean_temp_files(out_dir)
    _remove_if_empty(out_dir, created)


def _remove_if_empty(out_dir: Path, created: bool) -> None:
    """Remove an empty chunks/ and, when this run created it, an empty out_dir."""
    chunks = out_dir / CHUNKS
    if chunks.is_dir() and not any(chunks.iterdir()):
        chunks.rmdir()
    if created and out_dir.is_dir() and not any(out_dir.iterdir()):
        out_dir.rmdir()
