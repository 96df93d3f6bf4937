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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..core.checks import check_finite, check_seed
from ..core.errors import DataError, LensBiasError
from ..core.files import atomic_write, check_writable, file_lock, write_table
from ..core.hooks import device_of
from ..core.methods import ChunkSums, LocateMethod
from ..core.models import HookedModel, resolve_model
from ..core.prompts import PromptSet
from ..core.scores import ComponentScores
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


@dataclass(frozen=True)
class RunResult:
    """A batch run's outcome. `scores`: the method's result — dict[str, ComponentScores] (patching,
    attribution, tracing, baselines: one per site), NASResult (nas) or ComponentScores (crispr) —, None
    with `done` False for a job whose chunks are done while other jobs' are still missing. `computed`:
    the chunks computed by this start (every rank's, under torch.distributed), `skipped` the others."""

    scores: ComponentScores | dict[str, ComponentScores] | None
    done: bool
    out_dir: Path
    n_prompts: int
    n_chunks: int
    computed: tuple[int, ...] = ()
    skipped: tuple[int, ...] = ()


@dataclass
class _Plan:
    """One run's arguments, as its steps share them."""

    spec: LocateMethod
    model: HookedModel
    data: Any  # a PromptSet, or multiple-choice items
    out_dir: Path
    opts: dict
    args: dict  # what the manifest records and a rerun must match
    key: str
    chunk_size: int
    batch_size: int | None
    rank: int
    world_size: int
    dist: Any  # torch.distributed under a process group, else None
    progress: bool
    write: bool
    state: Any = None  # spec.prepare's, shared by every chunk
    created: bool = False  # this run created out_dir
    start_no: int = 1  # the manifest's count of starts, this one included

    @property
    def n_chunks(self) -> int:
        return math.ceil(len(self.data) / self.chunk_size)

    @property
    def writes_folder(self) -> bool:
        """This process writes the outputs and undoes a failed start: no process group, or its rank 0."""
        return self.dist is None or self.rank == 0


def run_dataset(
    model: HookedModel | str | Path,
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
) -> RunResult:
    """Run `method` over `data` in resumable chunks of `chunk_size` prompts: check → load → run → combine
    → write. Returns a RunResult (its `scores`: the combined result, as attribute_dataset returns it).

    method: a name in lens_bias.runs.REGISTRY (patching, attribution, tracing, nas, crispr, baselines).
    model: a hooked model, or a name/directory for load_model(device, dtype). data: a file (see
    load_run_data), a PromptSet (patching, attribution, tracing, nas) or multiple-choice items
    (crispr). batch_size: prompts per forward (rows of (component, prompt) for patching and
    tracing; the method's default when None). options: the method's options (REGISTRY[method].options).
    Results carry no per-prompt values except NAS's. A job (rank/world_size without
    torch.distributed) that finds other jobs' chunks still missing gets done=False and no scores.
    Finished chunks on disk whose checksum matches the manifest are skipped; `write` adds the table
    and heatmaps to out_dir. An existing out_dir that holds no run, or a run with other arguments
    and finished chunks, is refused unless `overwrite` (which discards that run's chunks and
    outputs). Processes sharing out_dir never compute the same chunk (a lock per chunk).
    """
    spec, opts, out_dir = _check(method, data, out_dir, chunk_size, batch_size, seed, options, overwrite)
    model, model_name = resolve_model(model, device=device, dtype=dtype)
    plan, data_name = _load(model, spec, opts, data, out_dir, chunk_size=chunk_size, batch_size=batch_size,
                            seed=seed, rank=rank, world_size=world_size, progress=progress, write=write,
                            overwrite=overwrite)
    claim = _claim(plan, overwrite, model_name, data_name)
    try:
        computed = _compute(plan, claim)
        total, computed = _combine(plan, computed)
        if total is None:
            return RunResult(None, False, out_dir, len(plan.data), plan.n_chunks, tuple(computed))
        result = spec.finalize(model, plan.data, total, opts)
        skipped = [i for i in range(plan.n_chunks) if i not in set(computed)]
        if write and plan.writes_folder:
            _write(plan, result, computed, skipped)
        if plan.dist is not None:
            plan.dist.barrier()  # every rank returns once rank 0's outputs are on disk
        return RunResult(result, True, out_dir, len(plan.data), plan.n_chunks, tuple(computed), tuple(skipped))
    finally:
        release_claim(out_dir, claim)


def attribute_dataset(model: HookedModel | str | Path, method: str, data, out_dir: str | Path, **kwargs
                      ) -> ComponentScores | dict[str, ComponentScores] | None:
    """`run_dataset(...).scores` (same arguments): dict[str, ComponentScores] (patching, attribution,
    tracing, baselines), NASResult (nas) or ComponentScores (crispr); None for a job (rank/world_size
    without torch.distributed) that finds other jobs' chunks still missing."""
    return run_dataset(model, method, data, out_dir, **kwargs).scores


# ---------------------------------------------------------------------------------------
# The steps: check → load → (claim the folder) → run → combine → write
# ---------------------------------------------------------------------------------------
def _check(method: str, data, out_dir, chunk_size, batch_size, seed, options,
           overwrite: bool) -> tuple[LocateMethod, dict, Path]:
    """The method, its options and the output folder, refused before any work when they are wrong: a
    folder, writable, and not a user's folder."""
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
    if out_dir.exists() and not out_dir.is_dir():
        raise LensBiasError(f"{out_dir} is a file; the output must be a folder")
    if read_manifest(out_dir) is None and _user_files(out_dir) and not overwrite:
        shown = ", ".join(_user_files(out_dir)[:3])
        raise LensBiasError(f"{out_dir} holds files but no lens-bias run ({shown}, ...): its files would be "
                            "overwritten; use another folder, or pass overwrite=True (--overwrite)")
    check_writable(out_dir)
    return spec, opts, out_dir


def _load(model: HookedModel, spec: LocateMethod, opts: dict, data, out_dir: Path, *, chunk_size: int, batch_size,
          seed: int, rank, world_size, progress: bool, write: bool, overwrite: bool) -> tuple[_Plan, str]:
    """The data (read from its file), this process's rank, the run's arguments and the method's shared
    state: bad input the method finds in the whole data set fails here, before anything is written."""
    data_name = str(data) if isinstance(data, (str, Path)) else type(data).__name__
    data_hash = data_fingerprint(data)
    if isinstance(data, (str, Path)):
        data = load_run_data(model, spec, data, opts)
    if isinstance(data, PromptSet) != expects_prompt_set(spec):
        want = "a PromptSet" if expects_prompt_set(spec) else "multiple-choice items"
        raise LensBiasError(f"{spec.name} runs on {want}, got {type(data).__name__}")
    if len(data) == 0:
        raise DataError("no prompts to run on")
    dist = process_group()
    if dist is not None:
        rank, world_size = dist.get_rank(), dist.get_world_size()
    rank, world_size = rank or 0, world_size or 1
    if not 0 <= rank < world_size:
        raise LensBiasError(f"rank {rank} is not in 0..{world_size - 1}")
    torch.manual_seed(seed)
    args = {"method": spec.name, "model_sha256": model_fingerprint(model), "data_sha256": data_hash,
            "n_prompts": len(data), "chunk_size": chunk_size, "seed": seed, "options": opts}
    key = hashlib.sha256(json.dumps(args, sort_keys=True).encode()).hexdigest()[:16]
    if not overwrite:
        check_same_run(out_dir, read_manifest(out_dir), args)
    plan = _Plan(spec, model, data, out_dir, opts, args, key, chunk_size, batch_size, rank, world_size, dist,
                 progress, write)
    plan.state = spec.prepare(model, data, opts, seed) if spec.prepare is not None else None
    return plan, data_name


def _claim(plan: _Plan, overwrite: bool, model_name: str, data_name: str):
    """This process's claim on the folder (a live run with other arguments is refused) and, on rank 0,
    the manifest of this start; then every rank has the same run key."""
    out_dir = plan.out_dir
    plan.created = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    with run_lock(out_dir):
        try:
            claim = claim_run(out_dir, plan.key, plan.args)
        except LensBiasError:
            # refused: the folder may be another live run's, so its chunks/ (maybe still empty) is not ours to remove
            _remove_if_empty(out_dir, plan.created, chunks=False)
            raise
        (out_dir / CHUNKS).mkdir(exist_ok=True)
        try:
            if plan.rank == 0:
                _start(out_dir, plan.args, plan.key, plan.n_chunks, overwrite, model_name, data_name)
        except BaseException:
            claim.release()
            raise
    try:
        if plan.dist is not None:
            keys = [None] * plan.world_size
            plan.dist.all_gather_object(keys, plan.key)  # also the barrier after rank 0's manifest
            if len(set(keys)) > 1:
                raise LensBiasError(f"the ranks were given different arguments (run keys {sorted(map(str, set(keys)))})")
        plan.start_no = (read_manifest(out_dir) or {}).get("starts", 1)
    except BaseException:
        release_claim(out_dir, claim)
        raise
    return claim


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


def _finished(plan: _Plan, i: int, manifest: dict | None):
    """Chunk i's record when it is finished on disk (its checksum matching the manifest), else None."""
    entry = chunk_entry(manifest, i)
    return load_chunk(chunk_path(plan.out_dir, i), plan.key, entry, i) if entry is not None else None


def _compute(plan: _Plan, claim) -> list[int]:
    """This process's chunks (rank r: every world_size-th), each computed unless finished; one a chunk
    another process is computing is waited for. Returns the chunks computed here. When it fails before
    any chunk of the run finished, the folder is left as it was."""
    out_dir, n = plan.out_dir, len(plan.data)
    mine = [i for i in range(plan.n_chunks) if i % plan.world_size == plan.rank]
    bar = tqdm(total=len(mine), disable=not plan.progress, unit="chunk",
               desc=plan.spec.name + (f" rank {plan.rank}" if plan.world_size > 1 else ""),
               position=plan.rank if plan.world_size > 1 else None)
    computed: list[int] = []

    def compute(i: int) -> None:
        """Chunk i, computed and saved (call holding its lock)."""
        clean_chunk_temps(out_dir, i)
        lo, hi = i * plan.chunk_size, min(n, (i + 1) * plan.chunk_size)
        t0 = time.perf_counter()
        part = plan.spec.run(plan.model, plan.data, lo, hi, plan.opts, plan.batch_size, plan.state)
        # the values (clean/corrupted are NaN by design for methods without a counterfactual)
        check_finite({k: v for k, v in part.sums.items() if k.endswith("/values")},
                     f"{plan.spec.name} sums of chunk {i} (prompts {lo}..{hi - 1})", plan.model)
        rec = {"key": plan.key, "index": i, "lo": lo, "hi": hi, "count": part.count, "sums": part.sums,
               "meta": part.meta, "rows": part.rows, "start": plan.start_no, "rank": plan.rank, "pid": os.getpid(),
               "seconds": time.perf_counter() - t0}
        save_chunk(out_dir, i, rec, (plan.args, plan.key, plan.n_chunks))
        computed.append(i)

    def compute_unless_finished(i: int) -> None:
        if _finished(plan, i, read_manifest(out_dir)) is None:  # another process may have finished it
            compute(i)

    try:
        manifest, busy = read_manifest(out_dir), []
        for i in mine:
            if _finished(plan, i, manifest) is None:
                with file_lock(chunk_lock_path(out_dir, i), blocking=False) as held:
                    if not held:  # another process is computing it
                        busy.append(i)
                        continue
                    compute_unless_finished(i)
            bar.update(1)
        for i in busy:  # wait for the other process; compute what it left (it may have died)
            with file_lock(chunk_lock_path(out_dir, i)):
                compute_unless_finished(i)
            bar.update(1)
    except BaseException:
        if plan.writes_folder and not finished_chunks(out_dir, read_manifest(out_dir)):
            release_claim(out_dir, claim)
            _undo_start(out_dir, plan.created)  # nothing finished: leave the folder as it was
        raise
    finally:
        bar.close()
    return computed


def _combine(plan: _Plan, computed: list[int]) -> tuple[ChunkSums | None, list[int]]:
    """The sums of every finished chunk (under torch.distributed: this rank's, all-reduced), per-prompt
    rows in order, and the chunks computed (every rank's); None with a warning while chunks are missing."""
    owned = [i for i in range(plan.n_chunks) if i % plan.world_size == plan.rank] if plan.dist is not None \
        else range(plan.n_chunks)
    manifest = read_manifest(plan.out_dir)
    width = plan.data.tokens.shape[1] if isinstance(plan.data, PromptSet) else None
    total, rows, missing = ChunkSums({}, 0), {}, []
    for i in owned:
        rec = _finished(plan, i, manifest)
        if rec is None:
            missing.append(i)
            continue
        rec = _pad_positions(rec, width)
        for k, v in rec["sums"].items():
            total.sums[k] = total.sums[k] + v.double() if k in total.sums else v.double().clone()
        total.meta, total.count = rec["meta"] or total.meta, total.count + rec["count"]
        if rec["rows"]:
            rows[i] = rec["rows"]
    if plan.dist is not None:
        total, rows, computed = all_reduce(plan.dist, total, rows, computed, device_of(plan.model))
    elif missing:
        warnings.warn(f"{len(missing)} of {plan.n_chunks} chunks are not finished yet (e.g. chunk {missing[0]}); "
                      "the job that finishes the last one combines them", stacklevel=2)
        return None, computed
    for k in sorted({k for r in rows.values() for k in r}):
        total.rows[k] = torch.cat([rows[i][k] for i in sorted(rows)])
    return total, computed


def _write(plan: _Plan, result, computed: list[int], skipped: list[int]) -> None:
    """The table and heatmaps, and the manifest's record of this start (holding the folder's lock)."""
    out_dir = plan.out_dir
    with run_lock(out_dir):
        clean_temp_files(out_dir)
        clean_stale_locks(out_dir)
        write_outputs(out_dir, plan.spec, result)
        outputs = sorted(p.name for p in out_dir.glob("*") if p.is_file() and not p.name.startswith("."))
        entry = {"start": plan.start_no, "pid": os.getpid(), "world_size": plan.world_size, "computed": computed,
                 "skipped": skipped}
        history = (read_manifest(out_dir) or {}).get("history", [])[-49:] + [entry]
        write_manifest(out_dir, plan.args, plan.key, plan.n_chunks, outputs=outputs, locked=True, last_start=entry,
                       history=history)


def _undo_start(out_dir: Path, created: bool) -> None:
    """After a run failed before any chunk finished: remove its manifest (it binds nothing) and, when
    this run created the folder, the folder."""
    with run_lock(out_dir):
        (out_dir / MANIFEST).unlink(missing_ok=True)
        clean_temp_files(out_dir)
    _remove_if_empty(out_dir, created)


def _remove_if_empty(out_dir: Path, created: bool, *, chunks: bool = True) -> None:
    """Remove an empty chunks/ (unless `chunks` is False) and, when this run created it, an empty out_dir."""
    if chunks and (out_dir / CHUNKS).is_dir() and not any((out_dir / CHUNKS).iterdir()):
        (out_dir / CHUNKS).rmdir()
    if created and out_dir.is_dir() and not any(out_dir.iterdir()):
        out_dir.rmdir()
