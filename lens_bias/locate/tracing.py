"""Causal tracing (Meng et al. 2022, ROME; used by LSDM to find where gender bias lives).

Corrupt the subject tokens (e.g. the occupation) by adding Gaussian noise of `noise` × the
embedding standard deviation to their token embeddings (ROME: 3 × the std of the subjects'
embeddings, added to the token-embedding output; `samples` noisy copies of each prompt), then restore the clean hidden state of one
(layer, token) at a time — residual stream, MLP output or attention output, optionally a window
of layers — and read the bias metric. Indirect effect IE = metric(restored) − metric(corrupted).
Batched like activation patching: one (state, prompt) pair per row.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .errors import LensBiasError
from .patching import ComponentScores, activation_patching
from .prompts import PromptSet

#: ROME's names → our components: hidden state = block output (resid_post), mlp, attn.
TRACE_KINDS = {"resid": "resid_post", "mlp": "mlp_out", "attn": "attn_out"}


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
    device = next(model.parameters()).device
    eps = subject_noise(model, ps, noise, seed, std, first_row).to(device)

    def corruption(prompt_idx: Tensor):
        rows_noise = eps[prompt_idx.to(device)]

        def add(x, hook):
            return x + rows_noise.to(x.dtype)

        return [("hook_embed", add)]

    return corruption


def causal_trace(
    model,
    ps: PromptSet,
    kinds: tuple[str, ...] = ("resid", "mlp", "attn"),
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
    """Indirect effect of restoring each (layer, token) state, per kind ('resid', 'mlp', 'attn').

    Noise = `noise` × embedding_std(std) on the subject tokens, `samples` seeded draws per prompt
    (ROME uses 10). `window` > 1 restores mlp/attn outputs in a window of layers centred on each
    layer (ROME uses 10; the residual is always restored at one layer). Returns ComponentScores
    [layer, pos] per kind; `.effect` is IE = metric(restored) − metric(corrupted), `.normalized`
    divides by the total effect metric(clean) − metric(corrupted). To trace a data set in chunks,
    pass each chunk's start × samples as `first_row` and the whole set's embedding_std as `std`.
    """
    unknown = [k for k in kinds if k not in TRACE_KINDS]
    if unknown or not kinds:
        raise LensBiasError(f"unknown trace kind(s) {unknown or kinds}; choose from {sorted(TRACE_KINDS)}")
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
    for kind in kinds:
        res = activation_patching(model, ps, TRACE_KINDS[kind], per_position=True, metric=metric,
                                  window=window if kind != "resid" else 1, corruption=corruption,
                                  batch_size=batch_size, progress=progress)
        res.method = "tracing"
        res.extra.update({"noise": noise, "embedding_std": scale, "samples": samples, "seed": seed, "kind": kind,
                          "subject_span": tuple(ps.subject_spans[0].tolist())})
        out[kind] = res
    return out
