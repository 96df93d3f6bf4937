"""`locate_report`: every locate method on one task, where they agree, and proof by ablation — one call.

Stages (each cached in DIR/stages/<stage>.pt under a fingerprint of the model's weights, the data, the
stage's options and lens_bias's code, written atomically; its sha256 goes into DIR/locate_report.json, and a
file whose bytes do not match is computed again, with a warning; a rerun skips every stage that matches):

    bias          the bias metric on the locate split (orientation of the scores)
    method-<name> one locate method's scores on the common units (units.py)
    precision     half-precision models only: each method again on a sample, in float32 (precision.py)
    contexts      the top units' tokens and contexts
    faithfulness  necessity, sufficiency and capability curves against random units, the bias's interval and
                  each top unit's effect alone (faithfulness.py, resampling.py)

Runs sharing a folder share the work: each stage has a lock (DIR/stages/.lock-<stage>); a run waits for a
stage another run is computing and reads its result, and takes the methods another run is busy with last.

Outputs (with `out`): report.html (one self-contained page), summary.json, tables/*.csv + .parquet.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import time
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

from ...core.errors import LensBiasError
from ...core.files import atomic_write, file_lock, write_table, write_text
from ...core.hooks import device_of, hook_name, run_until
from ...core.models import HookedModel, resolve_model
from ...core.prompts import PromptSet, tokenizer_of
from ...locate.patching import position_labels
from ...mitigate.ablation import AblationMethod
from ...runs.store import data_fingerprint, model_fingerprint, read_record
from .agreement import agreement_table
from .faithfulness import ALPHA, BREAKS, BUDGET, RANK_DRAWS, Faithfulness, curves, rank_methods
from .methods import applicable_methods, mc_forward, run_method
from .precision import HALF, SAMPLE, model_dtype, precision_check
from .tasks import ReportTask, bias_of, check_options, check_task_spec, organism_card, read_neutral, resolve_task
from .units import rank_of as unit_rank
from .units import scores_frame, top_units, unit_label

if TYPE_CHECKING:
    import pandas as pd

FORMAT = 2
MANIFEST = "locate_report.json"
LOCK = ".lens-bias.lock"
STAGES = "stages"
N_TOP = 5
#: planted organism units each task's report looks for: card key → (unit type, task kinds)
PLANTED = {"gender_neuron": ("neuron", "pairs"), "negative_head": ("head", "yesno"),
           "bbq_neuron": ("neuron", "multiple_choice")}


# ---------------------------------------------------------------------------------------
# Stage cache
# ---------------------------------------------------------------------------------------
def _key(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def code_fingerprint() -> str:
    """sha256 of lens_bias's source files: a stage cached by other code is computed again."""
    root = Path(__file__).resolve().parents[2]
    h = hashlib.sha256()
    for p in sorted(root.rglob("*.py")):
        h.update(p.relative_to(root).as_posix().encode() + p.read_bytes())
    return h.hexdigest()


class _Stages:
    """Stage results cached in DIR/stages/<name>.pt, keyed by a fingerprint (no folder: no cache).

    A stage file is trusted only when its bytes match the sha256 the folder's manifest recorded when it was
    written (as batch-run chunks are, runs/store.py): a value changed on disk is computed again, with a
    warning. Runs sharing a folder share the work: a stage another process is computing is waited for
    (its lock, DIR/stages/.lock-<name>) and then read, not computed twice."""

    def __init__(self, out: Path | None, base: dict):
        self.out = out
        self.dir = out / STAGES if out is not None else None
        self.base = base
        self.timings: dict[str, dict] = {}

    def _key(self, name: str, options: dict) -> str:
        return _key({**self.base, "stage": name, "options": options})

    def _recorded(self, name: str) -> str | None:
        assert self.out is not None and self.dir is not None  # called only with a folder (get, busy)
        try:
            m = json.loads((self.out / MANIFEST).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            return None
        return (m.get("stages") or {}).get(name) if isinstance(m, dict) else None

    def _load(self, name: str, key: str):
        """The cached value, or None when absent, unreadable, of other inputs or not the bytes recorded."""
        assert self.out is not None and self.dir is not None  # called only with a folder (get, busy)
        path = self.dir / f"{name}.pt"
        if not path.is_file():
            return None
        data, recorded = path.read_bytes(), self._recorded(name)
        if recorded is None:  # written before checksums were recorded, or its manifest was replaced
            return None
        if hashlib.sha256(data).hexdigest() != recorded:
            warnings.warn(f"{path} does not match the checksum recorded for it in {self.out / MANIFEST} "
                          "(changed on disk); computing the stage again", stacklevel=2)
            return None
        return read_record(path, data, key)

    def _save(self, name: str, key: str, value, seconds: float) -> None:
        assert self.out is not None and self.dir is not None  # called only with a folder (get, busy)
        buf = io.BytesIO()
        torch.save({"key": key, "value": value, "seconds": seconds}, buf)
        data = buf.getvalue()
        with file_lock(self.out / LOCK):  # the manifest is shared: read, add this stage's checksum, rename
            m = json.loads((self.out / MANIFEST).read_text(encoding="utf-8"))
            m.setdefault("stages", {})[name] = hashlib.sha256(data).hexdigest()
            atomic_write(self.dir / f"{name}.pt", lambda f: f.write(data))
            write_text(self.out / MANIFEST, json.dumps(m, indent=1) + "\n")

    def busy(self, name: str) -> bool:
        """Another process holds this stage's lock (it is computing it)."""
        if self.dir is None:
            return False
        self.dir.mkdir(parents=True, exist_ok=True)
        with file_lock(self.dir / f".lock-{name}", blocking=False) as held:
            return not held

    def get(self, name: str, options: dict, compute):
        key = self._key(name, options)
        if self.dir is None:
            return self._compute(name, compute)
        self.dir.mkdir(parents=True, exist_ok=True)
        with file_lock(self.dir / f".lock-{name}"):  # another run computing it: wait, then read its result
            rec = self._load(name, key)
            if rec is not None:
                self.timings[name] = {"seconds": 0.0, "cached": True, "computed_in": rec.get("seconds")}
                return rec["value"]
            t = time.perf_counter()
            value = self._compute(name, compute)
            self._save(name, key, value, time.perf_counter() - t)
            return value

    def _compute(self, name: str, compute):
        t, c = time.perf_counter(), time.process_time()
        value = compute()
        self.timings[name] = {"seconds": round(time.perf_counter() - t, 3), "cpu_seconds": round(time.process_time() - c, 3),
                              "cached": False}
        return value


#: files of ours that do not make a folder "hold files": locks and temp files of a run writing it
def _ours(p: Path) -> bool:
    return p.name.startswith(".") and (p.name == LOCK or p.name.endswith(".tmp"))


def check_out_early(out: str | Path, overwrite: bool = False) -> None:
    """What can be refused before a model is loaded: `out` is a file, or a folder that holds files and is not a
    locate report folder (without overwrite). The lock and temp files of a run writing the folder do not count."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise LensBiasError(f"output path {out} exists and is not a directory")
    if out.is_dir() and not overwrite and not (out / MANIFEST).is_file() and any(not _ours(p) for p in out.iterdir()):
        raise LensBiasError(f"output directory {out} holds files and is not a locate report folder; pass "
                            "overwrite=True (--overwrite) to write into it")


def _check_out(out: Path, manifest: dict, overwrite: bool) -> None:
    """A new or empty folder, or a report folder of the same model, data and options; else --overwrite."""
    out = Path(out)
    check_out_early(out, overwrite)
    old_path = out / MANIFEST
    if not out.exists() or not old_path.is_file() or overwrite:
        return
    try:
        old = json.loads(old_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        raise LensBiasError(f"{old_path} is not valid JSON; pass overwrite=True (--overwrite) to start over") from None
    diff = [k for k in ("model_sha256", "data_sha256", "options") if old.get(k) != manifest.get(k)]
    if diff:
        raise LensBiasError(f"{out} holds a report of another {', '.join(d.replace('_sha256', '') for d in diff)}; use "
                            "another folder or pass overwrite=True (--overwrite)")


def _start_manifest(out: Path, manifest: dict, overwrite: bool) -> None:
    """Check the folder and write the manifest, keeping the stage checksums of the same run's earlier stages."""
    with file_lock(out / LOCK):
        _check_out(out, manifest, overwrite)
        try:  # the stage files stay trusted under --overwrite too: their keys say what they were computed from
            old = json.loads((out / MANIFEST).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            old = {}
        old = old if isinstance(old, dict) else {}
        write_text(out / MANIFEST, json.dumps({**manifest, "stages": old.get("stages", {})}, indent=1) + "\n")


# ---------------------------------------------------------------------------------------
# Contexts of the top units
# ---------------------------------------------------------------------------------------
def _tok_str(tok, ids: list[int]) -> list[str]:
    return [t.replace("Ġ", " ").replace("Ċ", "\\n") for t in tok.convert_ids_to_tokens(ids)]


def _context(tok, ids: list[int], p: int, before: int = 8, after: int = 2) -> str:
    """The tokens around position p, p marked [so]; special tokens (BOS, chat-turn markers) left out."""
    special = set(tok.all_special_ids)
    keep = [i for i, t in enumerate(ids) if t not in special or i == p]
    words = dict(zip(keep, _tok_str(tok, [ids[i] for i in keep])))
    at = keep.index(p)
    lo, hi = max(0, at - before), min(len(keep), at + after + 1)
    s = "".join(f"[{words[i]}]" if i == p else words[i] for i in keep[lo:hi])
    return ("…" if lo > 0 else "") + s + ("…" if hi < len(keep) else "")


def visible_labels(model, ps: PromptSet) -> list[str]:
    """A label per position (patching.position_labels) with special tokens shown as '' (hidden)."""
    tok = tokenizer_of(model)
    special = set(tok.all_special_ids)
    labels = position_labels(model, ps)
    return ["" if set(ps.tokens[:, p].tolist()) <= special else lab for p, lab in enumerate(labels)]


def _special(tok, tokens: torch.Tensor) -> torch.Tensor:
    """Where `tokens` holds a special token (BOS, EOS, chat-turn markers, padding)."""
    return torch.isin(tokens, torch.tensor(sorted(set(tok.all_special_ids)), dtype=tokens.dtype, device=tokens.device))


def compute_contexts(model: HookedModel, task: ReportTask, scores: dict, n_top: int = N_TOP) -> list[dict]:
    """For each method's top units: where a head or neuron is most active on the locate prompts (the
    prompt and token, marked [so]; special tokens are neither candidates nor shown), and for heads on prompt
    tasks the token the answer position attends to most (mean over prompts, special tokens left out); for
    sites the token at the position."""
    tok = tokenizer_of(model)
    L = model.cfg.n_layers
    names = [hook_name(s, l) for s in ("head", "neuron") for l in range(L)]
    labels, attend = None, None
    if isinstance(task.locate, PromptSet):
        ps = task.locate.to(device_of(model))
        pats = [hook_name("pattern", l) for l in range(L)]
        with torch.no_grad():
            acts = run_until(model, ps.tokens, attention_mask=ps.attention_mask, keep=names + pats, detach=True)
        tokens, mask = ps.tokens, ps.attention_mask.bool()
        labels = visible_labels(model, task.locate)
        rows = torch.arange(len(ps), device=tokens.device)
        attend = torch.stack([acts[p][rows, :, ps.answer_pos] for p in pats], 1)  # [n, L, H, key]
        attend = attend.masked_fill(_special(tok, tokens)[:, None, None, :], 0).mean(0)  # [L, H, key]
    else:
        with torch.no_grad():
            acts, _, seqs = mc_forward(model, task.locate[:16], task.instructions[0], grad=False)
        from ...core.prompts import pad

        tokens, mask = pad(seqs)
        tokens, mask = tokens.to(device_of(model)), mask.bool().to(device_of(model))
    out = []
    for unit_type, by_method in scores.items():
        for method, t in by_method.items():
            for rank, u in enumerate(top_units(t, n_top), 1):
                row = {"unit_type": unit_type, "method": method, "rank": rank,
                       "unit": unit_label(unit_type, u, labels), "score": float(t[u])}
                if unit_type in ("head", "neuron"):
                    a = acts[hook_name(unit_type, u[0])]
                    v = a[:, :, u[1]].float()
                    v = v.norm(dim=-1) if unit_type == "head" else v
                    v = v.masked_fill(~mask | _special(tok, tokens), -math.inf)
                    r, p = divmod(int(v.reshape(-1).argmax()), v.shape[1])
                    ids = tokens[r][mask[r]].tolist()
                    row["most_active"] = _context(tok, ids, p)
                    row["activation"] = float(v[r, p])
                    if unit_type == "head" and attend is not None:
                        assert labels is not None  # set with attend
                        key_pos = int(attend[u[0], u[1]].argmax())
                        row["attends_to"] = f"{labels[key_pos].strip()} (pos {key_pos}, "  \
                                            f"{float(attend[u[0], u[1], key_pos]):.2f})"
                elif unit_type == "site" and labels is not None:
                    row["token"] = labels[u[1]].strip()
                out.append(row)
    return out


# ---------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------
@dataclass
class LocateReport:
    """Every locate method on one task: scores on common units, agreement, faithfulness, ranking.

    `ranking` (pandas) ranks (method, unit type) by the bias their top-k remove on held-out prompts within the
    capability budget `loss_budget` (nats of neutral-text loss), those that beat random first (faithfulness.py);
    `scores[unit_type][method]` are the oriented scores; `agreement`, `curves`, `top_units` (with each unit's
    effect alone) are tidy tables; `summary()` is what summary.json holds; `figures()` the page's figures;
    `answer()` the first screen's paragraph."""

    model_name: str
    task: ReportTask
    methods: list[str]
    scores: dict[str, dict[str, torch.Tensor]]
    meta: dict[str, dict]
    tokens: list[str] | None
    agreement: pd.DataFrame
    rows: list[dict]
    baseline: dict
    ranking: pd.DataFrame
    curves: pd.DataFrame
    top_units: pd.DataFrame
    timings: dict
    notes: list[str] = field(default_factory=list)
    loss_budget: float = BUDGET
    precision: list[dict] = field(default_factory=list)
    planted: list[dict] = field(default_factory=list)
    shape: dict = field(default_factory=dict)
    out: Path | None = None

    # ---- tables ---------------------------------------------------------------------
    def scores_frame(self):
        """Every method's oriented score on every unit (tidy)."""
        return scores_frame(self.scores, self.tokens)

    def method_ranking(self, unit_type: str | None = None) -> list[tuple[str, str]]:
        """(method, unit type) pairs best first: those that beat random first, then by necessity area above
        random (faithfulness.rank_methods)."""
        r = self.ranking
        if unit_type is not None:
            r = r[r.unit_type == unit_type]
        return list(zip(r["method"], r["unit_type"]))

    def rank_of(self, method: str, unit_type: str, unit: tuple[int, ...]) -> int:
        """The rank (1 = top) of one unit by one method; tied units share the lowest of their places."""
        return unit_rank(self.scores[unit_type][method], tuple(unit))[0]

    def summary(self) -> dict:
        """The JSON summary: ranking first, then planted units, top units, agreement, bias, timings."""
        def clean(v):
            if isinstance(v, float):
                return None if v != v or v in (math.inf, -math.inf) else round(v, 6)
            if isinstance(v, dict):
                return {k: clean(x) for k, x in v.items()}
            if isinstance(v, (list, tuple)):
                return [clean(x) for x in v]
            if hasattr(v, "item"):
                return clean(v.item())
            return v

        top = {}
        for r in self.top_units.to_dict("records"):
            top.setdefault(r["method"], {}).setdefault(r["unit_type"], []).append(
                {k: r[k] for k in ("rank", "unit", "score", "effect", "effect_lo", "effect_hi", "most_active",
                                   "attends_to", "token")
                 if k in r and r[k] == r[k] and r[k] is not None})
        return clean({  # pyright: ignore[reportReturnType] - clean keeps a dict a dict
            "format": FORMAT,
            "answer": self.answer(),
            "loss_budget": self.loss_budget,
            "ranking": self.ranking.to_dict("records"),
            "planted": self.planted,
            "model": self.model_name, "shape": self.shape,
            "task": {"name": self.task.name, "kind": self.task.kind, "description": self.task.description,
                     "prompts": self.task.sizes(), "held_out": self.task.held_out, "notes": self.task.notes},
            "bias": self.baseline,
            "methods": self.methods,
            "method_notes": {m: {k: v for k, v in meta.items() if isinstance(v, (str, int, float, list))}
                             for m, meta in self.meta.items()},
            "top_units": top,
            "agreement": "tables/agreement.csv (every pair of methods: Spearman ρ, top-k overlap)",
            "precision": self.precision,
            "timings": self.timings,
            "notes": self.notes,
        })

    # ---- figures and page (page.py) -------------------------------------------------
    def figures(self) -> dict:
        from .page import report_figures

        return report_figures(self)

    def main_figure(self, ablation: str = "zero"):
        from .page import necessity_figure

        return necessity_figure(self, ablation)

    def to_html(self) -> str:
        from .page import report_html

        return report_html(self)

    def write(self, out: str | Path) -> Path:
        """report.html, summary.json and tables/ into `out` (each file written atomically)."""
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        tables = {"ranking": self.ranking, "agreement": self.agreement, "curves": self.curves,
                  "faithfulness": _frame(self.rows), "top_units": self.top_units, "scores": self.scores_frame()}
        for name, df in tables.items():
            write_table(out / "tables" / name, df)
        write_text(out / "summary.json", json.dumps(self.summary(), indent=1, ensure_ascii=False) + "\n")
        write_text(out / "report.html", self.to_html())
        return out

    def __repr__(self) -> str:
        b = self.baseline
        lines = [f"LocateReport: {self.task.name} on {self.model_name} — {len(self.methods)} methods, "
                 f"bias {b['bias_clean']:+.3f} (reference {b['bias_reference']:+.3f}; 95% interval of the gap "
                 f"[{b.get('bias_lo', math.nan):+.3f}, {b.get('bias_hi', math.nan):+.3f}])"]
        for row in self.ranking.head(5).itertuples():
            at = (f"top-{int(row.k_budget)} remove {row.removed:.0%} of the bias at Δloss {row.d_loss:+.3f}"
                  if row.k_budget == row.k_budget and row.k_budget is not None else
                  f"no top-k within +{self.loss_budget:g} nats (area {row.area:+.3f})")
            lines.append(f"  {row.rank}. {row.method} ({row.unit_type}): {at}; p vs random {row.p_random:.3f}"
                         f"{' ✓ beats random' if row.beats_random else ''}{' ⚠ breaks the model' if row.breaks_model else ''}")
        lines += [f"  planted {p['name']} {p['unit']}: " + ", ".join(
            f"{m} #{k}" + (f" (tied with {p['ties'][m]})" if p.get("ties", {}).get(m) else "")
            for m, k in p["ranks"].items()) for p in self.planted]
        return "\n".join(lines)

    def answer(self) -> str:
        """The first screen's answer, in plain text (page.py writes it as HTML)."""
        from .page import answer_text

        return answer_text(self)


def _with_effects(top, effects: list[dict]):
    """The top-units table with each unit's effect alone (zero-ablation necessity) and its interval."""
    import pandas as pd

    if not len(top) or not effects:
        return top
    e = pd.DataFrame(effects).rename(columns={"value": "effect", "lo": "effect_lo", "hi": "effect_hi"})
    return top.merge(e[["unit_type", "method", "rank", "effect", "effect_lo", "effect_hi"]],
                     on=["unit_type", "method", "rank"], how="left")


def _frame(rows):
    import pandas as pd

    return pd.DataFrame(rows)


def _planted(model, task: ReportTask, scores: dict) -> list[dict]:
    card = organism_card(model)
    if card is None:
        return []
    out = []
    for key, (unit_type, kind) in PLANTED.items():
        p = card["planted"].get(key)
        if p is None or kind != task.kind or unit_type not in scores:
            continue
        unit = (p["layer"], p["neuron"] if unit_type == "neuron" else p["head"])
        ranks, ties = {}, {}
        for method, t in scores[unit_type].items():
            ranks[method], ties[method] = unit_rank(t, unit)
        out.append({"name": key, "unit_type": unit_type, "unit": unit_label(unit_type, unit), "layer": unit[0],
                    "index": unit[1], "ranks": ranks, "ties": ties})
    return out


def locate_report(
    model: HookedModel | str,
    task,
    out: str | Path | None = None,
    *,
    methods: Iterable[str] | None = None,
    k_values: Sequence[int] = (1, 2, 4, 8),
    ablations: Sequence[AblationMethod] = ("zero", "mean"),
    seeds: int = RANK_DRAWS,
    holdout: float = 0.5,
    max_prompts: int = 64,
    max_items: int = 48,
    neutral: str | Path | list[str] | None = None,
    tracing_corruption: str = "noise",
    capability: bool = True,
    loss_budget: float = BUDGET,
    seed: int = 0,
    overwrite: bool = False,
    progress: bool = True,
    device=None,
    dtype=None,
) -> LocateReport:
    """Every locate method that applies to `task` on `model`, mapped onto common units, their agreement, and
    the faithfulness of each method's top-k by ablation on held-out prompts; with `out`, the HTML page,
    summary.json and tables are written there and every stage is cached (a rerun resumes).

    task: 'professions', 'winobias', 'winogender', 'yesno', 'bbq', 'bbq/Age', a file (yesno:F, bbq:F,
    mc:F, pairs:F, or a path sniffed from its first record), a PromptSet or a list of items (tasks.py).
    holdout: share of the groups (professions, questions, items) held out for the ablations (0: none).
    tracing_corruption: 'noise' (ROME's; default) or 'counterfactual' (the twins — then tracing equals
    activation patching of the same sites). seeds: random unit sets per k. `device`/`dtype` load a model
    given by name.
    """
    t_start = time.perf_counter()
    if out is not None:  # refuse what can be refused before loading anything
        check_out_early(out, overwrite)
    if isinstance(task, (str, Path)) and not isinstance(task, PromptSet):
        check_task_spec(str(task))
    check_options(holdout=holdout, max_prompts=max_prompts, max_items=max_items)
    if isinstance(loss_budget, bool) or not (isinstance(loss_budget, (int, float)) and loss_budget >= 0):
        raise LensBiasError(f"loss_budget (--loss-budget) must be a number of nats ≥ 0, got {loss_budget!r}")
    if neutral is not None:
        neutral = read_neutral(neutral)
    model, name = resolve_model(model, device=device, dtype=dtype)
    bad = [a for a in ablations if a not in ("zero", "mean", "resample")]
    if bad or not ablations:
        raise LensBiasError(f"unknown ablation(s) {bad or list(ablations)}; choose from zero, mean, resample")
    if seeds < 2:
        raise LensBiasError(f"seeds must be ≥ 2 (random's spread needs two), got {seeds}")
    if not k_values or any(int(k) < 1 for k in k_values):
        raise LensBiasError(f"k values must be positive, got {list(k_values)}")
    if tracing_corruption not in ("noise", "counterfactual"):
        raise LensBiasError(f"tracing_corruption must be 'noise' or 'counterfactual', not {tracing_corruption!r}")
    rtask = resolve_task(model, task, holdout=holdout, max_prompts=max_prompts, max_items=max_items, seed=seed,
                         neutral=neutral)
    available, notes = applicable_methods(rtask.kind)
    if methods is not None:
        methods = list(methods)
        unknown = [m for m in methods if m not in available]
        if unknown:
            raise LensBiasError(f"method(s) {unknown} do not apply to a {rtask.kind} task; choose from "
                                f"{', '.join(available)}")
        if "random" not in methods:
            methods.append("random")
    else:
        methods = available
    options = {"k_values": sorted({int(k) for k in k_values}), "ablations": list(ablations), "seeds": seeds,
               "holdout": holdout, "max_prompts": max_prompts, "max_items": max_items, "seed": seed,
               "tracing_corruption": tracing_corruption, "capability": capability}
    data_sha = _key([data_fingerprint(rtask.locate), data_fingerprint(rtask.test), rtask.neutral or [],
                     rtask.reference_text or []])
    manifest = {"format": FORMAT, "model": name, "model_sha256": model_fingerprint(model), "task": rtask.name,
                "data_sha256": data_sha, "options": options}
    if out is not None:
        out = Path(out)
        check_out_early(out, overwrite)
        out.mkdir(parents=True, exist_ok=True)
        _start_manifest(out, manifest, overwrite)
    stages = _Stages(out, {"model": manifest["model_sha256"], "data": data_sha, "format": FORMAT,
                           "code": code_fingerprint()})

    # ---- orientation: the bias on the split the methods see ---------------------------------
    def bias_stage():
        locate_clean = bias_of(model, rtask, split="locate")["bias"]
        locate_ref = bias_of(model, rtask, split="locate", corrupted=True)["bias"] if rtask.has_twins else 0.0
        return {"locate_clean": locate_clean, "locate_reference": locate_ref}

    b = stages.get("bias", {}, bias_stage)
    orient = {"sign": 1.0 if b["locate_clean"] - b["locate_reference"] >= 0 else -1.0,
              "metric_sign": -1.0 if rtask.kind == "yesno" else 1.0}
    opts = {"seed": seed, "tracing_corruption": tracing_corruption, "tracing_samples": 3}

    # ---- every method ----------------------------------------------------------------------
    scores: dict[str, dict[str, torch.Tensor]] = {}
    meta: dict[str, dict] = {}
    results = {}
    bar = tqdm(total=len(methods), desc="locate methods", disable=not progress)
    # a method another run on this folder is computing comes last (then its result is read, not recomputed)
    for m in sorted(methods, key=lambda m: stages.busy(f"method-{m}")):
        bar.set_postfix_str(m)
        results[m] = stages.get(f"method-{m}", {k: opts[k] for k in ("seed", "tracing_corruption", "tracing_samples")}
                                if m in ("tracing", "random") else {},
                                lambda m=m: _pack(run_method(m, model, rtask, orient, opts, progress)))
        bar.update(1)
    bar.close()
    for m in methods:
        got, info = results[m]["scores"], results[m]["meta"]
        meta[m] = info
        if got is None:
            notes.append(f"{m}: {info.get('skipped', 'skipped')}")
            continue
        for unit_type, t in got.items():
            scores.setdefault(unit_type, {})[m] = t.float()
        for w in info.get("warnings", []):
            notes.append(f"{m}: {w}")
    # a unit type with only random is noise: left out
    scores = {u: d for u, d in scores.items() if len([m for m in d if m != "random"]) > 0}
    for unit_type, by_method in scores.items():
        for m, t in by_method.items():
            finite = t[torch.isfinite(t)]
            if len(finite) > 1 and bool((finite == finite[0]).all()):
                notes.append(f"{m} ({unit_type}): all {len(finite)} scores are {float(finite[0]):g}, so its ranking "
                             "says nothing (its top-k are arbitrary ties); are the clean and corrupted prompts the same?")
    if "tracing" in meta and meta["tracing"].get("total_effect_fraction") is not None:
        f = meta["tracing"]["total_effect_fraction"]
        if not f >= 0.2:
            notes.append(f"tracing: the {meta['tracing']['corruption']} corruption takes {f:.0%} of the bias away "
                         "(ROME needs a corruption that removes it): its effects are weak evidence")
    tokens = visible_labels(model, rtask.locate) if isinstance(rtask.locate, PromptSet) else None
    precision: list[dict] = []
    if model_dtype(model) in HALF:  # does half precision change the answer? a float32 check on a sample
        p_notes, precision = stages.get("precision", {"sample": SAMPLE, **opts},
                                        lambda: list(precision_check(model, rtask, methods, orient, opts)))
        notes += p_notes

    # ---- agreement, contexts, faithfulness -----------------------------------------------------
    t = time.perf_counter()
    agreement = agreement_table(scores)
    stages.timings["agreement"] = {"seconds": round(time.perf_counter() - t, 3)}  # not a cached stage
    contexts = stages.get("contexts", {"n_top": N_TOP}, lambda: compute_contexts(model, rtask, scores))

    def faith_stage():
        f = Faithfulness(model, rtask, ablations=ablations, seeds=seeds, capability=capability, seed=seed)
        rows = f.run(scores, options["k_values"], progress=progress)
        return {"rows": rows, "baseline": f.baseline(), "effects": f.effects}

    faith = stages.get("faithfulness", {**options, "methods": methods}, faith_stage)
    baseline = {**faith["baseline"], "locate_clean": b["locate_clean"], "locate_reference": b["locate_reference"]}
    lo, hi = baseline["bias_lo"], baseline["bias_hi"]
    significant = bool(lo > 0 or hi < 0) and rtask.held_out
    what = ("professions and their neutral twins" if rtask.kind == "pairs" else
            "questions" if rtask.kind == "yesno" else "items")
    if not significant and rtask.held_out:
        notes.append(f"the bias on the held-out prompts is not significant (95% interval [{lo:+.3f}, {hi:+.3f}] over "
                     f"resampled {what} includes 0): no method can beat random there")
    if seeds < math.ceil(1 / ALPHA) - 1:
        notes.append(f"with {seeds} random draws the rank test cannot reach p ≤ {ALPHA:g} (p ≥ 1/{seeds + 1}): no method "
                     f"can beat random; use seeds ≥ {math.ceil(1 / ALPHA) - 1}")
    if not baseline["scale"] or baseline["scale"] < 1e-6:
        notes.append("the model shows no bias on the held-out prompts: the curves are undefined (NaN)")
    ranking = rank_methods(faith["rows"], baseline, significant, loss_budget)
    if len(ranking) and capability and ranking["breaks_model"].any():
        broken = ", ".join(f"{r.method} ({r.unit_type}, top-{r.k_max}) +{r.d_neutral_loss_kmax:.2f}" for r in
                           ranking[ranking.breaks_model].itertuples())
        notes.append(f"ablating these methods' top units at the largest k raises the neutral-text loss by more than "
                     f"{BREAKS:g} nat/token (they remove bias by breaking the model; marked ⚠): {broken}")
    import pandas as pd

    stages.timings["total"] = {"seconds": round(time.perf_counter() - t_start, 3)}
    cfg = model.cfg
    report = LocateReport(
        model_name=name, task=rtask, methods=methods, scores=scores, meta=meta, tokens=tokens, agreement=agreement,
        rows=faith["rows"], baseline=baseline, ranking=ranking, curves=curves(faith["rows"]),
        top_units=_with_effects(pd.DataFrame(contexts), faith["effects"]), timings=stages.timings,
        notes=notes + rtask.notes, loss_budget=loss_budget, precision=precision,
        planted=_planted(model, rtask, scores),
        shape={"n_layers": cfg.n_layers, "n_heads": cfg.n_heads, "d_model": cfg.d_model, "d_mlp": cfg.d_mlp},
        out=out)
    if out is not None:
        t = time.perf_counter()
        report.write(out)
        stages.timings["write"] = {"seconds": round(time.perf_counter() - t, 3)}
        stages.timings["total"] = {"seconds": round(time.perf_counter() - t_start, 3)}
        write_text(out / "summary.json", json.dumps(report.summary(), indent=1, ensure_ascii=False) + "\n")
    return report


def _pack(result) -> dict:
    scores, meta = result
    clean = {k: v for k, v in (meta or {}).items()
             if isinstance(v, (str, int, float, bool, list)) or v is None}
    return {"scores": None if scores is None else {k: v.detach().float().cpu() for k, v in scores.items()},
            "meta": clean}


__all__ = ["LocateReport", "check_out_early", "compute_contexts", "locate_report"]
