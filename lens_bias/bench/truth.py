"""The ground truth of a benchmark case and the two scores of a ranking against it.

The truth is what exhaustive ablation measured on the shipped weights (`ground_truth.safetensors`
beside each model): effect(u) = m(model) − m(model with unit u ablated), for every head and for
every MLP neuron of the layers the build swept, zero and mean ablation, plus pairs and cumulative
top-k ablations. A unit *carries* the bias when it is among the fewest units, by effect, whose
positive effects add up to `share` (80%) of all positive effect — at least `min_k` (3) of them.

    recall@k = |top-k(score) ∩ carriers| / k,   k = |carriers|
    AUC      = P(score(carrier) > score(other unit))  (ties count ½; Mann–Whitney)
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from jaxtyping import Bool, Float
from safetensors.torch import load_file
from torch import Tensor

from ..core.errors import LensBiasError

Ablation = Literal["zero", "mean"]
UnitKind = Literal["head", "neuron"]


def load_truth(model_dir: str | Path) -> dict[str, Tensor]:
    """Every tensor of the model folder's ground_truth.safetensors."""
    path = Path(model_dir) / "ground_truth.safetensors"
    if not path.is_file():
        raise LensBiasError(f"{path}: no ground truth (build the benchmark models with python -m lens_bias.bench.build)")
    return load_file(str(path))


def unit_truth(truth: dict[str, Tensor], key: str, unit: UnitKind, metric: str = "bias",
               ablation: Ablation = "zero") -> tuple[Float[Tensor, "layer unit"], list[int]]:
    """(effects [layer, unit], the layers they cover): every layer's heads, or the swept layers' neurons."""
    name = f"{key}/{metric}/{'heads' if unit == 'head' else 'neurons'}_{ablation}"
    if name not in truth:
        raise LensBiasError(f"ground truth has no {name}")
    eff = truth[name].float()
    layers = list(range(eff.shape[0])) if unit == "head" else truth[f"{key}/neuron_layers"].tolist()
    return eff, layers


def carriers(effect: Tensor, share: float = 0.8, min_k: int = 3) -> Bool[Tensor, "..."]:  # noqa: UP037 - jaxtyping needs the string "...", not Ellipsis
    """The fewest units, largest effect first, whose positive effects reach `share` of the positive
    total (at least `min_k`)."""
    flat = effect.reshape(-1)
    order = flat.argsort(descending=True)
    pos = flat[order].clamp(min=0)
    total = float(pos.sum())
    if total <= 0:
        raise LensBiasError("no unit has a positive effect: nothing carries this bias")
    k = int((pos.cumsum(0) < share * total).sum()) + 1
    k = max(k, min_k)
    mask = torch.zeros_like(flat, dtype=torch.bool)
    mask[order[:k]] = True
    return mask.view(effect.shape)


def recall_at_k(scores: Tensor, positive: Tensor) -> float:
    """|top-k(scores) ∩ positive| / k with k = |positive| (NaN scores rank last)."""
    s = torch.nan_to_num(scores.reshape(-1).float(), nan=-float("inf"))
    k = int(positive.sum())
    top = s.argsort(descending=True)[:k]
    return float(positive.reshape(-1)[top].float().sum() / k)


def auc(scores: Tensor, positive: Tensor) -> float:
    """P(score of a positive unit > score of a negative one), ties ½."""
    s = torch.nan_to_num(scores.reshape(-1).double(), nan=-float("inf"))
    p = positive.reshape(-1)
    ranks = _average_ranks(s)
    n_pos, n_neg = int(p.sum()), int((~p).sum())
    return float((ranks[p].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _average_ranks(x: Tensor) -> Tensor:
    """1-based ranks, ties given their average rank."""
    order = x.argsort()
    ranks = torch.empty_like(x)
    ranks[order] = torch.arange(1, len(x) + 1, dtype=x.dtype)
    uniq, inv = torch.unique(x, return_inverse=True)
    sums = torch.zeros(len(uniq), dtype=x.dtype).index_add_(0, inv, ranks)
    counts = torch.zeros(len(uniq), dtype=x.dtype).index_add_(0, inv, torch.ones_like(x))
    return (sums / counts)[inv]


# ---------------------------------------------------------------------------------------------------
# Sampled truth (real-model neurons): every neuron of the swept layers is known, the others only through a
# uniform random sample. Each known unit stands for `weight` units of the population: 1 for a swept one,
# (neurons outside the swept layers) / (sample size) for a sampled one (Horvitz–Thompson). Then
#   carriers  = the fewest known units, largest effect first, whose weighted positive effects reach `share`
#               of the weighted positive total; k̂ = their total weight (the carriers expected in the population)
#   recall@k̂ ≈ Σ_{carriers j with rank_score(j) ≤ k̂} w_j / k̂, the method's ranks taken over the whole population
#   AUC      ≈ Σ_{c ∈ carriers, n ∉ carriers} w_c w_n [1(s_c > s_n) + ½·1(s_c = s_n)] / (Σ w_c · Σ w_n)
# — unbiased over the draw of the sample; with every unit known (all weights 1) they equal recall_at_k and auc.
def weighted_carriers(effect: Tensor, weight: Tensor, share: float = 0.8, min_k: int = 3) -> tuple[Tensor, float]:
    """(carrier mask over the known units, k̂ = the carriers' total weight)."""
    order = effect.argsort(descending=True)
    pos = (effect[order].clamp(min=0) * weight[order]).double()
    total = float(pos.sum())
    if total <= 0:
        raise LensBiasError("no unit has a positive effect: nothing carries this bias")
    n = int((pos.cumsum(0) < share * total).sum()) + 1
    n = max(n, min_k)
    mask = torch.zeros_like(effect, dtype=torch.bool)
    mask[order[:n]] = True
    return mask, float(weight[mask].sum())


def weighted_recall(population_scores: Tensor, known: Tensor, positive: Tensor, weight: Tensor, k: float) -> float:
    """Estimated |top-k(scores) ∩ carriers| / k: `known` indexes the known units in the flat population."""
    s = torch.nan_to_num(population_scores.reshape(-1).float(), nan=-float("inf"))
    kk = max(1, round(k))
    top = torch.zeros(s.numel(), dtype=torch.bool)
    top[s.argsort(descending=True)[:kk]] = True
    hit = top[known] & positive
    return float((weight[hit].sum() / kk).clamp(max=1.0))


def weighted_auc(scores: Tensor, positive: Tensor, weight: Tensor) -> float:
    """Estimated P(score of a carrier > score of another unit), ties ½, over weighted known units."""
    s = torch.nan_to_num(scores.reshape(-1).double(), nan=-float("inf"))
    w = weight.double()
    order = s.argsort()
    s_o, w_o, p_o = s[order], w[order], positive[order]
    uniq, inv = torch.unique_consecutive(s_o, return_inverse=True)
    neg_w = torch.zeros(len(uniq), dtype=torch.double).index_add_(0, inv, w_o * (~p_o))
    below = neg_w.cumsum(0) - neg_w  # negative weight strictly below each value
    pos_w = torch.zeros(len(uniq), dtype=torch.double).index_add_(0, inv, w_o * p_o)
    num = float((pos_w * (below + 0.5 * neg_w)).sum())
    den = float(w[positive].sum() * w[~positive].sum())
    return num / den if den else float("nan")
