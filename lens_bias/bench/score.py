"""Score every method and baseline on every case: recall@k and AUC of its ranking against the
ablation truth, one tidy table (pandas), and whether each method beat the baselines."""

from __future__ import annotations

import json
import time
from typing import Iterable

import pandas as pd
import torch
from tqdm.auto import tqdm

from ..core.models import HookedModel, load_model
from ..mitigate.ablation import ablate
from ..tasks.capability import text_loss
from .cases import CASES, Case, get_case
from .methods import case_metric, case_scores, scores_key
from .truth import auc, carriers, load_truth, recall_at_k, unit_truth

BASELINES = ("weight norm", "mean |activation|", "grad×activation", "attention to ' No'", "random")


def case_truth(case: Case, truth: dict, unit: str) -> tuple[torch.Tensor, list[int] | None]:
    """(effects, the layers of the method scores they cover; None = all)."""
    if unit == "site":
        return truth[f"{case.truth_key}/bias/pos_mlp_zero"].float(), None
    eff, layers = unit_truth(truth, case.truth_key, unit)  # pyright: ignore[reportArgumentType] - case units are UnitKind names
    return eff, layers if unit == "neuron" else None


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
    """One row per (method, unit): recall@k, AUC (random: mean and std over `seeds` draws), k, the
    rank of the case's decoy head where it has one and, with `mitigate`, what zero-ablating the
    method's top-k units does (`mitigation`; random: its first draw). `scores`: `case_scores`' result,
    when already computed."""
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
        eff, layers = case_truth(case, truth, unit)
        pos = carriers(eff)
        for method, by_unit in scores.items():
            if unit not in by_unit:
                continue
            s = by_unit[unit].float().cpu()
            draws = s if method == "random" else s[None]
            if layers is not None:
                draws = draws[:, layers]
            rec = torch.tensor([recall_at_k(d, pos) for d in draws])
            area = torch.tensor([auc(d, pos) for d in draws])
            row = {"case": case.name, "title": case.title, "unit": unit, "method": method, "k": int(pos.sum()),
                   "n_units": pos.numel(), "recall@k": float(rec.mean()), "AUC": float(area.mean()),
                   "recall_std": float(rec.std()) if len(rec) > 1 else 0.0,
                   "baseline": method in BASELINES, "designed": "win" if method in case.wins else
                   ("lose" if method in case.loses else "")}
            if case.extra.get("decoy") and unit == "head":
                d = card["cases"][case.name]["intended"]["decoy"]
                flat = draws[0].reshape(-1)
                row["decoy_rank"] = int((flat > flat[d[0] * eff.shape[1] + d[1]]).sum()) + 1
            if mitigate and unit in ("head", "neuron"):
                row.update(mitigation(model, case, unit, _top_units(draws[0], row["k"], layers), bias, neutral, before))
            rows.append(row)
    df = pd.DataFrame(rows)
    df["seconds"] = seconds
    return _verdicts(df)


def _verdicts(df: pd.DataFrame) -> pd.DataFrame:
    """'beats baselines': recall@k above every baseline's (random: its mean + 2 std) on that case and unit."""
    out = []
    for _, g in df.groupby(["case", "unit"], sort=False):
        base = g[g["baseline"]]
        bar = max([float(r["recall@k"] + (2 * r["recall_std"] if r["method"] == "random" else 0))
                   for _, r in base.iterrows()], default=float("nan"))
        g = g.copy()
        g["beats_baselines"] = [bool(r["recall@k"] > bar) if not r["baseline"] else None for _, r in g.iterrows()]
        out.append(g)
    return pd.concat(out, ignore_index=True)


def benchmark(cases: Iterable[str] | None = None, *, device=None, seeds: int = 20, progress: bool = True) -> pd.DataFrame:
    """The method × case table over every built case (or `cases`)."""
    names = list(cases) if cases else [n for n, c in CASES.items() if c.available]
    models, computed, frames = {}, {}, []
    for name in tqdm(names, desc="cases", disable=not progress):
        case = get_case(name)
        if case.model not in models:
            models[case.model] = load_model(str(case.model_dir), device=device)
        key = scores_key(case)
        if key not in computed:
            computed[key] = case_scores(models[case.model], case, seeds=seeds)
        frames.append(score_case(models[case.model], case, seeds=seeds, scores=computed[key]))
    return pd.concat(frames, ignore_index=True)


def wide_table(df: pd.DataFrame) -> pd.DataFrame:
    """method × case: 'recall@k / AUC' (an asterisk where a method does not beat the baselines)."""
    def cell(r):
        mark = "" if r["baseline"] or r["beats_baselines"] else "*"
        return f"{r['recall@k']:.2f} / {r['AUC']:.2f}{mark}"

    d = df.assign(cell=df.apply(cell, axis=1), col=df["case"] + " " + df["unit"])
    return d.pivot_table(index="method", columns="col", values="cell", aggfunc="first", sort=False).fillna("—")
