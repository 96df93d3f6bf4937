"""Bias metrics at the answer position: logit difference, probability/odds ratio, normalised effect."""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor

from .errors import LensBiasError, PromptError
from .prompts import PromptSet


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


def get_metric(metric):
    """A metric function from a name in METRICS or a callable (logits, PromptSet) → [batch]."""
    if callable(metric):
        return metric
    if metric not in METRICS:
        raise LensBiasError(f"unknown metric {metric!r}; choose one of {sorted(METRICS)} or pass a function")
    return METRICS[metric]


def _lines(texts) -> list[str]:
    if isinstance(texts, str):
        texts = texts.splitlines()
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise LensBiasError("no text to evaluate: the text is empty")
    return texts


def text_loss(model, texts: str | list[str], *, batch_size: int = 32, max_tokens: int | None = None,
              hooks: list | None = None) -> float:
    """Capability kept: mean next-token cross-entropy (nats/token) over lines of neutral text
    (BOS + line), padding ignored; `hooks` (e.g. an ablation) are active during the forward."""
    tok = model.tokenizer
    dev = next(model.parameters()).device
    max_tokens = max_tokens or model.cfg.n_ctx
    total, count = 0.0, 0
    texts = _lines(texts)
    for i in range(0, len(texts), batch_size):
        enc = [([tok.bos_token_id] if tok.bos_token_id is not None else []) +
               tok(t, add_special_tokens=False)["input_ids"] for t in texts[i:i + batch_size]]
        enc = [e[:max_tokens] for e in enc]
        width = max(len(e) for e in enc)
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        ids = torch.tensor([e + [pad] * (width - len(e)) for e in enc], device=dev)
        labels = torch.tensor([e + [-100] * (width - len(e)) for e in enc], device=dev)
        with torch.no_grad(), model.hooks(fwd_hooks=hooks or []):
            logits = model(ids, attention_mask=(labels != -100).long())
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                                 labels[:, 1:].reshape(-1), ignore_index=-100, reduction="sum")
        total += loss.item()
        count += int((labels[:, 1:] != -100).sum())
    if count == 0:
        raise LensBiasError("no tokens to score: every line is a single token")
    return total / count


def cloze_accuracy(model, items: list[dict], *, batch_size: int = 32, hooks: list | None = None) -> dict:
    """Capability kept: share of cloze items ({'prompt', 'answer'}) the model completes greedily with
    the answer (every answer token is the top-1 next token, teacher-forced), overall and per 'kind'."""
    from collections import defaultdict

    if not items:
        raise LensBiasError("no cloze items to evaluate")
    tok = model.tokenizer
    dev = next(model.parameters()).device
    bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
    hits: dict[str, list[bool]] = defaultdict(list)
    for i in range(0, len(items), batch_size):
        chunk = items[i:i + batch_size]
        seqs, spans = [], []
        for it in chunk:
            p = bos + tok(it["prompt"], add_special_tokens=False)["input_ids"]
            a = tok(it["answer"], add_special_tokens=False)["input_ids"]
            if not a:
                raise LensBiasError(f"cloze answer {it['answer']!r} tokenises to nothing (prompt {it['prompt']!r})")
            seqs.append(p + a)
            spans.append((len(p), len(a)))
        width = max(map(len, seqs))
        n_ctx = getattr(model.cfg, "n_ctx", None)
        if n_ctx and width > n_ctx:
            raise PromptError(f"a cloze prompt with its answer is {width} tokens, longer than the model's context "
                              f"of {n_ctx}")
        ids = torch.tensor([q + [0] * (width - len(q)) for q in seqs], device=dev)
        mask = torch.tensor([[1] * len(q) + [0] * (width - len(q)) for q in seqs], device=dev)
        with torch.no_grad(), model.hooks(fwd_hooks=hooks or []):
            top = model(ids, attention_mask=mask).argmax(-1)
        for it, q, (start, n), row in zip(chunk, seqs, spans, top):
            ok = row[start - 1:start - 1 + n].tolist() == q[start:start + n]
            hits["overall"].append(ok)
            hits[it.get("kind", "all")].append(ok)
    return {k: sum(v) / len(v) for k, v in hits.items()}


def compare_models(models: dict, measures: dict):
    """Tidy before/after table: one row per (model, measure) with its value — e.g. models
    {'original': m, 'edited': e, 'random': r} and measures {'bias': fn, 'neutral loss': fn}, each
    fn(model) → float, or → {key: float} for several values from one evaluation (rows
    'name_key')."""
    import pandas as pd

    if not models or not measures:
        raise LensBiasError("compare_models needs at least one model and one measure")
    rows = []
    for mn, m in models.items():
        for name, fn in measures.items():
            value = fn(m)
            items = value.items() if isinstance(value, dict) else [(None, value)]
            rows += [{"model": mn, "measure": name if k is None else f"{name}_{k}", "value": float(v)}
                     for k, v in items]
    return pd.DataFrame(rows)
