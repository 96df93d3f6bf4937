"""Common units of a locate report, their labels, and the rules that carry a finer method's scores to a
coarser unit.

    head    (layer, head)                 [L, H]
    neuron  (layer, neuron)               [L, d_mlp]
    layer   (layer, part), part attn|mlp  [L, 2]   a layer's whole attention or MLP output
    site    (layer, pos, site)            [L, P, 3] site resid_pre|attn_out|mlp_out at one position

Aggregation (finer → coarser), by the first-order rule that effects add:
    neurons of layer l → (l, mlp)            sum over the layer's neurons
    heads of layer l   → (l, attn)           sum over the layer's heads
    (l, pos, attn_out|mlp_out) → (l, attn|mlp)   sum over positions
    heads by position → head                 sum over positions
Attribution scores add exactly (attn_out and mlp_out are linear in z and in the neurons); patching and
tracing effects add only to first order — the rule is stated, not assumed exact.

Sign: every score is oriented so that a unit that carries the bias ranks high — patching and tracing:
restoring the clean unit moves the metric toward the clean bias; attribution (gradient in the clean run):
corrupting the unit takes bias away; gradient × activation: the unit's first-order push on the bias
metric; NAS: prefers ' No'; CRISPR: raises the biased option. Baselines without a sign (weight norm,
mean |activation|, attention to ' No') rank by size.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

UNIT_TYPES = ("head", "neuron", "layer", "site")
LAYER_PARTS = ("attn", "mlp")
SITE_PARTS = ("resid_pre", "attn_out", "mlp_out")
#: unit types whose top-k are ablated (sites are compared by agreement only)
ABLATABLE = ("head", "neuron", "layer")


def layer_from_heads_and_neurons(head: Tensor | None, neuron: Tensor | None, n_layers: int) -> Tensor:
    """[L, 2] (attn, mlp): the sum over each layer's heads and over its neurons (NaN where absent)."""
    out = torch.full((n_layers, 2), math.nan)
    if head is not None:
        out[:, 0] = head.float().sum(1)
    if neuron is not None:
        out[:, 1] = neuron.float().sum(1)
    return out


def layer_from_sites(site: Tensor) -> Tensor:
    """[L, 2] from [L, P, 3]: attn_out and mlp_out summed over positions."""
    return torch.stack([site[:, :, 1].sum(1), site[:, :, 2].sum(1)], 1)


def unit_label(unit_type: str, idx: tuple[int, ...], tokens: list[str] | None = None) -> str:
    """'L2H1', 'L0N103', 'L0 mlp', 'L0 P4 mlp_out (that)'."""
    if unit_type == "head":
        return f"L{idx[0]}H{idx[1]}"
    if unit_type == "neuron":
        return f"L{idx[0]}N{idx[1]}"
    if unit_type == "layer":
        return f"L{idx[0]} {LAYER_PARTS[idx[1]]}"
    tok = f" ({tokens[idx[1]].strip()})" if tokens and idx[1] < len(tokens) and tokens[idx[1]].strip() else ""
    return f"L{idx[0]} P{idx[1]} {SITE_PARTS[idx[2]]}{tok}"


def top_units(scores: Tensor, k: int) -> list[tuple[int, ...]]:
    """The k units with the highest score (NaN last), as index tuples."""
    flat = scores.reshape(-1).float().nan_to_num(nan=-math.inf)
    k = min(k, int(torch.isfinite(flat).sum()))
    idx = flat.topk(k).indices.tolist() if k > 0 else []
    return [tuple(int(v) for v in torch.unravel_index(torch.tensor(i), scores.shape)) for i in idx]


def rank_of(scores: Tensor, unit: tuple[int, ...]) -> tuple[int, int]:
    """(rank, ties) of one unit: rank = how many units score at least as high (1 = top, ties share the
    lowest place: a unit tied with every other is last, not first), ties = how many others score the same
    (NaN scores rank last)."""
    flat = scores.float().nan_to_num(nan=-math.inf)
    v = flat[unit]
    return int((flat >= v).sum()), int((flat == v).sum()) - 1


def n_units(scores: Tensor) -> int:
    return int(torch.isfinite(scores.float()).sum())


def expand(unit_type: str, units: list[tuple[int, ...]], n_heads: int, d_mlp: int
           ) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """(heads, neurons) a set of units stands for: a layer unit is all heads or all neurons of its layer."""
    heads, neurons = [], []
    for u in units:
        if unit_type == "head":
            heads.append((u[0], u[1]))
        elif unit_type == "neuron":
            neurons.append((u[0], u[1]))
        elif unit_type == "layer":
            if u[1] == 0:
                heads += [(u[0], h) for h in range(n_heads)]
            else:
                neurons += [(u[0], i) for i in range(d_mlp)]
        else:
            raise ValueError(f"units of type {unit_type!r} are not ablated")
    return heads, neurons


def scores_frame(scores: dict[str, dict[str, Tensor]], tokens: list[str] | None = None):
    """Tidy table of every method's scores on every unit: unit_type, method, unit, layer, index, pos, part,
    score, rank (1 = carries the most bias by that method; tied units share the lowest of their places)."""
    import numpy as np
    import pandas as pd

    frames = []
    for unit_type, by_method in scores.items():
        for method, t in by_method.items():
            arr = t.detach().float().cpu().numpy()
            flat = arr.reshape(-1)
            idx = np.unravel_index(np.arange(flat.size), arr.shape)
            keep = ~np.isnan(flat)
            df = pd.DataFrame({"unit_type": unit_type, "method": method, "layer": idx[0][keep],
                               "score": flat[keep]})
            df["rank"] = df["score"].rank(ascending=False, method="max").astype(int)  # ties: the lowest place
            if unit_type in ("head", "neuron"):
                df["index"] = idx[1][keep]
                df["unit"] = [unit_label(unit_type, (a, b)) for a, b in zip(df["layer"], df["index"])]
            elif unit_type == "layer":
                df["part"] = [LAYER_PARTS[p] for p in idx[1][keep]]
                df["unit"] = [unit_label(unit_type, (a, b)) for a, b in zip(df["layer"], idx[1][keep])]
            else:
                df["pos"] = idx[1][keep]
                df["part"] = [SITE_PARTS[p] for p in idx[2][keep]]
                df["unit"] = [unit_label(unit_type, (a, b, c), tokens)
                              for a, b, c in zip(df["layer"], idx[1][keep], idx[2][keep])]
            frames.append(df)
    cols = ["unit_type", "method", "unit", "layer", "index", "pos", "part", "score", "rank"]
    out = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=cols)
    return out.reindex(columns=cols)
