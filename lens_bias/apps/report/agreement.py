"""Agreement between methods on a unit type: Spearman's ρ over the units both score, and top-k overlap
|top_k(A) ∩ top_k(B)| / k."""

from __future__ import annotations

import math

import torch

from .units import top_units

OVERLAP_K = (1, 2, 4, 8)


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman's ρ of two score tensors over the units both have (average ranks for ties); NaN when
    fewer than 3 units or a constant side."""
    import pandas as pd

    x, y = a.reshape(-1).double(), b.reshape(-1).double()
    ok = torch.isfinite(x) & torch.isfinite(y)
    if int(ok.sum()) < 3:
        return float("nan")
    rx = pd.Series(x[ok].numpy()).rank(method="average")
    ry = pd.Series(y[ok].numpy()).rank(method="average")
    rho = rx.corr(ry)  # Pearson of the ranks
    return float(rho) if rho == rho else float("nan")


def overlap(a: torch.Tensor, b: torch.Tensor, k: int) -> float:
    """|top_k(A) ∩ top_k(B)| / k over the units both score."""
    both = torch.isfinite(a.float()) & torch.isfinite(b.float())
    if int(both.sum()) < k:
        return float("nan")
    ta = set(top_units(torch.where(both, a.float(), torch.tensor(math.nan)), k))
    tb = set(top_units(torch.where(both, b.float(), torch.tensor(math.nan)), k))
    return len(ta & tb) / k


def agreement_table(scores: dict[str, dict[str, torch.Tensor]], ks=OVERLAP_K):
    """One row per (unit type, method A, method B), A ≠ B, both orders: spearman, overlap@k, n_units."""
    import pandas as pd

    rows = []
    for unit_type, by_method in scores.items():
        names = list(by_method)
        for a in names:
            for b in names:
                if a == b:
                    continue
                ta, tb = by_method[a], by_method[b]
                n = int((torch.isfinite(ta.float()) & torch.isfinite(tb.float())).sum())
                row = {"unit_type": unit_type, "method_a": a, "method_b": b, "n_units": n,
                       "spearman": spearman(ta, tb)}
                for k in ks:
                    row[f"overlap@{k}"] = overlap(ta, tb, k)
                rows.append(row)
    return pd.DataFrame(rows)
