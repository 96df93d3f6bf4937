"""`locate_report`: every locate method on one task, where they agree, and proof by ablation — one call.

Stages (each cached in DIR/stages/<stage>.pt under a fingerprint of the model's weights, the data and
the stage's options, written atomically; a rerun skips every stage whose file matches):

    (and of lens_bias's code: a stage cached by other code is computed again)

    bias          the bias metric on both splits (orientation of the scores, scale of the curves)
    method-<name> one locate method's scores on the common units (units.py)
    contexts      the top units' tokens and contexts
    faithfulness  necessity, sufficiency and capability curves against random units (faithfulness.py)

Outputs (with `out`): report.html (one self-contained page), summary.json, tables/*.csv + .parquet.
"""

from __future__ import annotations

import hashlib
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
from ...core.files import atomic_write, write_table, write_text
from ...core.hooks import device_of, hook_name, run_until
from ...core.models import HookedModel, resolve_model
from ...core.prompts import PromptSet, tokenizer_of
from ...locate.patching import position_labels
from ...mitigate.ablation import AblationMethod
from ...runs.store import data_fingerprint, model_fingerprint
from .agreement import agreement_table
from .faithfulness import Faithfulness, curves, rank_methods
from .methods import applicable_methods, mc_forward, run_method
from .tasks import ReportTask, bias_of, check_task_spec, organism_card, resolve_task
from .units import scores_frame, top_units, unit_label

if TYPE_CHECKING:
    import pandas as pd

FORMAT = 1
MANIFEST = "locate_report.json"
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
    """Stage results cached in DIR/stages/<name>.pt, keyed by a fingerprint (no folder: no cache)."""

    def __init__(self, out: Path | None, base: dict):
        self.dir = out / STAGES if out is not None else None
        self.base = base
        self.timings: dict[str, dict] = {}

    def get(self, name: str, options: dict, compute):
        key = _key({**self.base, "stage": name, "options": options})
        path = self.dir / f"{name}.pt" if self.dir is not None else None
        if path is not None and path.is_file():
            try:
                rec = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as e:  # noqa: BLE001 - an unreadable stage is recomputed
                warnings.warn(f"{path} is unreadable ({type(e).__name__}); computing the stage again", stacklevel=2)
                rec = None
            if isinstance(rec, dict) and rec.get("key") == key:
                self.timings[name] = {"seconds": 0.0, "cached": True, "computed_in": rec.get("seconds")}
                return rec["value"]
        t = time.perf_counter()
        value = compute()
        seconds = time.perf_counter() - t
        self.timings[name] = {"seconds": round(seconds, 3), "cached": False}
        if path is not None:
            atomic_write(path, lambda f: torch.save({"key": key, "value": value, "seconds": seconds}, f))
        return value


def check_out_early(out: str | Path, overwrite: bool = False) -> None:
    """What can be refused before a model is loaded: `out` is a file, or a folder that holds files and is not a
    locate report folder (without overwrite)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise LensBiasError(f"output path {out} exists and is not a directory")
    if out.is_dir() and not overwrite and any(out.iterdir()) and not (out / MANIFEST).is_file():
        raise LensBiasError(f"output directory {out} holds files and is not a locate report folder; pass "
                            "overwrite=True (--overwrite) to write into it")


def _check_out(out: Path, manifest: dict, overwrite: bool) -> None:
    """A new or empty folder, or a report folder of the same model, data and options; else --overwrite."""
    out = Path(out)
    check_out_early(out, overwrite)
    old_path = out / MANIFEST
    if not out.exists() or not any(out.iterdir()) or overwrite:
        return
    try:
        old = json.loads(old_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        raise LensBiasError(f"{old_path} is not valid JSON; pass overwrite=True (--overwrite) to start over") from None
    diff = [k for k in ("model_sha256", "data_sha256", "options") if old.get(k) != manifest.get(k)]
    if diff:
        raise LensBiasError(f"{out} holds a report of another {', '.join(d.replace('_sha256', '') for d in diff)}; use "
                            "another folder or pass overwrite=True (--overwrite)")


# ---------------------------------------------------------------------------------------
# Contexts of the top units
# ---------------------------------------------------------------------------------------
def _tok_str(tok, ids: list[int]) -> list[str]:
    return [t.replace("Ġ", " ").replace("Ċ", "\\n") for t in tok.convert_ids_to_tokens(ids)]


def _context(tok, ids: list[int], p: int, before: int = 8, after: int = 2) -> str:
    words = _tok_str(tok, ids)
    lo, hi = max(0, p - before), min(len(words), p + after + 1)
    s = "".join(f"[{w}]" if i == p else w for i, w in enumerate(words[lo:hi], lo))
    return ("…" if lo > 0 else "") + s + ("…" if hi < len(words) else "")


def compute_contexts(model: HookedModel, task: ReportTask, scores: dict, n_top: int = N_TOP) -> list[dict]:
    """For each method's top units: where a head or neuron is most active on the locate prompts (the
    prompt and token, marked [so]), and for heads on prompt tasks the token the answer position
    attends to most (mean over prompts, BOS left out); for sites the token at the position."""
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
        labels = position_labels(model, task.locate)
        rows = torch.arange(len(ps), device=tokens.device)
        attend = torch.stack([acts[p][rows, :, ps.answer_pos] for p in pats], 1)  # [n, L, H, key]
        if tok.bos_token_id is not None and bool((tokens[:, 0] == tok.bos_token_id).all()):
            attend[..., 0] = 0
        attend = attend.mean(0)  # [L, H, key]
    else:
        with torch.no_grad():
            acts, _, seqs = mc_forward(model, task.locate[:16], task.instructions[0], grad=False)
        from ...core.prompts import pad

        tokens, mask = pad(seqs)
        mask = mask.bool().to(device_of(model))
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
                    v = v.masked_fill(~mask, -math.inf)
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

    `ranking` (pandas) ranks (method, unit type) by how much bias their top-k carry on held-out prompts:
    those that beat random first, then by necessity area above random (faithfulness.py); `scores[unit_type][method]` are the oriented scores; `agreement`, `curves`,
    `top_units` are tidy tables; `summary()` is what summary.json holds; `figures()` the page's figures."""

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
        """The rank (1 = top) of one unit by one method."""
        t = self.scores[unit_type][method].reshape(-1).float().nan_to_num(nan=-math.inf)
        flat = int(torch.tensor(unit) @ torch.tensor(
            [math.prod(self.scores[unit_type][method].shape[i + 1:]) for i in range(len(unit))]))
        return int((t > t[flat]).sum()) + 1

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
                {k: r[k] for k in ("rank", "unit", "score", "most_active", "attends_to", "token")
                 if k in r and r[k] == r[k] and r[k] is not None})
        agree = self.agreement[self.agreement.method_a < self.agreement.method_b] if len(self.agreement) else self.agreement
        return clean({  # pyright: ignore[reportReturnType] - clean() keeps the dict it is given
            "format": FORMAT,
            "ranking": self.ranking.to_dict("records"),
            "planted": self.planted,
            "model": self.model_name, "shape": self.shape,
            "task": {"name": self.task.name, "kind": self.task.kind, "description": self.task.description,
                     "prompts": self.task.sizes(), "notes": self.task.notes},
            "bias": self.baseline,
            "methods": self.methods,
            "method_notes": {m: {k: v for k, v in meta.items() if isinstance(v, (str, int, float, list))}
                             for m, meta in self.meta.items()},
            "top_units": top,
            "agreement": agree.to_dict("records") if len(agree) else [],
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
        r = self.ranking.head(5)
        lines = [f"LocateReport: {self.task.name} on {self.model_name} — {len(self.methods)} methods, "
                 f"bias {self.baseline['bias_clean']:+.3f} (reference {self.baseline['bias_reference']:+.3f})"]
        lines += [f"  {row.rank}. {row.method} ({row.unit_type}): area {row.area:+.3f} ± {row.spread:.3f}"
                  f"{' ✓ beats random' if row.beats_random else ''}" for row in r.itertuples()]
        lines += [f"  planted {p['name']} {p['unit']}: " + ", ".join(f"{m} #{k}" for m, k in p["ranks"].items())
                  for p in self.planted]
        return "\n".join(lines)


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
        ranks = {}
        for method, t in scores[unit_type].items():
            flat = t.float().nan_to_num(nan=-math.inf)
            ranks[method] = int((flat > flat[unit]).sum()) + 1
        out.append({"name": key, "unit_type": unit_type, "unit": unit_label(unit_type, unit), "layer": unit[0],
                    "index": unit[1], "ranks": ranks})
    return out


def bias_significance(model: HookedModel, task: ReportTask) -> float:
    """t statistic of the test split's bias over its groups — professions (or occupations) for pairs, each
    the mean over its prompts of LD minus its twin's; for yes/no the class-balanced offset of the questions'
    means over its standard error; NaN for multiple choice. Prompts of one group share their
    subject (question), so the groups are the independent draws."""
    from ...core.metrics import answer_logits_fast
    from .tasks import group_of, yesno_offset

    if task.kind == "multiple_choice":
        return float("nan")
    ps = task.test.to(device_of(model))  # pyright: ignore[reportAttributeAccessIssue] - pairs and yes/no tasks hold a PromptSet
    with torch.no_grad():
        a = answer_logits_fast(model, ps.tokens, ps.answer_pos, ps.answer_ids, [], ps.attention_mask).float()
        d = a[:, 0] - a[:, 1]
        if task.kind == "yesno":  # per question (its prompts share it), then class-balanced
            per: dict = {}
            for i, m in enumerate(ps.metadata):
                per.setdefault(m["question"], (m["label"] == "yes", []))[1].append(float(-d[i]))
            q = torch.tensor([sum(v) / len(v) for _, v in per.values()], dtype=torch.float64)
            mean, se = yesno_offset(q, [gold for gold, _ in per.values()])
            return mean / se if se > 0 else float("nan")
        c = answer_logits_fast(model, ps.corrupted_tokens, ps.answer_pos, ps.answer_ids, [], ps.attention_mask)  # pyright: ignore[reportArgumentType] - twinned tasks have corrupted tokens
        d = (d - (c[:, 0] - c[:, 1]).float()).cpu()
    groups: dict = {}
    for i, m in enumerate(ps.metadata):
        groups.setdefault(group_of(task.kind, m, i), []).append(float(d[i]))
    g = torch.tensor([sum(v) / len(v) for v in groups.values()], dtype=torch.float64)
    if len(g) < 2 or float(g.std()) == 0:
        return float("nan")
    return float(g.mean() / (g.std() / math.sqrt(len(g))))


def locate_report(
    model: HookedModel | str,
    task,
    out: str | Path | None = None,
    *,
    methods: Iterable[str] | None = None,
    k_values: Sequence[int] = (1, 2, 4, 8),
    ablations: Sequence[AblationMethod] = ("zero", "mean", "resample"),
    seeds: int = 5,
    holdout: float = 0.5,
    max_prompts: int = 64,
    max_items: int = 48,
    neutral: str | list[str] | None = None,
    tracing_corruption: str = "noise",
    capability: bool = True,
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
        _check_out(out, manifest, overwrite)
        out.mkdir(parents=True, exist_ok=True)
        write_text(out / MANIFEST, json.dumps(manifest, indent=1) + "\n")
    stages = _Stages(out, {"model": manifest["model_sha256"], "data": data_sha, "format": FORMAT,
                           "code": code_fingerprint()})

    # ---- orientation: the bias on the split the methods see ---------------------------------
    def bias_stage():
        locate_clean = bias_of(model, rtask, split="locate")["bias"]
        locate_ref = bias_of(model, rtask, split="locate", corrupted=True)["bias"] if rtask.has_twins else 0.0
        return {"locate_clean": locate_clean, "locate_reference": locate_ref,
                "test_t": bias_significance(model, rtask)}

    b = stages.get("bias", {}, bias_stage)
    orient = {"sign": 1.0 if b["locate_clean"] - b["locate_reference"] >= 0 else -1.0,
              "metric_sign": -1.0 if rtask.kind == "yesno" else 1.0}
    opts = {"seed": seed, "tracing_corruption": tracing_corruption, "tracing_samples": 3}

    # ---- every method ----------------------------------------------------------------------
    scores: dict[str, dict[str, torch.Tensor]] = {}
    meta: dict[str, dict] = {}
    for m in tqdm(methods, desc="locate methods", disable=not progress):
        res = stages.get(f"method-{m}", {k: opts[k] for k in ("seed", "tracing_corruption", "tracing_samples")}
                         if m in ("tracing", "random") else {},
                         lambda m=m: _pack(run_method(m, model, rtask, orient, opts, False)))
        got, info = res["scores"], res["meta"]
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
    if "tracing" in meta and meta["tracing"].get("total_effect_fraction") is not None:
        f = meta["tracing"]["total_effect_fraction"]
        if not f >= 0.2:
            notes.append(f"tracing: the {meta['tracing']['corruption']} corruption takes {f:.0%} of the bias away "
                         "(ROME needs a corruption that removes it): its effects are weak evidence")
    tokens = position_labels(model, rtask.locate) if isinstance(rtask.locate, PromptSet) else None

    # ---- agreement, contexts, faithfulness -----------------------------------------------------
    t = time.perf_counter()
    agreement = agreement_table(scores)
    stages.timings["agreement"] = {"seconds": round(time.perf_counter() - t, 3), "cached": False}
    contexts = stages.get("contexts", {"n_top": N_TOP}, lambda: compute_contexts(model, rtask, scores))

    def faith_stage():
        f = Faithfulness(model, rtask, ablations=ablations, seeds=seeds, capability=capability, seed=seed)
        return {"rows": f.run(scores, options["k_values"], progress=progress), "baseline": f.baseline()}

    faith = stages.get("faithfulness", {**options, "methods": methods}, faith_stage)
    baseline = {**faith["baseline"], "locate_clean": b["locate_clean"], "locate_reference": b["locate_reference"],
                "test_t": b["test_t"]}
    significant = not (abs(b["test_t"]) < 2)  # NaN (multiple choice) counts as measurable
    if not significant:
        notes.append(f"the bias on the held-out prompts is not significant (t = {b['test_t']:.2f}): no method can "
                     "beat random there")
    if not baseline["scale"] or baseline["scale"] < 1e-6:
        notes.append("the model shows no bias on the held-out prompts: the curves are undefined (NaN)")
    ranking = rank_methods(faith["rows"], baseline, significant)
    import pandas as pd

    stages.timings["total"] = {"seconds": round(time.perf_counter() - t_start, 3)}
    cfg = model.cfg
    report = LocateReport(
        model_name=name, task=rtask, methods=methods, scores=scores, meta=meta, tokens=tokens, agreement=agreement,
        rows=faith["rows"], baseline=baseline, ranking=ranking, curves=curves(faith["rows"]),
        top_units=pd.DataFrame(contexts), timings=stages.timings, notes=notes + rtask.notes,
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
