"""Capability kept and bias measured, for before/after tables: loss on neutral text, cloze accuracy,
the gender logit difference of a prompt set, and tidy comparison tables."""

from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path
from typing import Callable

import torch
from jaxtyping import Float
from torch import Tensor

from ..core.checks import check_finite
from ..core.errors import LensBiasError, PromptError
from ..core.files import shipped
from ..core.hooks import device_of
from ..core.metrics import logit_diff
from ..core.models import HookedModel
from ..core.prompts import PromptSet, encode_lines, pad, pad_id_of
from .records import Items, as_items, read_text_file, shipped_dataset, take


_FILE_SUFFIXES = (".txt", ".text", ".md", ".json", ".jsonl", ".csv", ".tsv")


def text_lines(texts: str | list[str] | os.PathLike) -> list[str]:
    """The non-empty lines of a text, a list of texts or a file (a pathlib.Path); an error when there
    are none, and for a string that is a file's name rather than text ('neutral.txt' would be scored
    as the text itself)."""
    if isinstance(texts, os.PathLike):
        texts = read_text_file(texts)
    if isinstance(texts, str) and not any(c.isspace() for c in texts.strip()) and (
            "/" in texts or os.sep in texts or Path(texts.strip()).suffix.lower() in _FILE_SUFFIXES):
        exists = Path(texts.strip()).expanduser().is_file()
        raise LensBiasError(f"text {texts!r} looks like a file name, not text ("
                            + ("the file exists: pass its text, or pathlib.Path(...) to read it)" if exists
                               else "no such file); pass the text itself, or a pathlib.Path to read a file"))
    if isinstance(texts, str):
        texts = texts.splitlines()
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise LensBiasError("no text to evaluate: the text is empty")
    return texts


def default_neutral_text(model: HookedModel) -> str:
    """The neutral text of the capability check when none is given: the organism's own neutral text for the
    models trained here (their folder holds a lens_bias card: the organism, the benchmark models), else 400
    sentences of real English from the Brown corpus without gendered words (data/datasets/brown)."""
    source = getattr(model, "lens_bias_source", None)
    if source and (Path(source) / "lens_bias_card.json").is_file():
        return shipped("organism_data", "neutral.txt").read_text(encoding="utf-8")
    return shipped_dataset("brown").read_text(encoding="utf-8")


def text_loss(model: HookedModel, texts: str | list[str] | os.PathLike, *, batch_size: int = 32, max_tokens: int | None = None,
              hooks: list | None = None) -> float:
    """Capability kept: mean next-token cross-entropy (nats/token) over lines of neutral text
    (BOS + line), padding ignored; `hooks` (e.g. an ablation) are active during the forward."""
    dev = device_of(model)
    max_tokens = max_tokens or model.cfg.n_ctx
    total, count = 0.0, 0
    texts = text_lines(texts)
    for i in range(0, len(texts), batch_size):
        ids, mask = pad(encode_lines(model, texts[i:i + batch_size], max_tokens=max_tokens), pad_id_of(model.tokenizer))
        ids, mask = ids.to(dev), mask.to(dev)
        labels = ids.masked_fill(mask == 0, -100)
        with torch.no_grad(), model.hooks(fwd_hooks=hooks or []):
            logits = model(ids, attention_mask=mask)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                                 labels[:, 1:].reshape(-1), ignore_index=-100, reduction="sum")
        total += loss.item()
        count += int((labels[:, 1:] != -100).sum())
    if count == 0:
        raise LensBiasError("no tokens to score: every line is a single token")
    return check_finite(total / count, "text loss", model)


def cloze_accuracy(model: HookedModel, items: Items, *, batch_size: int = 32, hooks: list | None = None) -> dict:
    """Capability kept: share of cloze items ({'prompt', 'answer'}) the model completes greedily with
    the answer (every answer token is the top-1 next token, teacher-forced), overall and per 'kind'."""
    items = as_items(items)
    if not len(items):
        raise LensBiasError("no cloze items to evaluate")
    tok = model.tokenizer
    dev = device_of(model)
    hits: dict[str, list[bool]] = defaultdict(list)
    for i in range(0, len(items), batch_size):
        chunk = take(items, i, i + batch_size)
        seqs, spans = [], []
        for p, it in zip(encode_lines(model, [it["prompt"] for it in chunk]), chunk):
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
        ids, mask = pad(seqs)
        with torch.no_grad(), model.hooks(fwd_hooks=hooks or []):
            logits = model(ids.to(dev), attention_mask=mask.to(dev))
        check_finite(logits.amax(-1), "cloze logits", model)  # a NaN logit makes amax NaN
        top = logits.argmax(-1)
        for it, q, (start, n), row in zip(chunk, seqs, spans, top):
            ok = row[start - 1:start - 1 + n].tolist() == q[start:start + n]
            hits["overall"].append(ok)
            hits[it.get("kind", "all")].append(ok)
    return {k: sum(v) / len(v) for k, v in hits.items()}


def bias_values(model: HookedModel, ps: PromptSet, batch_size: int = 32) -> Float[Tensor, " batch"]:
    """LD = logit(answer₀) − logit(answer₁) per prompt (e.g. ' she' − ' he'), batched, no gradients."""
    dev = device_of(model)
    out = []
    for b in ps.batches(batch_size):
        b = b.to(dev)
        with torch.no_grad():
            out.append(logit_diff(model(b.tokens, attention_mask=b.attention_mask), b).float())
    return check_finite(torch.cat(out), "logit difference", model)


def bias_table(models: dict, sets: dict[str, PromptSet], batch_size: int = 32):
    """Tidy gender-bias table: per model and prompt set, mean LD = logit(a₀) − logit(a₁) and mean |LD|
    (e.g. sets from professions_prompts, winobias_prompts, winogender_prompts)."""
    import pandas as pd

    if not models or not sets:
        raise LensBiasError("bias_table needs at least one model and one prompt set")
    rows = []
    for mn, m in models.items():
        for sn, ps in sets.items():
            ld = bias_values(m, ps, batch_size)
            rows.append({"model": mn, "set": sn, "n": len(ps), "mean_ld": ld.mean().item(),
                         "mean_abs_ld": ld.abs().mean().item()})
    return pd.DataFrame(rows)


def compare_models(models: dict, measures: dict[str, Callable]):
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
