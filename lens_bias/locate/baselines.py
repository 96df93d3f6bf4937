"""Baselines a locate method has to beat: scores that use no counterfactual, or none of the model's
computation at all. A method that does not beat them on a ground-truth case is not locating.

    weight_norm         head: ‖W_O[h]‖_F (the output-projection rows that read its z); neuron: ‖W_out[i]‖
    mean_activation     mean over prompts and real positions of ‖z_h‖ (head) or |h_i| (neuron)
    grad_x_activation   mean over prompts of Σ_pos ∂LD/∂a · a in the clean run — attribution patching
                        without the corrupted baseline (a_clean − a_corr → a_clean)
    candidate_attention a head's mean attention from the answer position to the " No" candidate
                        (yes/no prompts) — NAS without its weighting and log-ratio

This file is also the worked example of adding a locate method: it ends with its `RUN` spec, and
lens_bias/runs/registry.py lists it — nothing else changed to make `lens-bias attribute --method
baselines` run resumably, in chunks, on several processes.
"""

from __future__ import annotations

from typing import Iterable, Literal

import torch
from jaxtyping import Float
from torch import Tensor

from ..core.errors import LensBiasError
from ..core.hf import out_projection
from ..core.hooks import check_sites, device_of, last_resid, trace, unit_names
from ..core.methods import ChunkSums, LocateMethod, add_scores, scores_from_sums
from ..core.models import HookedModel
from ..core.prompts import PromptSet
from ..core.scores import ComponentScores
from .attribution import activations_and_gradients
from .nas import negative_attention_scores

UnitSite = Literal["head", "neuron"]
Baseline = Literal["weight_norm", "mean_activation", "grad_x_activation"]
BASELINES = ("weight_norm", "mean_activation", "grad_x_activation")


def _scores(values: Tensor, site: str, method: str) -> ComponentScores:
    return ComponentScores(values.detach().float().cpu(), ("layer", site), site, method)


def weight_norm(model: HookedModel, site: UnitSite = "neuron") -> ComponentScores:
    """‖W_out[i]‖ per MLP neuron, or ‖W_O[h]‖_F per head: [layer, unit]."""
    check_sites([site], ("head", "neuron"), "weight-norm")
    L = model.cfg.n_layers
    if site == "neuron":
        vals = torch.stack([out_projection(model, l, "mlp").norm(dim=1) for l in range(L)])
    else:
        d = model.cfg.d_head
        vals = torch.stack([out_projection(model, l, "attn").reshape(model.cfg.n_heads, d, -1).norm(dim=(1, 2))
                            for l in range(L)])
    return _scores(vals, site, "weight_norm")


def mean_activation(model: HookedModel, ps: PromptSet, site: UnitSite = "neuron") -> ComponentScores:
    """Mean over prompts and real positions of |h_i| (neuron) or ‖z_h‖ (head): [layer, unit]."""
    check_sites([site], ("head", "neuron"), "mean-activation")
    names = list(unit_names(model, site).values())
    ps = ps.to(device_of(model))
    with torch.no_grad(), trace(model, names, stop_at=last_resid(model)) as acts:
        model(ps.tokens, attention_mask=ps.attention_mask)
    mask = ps.attention_mask.bool()
    vals = []
    for n in names:
        a = acts[n][mask].float()  # [tokens, units] or [tokens, head, d_head]
        vals.append((a.norm(dim=-1) if site == "head" else a.abs()).mean(0))
    return _scores(torch.stack(vals), site, "mean_activation")


def grad_x_activation(model: HookedModel, ps: PromptSet, site: UnitSite = "neuron") -> ComponentScores:
    """Mean over prompts of Σ_pos ∂LD/∂a · a (clean run), summed over a head's z features: [layer, unit]."""
    check_sites([site], ("head", "neuron"), "gradient × activation")
    ps = ps.to(device_of(model))
    names = list(unit_names(model, site).values())
    acts, grads, _ = activations_and_gradients(model, ps, ps.tokens, names)
    vals = []
    for n in names:
        s = (grads[n] * acts[n] * len(ps)).mean(0)  # the gradient is of the mean LD: undo its 1/n
        vals.append((s.sum(-1) if site == "head" else s).sum(0))
    return _scores(torch.stack(vals), site, "grad_x_activation")


def candidate_attention(model: HookedModel, ps: PromptSet, candidate: Literal["neg", "pos"] = "neg"
                        ) -> Float[Tensor, "layer head"]:
    """Mean attention from the answer position to the instruction's " No" (or " Yes") candidate, per head."""
    res = negative_attention_scores(model, ps, progress=False, queries="answer")
    return res.att_neg if candidate == "neg" else res.att_pos  # pyright: ignore[reportReturnType] - negative_attention_scores fills att_neg/att_pos


def baseline_scores(model: HookedModel, ps: PromptSet, baselines: Iterable[Baseline] = BASELINES,
                    sites: Iterable[UnitSite] = ("head", "neuron")) -> dict[str, ComponentScores]:
    """Every baseline for every site, keyed 'baseline:site' (e.g. 'weight_norm:neuron')."""
    out = {}
    for b in check_sites(baselines, BASELINES, "baseline"):
        for site in check_sites(sites, ("head", "neuron"), "baseline"):
            out[f"{b}:{site}"] = weight_norm(model, site) if b == "weight_norm" else \
                (mean_activation if b == "mean_activation" else grad_x_activation)(model, ps, site)
    if not out:
        raise LensBiasError("no baseline asked for")
    return out


# ---------------------------------------------------------------------------------------
# As a batch-run method (lens_bias.runs)
# ---------------------------------------------------------------------------------------
def _run_chunk(model, data: PromptSet, lo: int, hi: int, opts: dict, batch_size, state) -> ChunkSums:
    sub = data[lo:hi]
    return add_scores(baseline_scores(model, sub, opts["baselines"], opts["components"]), len(sub))


RUN = LocateMethod(
    name="baselines",
    summary="trivial baselines to beat: weight norm, mean |activation|, gradient × activation (no counterfactual)",
    data="pairs",
    options={"baselines": list(BASELINES), "components": ["head", "neuron"], "templates": None, "answers": None,
             "corrupt_with": "man"},
    run=_run_chunk,
    finalize=lambda model, data, total, opts: scores_from_sums(total, None),
    sites=("head", "neuron"),
)
