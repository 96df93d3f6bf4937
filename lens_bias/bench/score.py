"""Score every method and baseline on every case: recall@k and AUC of its ranking against the
ablation truth, one tidy table (pandas), and whether each method beat the baselines."""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Iterable

import pandas as pd
import torch
from tqdm.auto import tqdm

from ..core.models import HookedModel, load_model
from ..mitigate.ablation import ablate
from ..tasks.capability import text_loss
from .cases import CASES, Case, get_case
from .methods import case_metric, case_scores, scores_key
from .truth import (
    auc,
    carriers,
    load_truth,
    recall_at_k,
    unit_truth,
    weighted_auc,
    weighted_carriers,
    weighted_recall,
)

BASELINES = ("weight norm", "mean |activation|", "grad×activation", "attention to ' No'", "random")
#: the truths of a real case, in table order (zero first: the primary one)
REAL_TRUTHS = ("zero", "mean", "resample", "patch", "denoise")
_STEM = {"head": "heads", "site": "pos_mlp", "attn_site": "pos_attn", "neuron": "neurons"}


def case_truth(case: Case, truth: dict, unit: str) -> tuple[torch.Tensor, list[int] | None]:
    """(effects, the layers of the method scores they cover; None = all)."""
    if unit == "site":
        return truth[f"{case.truth_key}/bias/pos_mlp_zero"].float(), None
    eff, layers = unit_truth(truth, case.truth_key, unit)  # pyright: ignore[reportArgumentType] - case units are UnitKind names
    return eff, layers if unit == "neuron" else None


def real_truths(case: Case, truth: dict, unit: str, shape: tuple[int, int]) -> dict[str, dict]:
    """Each truth of a real case's unit as {effect, known (flat indices into the method scores' [layer, unit]
    layout), weight (None: every unit known)}: heads and sites are known everywhere; neurons on the swept
    layers and a uniform sample of the rest (each sampled neuron weighs outside / sample size)."""
    key, out = case.truth_key, {}
    for name in REAL_TRUTHS:
        full = truth.get(f"{key}/bias/{_STEM[unit]}_{name}")
        if full is None:
            continue
        if unit != "neuron":
            out[name] = {"effect": full.float().reshape(-1), "known": None, "weight": None}
            continue
        layers = truth[f"{key}/neuron_layers"].tolist()
        sample = truth[f"{key}/sample_index"].long()
        width = shape[1]
        known = torch.cat([(torch.tensor(layers)[:, None] * width + torch.arange(width)).reshape(-1),
                           sample[:, 0] * width + sample[:, 1]])
        outside = shape[0] * width - len(layers) * width
        weight = torch.cat([torch.ones(len(layers) * width), torch.full((len(sample),), outside / len(sample))])
        eff = torch.cat([full.float().reshape(-1), truth[f"{key}/bias/sample_neurons_{name}"].float()])
        out[name] = {"effect": eff, "known": known, "weight": weight}
    return out


def score_real(draws: torch.Tensor, t: dict) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(recall per draw, AUC per draw, k) of score draws [n, layer, unit] against one real truth."""
    if t["weight"] is None:
        pos = carriers(t["effect"])
        rec = torch.tensor([recall_at_k(d.reshape(-1), pos) for d in draws])
        area = torch.tensor([auc(d.reshape(-1), pos) for d in draws])
        return rec, area, int(pos.sum())
    pos, k = weighted_carriers(t["effect"], t["weight"])
    rec = torch.tensor([weighted_recall(d, t["known"], pos, t["weight"], k) for d in draws])
    area = torch.tensor([weighted_auc(d.reshape(-1)[t["known"]], pos, t["weight"]) for d in draws])
    return rec, area, round(k)


def _top_units(scores: torch.Tensor, k: int, layers: list[int] | None) -> list[tuple[int, int]]:
    flat = torch.nan_to_num(scores.reshape(-1).float(), nan=-float("inf"))
    width = scores.shape[-1]
    return [((layers[i // width] if layers else i // width), i % width) for i in flat.argsort(descending=True)[:k].tolist()]


def mitigation(model: HookedModel, case: Case, unit: str, units: list[tuple[int, int]], bias, neutral: str,
               before: tuple[float, float]) -> dict:
    """Zero-ablate `units`: the share of the bias removed, the neutral-text loss added, and their ratio
    (share removed per nat of loss added; the loss floored at 1e-3 nats)."""
    with ablate(model, **{"heads" if unit == "head" else "neurons": units}):  # pyright: ignore[reportArgumentType] - the dict is heads= or neurons=
        b, loss = bias(), float(text_loss(model, neutral))
    removed = (before[0] - b) / before[0] if before[0] else float("nan")
    added = loss - before[1]
    return {"bias_removed": removed, "loss_added": added, "removed_per_nat": removed / max(added, 1e-3)}


def score_case(model: HookedModel, case: Case, *, seeds: int = 20, mitigate: bool = True,
               scores: dict | None = None) -> pd.DataFrame:
    """One row per (method, unit[, truth]): recall@k, AUC (random: mean and std over `seeds` draws), k, the
    rank of the case's decoy head where it has one and, with `mitigate`, what zero-ablating the
    method's top-k units does (`mitigation`; random: its first draw). `scores`: `case_scores`' result,
    when already computed. A real case is scored against each of its truths (zero, mean, resample, patch,
    denoise; column `truth`), the mitigation on its held-out split."""
    truth = load_truth(case.model_dir)
    t0 = time.perf_counter()
    scores = scores if scores is not None else case_scores(model, case, seeds=seeds)
    seconds = time.perf_counter() - t0
    card = json.loads((case.model_dir / "lens_bias_card.json").read_text())
    if mitigate:
        bias = case_metric(model, case)
        neutral = (case.model_dir / "data" / "neutral.txt").read_text()
        before = (bias(), float(text_loss(model, neutral)))
    rows = []
    for unit in case.units:
        if case.real:
            shape = next(by[unit] for m, by in scores.items() if unit in by and m != "random").shape
            truths = real_truths(case, truth, unit, tuple(shape))
        else:
            eff, layers = case_truth(case, truth, unit)
        for method, by_unit in scores.items():
            if unit not in by_unit:
                continue
            s = by_unit[unit].float().cpu()
            draws = s if method == "random" else s[None]
            base = {"case": case.name, "title": case.title, "unit": unit, "method": method,
                    "baseline": method in BASELINES, "real": case.real,
                    "designed": "win" if method in case.wins else ("lose" if method in case.loses else "")}
            if case.real:
                for tname, t in truths.items():
                    rec, area, k = score_real(draws, t)
                    row = {**base, "truth": tname, "k": k, "n_units": int(draws[0].numel()),
                           "recall@k": float(rec.mean()), "AUC": float(area.mean()),
                           "recall_std": float(rec.std()) if len(rec) > 1 else 0.0}
                    if mitigate and tname == "zero" and unit in ("head", "neuron"):
                        row.update(mitigation(model, case, unit, _top_units(draws[0], k, None), bias, neutral, before))
                    rows.append(row)
                continue
            layer_draws = draws[:, layers] if layers is not None else draws
            pos = carriers(eff)
            rec = torch.tensor([recall_at_k(d, pos) for d in layer_draws])
            area = torch.tensor([auc(d, pos) for d in layer_draws])
            row = {**base, "truth": "zero", "k": int(pos.sum()), "n_units": pos.numel(), "recall@k": float(rec.mean()),
                   "AUC": float(area.mean()), "recall_std": float(rec.std()) if len(rec) > 1 else 0.0}
            if case.extra.get("decoy") and unit == "head":
                d = card["cases"][case.name]["intended"]["decoy"]
                flat = layer_draws[0].reshape(-1)
                row["decoy_rank"] = int((flat > flat[d[0] * eff.shape[1] + d[1]]).sum()) + 1
            if mitigate and unit in ("head", "neuron"):
                row.update(mitigation(model, case, unit, _top_units(layer_draws[0], row["k"], layers), bias, neutral,
                                      before))
            rows.append(row)
    df = pd.DataFrame(rows)
    df["seconds"] = seconds
    return _verdicts(df)


def _verdicts(df: pd.DataFrame) -> pd.DataFrame:
    """'beats baselines': recall@k above every baseline's (random: its mean + 2 std) on that case and unit."""
    out = []
    for _, g in df.groupby(["case", "unit", "truth"], sort=False):
        base = g[g["baseline"]]
        bar = max([float(r["recall@k"] + (2 * r["recall_std"] if r["method"] == "random" else 0))
                   for _, r in base.iterrows()], default=float("nan"))
        g = g.copy()
        g["beats_baselines"] = [bool(r["recall@k"] > bar) if not r["baseline"] else None for _, r in g.iterrows()]
        out.append(g)
    return pd.concat(out, ignore_index=True)


def _cached_scores(cache, case: Case, compute) -> dict:
    """`compute()`, or the scores saved under `cache` for this case's inputs (methods.scores_key)."""
    if cache is None:
        return compute()
    import hashlib
    from pathlib import Path

    tag = hashlib.sha256(repr(scores_key(case)).encode()).hexdigest()[:12]
    path = Path(cache) / f"{case.name}-{tag}.pt"
    if path.is_file():
        return torch.load(path, weights_only=False)
    scores = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(scores, tmp)
    tmp.replace(path)
    return scores


def benchmark(cases: Iterable[str] | None = None, *, device=None, seeds: int = 20, progress: bool = True,
              with_scores: bool = False, cache=None):
    """The method × case table over every available case (or `cases`); a real case whose model is not on
    this machine is skipped with a warning saying how to get it. `with_scores`: also {case: method scores}.
    `cache`: a folder keeping each case's method scores (re-scoring against the truth then runs no method)."""
    if cases:
        names = list(cases)
    else:
        names = [n for n, c in CASES.items() if c.available]
        for n, c in CASES.items():
            if c.real and c.built and c.model_missing:
                warnings.warn(f"benchmark case {n} skipped: {c.model_missing}", stacklevel=2)
    models, computed, frames, by_case = {}, {}, [], {}
    for name in tqdm(names, desc="cases", disable=not progress):
        case = get_case(name)
        if case.model not in models:
            models[case.model] = load_model(case.model_source, device=device)
        key = scores_key(case)
        if key not in computed:
            computed[key] = _cached_scores(cache, case, lambda c=case: case_scores(models[c.model], c, seeds=seeds))
        by_case[name] = computed[key]
        frames.append(score_case(models[case.model], case, seeds=seeds, scores=computed[key]))
    df = pd.concat(frames, ignore_index=True)
    return (df, by_case) if with_scores else df


#: the columns of a real case's shipped scores (data/bench/real-*/benchmark_scores.json)
SHIPPED_COLUMNS = ("method", "unit", "truth", "k", "n_units", "recall@k", "AUC", "recall_std", "beats_baselines",
                   "bias_removed", "loss_added")


def ship_scores(df: pd.DataFrame) -> list:
    """Write each real case's rows of the benchmark table to its folder's benchmark_scores.json (merged with the
    folder's other cases), so that the README's real-model table is reproducible and tested."""
    from ..core.files import write_text

    paths = []
    for name, g in df[df["real"]].groupby("case", sort=False):
        path = CASES[name].model_dir / "benchmark_scores.json"
        old = json.loads(path.read_text()) if path.is_file() else {}
        cols = [c for c in SHIPPED_COLUMNS if c in g]
        rows = [{c: (None if pd.isna(r[c]) else (r[c].item() if hasattr(r[c], "item") else r[c])) for c in cols}
                for _, r in g.iterrows()]
        old[name] = rows
        paths.append(write_text(path, json.dumps(dict(sorted(old.items())), indent=1) + "\n"))
    return paths


def wide_table(df: pd.DataFrame, truth: str = "zero", by_truth: bool = False) -> pd.DataFrame:
    """method × case: 'recall@k / AUC' against the `truth` (zero ablation: every case has it; an asterisk
    where a method does not beat the baselines; random: 'mean ± sd / AUC' over its draws); `by_truth`: one
    column per (case, unit, truth) instead."""
    def cell(r):
        if r["method"] == "random":
            return f"{r['recall@k']:.2f} ± {r['recall_std']:.2f} / {r['AUC']:.2f}"
        mark = "" if r["baseline"] or r["beats_baselines"] else "*"
        return f"{r['recall@k']:.2f} / {r['AUC']:.2f}{mark}"

    if not by_truth:
        df = df[df["truth"] == truth]
    col = df["case"] + " " + df["unit"] + ((" " + df["truth"]) if by_truth else "")
    d = df.assign(cell=df.apply(cell, axis=1), col=col)
    return d.pivot_table(index="method", columns="col", values="cell", aggfunc="first", sort=False).fillna("—")
