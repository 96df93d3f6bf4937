"""The hook for ground-truth benchmarks (#15): a case's model, data and measured effects in, the report's
method ranking beside the ranking the ground truth gives, out — so a benchmark can assert they agree."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ...core.errors import LensBiasError
from ...core.models import HookedModel
from .agreement import spearman
from .units import top_units


def truth_scores(report, truth: dict[str, Tensor], ks=(1, 2, 4, 8)):
    """Per (method, unit type) with a ground truth: recall@k of the truth's top-k units (by |effect|, k ≤ half
    the units), mean over k, and Spearman's ρ with the truth's effects (pandas)."""
    import pandas as pd

    rows = []
    for unit_type, effects in truth.items():
        if unit_type not in report.scores:
            continue
        effects = torch.as_tensor(effects).float()
        for method, t in report.scores[unit_type].items():
            if tuple(t.shape) != tuple(effects.shape):
                raise LensBiasError(f"ground truth for {unit_type} has shape {tuple(effects.shape)}, "
                                    f"{method}'s scores {tuple(t.shape)}")
            n = int(torch.isfinite(t).sum())
            recalls = []
            for k in ks:
                if not 1 <= k <= max(1, n // 2):
                    continue
                gold = set(top_units(effects.abs(), k))
                recalls.append(len(gold & set(top_units(t, k))) / k)
            rows.append({"method": method, "unit_type": unit_type,
                         "truth_recall": sum(recalls) / len(recalls) if recalls else math.nan,
                         "truth_spearman": spearman(t, effects)})
    return pd.DataFrame(rows)


def ranking_vs_truth(model: HookedModel, task, truth: dict[str, Tensor], *, report=None, ks=(1, 2, 4, 8), **report_kw):
    """The report's method ranking next to the ground truth's, for one benchmark case.

    truth maps a unit type ('head', 'neuron', 'layer') to the measured effect of every unit on the bias
    metric (e.g. exhaustive ablation: [layer, head], [layer, neuron]); a method's truth score is its
    recall@k of the truth's top-k (by |effect|), mean over k. Returns (table, ρ): one row per (method, unit
    type) with the report's rank and area and the truth's recall and rank, and Spearman's ρ between the
    report's areas and the truth's recalls (the agreement a benchmark asserts). `report` reuses a report
    already made; otherwise locate_report(model, task, **report_kw) runs."""
    from .main import locate_report

    if not truth:
        raise LensBiasError("no ground truth given: map a unit type to its effects tensor")
    report = report if report is not None else locate_report(model, task, progress=False, **report_kw)
    t = truth_scores(report, truth, ks)
    if not len(t):
        raise LensBiasError(f"the ground truth's unit types {sorted(truth)} are not in the report "
                            f"({sorted(report.scores)})")
    r = report.ranking[["method", "unit_type", "rank", "area", "beats_random"]]
    table = r.merge(t, on=["method", "unit_type"], how="inner")
    table["truth_rank"] = table["truth_recall"].rank(ascending=False, method="min").astype(int)
    rho = spearman(torch.tensor(table["area"].to_numpy()), torch.tensor(table["truth_recall"].to_numpy()))
    return table.sort_values("rank").reset_index(drop=True), rho
