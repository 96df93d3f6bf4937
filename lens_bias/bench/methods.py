"""Every locate method and baseline of the benchmark, as one function per case: unit scores in the
layout of the ground truth ([layer, head], [layer, neuron], or [layer, position] for MLP sites),
larger = more of the bias. Nothing here is tuned to a case: each method runs with its defaults."""

from __future__ import annotations

import json
from typing import Callable, Literal

import torch
from torch import Tensor

from ..core.models import HookedModel
from ..core.prompts import PromptSet, resolve_chat
from ..locate.attribution import attribution_patching
from ..locate.baselines import (
    candidate_attention,
    grad_x_activation,
    mean_activation,
    weight_norm,
)
from ..locate.crispr import Unit, crispr_scores, option_attributions
from ..locate.nas import negative_attention_scores
from ..locate.patching import PatchSite, activation_patching
from ..locate.tracing import causal_trace, trace_sites
from ..runs.registry import locate_units, methods_for
from ..tasks.multiple_choice import INSTRUCTIONS as MC_INSTRUCTIONS
from ..tasks.multiple_choice import biased_option, format_mc_prompt, item_options
from ..tasks.pairs import load_prompt_pairs
from ..tasks.yesno import binary_prompts
from .cases import Case

Scores = dict[str, dict[str, Tensor]]  # method → unit kind → scores


def _items(case: Case, name: str) -> list[dict]:
    return [json.loads(line) for line in (case.model_dir / "data" / name).read_text().splitlines() if line.strip()]


def _random(shape, seed: int) -> Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed))


def scores_key(case: Case) -> tuple:
    """What `case_scores` depends on besides the model: cases with the same key (3 and 5 share their
    data and differ only in what they score) share one computation."""
    return case.model, case.kind, case.data, case.units, case.extra.get("yesno")


def case_scores(model: HookedModel, case: Case, *, seeds: int = 20) -> Scores:
    """Scores of every method and baseline that applies to `case` (random: `seeds` draws, stacked)."""
    runners: dict[str, Callable[[HookedModel, Case], Scores]] = {"pairs": _pairs, "yesno": _yesno, "multiple_choice": _bbq}
    if case.real:
        runners = {"pairs": _real_pairs, "yesno": _real_yesno, "multiple_choice": _bbq}
    out = runners[case.kind](model, case)
    out.update(registered_scores(model, case))
    shapes = {u: next(s[u] for s in out.values() if u in s).shape for u in case.units}
    out["random"] = {u: torch.stack([_random(shapes[u], k) for k in range(seeds)]) for u in case.units}
    return out


#: the registered locate methods the runners below score under the benchmark's own names
COVERED = ("patching", "attribution", "tracing", "nas", "crispr", "baselines")


def registered_scores(model: HookedModel, case: Case) -> Scores:
    """Every other registered method of the case's data kind (a yes/no case's: its pairs), on its data,
    by runs.registry.locate_units: a method added to REGISTRY is in the benchmark without an edit here."""
    kind = "multiple_choice" if case.kind == "multiple_choice" else "pairs"
    names = [n for n in methods_for(kind) if n not in COVERED]
    data = (_items(case, case.data) if kind == "multiple_choice" else
            load_prompt_pairs(model, case.model_dir / "data" / case.data)) if names else None
    return {n: {u: v for u, v in locate_units(model, n, data).items() if u in case.units} for n in names}


def _pairs(model: HookedModel, case: Case, ps: PromptSet | None = None) -> Scores:
    ps = ps if ps is not None else load_prompt_pairs(model, case.model_dir / "data" / case.data)
    units = [u for u in case.units if u in ("head", "neuron")]
    out: Scores = {}
    if "head" in units:
        out["activation patching"] = {"head": activation_patching(model, ps, "head", per_position=False,
                                                                  progress=False).effect}
    for at, name in (("clean", "attribution (clean grad)"), ("corrupted", "attribution (corrupted grad)")):
        if units:
            res = attribution_patching(model, ps, units, at=at)  # pyright: ignore[reportArgumentType] - the case's unit sites are AttributionSite names
            out[name] = {u: res[u].values for u in units}
    for u in units:
        out.setdefault("grad×activation", {})[u] = grad_x_activation(model, ps, u).values  # pyright: ignore[reportArgumentType] - u is 'head' or 'neuron'
        out.setdefault("mean |activation|", {})[u] = mean_activation(model, ps, u).values  # pyright: ignore[reportArgumentType] - u is 'head' or 'neuron'
        out.setdefault("weight norm", {})[u] = weight_norm(model, u).values  # pyright: ignore[reportArgumentType] - u is 'head' or 'neuron'
    if "site" in case.units:
        out.update(_sites(model, ps))
    return out


def _sites(model: HookedModel, ps: PromptSet) -> Scores:
    """Causal tracing of MLP outputs [layer, position] (counterfactual twins, and ROME's noise at
    zero — the degraded control), and LSDM's site choice as a one-hot [layer, position]."""
    out: Scores = {}
    twins = causal_trace(model, ps, sites=("mlp_out",), corruption="counterfactual", progress=False)["mlp_out"]
    out["causal tracing"] = {"site": twins.effect}
    zero = causal_trace(model, ps, sites=("mlp_out",), corruption="noise", noise=0.0, samples=1,
                        progress=False)["mlp_out"]
    out["causal tracing (noise 0)"] = {"site": zero.effect}
    top = trace_sites(model, ps).iloc[0]
    pos = int(ps.subject_spans[0, 1]) - 1 if top["position"] == "subject" else int(ps.attention_mask[0].sum()) - 1  # pyright: ignore[reportOptionalSubscript] - tracing cases have subject spans
    choice = torch.zeros_like(twins.effect)
    choice[int(top["layer"]), pos] = 1.0
    out["LSDM site choice"] = {"site": choice}
    return out


def _yesno(model: HookedModel, case: Case) -> Scores:
    out = _pairs(model, case)
    yn = binary_prompts(model, _items(case, case.extra["yesno"]))
    out["NAS"] = {"head": negative_attention_scores(model, yn, progress=False).values}
    out["attention to ' No'"] = {"head": candidate_attention(model, yn)}
    return out


def _mc_template(model: HookedModel):
    """The tokenizer whose chat template multiple-choice prompts go through (the model's convention), or None."""
    return model.tokenizer if resolve_chat(model) else None


def _bbq(model: HookedModel, case: Case) -> Scores:
    """CRISPR (λ = 1, the paper's; λ = 0, no disentanglement) and attribution to P(biased option)
    with CRISPR's own A = h·∂P/∂h, max over the input tokens, mean over items — for each of the case's
    units (neurons; heads where the case scores them)."""
    items = _items(case, case.data)
    ins = [MC_INSTRUCTIONS[0]]
    template = _mc_template(model)
    prompts = [format_mc_prompt(ins[0], it["context"], it["question"], item_options(it), template) for it in items]
    options = [item_options(it) for it in items]
    biased = [biased_option(it) for it in items]
    carrier = PromptSet.build(model, prompts, (" A", " B"))  # tokens only: mean |activation| reads no answer
    out: Scores = {}
    units: tuple[Unit, ...] = case.units  # pyright: ignore[reportAssignmentType] - multiple-choice cases score heads or neurons
    for unit in units:
        for lam in (1.0, 0.0):
            out.setdefault(f"CRISPR λ={lam:g}", {})[unit] = crispr_scores(model, items, ins, lam=lam, progress=False,
                                                                          unit=unit).values
        out.setdefault("grad×P(biased)", {})[unit] = option_attributions(model, prompts, options, biased, unit=unit).mean(0)  # pyright: ignore[reportArgumentType] - the bench's BBQ items all have a biased option
        out.setdefault("mean |activation|", {})[unit] = mean_activation(model, carrier, unit).values
        out.setdefault("weight norm", {})[unit] = weight_norm(model, unit).values
    return out


# ---- real-model cases (lens_bias/bench/real): the methods on the `method_*` split ----------------------
def _real_pairs(model: HookedModel, case: Case) -> Scores:
    """As `_pairs`, plus the sites by (layer, position) of the professions case: activation patching and
    attribution patching of mlp_out ('site') and attn_out ('attn_site'), causal tracing of both on the twins
    (and at zero noise), LSDM's site choice."""
    ps = load_prompt_pairs(model, case.model_dir / "data" / case.data)
    out = _pairs(model, case, ps)  # with "site": _sites (causal tracing of mlp_out, LSDM's site choice)
    if "site" not in case.units:
        return out
    twins = causal_trace(model, ps, sites=("attn_out",), corruption="counterfactual", progress=False)["attn_out"]
    out["causal tracing"]["attn_site"] = twins.effect
    zero = causal_trace(model, ps, sites=("attn_out",), corruption="noise", noise=0.0, samples=1,
                        progress=False)["attn_out"]
    out["causal tracing (noise 0)"]["attn_site"] = zero.effect
    sites: tuple[tuple[PatchSite, str], ...] = (("mlp_out", "site"), ("attn_out", "attn_site"))
    for site, unit in sites:
        out.setdefault("activation patching", {})[unit] = activation_patching(model, ps, site, per_position=True,
                                                                              progress=False).effect
    grads: tuple[tuple[Literal["clean", "corrupted"], str], ...] = (("clean", "attribution (clean grad)"), ("corrupted", "attribution (corrupted grad)"))
    for at, name in grads:
        res = attribution_patching(model, ps, ["mlp_out", "attn_out"], at=at)
        out.setdefault(name, {}).update({"site": res["mlp_out"].values, "attn_site": res["attn_out"].values})
    return out


def _real_yesno(model: HookedModel, case: Case) -> Scores:
    """The methods that need no twins (the model answers No to every question: there is no natural
    counterfactual): NAS and raw attention to ' No' on the lens_bias instructions (chat template), and the
    baselines; gradient × activation of the case's metric LD = logit(No) − logit(Yes)."""
    items = _items(case, case.data)
    yn = binary_prompts(model, items)
    by_no = binary_prompts(model, items, candidates=(" No", " Yes"))  # answer_ids[:, 0] = No: LD = No − Yes
    return {"NAS": {"head": negative_attention_scores(model, yn, progress=False).values},
            "attention to ' No'": {"head": candidate_attention(model, yn)},
            "grad×activation": {"head": grad_x_activation(model, by_no, "head").values},
            "mean |activation|": {"head": mean_activation(model, yn, "head").values},
            "weight norm": {"head": weight_norm(model, "head").values}}


def case_metric(model: HookedModel, case: Case) -> Callable[[], float]:
    """The case's bias metric, as the ground truth measured it, for the model as it runs now (hooks
    included): pairs mean LD(clean) − mean LD(corrupted); yes/no mean logit(' No') − logit(' Yes')
    over the hard prompts (real case: over the held-out gold-yes questions, the truth's instruction); BBQ
    mean P(biased option) (real case: mean P(biased) − P(anti-biased) over the held-out items), P = softmax
    over the options' summed log-probs."""
    from ..tasks.capability import bias_values
    from ..tasks.multiple_choice import bbq_target, option_logprobs

    name = case.heldout or case.data
    if case.kind == "pairs" or (case.kind == "yesno" and not case.real):
        ps = load_prompt_pairs(model, case.model_dir / "data" / name)
        if case.kind == "pairs":
            return lambda: float(bias_values(model, ps).mean() - bias_values(model, ps.swapped()).mean())
        return lambda: float(bias_values(model, ps).mean())
    if case.kind == "yesno":
        ps = binary_prompts(model, _items(case, name), instructions=[case.extra["instruction"]],
                            candidates=(" No", " Yes"))
        return lambda: float(bias_values(model, ps).mean())
    items = _items(case, name)
    template = _mc_template(model) if case.real else None
    prompts = [format_mc_prompt(MC_INSTRUCTIONS[0], it["context"], it["question"], item_options(it), template)
               for it in items]
    biased = torch.tensor([biased_option(it) for it in items])
    anti = torch.tensor([3 - bbq_target(it).unknown - b for it, b in zip(items, biased.tolist())]) if case.real else None  # pyright: ignore[reportOperatorIssue] - the bench's BBQ items all have an unknown option

    def p_biased() -> float:
        lp, _ = option_logprobs(model, prompts, [item_options(it) for it in items])
        p = lp.softmax(-1)
        pb = p.gather(1, biased[:, None])[:, 0]
        return float((pb - p.gather(1, anti[:, None])[:, 0]).mean() if anti is not None else pb.mean())

    return p_biased
