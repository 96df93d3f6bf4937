"""Every locate method that applies to a task, run through its public function and mapped onto the
common units (units.py). Which methods apply comes from the batch-run registry (`REGISTRY`, each spec's
data kind) plus the baselines; a registered method the report does not know is named in a note."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import torch
from torch import Tensor

from ...core.errors import LensBiasError
from ...core.hooks import device_of, hook_name, site_kind, trace, unit_names
from ...core.models import HookedModel
from ...core.prompts import PromptSet
from ...locate.attribution import attribution_patching
from ...locate.baselines import (
    candidate_attention,
    grad_x_activation,
    mean_activation,
    weight_norm,
)
from ...locate.crispr import crispr_scores
from ...locate.nas import negative_attention_scores
from ...locate.patching import activation_patching, position_labels
from ...locate.tracing import causal_trace
from ...runs.registry import REGISTRY, locate_units
from ...tasks.multiple_choice import (
    biased_option,
    format_mc_prompt,
    item_options,
    option_sequences,
    sequence_logprobs,
    unknown_option,
)
from .tasks import ReportTask
from .units import SITE_PARTS, layer_from_heads_and_neurons, layer_from_sites

#: the registry's data kinds each task kind runs
TASK_DATA_KINDS = {"pairs": ("pairs", "subject_prompts"), "yesno": ("yesno",), "multiple_choice": ("multiple_choice",)}


def _flip(scores: dict[str, Tensor], s: float) -> dict[str, Tensor]:
    return {k: v * s for k, v in scores.items()}


def _with_layers(out: dict[str, Tensor], L: int) -> dict[str, Tensor]:
    out["layer"] = layer_from_heads_and_neurons(out.get("head"), out.get("neuron"), L)
    return out


# ---- pairs ------------------------------------------------------------------------------
def run_patching(model: HookedModel, task: ReportTask, orient: dict, opts: dict, progress: bool):
    ps = task.locate
    kw = {"progress": progress}
    head = activation_patching(model, ps, "head", per_position=False, **kw).effect  # pyright: ignore[reportArgumentType] - pairs and yes/no tasks hold a PromptSet
    sites = torch.stack([activation_patching(model, ps, s, per_position=True, **kw).effect for s in SITE_PARTS], -1)  # pyright: ignore[reportArgumentType] - pairs and yes/no tasks hold a PromptSet
    layer = torch.stack([activation_patching(model, ps, s, per_position=False, **kw).effect  # pyright: ignore[reportArgumentType] - pairs and yes/no tasks hold a PromptSet
                         for s in ("attn_out", "mlp_out")], -1)
    out = {"head": head, "site": sites, "layer": layer}
    return _flip(out, orient["sign"]), {"rule": "layer: attn_out / mlp_out patched at all positions at once"}


def run_attribution(model: HookedModel, task: ReportTask, orient: dict, opts: dict, progress: bool):
    res = attribution_patching(model, task.locate, ["head", "neuron", *SITE_PARTS], at="clean")  # pyright: ignore[reportArgumentType] - pairs and yes/no tasks hold a PromptSet
    out = {"head": res["head"].effect, "neuron": res["neuron"].effect,
           "site": torch.stack([res[s].effect for s in SITE_PARTS], -1)}
    out = _with_layers(out, model.cfg.n_layers)
    return _flip(out, orient["sign"]), {"rule": "layer: sum of heads / neurons (exact: attribution is linear)"}


def _same_length_rows(ps: PromptSet) -> PromptSet:
    lengths = ps.attention_mask.sum(1).tolist()
    best = max(set(lengths), key=lengths.count)
    return ps[[i for i, n in enumerate(lengths) if n == best]]


def run_tracing(model: HookedModel, task: ReportTask, orient: dict, opts: dict, progress: bool):
    ps = task.locate
    if ps.subject_spans is None:  # pyright: ignore[reportAttributeAccessIssue] - pairs and yes/no tasks hold a PromptSet
        return None, {"skipped": "the prompts have no subject spans"}
    ps = _same_length_rows(ps)  # pyright: ignore[reportArgumentType] - pairs and yes/no tasks hold a PromptSet
    corruption = opts.get("tracing_corruption", "noise")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = causal_trace(model, ps, sites=("attn_out", "mlp_out"), corruption=corruption,
                           samples=opts.get("tracing_samples", 3), seed=opts.get("seed", 0), progress=progress)
    first = res["mlp_out"]
    te = first.clean - first.corrupted
    sign = 1.0 if te >= 0 else -1.0  # restoring moves toward the clean run: its own total effect's sign
    L, P = first.values.shape
    full_p = task.locate.tokens.shape[1]  # pyright: ignore[reportAttributeAccessIssue] - pairs and yes/no tasks hold a PromptSet
    site = torch.full((L, full_p, 3), math.nan)
    site[:, :P, 1] = res["attn_out"].effect * sign
    site[:, :P, 2] = res["mlp_out"].effect * sign
    meta = {"corruption": corruption, "total_effect": te, "total_effect_fraction": first.extra["total_effect_fraction"],
            "n_prompts": len(ps), "warnings": [str(w.message) for w in caught],
            "rule": "layer: sum over positions"}
    site_f = site.nan_to_num(0.0)
    layer = layer_from_sites(site_f)
    return {"site": site, "layer": layer}, meta


def _baseline_sites(model: HookedModel, ps: PromptSet, fn: Callable) -> dict[str, Tensor]:
    return {s: fn(model, ps, s).values for s in ("head", "neuron")}


def run_grad_x_act(model: HookedModel, task: ReportTask, orient: dict, opts: dict, progress: bool):
    if task.kind == "multiple_choice":
        out = mc_grad_x_act(model, task.locate, task.instructions[:1])  # pyright: ignore[reportArgumentType] - multiple-choice tasks hold items
        out = _with_layers(out, model.cfg.n_layers)
        return _flip(out, orient["sign"]), {"metric": "P(biased) − P(other) on ambiguous items"}
    out = _with_layers(_baseline_sites(model, task.locate, grad_x_activation), model.cfg.n_layers)  # pyright: ignore[reportArgumentType] - pairs and yes/no tasks hold a PromptSet
    return _flip(out, orient["sign"] * orient["metric_sign"]), {}


def run_weight_norm(model: HookedModel, task: ReportTask, orient: dict, opts: dict, progress: bool):
    out = {s: weight_norm(model, s).values for s in ("head", "neuron")}
    return _with_layers(out, model.cfg.n_layers), {}


def run_mean_activation(model: HookedModel, task: ReportTask, orient: dict, opts: dict, progress: bool):
    if task.kind == "multiple_choice":
        out = mc_mean_activation(model, task.locate, task.instructions[0])  # pyright: ignore[reportArgumentType] - multiple-choice tasks hold items
    else:
        out = _baseline_sites(model, task.locate, mean_activation)  # pyright: ignore[reportArgumentType] - pairs and yes/no tasks hold a PromptSet
    return _with_layers(out, model.cfg.n_layers), {}


def run_random(model: HookedModel, task: ReportTask, orient: dict, opts: dict, progress: bool):
    cfg = model.cfg
    g = torch.Generator().manual_seed(int(opts.get("seed", 0)) + 7919)
    out = {"head": torch.rand(cfg.n_layers, cfg.n_heads, generator=g),
           "neuron": torch.rand(cfg.n_layers, cfg.d_mlp, generator=g),  # pyright: ignore[reportArgumentType] - a bridge's cfg has d_mlp
           "layer": torch.rand(cfg.n_layers, 2, generator=g)}
    if task.kind == "pairs":
        out["site"] = torch.rand(cfg.n_layers, task.locate.tokens.shape[1], 3, generator=g)  # pyright: ignore[reportAttributeAccessIssue] - pairs and yes/no tasks hold a PromptSet
    return out, {"seed": int(opts.get("seed", 0)) + 7919}


# ---- yes/no -----------------------------------------------------------------------------
def run_nas(model: HookedModel, task: ReportTask, orient: dict, opts: dict, progress: bool):
    nas = negative_attention_scores(model, task.locate, progress=progress)  # pyright: ignore[reportArgumentType] - pairs and yes/no tasks hold a PromptSet
    return {"head": nas.nas, "layer": layer_from_heads_and_neurons(nas.nas, None, model.cfg.n_layers)}, \
        {"rule": "layer: sum over heads (attn)"}


def run_candidate_attention(model: HookedModel, task: ReportTask, orient: dict, opts: dict, progress: bool):
    att = candidate_attention(model, task.locate, "neg")  # pyright: ignore[reportArgumentType] - pairs and yes/no tasks hold a PromptSet
    return {"head": att, "layer": layer_from_heads_and_neurons(att, None, model.cfg.n_layers)}, {}


# ---- multiple choice --------------------------------------------------------------------
def run_crispr(model: HookedModel, task: ReportTask, orient: dict, opts: dict, progress: bool):
    kw = {"instructions": task.instructions, "progress": progress, "batch_size": 8}
    neuron = crispr_scores(model, task.locate, unit="neuron", **kw).values  # pyright: ignore[reportArgumentType] - multiple-choice tasks hold items
    head = crispr_scores(model, task.locate, unit="head", **kw).values  # pyright: ignore[reportArgumentType] - multiple-choice tasks hold items
    return _with_layers({"head": head, "neuron": neuron}, model.cfg.n_layers), \
        {"instructions": len(task.instructions), "rule": "layer: sum of heads / neurons"}


def mc_forward(model: HookedModel, items: list, instruction: str, grad: bool):
    """One forward over every (item, option) sequence keeping hook_z and hook_post of every layer;
    returns (activations by hook, option probabilities [n, k], spans, sequence lengths)."""
    prompts = [format_mc_prompt(instruction, it["context"], it["question"], item_options(it)) for it in items]
    options = [item_options(it) for it in items]
    seqs, spans = option_sequences(model.tokenizer, prompts, options)
    with torch.set_grad_enabled(grad), trace(model, unit_names(model, ("head", "neuron")).values()) as acts:
        lp = sequence_logprobs(model, seqs, spans)
    k = len(options[0])
    return acts, lp.view(len(items), k).softmax(-1), seqs


def mc_grad_x_act(model: HookedModel, items: list, instructions: list[str]) -> dict[str, Tensor]:
    """Σ_pos ∂m/∂a · a of the report's multiple-choice bias metric m = mean over ambiguous items of
    P(biased) − P(other non-unknown option): [layer, head] (Σ over d_head) and [layer, neuron]."""
    L = model.cfg.n_layers
    sites = unit_names(model, ("head", "neuron"))
    names = list(sites.values())
    total = dict.fromkeys(names, 0.0)
    for ins in instructions:
        acts, probs, _ = mc_forward(model, items, ins, grad=True)
        terms = []
        for i, it in enumerate(items):
            b, u = biased_option(it), unknown_option(it)
            if it.get("context_condition") != "ambig" or b is None or u is None:
                continue
            other = [j for j in range(probs.shape[1]) if j not in (b, u)]
            if len(other) == 1:
                terms.append(probs[i, b] - probs[i, other[0]])
        if not terms:
            raise LensBiasError("no ambiguous item with a biased option to take the gradient of")
        grads = torch.autograd.grad(torch.stack(terms).mean(), [acts[n] for n in names], allow_unused=True)
        for ((site, _), n), g in zip(sites.items(), grads):
            s = (g * acts[n]).detach().float() if g is not None else torch.zeros(acts[n].shape)
            if site_kind(site) == "head":
                s = s.sum(-1)  # a head's features: [seq, pos, head]
            total[n] = total[n] + s.sum((0, 1)).cpu()  # pyright: ignore[reportArgumentType] - the sums are tensors
    return {site: torch.stack([total[hook_name(site, l)] for l in range(L)]) / len(instructions)  # pyright: ignore[reportArgumentType] - the sums are tensors
            for site in ("head", "neuron")}


def mc_mean_activation(model: HookedModel, items: list, instruction: str) -> dict[str, Tensor]:
    """baselines.mean_activation's formula on the multiple-choice sequences: mean over sequences and
    real positions of ‖z_h‖ (head) or |h_i| (neuron)."""
    from ...core.prompts import pad

    acts, _, seqs = mc_forward(model, items, instruction, grad=False)
    _, mask = pad(seqs)
    mask = mask.bool().to(device_of(model))
    L = model.cfg.n_layers
    out = {}
    for site in ("head", "neuron"):
        vals = []
        for l in range(L):
            a = acts[hook_name(site, l)][mask].float()
            vals.append((a.norm(dim=-1) if site == "head" else a.abs()).mean(0).cpu())
        out[site] = torch.stack(vals)
    return out


#: report method → (registry name it stands for, or None for a baseline; runner; task kinds)
RUNNERS: dict[str, tuple[str | None, Callable, tuple[str, ...]]] = {
    "patching": ("patching", run_patching, ("pairs",)),
    "attribution": ("attribution", run_attribution, ("pairs",)),
    "tracing": ("tracing", run_tracing, ("pairs",)),
    "nas": ("nas", run_nas, ("yesno",)),
    "candidate_attention": ("baselines", run_candidate_attention, ("yesno",)),
    "crispr": ("crispr", run_crispr, ("multiple_choice",)),
    "grad_x_act": ("baselines", run_grad_x_act, ("pairs", "yesno", "multiple_choice")),
    "weight_norm": ("baselines", run_weight_norm, ("pairs", "yesno", "multiple_choice")),
    "mean_activation": ("baselines", run_mean_activation, ("pairs", "yesno", "multiple_choice")),
    "random": (None, run_random, ("pairs", "yesno", "multiple_choice")),
}


def _registered(name: str) -> Callable:
    """The runner of a registered method with no hand-written one: runs.registry.locate_units on the task."""
    def run(model, task: ReportTask, orient: dict, opts: dict, progress: bool):
        out = _with_layers(_flip(locate_units(model, name, task.locate), orient["sign"]), model.cfg.n_layers)
        return out, {"rule": "layer: sum of heads / neurons (runs.registry.locate_units)"}
    return run


def applicable_methods(kind: str) -> tuple[list[str], list[str]]:
    """(report methods for a task kind, notes): the registry's methods whose data kind the task has (a
    registered method with no runner here through runs.registry.locate_units), the baselines, random."""
    kinds = TASK_DATA_KINDS[kind]
    known = {reg for reg, _, _ in RUNNERS.values() if reg}
    registered = {name for name, spec in REGISTRY.items() if spec.data in kinds} | {"baselines"}
    methods = [m for m, (reg, _, tasks) in RUNNERS.items()
               if kind in tasks and (reg is None or reg in registered or reg == "baselines")]
    return methods[:-1] + sorted(registered - known) + methods[-1:], []  # random last


def run_method(name: str, model: HookedModel, task: ReportTask, orient: dict, opts: dict, progress: bool):
    """(scores by unit type, metadata) of one report method."""
    return (RUNNERS[name][1] if name in RUNNERS else _registered(name))(model, task, orient, opts, progress)


__all__ = ["RUNNERS", "applicable_methods", "mc_grad_x_act", "mc_mean_activation", "position_labels", "run_method"]
