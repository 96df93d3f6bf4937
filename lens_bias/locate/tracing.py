"""Causal tracing (Meng et al. 2022, ROME; used by LSDM to find where gender bias lives).

Corrupt the subject (e.g. the occupation), then restore the clean hidden state of one (layer,
token) at a time — the residual stream after the block (ROME's "hidden state", site resid_post),
the MLP output (mlp_out) or the attention output (attn_out), optionally a window of layers — and
read the bias metric m (the logit difference of the prompt set's two answers, where ROME reads the
probability of the clean answer: the bias is what is traced here):

    TE = m(clean) − m(corrupted)                       total effect
    IE(l, t) = m(corrupted, state (l, t) restored) − m(corrupted)   indirect effect

Corruptions: `corruption="noise"` (ROME): Gaussian noise N(0, (ν·σ)²), ν = `noise` = 3, added to the
token embeddings (hook_embed) of the subject tokens, σ the standard deviation of the subject tokens'
embeddings ('subject'; ROME's collect_embedding_std) or of the whole embedding matrix ('vocab'),
`samples` = 10 seeded draws per prompt, the same draw in every restored run. `corruption=
"counterfactual"` runs the prompt set's corrupted twins instead (e.g. a neutral occupation).
ROME needs a corruption that takes the answer away; here it must move the bias toward zero
(|m(corrupted)| < |m(clean)|). The total effect is reported (`.extra['total_effect']`) and a
corruption that does not move the metric toward zero is warned about: its indirect effects are not
ROME's. Departure from ROME: window=1 by default (ROME restores windows of 10 layers of 48);
batched like activation patching: one (state, prompt) pair per row.
"""

from __future__ import annotations

import warnings
from typing import Iterable, Literal

import torch
from jaxtyping import Float
from torch import Tensor

from ..core.checks import check_weights_finite
from ..core.errors import LensBiasError
from ..core.hooks import check_sites, device_of, hook_name
from ..core.methods import ChunkSums, LocateMethod, add_scores, scores_from_sums
from ..core.metrics import Metric
from ..core.models import HookedModel
from ..core.prompts import PromptSet
from ..core.scores import ComponentScores
from .patching import activation_patching, position_labels

TraceSite = Literal["resid_post", "mlp_out", "attn_out"]
Corruption = Literal["noise", "counterfactual"]
NoiseStd = Literal["subject", "vocab"] | float
#: ROME traces hidden states (the block outputs), MLP outputs and attention outputs
TRACE_SITES = ("resid_post", "mlp_out", "attn_out")


def embedding_std(model: HookedModel, ps: PromptSet | None = None, std: NoiseStd = "subject") -> float:
    """The embedding scale the noise is a multiple of: 'subject' = std of the subject tokens'
    embeddings (ROME's collect_embedding_std), 'vocab' = std of all of W_E, or a number."""
    if isinstance(std, (int, float)):
        return float(std)
    W_E = model.W_E.detach().float()
    if std == "vocab":
        return W_E.std().item()
    if std != "subject":
        raise LensBiasError(f"std must be 'subject', 'vocab' or a number, not {std!r}")
    if ps is None or ps.subject_spans is None:
        raise LensBiasError("causal tracing needs subject spans: build the PromptSet with subjects=[...]")
    ids = torch.cat([ps.tokens[i, a:b] for i, (a, b) in enumerate(ps.subject_spans.tolist())])
    return W_E[ids.to(W_E.device)].std().item()


def subject_noise(model: HookedModel, ps: PromptSet, noise: float = 3.0, seed: int = 0, std: NoiseStd = "subject",
                  first_row: int = 0) -> Float[Tensor, "batch pos d_model"]:
    """Seeded Gaussian noise [batch, pos, d_model] of std `noise` × embedding_std, zero outside the subject spans.

    Row r draws from a generator seeded by (seed, first_row + r), so a prompt's noise does not
    depend on the other prompts: a data set traced in chunks (first_row = the chunk's start, std
    fixed from the whole set) gets the same noise as traced at once."""
    if ps.subject_spans is None:
        raise LensBiasError("causal tracing needs subject spans: build the PromptSet with subjects=[...]")
    scale = noise * embedding_std(model, ps, std)
    n, p, d = len(ps), ps.tokens.shape[1], model.cfg.d_model
    out = torch.zeros(n, p, d)
    for i, (a, b) in enumerate(ps.subject_spans.tolist()):
        gen = torch.Generator().manual_seed(int(seed) * 1_000_003 + first_row + i)
        out[i, a:b] = torch.randn(b - a, d, generator=gen) * scale
    return out


def subject_corruption(model: HookedModel, ps: PromptSet, noise: float = 3.0, seed: int = 0, std: NoiseStd = "subject",
                       first_row: int = 0):
    """A `corruption` for activation_patching: add subject noise to the token embeddings (hook_embed)."""
    device = device_of(model)
    eps = subject_noise(model, ps, noise, seed, std, first_row).to(device)

    def corruption(prompt_idx: Tensor):
        rows_noise = eps[prompt_idx.to(device)]

        def add(x, hook):
            return x + rows_noise.to(x.dtype)

        return [(hook_name("embed"), add)]

    return corruption


def total_effect_fraction(res: ComponentScores) -> float:
    """TE / |m(clean)|, signed so that a corruption moving the metric toward zero is positive
    (1 = all of the bias gone, 0 = none, < 0 = the corruption raised it)."""
    clean, corrupted = res.clean, res.corrupted
    if not clean:
        return float("nan")
    return (clean - corrupted) / clean


def causal_trace(
    model: HookedModel,
    ps: PromptSet,
    sites: Iterable[TraceSite] = TRACE_SITES,
    *,
    corruption: Corruption = "noise",
    noise: float = 3.0,
    std: NoiseStd = "subject",
    samples: int = 10,
    seed: int = 0,
    window: int = 1,
    metric: Metric = "logit_diff",
    batch_size: int | None = None,
    progress: bool = True,
    first_row: int = 0,
) -> dict[str, ComponentScores]:
    """Indirect effect IE(l, t) = m(corrupted, (l, t) restored) − m(corrupted) of each (layer, token)
    state, per site ('resid_post', 'mlp_out', 'attn_out'); the module docstring has the corruptions.

    Returns ComponentScores [layer, pos] per site: `.effect` is IE, `.normalized` IE/TE, and
    `.extra['total_effect']` / `['total_effect_fraction']` the total effect TE = m(clean) − m(corrupted)
    and TE/m(clean). `window` > 1 restores MLP/attention outputs in a window of layers centred on each
    layer (the residual is always restored at one layer). To trace a data set in chunks, pass each
    chunk's start × samples as `first_row` and the whole set's embedding_std as `std`.
    """
    sites = check_sites(sites, TRACE_SITES, "causal tracing")
    check_weights_finite(model, "causal tracing")
    if not isinstance(ps, PromptSet):
        raise LensBiasError(f"expected a PromptSet, got {type(ps).__name__}")
    if corruption not in ("noise", "counterfactual"):
        raise LensBiasError(f"corruption must be 'noise' or 'counterfactual', not {corruption!r}")
    if ps.subject_spans is None:
        raise LensBiasError("causal tracing needs subject spans: build the PromptSet with subjects=[...]")
    if not ps.same_length:
        raise LensBiasError("causal tracing averages over positions: every prompt must have the same "
                            "number of tokens (use one template per PromptSet)")
    if corruption == "counterfactual" and not ps.has_pairs:
        raise LensBiasError("corruption='counterfactual' needs the corrupted twins: build the PromptSet with "
                            "corrupted=[...] (e.g. a neutral occupation), or use corruption='noise'")
    if samples < 1:
        raise LensBiasError(f"samples must be ≥ 1, got {samples}")
    scale = None
    if corruption == "noise":
        scale = embedding_std(model, ps, std)
        if samples > 1:
            ps = ps[[i for i in range(len(ps)) for _ in range(samples)]]
        corrupt = subject_corruption(model, ps, noise, seed, scale, first_row)
    else:
        corrupt, samples = None, 1
    out = {}
    for site in sites:
        res = activation_patching(model, ps, site, per_position=True, metric=metric,
                                  window=window if site != "resid_post" else 1, corruption=corrupt,
                                  batch_size=batch_size, progress=progress)
        res.method = "tracing"
        res.extra.update({"corruption": corruption, "noise": noise if corruption == "noise" else None,
                          "embedding_std": scale, "samples": samples, "seed": seed,
                          "total_effect": res.clean - res.corrupted, "total_effect_fraction": total_effect_fraction(res),
                          "subject_span": tuple(ps.subject_spans[0].tolist())})  # pyright: ignore[reportOptionalSubscript] - the set has subject spans (checked by tracing)
        out[site] = res
    first = next(iter(out.values()))
    if not abs(first.corrupted) < abs(first.clean):
        warnings.warn(f"the {corruption} corruption does not move the bias toward zero (m(clean) {first.clean:+.3f}, "
                      f"m(corrupted) {first.corrupted:+.3f}): the indirect effects are not ROME's; use "
                      "corruption='counterfactual' with neutral twins, or more noise", stacklevel=2)
    return out


def trace_sites(model: HookedModel, ps: PromptSet, *, corruption: Corruption | None = None, noise: float = 3.0, seed: int = 0,
                samples: int = 10, min_total_effect: float = 0.2, progress: bool = False):
    """LSDM's site choice: causal tracing of MLP outputs summarised per (layer, position kind) — the mean
    indirect effect of restoring the MLP at the subject's last token ('subject') and at the last token
    ('last'), best first (pandas: layer, position, effect, n, total_effect).

    The corruption defaults to the prompt set's counterfactual twins when it has them, else ROME's
    subject noise. The choice rests on the corruption taking the bias away: when the total effect
    TE/m(clean) is below `min_total_effect` (or negative) the sites are refused with an error, since
    every indirect effect would then be noise."""
    import pandas as pd

    if ps.subject_spans is None:
        raise LensBiasError("tracing needs subject spans: build the PromptSet with subjects=[...]")
    corruption = corruption or ("counterfactual" if ps.has_pairs else "noise")
    groups: dict[tuple, list[int]] = {}
    lengths = ps.attention_mask.sum(1)
    for i in range(len(ps)):
        groups.setdefault((int(lengths[i]), int(ps.subject_spans[i, 1])), []).append(i)
    rows, clean, corrupted, n_all = [], 0.0, 0.0, 0
    for (length, subj_end), idx in groups.items():
        traced = causal_trace(model, ps[idx], sites=("mlp_out",), corruption=corruption, noise=noise, seed=seed,
                              samples=samples, progress=progress)["mlp_out"]
        clean, corrupted, n_all = clean + traced.clean * len(idx), corrupted + traced.corrupted * len(idx), n_all + len(idx)
        layers = traced.extra.get("layers") or list(range(traced.values.shape[0]))
        for li, layer in enumerate(layers):
            for kind, pos in (("subject", subj_end - 1), ("last", length - 1)):
                rows.append({"layer": layer, "position": kind, "effect": float(traced.effect[li, pos]),
                             "n": len(idx)})
    clean, corrupted = clean / n_all, corrupted / n_all
    fraction = (clean - corrupted) / clean if clean else float("nan")
    if not fraction >= min_total_effect:
        raise LensBiasError(f"the {corruption} corruption takes {fraction:.0%} of the bias away (m(clean) {clean:+.3f}, "
                            f"m(corrupted) {corrupted:+.3f}); the site choice needs at least {min_total_effect:.0%}: "
                            "give the prompts counterfactual twins (corrupted=[...], e.g. neutral occupations)")
    df = pd.DataFrame(rows)
    df["weighted"] = df["effect"] * df["n"]
    out = df.groupby(["layer", "position"], as_index=False)[["weighted", "n"]].sum()
    out["effect"] = out["weighted"] / out["n"]
    out["total_effect"] = clean - corrupted
    return out.drop(columns=["weighted"]).sort_values("effect", ascending=False).reset_index(drop=True)


# ---------------------------------------------------------------------------------------
# As a batch-run method (lens_bias.runs)
# ---------------------------------------------------------------------------------------
def _prepare(model, data: PromptSet, opts: dict, seed: int) -> dict:
    """The noise scale from the whole data set (chunks then trace with the same noise as one run)."""
    if data.subject_spans is None:
        raise LensBiasError("causal tracing needs subject spans: give each prompt a 'subject'")
    if not data.same_length:
        raise LensBiasError("causal tracing averages over positions: every prompt must have the same number of "
                            "tokens (use one template)")
    noise = opts["corruption"] == "noise"
    return {"scale": embedding_std(model, data, opts["std"]) if noise else None, "seed": seed}


def _run_chunk(model, data: PromptSet, lo: int, hi: int, opts: dict, batch_size, state) -> ChunkSums:
    """causal_trace of prompts lo..hi with the whole set's noise scale; its per-row seeded noise
    (first_row) makes the chunks exact."""
    res = causal_trace(model, data[lo:hi], opts["components"], corruption=opts["corruption"], noise=opts["noise"],
                       std=state["scale"] if state["scale"] is not None else opts["std"],
                       samples=opts["samples"], seed=state["seed"], window=opts["window"], metric=opts["metric"],
                       batch_size=batch_size, progress=False, first_row=lo * opts["samples"])
    for r in res.values():
        r.extra["embedding_std"] = state["scale"]
    samples = next(iter(res.values())).extra["samples"]  # 1 for counterfactual twins
    total = add_scores(res, (hi - lo) * samples)
    total.count = hi - lo
    return total


def _finalize(model, data: PromptSet, total: ChunkSums, opts: dict) -> dict[str, ComponentScores]:
    samples = next(iter(total.meta.values()))["extra"]["samples"]
    out = scores_from_sums(total, position_labels(model, data), total.count * samples)
    for r in out.values():
        r.extra.update({"total_effect": r.clean - r.corrupted, "total_effect_fraction": total_effect_fraction(r)})
    return out


RUN = LocateMethod(
    name="tracing",
    summary="causal tracing: noise the subject, restore one (layer, token) state (Meng et al. 2022, ROME)",
    data="subject_prompts",
    options={"components": list(TRACE_SITES), "corruption": "noise", "noise": 3.0, "std": "subject", "samples": 10,
             "window": 1, "metric": "logit_diff", "templates": None, "answers": None, "corrupt_with": "man"},
    run=_run_chunk,
    prepare=_prepare,
    finalize=_finalize,
    sites=TRACE_SITES,
)
