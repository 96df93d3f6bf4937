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

import contextlib
import hashlib
import json
import math
import os
import time
import warnings
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .errors import DataError, LensBiasError
from .files import atomic_write as _atomic_write
from .files import write_table
from .patching import COMPONENTS, ComponentScores, position_labels
from .prompts import PromptSet

#: method → one line with its paper (the CLI's help shows these).
METHODS: dict[str, str] = {
    "patching": "activation patching: restore one clean residual/attention/MLP output or head (Vig et al. 2020)",
    "attribution": "attribution patching: grad × (clean − corrupted), every component at once (Syed et al. 2023)",
    "tracing": "causal tracing: noise the subject, restore one (layer, token) state (Meng et al. 2022, ROME)",
    "nas": "Negative Attention Score of every head on yes/no prompts (Yu et al. 2024, NASA)",
    "neurons": "CRISPR bias score of every MLP neuron on BBQ items (Yang et al., ACL 2024)",
}

#: method → its options and their defaults (recorded in the manifest: they change the result).
_PAIR_DATA = {"templates": None, "answers": None, "corrupt_with": "man"}
DEFAULT_OPTIONS: dict[str, dict] = {
    "patching": {"components": ["resid_pre", "attn_out", "mlp_out", "head"], "per_position": None,
                 "metric": "logit_diff", "window": 1, **_PAIR_DATA},
    "attribution": {"components": ["head", "neuron", "resid"], "at": "clean", **_PAIR_DATA},
    "tracing": {"components": ["resid", "mlp", "attn"], "noise": 3.0, "std": "subject", "samples": 1,
                "window": 1, "metric": "logit_diff", **_PAIR_DATA},
    "nas": {},
    "neurons": {"instructions": None, "lam": 1.0, "tokens": "input"},
}

MANIFEST = "manifest.json"
CHUNKS = "chunks"
_FORMAT = 1
_OUTPUTS = ("scores.csv", "scores.parquet", MANIFEST)


# ---------------------------------------------------------------------------------------
# files
# ---------------------------------------------------------------------------------------
def _chunk_path(out_dir: Path, i: int) -> Path:
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


def _write_manifest(out_dir: Path, args: dict, key: str, n_chunks: int, starts: int | None = None, **extra):
    """Rewrite the manifest: arguments, the finished chunks found on disk, and `extra`."""
    old = read_manifest(out_dir) or {}
    finished = sorted(i for i in range(n_chunks) if _chunk_path(out_dir, i).is_file())
    m = {"format": _FORMAT, "args": args, "key": key, "n_chunks": n_chunks, "finished": finished,
         "complete": len(finished) == n_chunks, "starts": old.get("starts", 0) if starts is None else starts,
         "updated": time.strftime("%Y-%m-%dT%H:%M:%S"), **{k: v for k, v in old.items() if k in ("model", "data")},
         **extra}
    _atomic_write(out_dir / MANIFEST, lambda f: f.write((json.dumps(m, indent=1) + "\n").encode()))


def _clean_temp_files(out_dir: Path) -> None:
    """Remove temp files a killed run left (final names are never half-written)."""
    for folder in (out_dir, out_dir / CHUNKS):
        for p in folder.glob(".*"):
            if p.is_file() and (p.name.startswith(".chunk-") or p.name.startswith(".heatmap-")
                                or any(p.name.startswith(f".{n}.") for n in _OUTPUTS)):
                p.unlink(missing_ok=True)


def _load_chunk(path: Path, key: str) -> dict | None:
    """A finished chunk's record, or None when absent, unreadable or from other arguments."""
    if not path.is_file():
        return None
    try:
        rec = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - an unreadable chunk is recomputed
        warnings.warn(f"{path} is unreadable ({type(e).__name__}); computing it again")
        return None
    return rec if isinstance(rec, dict) and rec.get("key") == key else None


# ---------------------------------------------------------------------------------------
# fingerprints of the arguments
# ---------------------------------------------------------------------------------------
def _model_fingerprint(model) -> str:
    """sha256 of every parameter's name, shape, dtype and (sum, L1, L2) — any weight edit changes it."""
    h = hashlib.sha256()
    with torch.no_grad():
        for name, p in model.named_parameters():
            s = torch.stack([p.sum(dtype=torch.float64), torch.linalg.vector_norm(p, 1, dtype=torch.float64),
                             torch.linalg.vector_norm(p, 2, dtype=torch.float64)]).tolist()
            h.update(f"{name}{tuple(p.shape)}{p.dtype}{s[0]:.9e},{s[1]:.9e},{s[2]:.9e};".encode())
    return h.hexdigest()


def _data_fingerprint(data) -> str:
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


def _check_same_run(out_dir: Path, manifest: dict | None, args: dict) -> None:
    if manifest is None:
        return
    old = manifest.get("args", {})
    diff = [f"{_LABELS.get(k, k)}: {old.get(k)!r} there, {args[k]!r} now" for k in args if old.get(k) != args[k]]
    if diff:
        raise LensBiasError(f"{out_dir} holds a run with other arguments ({'; '.join(diff)}); "
                            "use another output folder, or delete this one to start over")


# ---------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------
def _answers_of(value, where: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = json.loads(value) if value.lstrip().startswith("[") else value.split("|")
    if not isinstance(value, (list, tuple)) or len(value) < 2 or not all(isinstance(a, str) for a in value):
        raise DataError(f"{where}: 'answers' must be two or more answer words, e.g. [\" she\", \" he\"]")
    return tuple(value)


def _prompt_pairs(model, path: Path, opts: dict, need_corrupted: bool) -> PromptSet:
    """Rows with prompt, corrupted, subject and answers (JSONL or CSV) → a PromptSet."""
    from .data import read_records

    prompts, corrupted, subjects, answers, meta = [], [], [], [], []
    default = tuple(opts.get("answers") or (" he", " she"))
    for n, r in read_records(path):
        where = f"{path}:{n}"
        if not isinstance(r, dict) or not str(r.get("prompt") or "").strip():
            raise DataError(f"{where}: every row needs a 'prompt' (and 'corrupted', 'subject', 'answers')")
        prompts.append(r["prompt"])
        corrupted.append(r.get("corrupted") or None)
        subjects.append(r.get("subject") or None)
        answers.append(_answers_of(r["answers"], where) if r.get("answers") else default)
        meta.append({k: v for k, v in r.items() if k not in ("prompt", "corrupted", "subject", "answers")})
    if not prompts:
        raise DataError(f"{path}: no prompts")
    if need_corrupted and None in corrupted:
        raise DataError(f"{path}: row {corrupted.index(None) + 1} has no 'corrupted' prompt (needed for patching "
                        "and attribution)")
    if not need_corrupted and None in subjects:
        raise DataError(f"{path}: row {subjects.index(None) + 1} has no 'subject' (causal tracing corrupts it)")
    return PromptSet.build(model, prompts, answers, corrupted if None not in corrupted else None,
                           subjects=subjects if None not in subjects else None, metadata=meta,
                           on_length_mismatch="drop")


def load_run_data(model, method: str, path: str | Path, options: dict | None = None):
    """The data a method runs on, from a file (formats in the CLI's `attribute --help`):
    a PromptSet (patching, attribution, tracing, nas) or a list of BBQ items (neurons)."""
    from .data import VIG_TEMPLATES, load_professions, professions_prompts, read_text_file

    _check_method(method)
    opts = _options(method, options)
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path} is a directory; --data wants a file")
    if method == "nas":
        from .binary import binary_prompts, load_yes_no

        return binary_prompts(model, load_yes_no(path))
    if method == "neurons":
        from .bbq import load_bbq

        return load_bbq(path)
    tracing = method == "tracing"
    if path.suffix in (".json", ".txt"):
        templates = opts["templates"] or (VIG_TEMPLATES[:1] if tracing else VIG_TEMPLATES)
        if path.suffix == ".json":
            professions = load_professions(path)
        else:
            professions = [w.strip() for w in read_text_file(path).splitlines() if w.strip()]
        return professions_prompts(model, professions, templates, tuple(opts["answers"] or (" he", " she")),
                                   corrupt_with=None if tracing else opts["corrupt_with"])
    if path.suffix in (".jsonl", ".csv"):
        return _prompt_pairs(model, path, opts, need_corrupted=not tracing)
    raise DataError(f"{path}: unknown data format {path.suffix!r} for {method}; use .json (professions), .txt "
                    "(one profession a line), .jsonl or .csv (prompt, corrupted, subject, answers)")


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise LensBiasError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")


def _options(method: str, options: dict | None) -> dict:
    """The method's options with defaults filled in (so omitting a default is the same run)."""
    defaults = DEFAULT_OPTIONS[method]
    options = {k: v for k, v in (options or {}).items() if v is not None}
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        raise LensBiasError(f"unknown option(s) {unknown} for {method}; it takes {sorted(defaults) or 'none'}")
    out = {**defaults, **options}
    for k in ("components", "templates", "answers", "instructions"):
        if isinstance(out.get(k), (tuple, list)):
            out[k] = list(out[k])
    return out


def _check_options(method: str, opts: dict) -> None:
    from .attribution import _HOOKS
    from .bbq import INSTRUCTIONS
    from .tracing import TRACE_KINDS

    allowed = {"patching": COMPONENTS, "attribution": _HOOKS, "tracing": TRACE_KINDS}.get(method)
    if allowed is not None:
        bad = [c for c in opts["components"] if c not in allowed]
        if bad or not opts["components"]:
            raise LensBiasError(f"unknown {method} component(s) {bad or opts['components']}; "
                                f"choose from {', '.join(sorted(allowed))}")
    if method == "neurons":
        n = opts["instructions"]
        if isinstance(n, int) and not 1 <= n <= len(INSTRUCTIONS):
            raise LensBiasError(f"instructions must be 1..{len(INSTRUCTIONS)}, got {n}")


# ---------------------------------------------------------------------------------------
# one chunk per method → sums (float64), count, metadata
# ---------------------------------------------------------------------------------------
def _scores_sums(key: str, res: ComponentScores, n: int, sums: dict, meta: dict) -> None:
    """Add a ComponentScores (means over n prompts) to `sums` as n × mean."""
    pp = res.extra.get("per_prompt")
    vals = pp.double().sum(-1) if pp is not None else res.values.double() * n
    for name, v in ((f"{key}/values", vals), (f"{key}/clean", torch.tensor(res.clean * n, dtype=torch.float64)),
                    (f"{key}/corrupted", torch.tensor(res.corrupted * n, dtype=torch.float64))):
        sums[name] = sums[name] + v if name in sums else v
    keep = {k: v for k, v in res.extra.items() if k not in ("per_prompt", "fast", "agreement")}
    meta[key] = {"dims": list(res.dims), "component": res.component, "method": res.method, "extra": keep}


def _chunk_patching(model, data, lo, hi, opts, batch_size, state):
    from .patching import activation_patching

    sub, sums, meta = data[lo:hi], {}, {}
    for comp in opts["components"]:
        per_pos = opts["per_position"] if opts["per_position"] is not None else comp != "head"
        res = activation_patching(model, sub, comp, per_position=per_pos, metric=opts["metric"],
                                  window=opts["window"], batch_size=batch_size, progress=False)
        _scores_sums(comp, res, len(sub), sums, meta)
    return sums, meta, len(sub), {}


def _chunk_attribution(model, data, lo, hi, opts, batch_size, state):
    from .attribution import attribution_patching

    sums, meta = {}, {}
    step = batch_size or hi - lo
    for s in range(lo, hi, step):
        sub = data[s: min(s + step, hi)]
        for comp, res in attribution_patching(model, sub, opts["components"], at=opts["at"]).items():
            _scores_sums(comp, res, len(sub), sums, meta)
    return sums, meta, hi - lo, {}


def _prepare_tracing(model, data: PromptSet, opts, seed):
    """The noise scale from the whole data set (chunks then trace with the same noise as one run)."""
    from .tracing import embedding_std

    if data.subject_spans is None:
        raise LensBiasError("causal tracing needs subject spans: give each prompt a 'subject'")
    if not data.same_length:
        raise LensBiasError("causal tracing averages over positions: every prompt must have the same number of "
                            "tokens (use one template)")
    return {"scale": embedding_std(model, data, opts["std"]), "seed": seed}


def _chunk_tracing(model, data, lo, hi, opts, batch_size, state):
    """causal_trace of prompts lo..hi with the whole set's noise scale; its per-row seeded noise
    (first_row) makes the chunks exact."""
    from .tracing import causal_trace

    res = causal_trace(model, data[lo:hi], tuple(opts["components"]), noise=opts["noise"], std=state["scale"],
                       samples=opts["samples"], seed=state["seed"], window=opts["window"], metric=opts["metric"],
                       batch_size=batch_size, progress=False, first_row=lo * opts["samples"])
    sums, meta = {}, {}
    for kind, r in res.items():
        r.extra["embedding_std"] = state["scale"]
        _scores_sums(kind, r, (hi - lo) * opts["samples"], sums, meta)
    return sums, meta, hi - lo, {}


def _chunk_nas(model, data, lo, hi, opts, batch_size, state):
    from .nas import negative_attention_scores

    res = negative_attention_scores(model, data[lo:hi], batch_size=batch_size or 32, progress=False)
    n = hi - lo
    sums = {"nas": res.per_prompt.double().sum(0), "att_neg": res.att_neg.double() * n,
            "att_pos": res.att_pos.double() * n}
    return sums, {}, n, {"per_prompt": res.per_prompt}


def _instructions(opts) -> list[str]:
    from .bbq import INSTRUCTIONS

    n = opts["instructions"]
    return INSTRUCTIONS if n is None else (INSTRUCTIONS[:n] if isinstance(n, int) else list(n))


def _chunk_neurons(model, data, lo, hi, opts, batch_size, state):
    """Per instruction: crispr_scores' confusion-weighted sum and its weight, so chunks combine
    as crispr_scores' confusion-weighted mean over all items."""
    from .neurons import crispr_scores

    res = crispr_scores(model, data[lo:hi], _instructions(opts), lam=opts["lam"], tokens=opts["tokens"],
                        batch_size=batch_size or 8, progress=False)
    sums = {"totals": res.extra["totals"].double(), "weights": res.extra["weights"].double()}
    return sums, {}, hi - lo, {}


#: method → f(model, data, lo, hi, opts, batch_size, state) → (sums, meta, count, per-prompt rows) of data[lo:hi]
_CHUNK = {"patching": _chunk_patching, "attribution": _chunk_attribution, "tracing": _chunk_tracing,
          "nas": _chunk_nas, "neurons": _chunk_neurons}


# ---------------------------------------------------------------------------------------
# combining chunks
# ---------------------------------------------------------------------------------------
def _finalize(model, method: str, data, sums: dict, meta: dict, count: int, rows: dict, opts: dict):
    """The method's result type from summed chunks (mean = sum / count)."""
    if method == "nas":
        from .nas import NASResult

        per_prompt = torch.cat([rows[i] for i in sorted(rows)]) if rows else torch.empty(0)
        return NASResult((sums["nas"] / count).float(), per_prompt, (sums["att_neg"] / count).float(),
                         (sums["att_pos"] / count).float(), list(data.metadata))
    if method == "neurons":
        vals = (sums["totals"] / sums["weights"].clamp(min=1e-12)[:, None, None]).mean(0).float()
        return ComponentScores(vals, ("layer", "neuron"), "neuron", "crispr",
                               extra={"lambda": opts["lam"], "tokens": opts["tokens"],
                                      "n_instructions": len(_instructions(opts)), "n_items": count})
    tokens = position_labels(model, data)
    n = count * (opts["samples"] if method == "tracing" else 1)
    out = {}
    for key in opts["components"]:
        m = meta[key]
        extra = {**m["extra"], "n_prompts": count}
        if "layers" in extra:
            extra["layers"] = list(extra["layers"])
        out[key] = ComponentScores((sums[f"{key}/values"] / n).float(), tuple(m["dims"]), m["component"],
                                   m["method"], float(sums[f"{key}/clean"] / n),
                                   float(sums[f"{key}/corrupted"] / n), tokens, extra)
    return out


def _add(total: dict, sums: dict) -> None:
    for k, v in sums.items():
        total[k] = total[k] + v.double() if k in total else v.double().clone()


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def _all_reduce(dist, sums: dict, meta: dict, count: int, rows: dict, computed: list, device):
    """Every rank's sums added (one all-reduce of a flat float64 vector); ranks without chunks
    take the shapes from the others; NAS per-prompt rows and the chunks computed are gathered."""
    world = dist.get_world_size()
    schemas = [None] * world
    local = ({k: list(v.shape) for k, v in sorted(sums.items())}, meta) if count else None
    dist.all_gather_object(schemas, (local, rows, computed))
    shapes, meta = next((s[0] for s in schemas if s[0] is not None), ({}, {}))
    comm = device if dist.get_backend() == "nccl" else torch.device("cpu")
    flat = torch.cat([(sums[k].double().reshape(-1) if k in sums else torch.zeros(math.prod(shape),
                       dtype=torch.float64)).to(comm) for k, shape in shapes.items()]
                     + [torch.tensor([float(count)], dtype=torch.float64, device=comm)])
    dist.all_reduce(flat)
    flat = flat.cpu()
    out, at = {}, 0
    for k, shape in shapes.items():
        size = math.prod(shape)
        out[k] = flat[at: at + size].reshape(shape)
        at += size
    all_rows = {i: r for _, rs, _ in schemas for i, r in rs.items()}
    return out, meta, int(round(float(flat[-1]))), all_rows, sorted(i for *_, c in schemas for i in c)


# ---------------------------------------------------------------------------------------
# outputs
# ---------------------------------------------------------------------------------------
def result_frame(result):
    """The tidy table of a run's result (one row per component; NAS: one per head)."""
    import pandas as pd

    if isinstance(result, dict):
        return pd.concat([r.to_frame() for r in result.values()], ignore_index=True)
    if hasattr(result, "ranking"):
        return result.ranking()
    return result.to_frame()


def _write_outputs(out_dir: Path, method: str, result) -> list[Path]:
    from .nas import nas_heatmap
    from .viz import heatmap

    df = result_frame(result)
    for col in ("layer", "pos", "head", "neuron"):
        if col in df:
            df[col] = df[col].astype("Int64")  # NaN where a component has no such axis
    written = write_table(out_dir / "scores", df)
    if method == "nas":
        figs = {"nas": nas_heatmap(result)}
    elif isinstance(result, dict):
        figs = {k: heatmap(r, title=f"{METHODS[method].split(':')[0]} — {k}") for k, r in result.items()}
    else:
        figs = {"neuron": heatmap(result, title="CRISPR bias score per MLP neuron")}
    for k, fig in figs.items():
        html = fig.to_html(include_plotlyjs="cdn").encode()
        _atomic_write(out_dir / f"heatmap-{k}.html", lambda f: f.write(html))
        written.append(out_dir / f"heatmap-{k}.html")
    return written


# ---------------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------------
@contextlib.contextmanager
def distributed(device=None):
    """Within the block, the process group torchrun / accelerate launch describe in the environment
    (joined when WORLD_SIZE > 1 and not yet joined: nccl on CUDA, gloo otherwise); yields
    (rank, world_size, this rank's device) and leaves the group afterwards if it joined it."""
    import torch.distributed as dist

    from .models import resolve_device

    world = int(os.environ.get("WORLD_SIZE", "1"))
    dev = resolve_device(device)
    if dev.type == "cuda" and dev.index is None and world > 1:
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if dev.type == "cuda" and dev.index is not None:
        torch.cuda.set_device(dev)
    joined = world > 1 and dist.is_available() and not dist.is_initialized()
    if joined:
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    group = _dist()
    try:
        yield (group.get_rank(), group.get_world_size(), dev) if group is not None else (0, 1, dev)
    except BaseException:
        if joined:  # no barrier: the other ranks may be inside another collective
            dist.destroy_process_group()
        raise
    if joined:
        dist.barrier()  # no rank tears the group down while another still talks on it
        dist.destroy_process_group()


def attribute_dataset(
    model,
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
):
    """Run `method` over `data` in resumable chunks of `chunk_size` prompts; the combined result.

    model: a hooked model, or a name/directory for load_model(device, dtype). data: a file (see
    load_run_data), a PromptSet (patching, attribution, tracing, nas) or BBQ items (neurons).
    batch_size: prompts per forward (rows of (component, prompt) for patching and tracing; the
    method's default when None). options: DEFAULT_OPTIONS[method] keys (components, ...).
    Returns dict[str, ComponentScores] (patching, attribution, tracing), NASResult (nas) or
    ComponentScores (neurons), without per-prompt values except NAS's; None for a job
    (rank/world_size without torch.distributed) that finds other jobs' chunks still missing.
    Finished chunks on disk are skipped; `write` adds the table and heatmaps to out_dir.
    """
    _check_method(method)
    if chunk_size < 1:
        raise LensBiasError(f"chunk_size must be ≥ 1, got {chunk_size}")
    if batch_size is not None and batch_size < 1:
        raise LensBiasError(f"batch_size must be ≥ 1, got {batch_size}")
    opts = _options(method, options)
    _check_options(method, opts)
    if isinstance(data, (str, Path)) and not Path(data).is_file():
        raise DataError(f"data file {data} {'is a directory' if Path(data).is_dir() else 'does not exist'}")
    if isinstance(model, (str, Path)):
        from .models import load_model

        model_name = str(model)
        model = load_model(model, device=device, dtype=dtype)
    else:
        model_name = str(getattr(model, "lens_bias_source", None) or getattr(model.cfg, "model_name", "model"))
    data_name = str(data) if isinstance(data, (str, Path)) else type(data).__name__
    data_hash = _data_fingerprint(data)
    if isinstance(data, (str, Path)):
        data = load_run_data(model, method, data, opts)
    if isinstance(data, PromptSet) == (method == "neurons"):
        want = "a list of BBQ items" if method == "neurons" else "a PromptSet"
        raise LensBiasError(f"{method} runs on {want}, got {type(data).__name__}")
    n = len(data)
    if n == 0:
        raise DataError("no prompts to run on")

    dist = _dist()
    if dist is not None:
        rank, world_size = dist.get_rank(), dist.get_world_size()
    rank, world_size = rank or 0, world_size or 1
    if not 0 <= rank < world_size:
        raise LensBiasError(f"rank {rank} is not in 0..{world_size - 1}")
    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    args = {"method": method, "model_sha256": _model_fingerprint(model), "data_sha256": data_hash,
            "n_prompts": n, "chunk_size": chunk_size, "seed": seed, "options": opts}
    key = hashlib.sha256(json.dumps(args, sort_keys=True).encode()).hexdigest()[:16]
    n_chunks = math.ceil(n / chunk_size)
    if out_dir.exists() and not out_dir.is_dir():
        raise LensBiasError(f"{out_dir} is a file; the output must be a folder")
    _check_same_run(out_dir, read_manifest(out_dir), args)
    writes_manifest = dist is None or rank == 0
    if rank == 0:
        (out_dir / CHUNKS).mkdir(parents=True, exist_ok=True)
        if dist is not None or world_size == 1:  # independent jobs may be writing theirs right now
            _clean_temp_files(out_dir)
        starts = ((read_manifest(out_dir) or {}).get("starts", 0)) + 1
        _write_manifest(out_dir, args, key, n_chunks, starts, model=model_name, data=data_name)
    if dist is not None:
        keys = [None] * world_size
        dist.all_gather_object(keys, key)  # also the barrier after rank 0's manifest
        if len(set(keys)) > 1:
            raise LensBiasError(f"the ranks were given different arguments (run keys {sorted(set(keys))})")
    (out_dir / CHUNKS).mkdir(parents=True, exist_ok=True)
    start_no = (read_manifest(out_dir) or {}).get("starts", 1)

    state = _prepare_tracing(model, data, opts, seed) if method == "tracing" else None
    mine = [i for i in range(n_chunks) if i % world_size == rank]
    done = {i for i in mine if _load_chunk(_chunk_path(out_dir, i), key) is not None}
    bar = tqdm(total=len(mine), initial=len(done), disable=not progress, unit="chunk",
               desc=f"{method}" + (f" rank {rank}" if world_size > 1 else ""),
               position=rank if world_size > 1 else None)
    computed = []
    for i in mine:
        if i in done:
            continue
        lo, hi = i * chunk_size, min(n, (i + 1) * chunk_size)
        t0 = time.perf_counter()
        sums, meta, count, rows = _CHUNK[method](model, data, lo, hi, opts, batch_size, state)
        rec = {"key": key, "index": i, "lo": lo, "hi": hi, "count": count, "sums": sums, "meta": meta,
               "rows": rows, "start": start_no, "rank": rank, "seconds": time.perf_counter() - t0}
        _atomic_write(_chunk_path(out_dir, i), lambda f: torch.save(rec, f))
        computed.append(i)
        if writes_manifest:
            _write_manifest(out_dir, args, key, n_chunks)
        bar.update(1)
    bar.close()

    owned = mine if dist is not None else range(n_chunks)
    sums, meta, count, rows = {}, {}, 0, {}
    missing = []
    for i in owned:
        rec = _load_chunk(_chunk_path(out_dir, i), key)
        if rec is None:
            missing.append(i)
            continue
        _add(sums, rec["sums"])
        meta, count = rec["meta"] or meta, count + rec["count"]
        if rec["rows"]:
            rows[i] = rec["rows"]["per_prompt"]
    if dist is not None:
        device_of_model = next(model.parameters()).device
        sums, meta, count, rows, computed = _all_reduce(dist, sums, meta, count, rows, computed, device_of_model)
    elif missing:
        if writes_manifest:
            _write_manifest(out_dir, args, key, n_chunks)
        warnings.warn(f"{len(missing)} of {n_chunks} chunks are not finished yet (e.g. chunk {missing[0]}); "
                      "the job that finishes the last one combines them")
        return None
    result = _finalize(model, method, data, sums, meta, count, rows, opts)
    if write and (dist is None or rank == 0):
        _write_outputs(out_dir, method, result)
        outputs = sorted(p.name for p in out_dir.glob("*") if p.is_file() and not p.name.startswith("."))
        _write_manifest(out_dir, args, key, n_chunks, outputs=outputs,
                        last_start={"start": start_no, "world_size": world_size, "computed": computed,
                                    "skipped": [i for i in range(n_chunks) if i not in set(computed)]})
    if dist is not None:
        dist.barrier()  # every rank returns once rank 0's outputs are on disk
    return result
