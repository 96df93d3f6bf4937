"""Causal tracing (Meng et al. 2022, ROME; used by LSDM to find where gender bias lives).

Corrupt the subject tokens (e.g. the occupation) by adding Gaussian noise of `noise` × the
embedding standard deviation to their embeddings, then restore the clean hidden state of one
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


def subject_noise(model, ps: PromptSet, noise: float = 3.0, seed: int = 0) -> Tensor:
    """Seeded Gaussian noise [batch, pos, d_model] of std `noise` × std(W_E), zero outside the subject spans."""
    if ps.subject_spans is None:
        raise LensBiasError("causal tracing needs subject spans: build the PromptSet with subjects=[...]")
    emb_std = model.W_E.float().std().item()
    gen = torch.Generator().manual_seed(seed)
    n, p, d = len(ps), ps.tokens.shape[1], model.cfg.d_model
    out = torch.zeros(n, p, d)
    for i, (a, b) in enumerate(ps.subject_spans.tolist()):
        out[i, a:b] = torch.randn(b - a, d, generator=gen) * (noise * emb_std)
    return out


def subject_corruption(model, ps: PromptSet, noise: float = 3.0, seed: int = 0):
    """A `corruption` for activation_patching: add subject noise to the token embeddings."""
    device = next(model.parameters()).device
    eps = subject_noise(model, ps, noise, seed).to(device)

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
    seed: int = 0,
    window: int = 1,
    metric: str = "logit_diff",
    batch_size: int = 64,
    progress: bool = True,
) -> dict[str, ComponentScores]:
    """Indirect effect of restoring each (layer, token) state, per kind ('resid', 'mlp', 'attn').

    Returns ComponentScores [layer, pos] per kind; `.effect` is IE = metric(restored) −
    metric(corrupted), `.normalized` divides by the total effect metric(clean) − metric(corrupted).
    """
    unknown = [k for k in kinds if k not in TRACE_KINDS]
    if unknown:
        raise LensBiasError(f"unknown trace kind(s) {unknown}; choose from {sorted(TRACE_KINDS)}")
    if not ps.same_length:
        raise LensBiasError("causal tracing averages over positions: every prompt must have the same "
                            "number of tokens (use one template per PromptSet)")
    corruption = subject_corruption(model, ps, noise, seed)
    out = {}
    for kind in kinds:
        res = activation_patching(model, ps, TRACE_KINDS[kind], per_position=True, metric=metric,
                                  window=window if kind != "resid" else 1, corruption=corruption,
                                  batch_size=batch_size, progress=progress)
        res.method = "tracing"
        res.extra.update({"noise": noise, "seed": seed, "kind": kind})
        out[kind] = res
    return out
