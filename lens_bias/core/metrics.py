"""Bias metrics at the answer position: logit difference, probability/odds ratio, normalised effect,
and the answer logits computed without unembedding anything else."""

from __future__ import annotations

from typing import Callable, Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor

from .errors import LensBiasError
from .hooks import last_resid, run_until
from .models import HookedModel
from .prompts import PromptSet

MetricName = Literal["logit_diff", "prob_ratio", "odds_ratio"]
Metric = MetricName | Callable


def answer_logits(logits: Float[Tensor, "batch pos vocab"] | Float[Tensor, "batch n_answers"],
                  ps: PromptSet | None = None) -> Float[Tensor, "batch n_answers"]:
    """The logits of each prompt's answer tokens at its answer position (2-D input: already gathered)."""
    if logits.ndim == 2:
        if logits.shape[1] < 2:
            raise LensBiasError(f"gathered answer logits need ≥ 2 answers per row, got shape {tuple(logits.shape)}")
        return logits
    if ps is None:
        raise LensBiasError("logits [batch, pos, vocab] need the PromptSet (answer positions and ids)")
    if logits.ndim != 3 or logits.shape[0] != len(ps):
        raise LensBiasError(f"logits of shape {tuple(logits.shape)} do not fit a prompt set of {len(ps)} prompts")
    rows = torch.arange(len(ps), device=logits.device)
    last = logits[rows, ps.answer_pos.to(logits.device)]
    return last.gather(1, ps.answer_ids.to(logits.device))


def logit_diff(logits, ps: PromptSet | None = None) -> Float[Tensor, " batch"]:
    """LD = logit(answer₀) − logit(answer₁) at the answer position (e.g. ' she' − ' he')."""
    a = answer_logits(logits, ps)
    return a[:, 0] - a[:, 1]


def prob_ratio(logits, ps: PromptSet | None = None) -> Float[Tensor, " batch"]:
    """P(answer₀)/P(answer₁) = exp(LD) — Vig et al. (2020)'s y = p(anti)/p(stereo) with the answers so ordered."""
    return logit_diff(logits, ps).exp()


def odds_ratio(logits: Float[Tensor, "batch pos vocab"], ps: PromptSet) -> Float[Tensor, " batch"]:
    """[P(a₀)/(1−P(a₀))] / [P(a₁)/(1−P(a₁))] with P the full softmax at the answer position."""
    if logits.ndim != 3:
        raise LensBiasError("odds_ratio needs the full logits [batch, pos, vocab] (the softmax spans the vocabulary)")
    answer_logits(logits, ps)  # shape checks
    rows = torch.arange(len(ps), device=logits.device)
    logp = logits[rows, ps.answer_pos.to(logits.device)].float().log_softmax(-1)
    lp = logp.gather(1, ps.answer_ids.to(logits.device))
    log_odds = lp - torch.log1p(-lp.exp().clamp(max=1 - 1e-7))
    return (log_odds[:, 0] - log_odds[:, 1]).exp()


def total_effect(clean_ratio: Tensor, intervened_ratio: Tensor) -> Tensor:
    """Vig et al.'s total effect TE = y(intervened)/y(clean) − 1 for ratios y."""
    return intervened_ratio / clean_ratio - 1


def normalized_metric(value: Tensor | float, clean: Tensor | float, corrupted: Tensor | float) -> Tensor:
    """(value − corrupted)/(clean − corrupted): 0 = corrupted behaviour, 1 = clean behaviour."""
    value, clean, corrupted = (torch.as_tensor(v, dtype=torch.float32) for v in (value, clean, corrupted))
    gap = clean - corrupted
    if torch.any(gap.abs() < 1e-8):
        raise LensBiasError(
            "clean and corrupted metrics are equal, so the normalised metric is undefined; "
            "choose a corruption that changes the behaviour"
        )
    return (value - corrupted) / gap


METRICS = {"logit_diff": logit_diff, "prob_ratio": prob_ratio, "odds_ratio": odds_ratio}


#: metrics computed from the answer position alone (no full-vocabulary logits needed but odds_ratio's softmax)
FAST_METRICS = ("logit_diff", "prob_ratio", "odds_ratio")


def get_metric(metric: Metric) -> Callable:
    """A metric function from a name in METRICS or a callable (logits, PromptSet) → [batch]."""
    if callable(metric):
        return metric
    if metric not in METRICS:
        raise LensBiasError(f"unknown metric {metric!r}; choose one of {sorted(METRICS)} or pass a function")
    return METRICS[metric]


def metric_from_answers(a: Float[Tensor, "rows n_answers"], metric: MetricName,
                        logp: Float[Tensor, "rows n_answers"] | None = None) -> Float[Tensor, " rows"]:
    """Per-row metric from answer logits (and answer log-probs, which odds_ratio needs)."""
    if metric == "odds_ratio":
        lo = logp - torch.log1p(-logp.exp().clamp(max=1 - 1e-7))
        return (lo[:, 0] - lo[:, 1]).exp()
    d = a[:, 0] - a[:, 1]
    return d if metric == "logit_diff" else d.exp()


def logit_soft_cap(model) -> float | None:
    """The model's final-logit soft cap c (Gemma 2: logits ← c·tanh(logits/c)), None when it has none."""
    config = getattr(getattr(model, "original_model", model), "config", None)
    cap = getattr(config, "final_logit_softcapping", None)
    return float(cap) if cap else None


def soft_cap(model, logits: Tensor) -> Tensor:
    """Logits after the model's final soft cap (unchanged for models without one). Element-wise, so it
    applies to any subset of the vocabulary's logits, e.g. the answer columns alone."""
    cap = logit_soft_cap(model)
    return logits if cap is None else cap * torch.tanh(logits / cap)


def unembed_answers(model: HookedModel, x: Float[Tensor, "rows d_model"], answer_ids: Int[Tensor, "rows n_answers"],
                    metric: MetricName, W_U: Tensor, b_U: Tensor | None) -> Float[Tensor, " rows"]:
    """The per-row metric from final-layer residuals at the answer position: final norm, then only
    the answer columns of W_U (odds_ratio: the full row, for its softmax)."""
    x = model.ln_final(x[:, None])[:, 0]
    if metric == "odds_ratio":
        logits = soft_cap(model, x @ W_U + (b_U if b_U is not None else 0))
        logp = logits.float().log_softmax(-1).gather(1, answer_ids)
        return metric_from_answers(logits.gather(1, answer_ids), metric, logp)
    out = torch.einsum("rd,dra->ra", x, W_U[:, answer_ids])
    if b_U is not None:
        out = out + b_U[answer_ids]
    return metric_from_answers(soft_cap(model, out), metric)


def answer_logits_fast(
    model: HookedModel,
    tokens: Int[Tensor, "batch pos"],
    answer_pos: Int[Tensor, " batch"],
    answer_ids: Int[Tensor, "batch n_answers"],
    fwd_hooks: list = (),
    attention_mask: Int[Tensor, "batch pos"] | None = None,
    W_U: Tensor | None = None,
    b_U: Tensor | None = None,
) -> Float[Tensor, "batch n_answers"]:
    """Answer-token logits at the answer positions, equal to the full forward's, skipping the
    unembedding of every other position and token."""
    resid = run_until(model, tokens, attention_mask=attention_mask, fwd_hooks=fwd_hooks)[last_resid(model)]
    rows = torch.arange(resid.shape[0], device=resid.device)
    x = model.ln_final(resid[rows, answer_pos.to(resid.device)][:, None])[:, 0]  # [batch, d_model]
    W_U = model.W_U if W_U is None else W_U
    out = torch.einsum("bd,dba->ba", x, W_U[:, answer_ids.to(W_U.device)])
    if b_U is None:
        b_U = getattr(model, "b_U", None)
    if b_U is not None:
        out = out + b_U[answer_ids.to(b_U.device)]
    return soft_cap(model, out)
