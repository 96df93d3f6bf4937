"""Causal tracing (Meng et al. 2022, ROME; used by LSDM to find where gender bias lives).

Corrupt the subject tokens (e.g. the occupation) by adding Gaussian noise of `noise` × the
embedding standard deviation to their token embeddings (ROME: 3 × the std of the subjects'
embeddings, added to the token-embedding output; `samples` noisy copies of each prompt), then restore the clean hidden state of one
(layer, token) at a time — the residual stream after the block (ROME's "hidden state",
site resid_post), the MLP output (mlp_out) or the attention output (attn_out), optionally a
window of layers — and read the bias metric. Indirect effect IE = metric(restored) − metric(corrupted).
Batched like activation patching: one (state, prompt) pair per row.
"""

from __future__ import annotations

from typing import Iterable, Literal

import torch
from torch import Tensor

from ..core.checks import check_weights_finite
from ..core.errors import LensBiasError
from ..core.hooks import check_sites, device_of, hook_name
from ..core.methods import ChunkSums, LocateMethod, add_scores, scores_from_sums
from ..core.prompts import PromptSet
from ..core.scores import ComponentScores
from .patching import activation_patching, position_labels

TraceSite = Literal["resid_post", "mlp_out", "attn_out"]
#: ROME traces hidden states (the block outputs), MLP outputs and attention outputs
TRACE_SITES = ("resid_post", "mlp_out", "attn_out")


def embedding_std(model, ps: PromptSet | None = None, std: str | float = "subject") -> float:
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


def subject_noise(model, ps: PromptSet, noise: float = 3.0, seed: int = 0, std: str | float = "subject",
                  first_row: int = 0) -> Tensor:
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


def subject_corruption(model, ps: PromptSet, noise: float = 3.0, seed: int = 0, std: str | float = "subject",
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


def causal_trace(
    model,
    ps: PromptSet,
    sites: Iterable[TraceSite] = TRACE_SITES,
    *,
    noise: float = 3.0,
    std: str | float = "subject",
    samples: int = 1,
    seed: int = 0,
    window: int = 1,
    metric: str = "logit_diff",
    batch_size: int | None = None,
    progress: bool = True,
    first_row: int = 0,
) -> dict[str, ComponentScores]:
    """Indirect effect of restoring each (layer, token) state, per site ('resid_post', 'mlp_out', 'attn_out').

    Noise = `noise` × embedding_std(std) on the subject tokens, `samples` seeded draws per prompt
    (ROME uses 10). `window` > 1 restores MLP/attention outputs in a window of layers centred on each
    layer (ROME uses 10; the residual is always restored at one layer). Returns ComponentScores
    [layer, pos] per site; `.effect` is IE = metric(restored) − metric(corrupted), `.normalized`
    divides by the total effect metric(clean) − metric(corrupted). To trace a data set in chunks,
    pass each chunk's start × samples as `first_row` and the whole set's embedding_std as `std`.
    """
    sites = check_sites(sites, TRACE_SITES, "causal tracing")
    check_weights_finite(model, "causal tracing")
    if not isinstance(ps, PromptSet):
        raise LensBiasError(f"expected a PromptSet, got {type(ps).__name__}")
    if ps.subject_spans is None:
        raise LensBiasError("causal tracing needs subject spans: build the PromptSet with subjects=[...]")
    if not ps.same_length:
        raise LensBiasError("causal tracing averages over positions: every prompt must have the same "
                            "number of tokens (use one template per PromptSet)")
    if samples < 1:
        raise LensBiasError(f"samples must be ≥ 1, got {samples}")
    scale = embedding_std(model, ps, std)
    if samples > 1:
        ps = ps[[i for i in range(len(ps)) for _ in range(samples)]]
    corruption = subject_corruption(model, ps, noise, seed, scale, first_row)
    out = {}
    for site in sites:
        res = activation_patching(model, ps, site, per_position=True, metric=metric,
                                  window=window if site != "resid_post" else 1, corruption=corruption,
                                  batch_size=batch_size, progress=progress)
        res.method = "tracing"
        res.extra.update({"noise": noise, "embedding_std": scale, "samples": samples, "seed": seed,
                          "subject_span": tuple(ps.subject_spans[0].tolist())})
        out[site] = res
    return out


def trace_sites(model, ps: PromptSet, *, noise: float = 3.0, seed: int = 0, samples: int = 1, progress: bool = False):
    """Causal tracing of MLP outputs summarised per (layer, position kind) — the mean indirect effect
    of restoring the MLP at the subject's last token and at the last token (pandas, best first)."""
    import pandas as pd

    if ps.subject_spans is None:
        raise LensBiasError("tracing needs subject spans: build the PromptSet with subjects=[...]")
    groups: dict[tuple, list[int]] = {}
    lengths = ps.attention_mask.sum(1)
    for i in range(len(ps)):
        groups.setdefault((int(lengths[i]), int(ps.subject_spans[i, 1])), []).append(i)
    rows = []
    for (length, subj_end), idx in groups.items():
        traced = causal_trace(model, ps[idx], sites=("mlp_out",), noise=noise, seed=seed, samples=samples,
                              progress=progress)["mlp_out"]
        layers = traced.extra.get("layers") or list(range(traced.values.shape[0]))
        for li, layer in enumerate(layers):
            for kind, pos in (("subject", subj_end - 1), ("last", length - 1)):
                rows.append({"layer": layer, "position": kind, "effect": float(traced.effect[li, pos]),
                             "n": len(idx)})
    df = pd.DataFrame(rows)
    df["weighted"] = df["effect"] * df["n"]
    out = df.groupby(["layer", "position"], as_index=False)[["weighted", "n"]].sum()
    out["effect"] = out["weighted"] / out["n"]
    return out.drop(columns=["weighted"]).sort_values("effect", ascending=False, key=abs).reset_index(drop=True)


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
    return {"scale": embedding_std(model, data, opts["std"]), "seed": seed}


def _run_chunk(model, data: PromptSet, lo: int, hi: int, opts: dict, batch_size, state) -> ChunkSums:
    """causal_trace of prompts lo..hi with the whole set's noise scale; its per-row seeded noise
    (first_row) makes the chunks exact."""
    res = causal_trace(model, data[lo:hi], opts["components"], noise=opts["noise"], std=state["scale"],
                       samples=opts["samples"], seed=state["seed"], window=opts["window"], metric=opts["metric"],
                       batch_size=batch_size, progress=False, first_row=lo * opts["samples"])
    for r in res.values():
        r.extra["embedding_std"] = state["scale"]
    total = add_scores(res, (hi - lo) * opts["samples"])
    total.count = hi - lo
    return total


RUN = LocateMethod(
    name="tracing",
    summary="causal tracing: noise the subject, restore one (layer, token) state (Meng et al. 2022, ROME)",
    data="subject_prompts",
    options={"components": list(TRACE_SITES), "noise": 3.0, "std": "subject", "samples": 1, "window": 1,
             "metric": "logit_diff", "templates": None, "answers": None, "corrupt_with": "man"},
    run=_run_chunk,
    prepare=_prepare,
    finalize=lambda model, data, total, opts: scores_from_sums(total, position_labels(model, data),
                                                               total.count * opts["samples"]),
    sites=TRACE_SITES,
)
