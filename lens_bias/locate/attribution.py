"""Attribution patching: a first-order estimate of every activation-patching effect at once.

score(c) = ∂metric/∂a_c · (a_c(clean) − a_c(corrupted)), summed over the component's
activation entries (and positions, unless kept). One clean forward+backward gives the
gradients (the metric is the mean over prompts), one corrupted forward the corrupted
activations; only the hooks asked for are cached. Sites (lens_bias.core.hooks): attention heads
(head = hook_z), MLP neurons (neuron = mlp.hook_post) and residual-stream positions (resid_pre,
resid_mid, resid_post, attn_out, mlp_out).
"""

from __future__ import annotations

import math
from typing import Iterable, Literal

import torch
from torch import Tensor

from ..core.checks import check_finite
from ..core.errors import LensBiasError
from ..core.hooks import check_hook_names, check_sites, device_of, hook_name
from ..core.methods import ChunkSums, LocateMethod, add_scores, scores_from_sums
from ..core.metrics import answer_logits_fast
from ..core.models import HookedModel
from ..core.prompts import PromptSet
from ..core.scores import ComponentScores
from .patching import check_pairs, position_labels

AttributionSite = Literal["head", "neuron", "resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out"]
ATTRIBUTION_SITES = ("head", "neuron", "resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out")


def _answer_metric(model, ps, tokens, hooks, W_U, b_U) -> Tensor:
    a = answer_logits_fast(model, tokens, ps.answer_pos, ps.answer_ids, hooks, ps.attention_mask, W_U, b_U)
    return (a[:, 0] - a[:, 1]).mean()


def activations_and_gradients(model: HookedModel, ps: PromptSet, tokens: Tensor, names: Iterable[str],
                              fwd_hooks: list = ()) -> tuple[dict[str, Tensor], dict[str, Tensor], float]:
    """One forward+backward of the mean logit difference LD over `ps` on `tokens` (with `fwd_hooks`):
    the activations at `names`, ∂(mean LD)/∂a there, and the mean LD. The weights get no gradients
    (the backward starts from the embeddings), which halves its cost."""
    acts, grads = {}, {}

    def keep(x, hook, name):
        acts[name] = x.detach()
        if x.requires_grad:
            x.register_hook(lambda g: grads.__setitem__(name, g.detach()))
        return x

    hooks = [(n, (lambda n: lambda x, hook: keep(x, hook, n))(n)) for n in set(names)]

    def leaf(x, hook):  # gradients flow from here: the weights need none
        return x.detach().requires_grad_(True)

    params = [p for p in model.parameters() if p.requires_grad]
    try:
        for p in params:
            p.requires_grad_(False)
        with torch.enable_grad():
            metric = _answer_metric(model, ps, tokens, list(fwd_hooks) + [(hook_name("resid_pre", 0), leaf)] + hooks,
                                    model.W_U, getattr(model, "b_U", None))
            metric.backward()
    finally:
        for p in params:
            p.requires_grad_(True)
    missing = [n for n in acts if n not in grads]
    if missing:
        raise LensBiasError(f"no gradient reached {missing[0]}: is the metric independent of it?")
    return acts, grads, metric.item()


def attribution_patching(
    model: HookedModel,
    ps: PromptSet,
    components: Iterable[AttributionSite] = ("head", "neuron", "resid_pre"),
    *,
    at: Literal["clean", "corrupted"] = "clean",
    per_position: bool = False,
    compare: dict[str, ComponentScores] | None = None,
    corruption=None,
) -> dict[str, ComponentScores]:
    """Attribution scores for each component kind, with the logit-difference metric.

    at='clean' (default) takes gradients in the clean run (estimates the drop from corrupting
    one component); at='corrupted' takes them in the corrupted run (estimates the gain from
    restoring one component, i.e. the activation patching of lens_bias.patching). Shapes:
    head [layer, head], neuron [layer, d_mlp], residual sites [layer, pos] (per_position adds a pos
    axis to heads and neurons). `compare` maps a kind to activation-patching results of the same
    shape; Pearson and Spearman agreement are then stored in `.extra['agreement']`.
    `corruption(prompt_idx) -> fwd hooks` makes the corrupted run from the clean tokens (as in
    activation_patching).
    """
    components = check_sites(components, ATTRIBUTION_SITES, "attribution")
    if at not in ("clean", "corrupted"):
        raise LensBiasError(f"at must be 'clean' or 'corrupted', not {at!r}")
    if corruption is None:
        check_pairs(model, ps)
    device = device_of(model)
    ps = ps.to(device)
    L = model.cfg.n_layers
    names = {(c, l): hook_name(c, l) for c in components for l in range(L)}
    wanted = set(names.values())
    check_hook_names(model, sorted(wanted))
    W_U, b_U = model.W_U, getattr(model, "b_U", None)
    corrupt_tokens = ps.tokens if corruption is not None else ps.corrupted_tokens
    corrupt_hooks = list(corruption(torch.arange(len(ps), device=device))) if corruption is not None else []
    grad_tokens, other_tokens = (ps.tokens, corrupt_tokens) if at == "clean" else (corrupt_tokens, ps.tokens)
    grad_extra, other_extra = ([], corrupt_hooks) if at == "clean" else (corrupt_hooks, [])

    grad_acts, grads, grad_metric = activations_and_gradients(model, ps, grad_tokens, wanted, grad_extra)
    acts = {}

    def keep(x, hook, name):
        acts[name] = x.detach()
        return x

    hooks = [(n, (lambda n: lambda x, hook: keep(x, hook, n))(n)) for n in wanted]
    with torch.no_grad():
        other_metric = _answer_metric(model, ps, other_tokens, other_extra + hooks, W_U, b_U).item()
    other_acts = acts
    clean_m, corr_m = (grad_metric, other_metric) if at == "clean" else (other_metric, grad_metric)

    out = {}
    tokens = position_labels(model, ps)
    for c in components:
        per_layer = []
        for l in range(L):
            n = names[(c, l)]
            # Δ = clean − corrupted activation, whichever run the gradient came from
            # (in float32: in half precision the differences, products and sums lose their small terms)
            a_g, a_o = grad_acts[n].float(), other_acts[n].float()
            delta = (a_g - a_o) if at == "clean" else (a_o - a_g)
            s = (grads[n].float() * delta * len(ps)).mean(0)  # the metric is a mean over prompts: undo its 1/n
            if c != "neuron":
                s = s.sum(-1)  # over d_head / d_model → [pos] or [pos, head]
            if c in ("head", "neuron") and not per_position:
                s = s.sum(0)  # over positions
            per_layer.append(s)
        vals = check_finite(torch.stack(per_layer).detach().cpu(), f"attribution scores of {c}", model)
        unit = {"head": "head", "neuron": "neuron"}.get(c)
        dims = ("layer",) + (("pos",) if (unit is None or per_position) else ()) + ((unit,) if unit else ())
        res = ComponentScores(vals, dims, c, f"attribution@{at}", clean_m, corr_m, tokens)
        if compare and c in compare:
            res.extra["agreement"] = agreement(res, compare[c])
        out[c] = res
    return out


def _rank(x: Tensor) -> Tensor:
    r = torch.empty_like(x)
    r[x.argsort()] = torch.arange(len(x), dtype=x.dtype)
    return r


def agreement(attr: ComponentScores, patched: ComponentScores) -> dict:
    """Pearson and Spearman correlation between attribution scores and patching effects."""
    a = attr.effect.reshape(-1).double()
    p = patched.effect.reshape(-1).double()
    if a.shape != p.shape:
        raise LensBiasError(f"attribution has {a.numel()} components, patching {p.numel()}: shapes differ")
    def pearson(x, y):
        x, y = x - x.mean(), y - y.mean()
        den = math.sqrt(float((x * x).sum() * (y * y).sum()))
        return float((x * y).sum() / den) if den > 0 else float("nan")
    return {"pearson": pearson(a, p), "spearman": pearson(_rank(a), _rank(p)), "n": a.numel(),
            "max_abs_diff": float((a - p).abs().max())}


# ---------------------------------------------------------------------------------------
# As a batch-run method (lens_bias.runs)
# ---------------------------------------------------------------------------------------
def _run_chunk(model, data: PromptSet, lo: int, hi: int, opts: dict, batch_size, state) -> ChunkSums:
    total = ChunkSums({}, 0)
    step = batch_size or hi - lo
    for s in range(lo, hi, step):
        sub = data[s: min(s + step, hi)]
        add_scores(attribution_patching(model, sub, opts["components"], at=opts["at"]), len(sub), total)
    return total


RUN = LocateMethod(
    name="attribution",
    summary="attribution patching: grad × (clean − corrupted), every component at once (Syed et al. 2023)",
    data="pairs",
    options={"components": ["head", "neuron", "resid_pre"], "at": "clean", "templates": None, "answers": None,
             "corrupt_with": "man"},
    run=_run_chunk,
    finalize=lambda model, data, total, opts: scores_from_sums(total, position_labels(model, data)),
    sites=ATTRIBUTION_SITES,
)
