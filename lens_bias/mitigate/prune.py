"""Pruning as a weight edit: a neuron's W_out row or a head's W_O slice set to zero.

Zeroing W_out makes a neuron's contribution exactly zero for every input — the same function as
zero-ablating `mlp.hook_post` — while its input weights stay as they were; zeroing the W_O rows
that read a head's z equals zero-ablating `hook_z`. Both are edits of the Hugging Face weights
the bridge wraps, so they export. CRISPR (Yang et al. 2024) prunes its top bias neurons this way;
`prune_curve` and `crispr_report` evaluate the choice on held-out items.
"""

from __future__ import annotations

import functools
from typing import Sequence

import torch

from ..core.errors import LensBiasError
from ..core.hf import clone_model, hf_state_dict, out_projection
from ..core.models import HookedModel
from ..core.scores import ComponentScores
from ..tasks.capability import text_loss
from ..tasks.multiple_choice import bbq_evaluate
from .ablation import UnitSite, check_units, neuron_ablation_hooks, random_units
from .edits import Mitigation
from .methods import MitigationMethod, MitigationRequest, MitigationRun

#: n random (layer, neuron) pairs not in `exclude`
random_neurons = functools.partial(random_units, site="neuron")
#: n random (layer, head) pairs not in `exclude`
random_heads = functools.partial(random_units, site="head")


def prune_neurons(model: HookedModel, neurons: Sequence[tuple[int, int]], *, inplace: bool = False) -> Mitigation:
    """W_out[l][i] ← 0 for each neuron (l, i): a permanent edit equal to zero-ablating it; on a copy
    (clone_model) unless `inplace`."""
    neurons = check_units(model, neurons, "neuron")
    target = model if inplace else clone_model(model)
    with torch.no_grad():
        for l, i in neurons:
            out_projection(target, l, "mlp")[i].zero_()
    return Mitigation.of(model, target, "prune-neurons", units=[list(u) for u in neurons])


def prune_heads(model: HookedModel, heads: Sequence[tuple[int, int]], *, inplace: bool = False) -> Mitigation:
    """W_O[l][h·d_head:(h+1)·d_head] ← 0 for each head (l, h) — the rows that read its z: equal to
    zero-ablating hook_z, and it exports; on a copy unless `inplace`."""
    heads = check_units(model, heads, "head")
    target = model if inplace else clone_model(model)
    d_head = target.cfg.d_head
    with torch.no_grad():
        for l, h in heads:
            out_projection(target, l, "attn")[h * d_head:(h + 1) * d_head].zero_()
    hf_state_dict(target)  # the edited weights must stay reachable under Hugging Face names
    return Mitigation.of(model, target, "prune-heads", units=[list(u) for u in heads])


def prune_curve(model: HookedModel, scores: ComponentScores, dev_items: list[dict], ns=(1, 2, 4, 8, 16),
                instructions: list[str] | None = None):
    """Dev-split metrics after zero-ablating the top-n neurons, for each n (pandas; choose n here)."""
    import pandas as pd

    if not ns or any(n < 1 for n in ns):
        raise LensBiasError(f"ns must be positive numbers of neurons, got {ns}")
    rows = [{"n": 0, **bbq_evaluate(model, dev_items, instructions)}]
    for n in ns:
        hooks = neuron_ablation_hooks(model, scores.units(n))  # pyright: ignore[reportArgumentType] - units() of a [layer, neuron] score are pairs
        rows.append({"n": n, **bbq_evaluate(model, dev_items, instructions, hooks=hooks)})
    return pd.DataFrame(rows)


def crispr_report(model: HookedModel, neurons: list[tuple[int, int]], test_items: list[dict], *, neutral_text=None,
                  instructions: list[str] | None = None, random_seeds=(0, 1, 2)):
    """Before/after table on a held-out split: the original model, the top-n `neurons` pruned, and n
    random neurons pruned (one row per seed) — BBQ accuracy (ambig/disambig/overall), bias scores,
    the stereotyped rate in ambiguous contexts and, with `neutral_text`, capability (loss on it)."""
    import pandas as pd

    def row(name, hooks, seed=None):
        r = {"condition": name, "seed": seed, "n_neurons": 0 if name == "original" else len(neurons),
             **bbq_evaluate(model, test_items, instructions, hooks=hooks)}
        if neutral_text is not None:
            r["neutral_loss"] = text_loss(model, neutral_text, hooks=hooks)
        return r

    rows = [row("original", []), row("pruned", neuron_ablation_hooks(model, neurons))]
    for s in random_seeds:
        rows.append(row("random", neuron_ablation_hooks(model, random_neurons(model, len(neurons), s, exclude=neurons)), s))
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------------------
# As mitigations of `lens-bias mitigate` (lens_bias.mitigate.registry)
# ---------------------------------------------------------------------------------------
def _pruning(site: UnitSite, summary: str) -> MitigationMethod:
    """prune-neurons or prune-heads as a mitigation: the --units pruned (the pipeline measures --data)."""
    name, prune = f"prune-{site}s", (prune_neurons if site == "neuron" else prune_heads)

    def check(model: HookedModel, request: MitigationRequest) -> None:
        if not request.units:
            raise LensBiasError(f"{name} needs the components to prune (--units LAYER:INDEX,...)")

    def run(model: HookedModel, request: MitigationRequest, data: None) -> MitigationRun:
        return MitigationRun(prune(model, request.units), lines=[f"pruned {len(request.units)} {site}s: {request.units}"])

    return MitigationMethod(name=name, summary=summary, units=site, data="evaluation", run=run, check=check)


RUN_NEURONS = _pruning("neuron", "zero the W_out rows of --units LAYER:NEURON,... (= zero ablation; Yang et al. 2024, "
                                 "CRISPR)")
RUN_HEADS = _pruning("head", "zero the W_O slices of --units LAYER:HEAD,... (= zero ablation of hook_z)")
