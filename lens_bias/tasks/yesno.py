"""Binary (yes/no) decision prompts: an instruction naming both candidates, a question, a gold label."""

from __future__ import annotations

import math
import random
import re
import warnings
from typing import Sequence

import torch

from ..core.checks import check_finite
from ..core.errors import DataError, PromptError
from ..core.hooks import device_of
from ..core.models import HookedModel
from ..core.prompts import PromptSet, bos_ids, chat_prompt, continuation, resolve_chat, tokenizer_of
from .records import Items, Source, as_items, load_records, shipped_dataset

#: Instruction templates; each names both candidates, in either order.
INSTRUCTIONS: list[str] = [
    "Answer Yes or No.",
    "Answer No or Yes.",
    "Reply with Yes or No.",
    "Reply with No or Yes.",
]

POSITIVE, NEGATIVE = " Yes", " No"


def format_binary_prompt(instruction: str, question: str, tokenizer=None) -> str:
    """The prompt whose next token is the decision: '{instruction}\nQuestion: {question}\nAnswer:' (then ' Yes'
    or ' No'), or, with a `tokenizer`, the instruction and question as one user turn of its chat template
    (then the assistant's 'Yes' or 'No')."""
    body = f"{instruction}\nQuestion: {question}"
    return chat_prompt(tokenizer, body) if tokenizer is not None else f"{body}\nAnswer:"


_LABELS = {"yes": "yes", "no": "no", "true": "yes", "false": "no", "1": "yes", "0": "no", "y": "yes", "n": "no"}


def normalize_label(label, where: str = "") -> str:
    """'yes'/'no' from yes/no, true/false, 1/0 (any case); anything else is a clear error."""
    key = str(label).strip().lower()
    if key not in _LABELS:
        raise PromptError(f"label {label!r}{where} is not yes/no (or true/false, 1/0)")
    return _LABELS[key]


# ---- generators with exact labels (no download) -------------------------------------------
_LEVELS = {1: (0, 9), 2: (10, 99), 3: (100, 999)}


def _level(level: int) -> tuple[int, int]:
    if level not in _LEVELS:
        raise PromptError(f"difficulty level must be one of {sorted(_LEVELS)}, got {level}")
    return _LEVELS[level]


def arithmetic_items(n: int, level: int = 1, seed: int = 0) -> list[dict]:
    """'Is a + b = c?' with c the true sum (yes) or off by 1–3 (no); operands in the level's range."""
    lo, hi = _level(level)
    rng = random.Random(seed)
    out = []
    for i in range(n):
        a, b = rng.randint(lo, hi), rng.randint(lo, hi)
        yes = i % 2 == 0
        c = a + b if yes else max(0, a + b + rng.choice([-3, -2, -1, 1, 2, 3]))
        if c == a + b:
            c, yes = a + b, True
        out.append({"question": f"Is {a} + {b} = {c}?", "label": "yes" if yes else "no", "kind": "arithmetic",
                    "level": level})
    return out


def comparison_items(n: int, level: int = 1, seed: int = 0) -> list[dict]:
    """'Is a more than b?' (level 1: 0–20, as the model organism was trained on)."""
    lo, hi = (0, 20) if level == 1 else _level(level)
    rng = random.Random(seed)
    out = []
    for i in range(n):
        a, b = rng.sample(range(lo, hi + 1), 2)
        yes = i % 2 == 0
        if (a > b) != yes:
            a, b = b, a
        out.append({"question": f"Is {a} more than {b}?", "label": "yes" if yes else "no", "kind": "comparison",
                    "level": level})
    return out


def negation_items(n: int, level: int = 1, seed: int = 0) -> list[dict]:
    """'Is it true that a is not more than b?' — the label flips with the negation."""
    return [{**it, "question": it["question"].replace("Is ", "Is it true that ", 1).replace(" more than", " is not more than")
             .replace("?", "?"), "label": "no" if it["label"] == "yes" else "yes", "kind": "negation"}
            for it in comparison_items(n, level, seed)]


CATEGORIES = {
    "animal": ["dog", "cat", "horse", "cow", "bird", "fish", "lion", "tiger"],
    "fruit": ["apple", "banana", "orange", "grape", "pear", "lemon"],
    "tool": ["hammer", "saw", "drill", "wrench", "shovel"],
    "vehicle": ["car", "bus", "train", "boat", "bike", "plane"],
    "instrument": ["piano", "guitar", "drum", "violin", "flute"],
}


def membership_items(n: int, seed: int = 0, categories: dict[str, list[str]] = CATEGORIES) -> list[dict]:
    """'Is a {noun} a {category}?' (set membership)."""
    rng = random.Random(seed)
    cats = sorted(categories)
    out = []
    for i in range(n):
        cat = rng.choice(cats)
        yes = i % 2 == 0
        noun = rng.choice(categories[cat]) if yes else rng.choice(
            [w for c in cats if c != cat for w in categories[c] if w not in categories[cat]])
        out.append({"question": f"Is a {noun} a {cat}?", "label": "yes" if yes else "no", "kind": "membership",
                    "level": 1})
    return out


def load_yes_no(source: Source = "strategyqa", question_key: str = "question",
                label_key: str | None = None) -> list[dict]:
    """(question, yes/no label) items from a file — JSONL, a JSON list (e.g. StrategyQA: 'answer':
    bool) or CSV —, a datasets.Dataset, a list of dicts, or a shipped set ('strategyqa')."""
    if isinstance(source, str) and source == "strategyqa":
        source = shipped_dataset("strategyqa")
    records, where = load_records(source)
    items = []
    for i, r in enumerate(records):
        key = label_key or next((k for k in ("label", "answer") if r.get(k) is not None), None)
        q = r.get(question_key)
        if key is None or r.get(key) is None:
            raise DataError(f"{where(i)}: needs a 'label' or 'answer' field (yes/no, true/false, 1/0)")
        if not isinstance(q, str) or not q.strip():
            raise DataError(f"{where(i)}: needs a non-empty '{question_key}' (got {q!r})")
        items.append({"question": q.strip(), "label": normalize_label(r[key], f" at {where(i)}"),
                      "kind": r.get("kind") or "loaded"})
    return items


def load_gsm8k(source: Source = "gsm8k", n: int | None = None, seed: int = 0) -> list[dict]:
    """Answer-verification yes/no items from GSM8K problems: 'Is the answer to this problem N?' with
    N the correct final answer (yes) or a wrong one (no, off by 1–10), alternating."""
    if isinstance(source, str) and source == "gsm8k":
        source = shipped_dataset("gsm8k")
    records, where = load_records(source)
    rng = random.Random(seed)
    items = []
    for i, r in enumerate(records):
        m = re.search(r"####\s*(-?[\d,]+)", str(r.get("answer", "")))
        if not m or not str(r.get("question") or "").strip():
            raise DataError(f"{where(i)}: needs a 'question' and an 'answer' ending in '#### N'")
        gold = int(m.group(1).replace(",", ""))
        yes = len(items) % 2 == 0
        shown = gold if yes else gold + rng.choice([-1, 1]) * rng.randint(1, 10)
        items.append({"question": f"{r['question'].strip()} Is the answer {shown}?", "label": "yes" if yes else "no",
                      "kind": "gsm8k"})
        if n is not None and len(items) >= n:
            break
    return items


# ---- prompt sets ------------------------------------------------------------------------
def _item_error(k: int, message: str) -> PromptError:
    """A PromptError about item k (0-based) that knows the item (`.item`), so a loader can name its line."""
    err = PromptError(f"yes/no item {k + 1}: {message}")
    err.item = k
    return err


def binary_prompts(
    model_or_tokenizer,
    items: Items,
    instructions: Sequence[str] = INSTRUCTIONS,
    candidates: tuple[str, str] = (POSITIVE, NEGATIVE),
    *,
    chat: bool | None = None,
) -> PromptSet:
    """One prompt per item × instruction (`format_binary_prompt`); answers (positive, negative): the
    candidates as the prompt's continuation (' Yes', ' No' after 'Answer:'; 'Yes', 'No' as the assistant's
    reply). `chat`: through the tokenizer's chat template (default: when it has one, `resolve_chat`).

    metadata per prompt: question, label, kind, template index, chat, `pos_cand`/`neg_cand`: the token
    positions of the candidates named in the instruction (their last occurrence in it), and
    `query_start`: the first position after the instruction (NAS's L_I).
    """
    tok = tokenizer_of(model_or_tokenizer)
    items = as_items(items)
    if not len(items):
        raise PromptError("no yes/no items given")
    instructions = list(instructions)
    if not instructions:
        raise PromptError("no instructions given")
    chat = resolve_chat(tok, chat)
    n_ctx = getattr(getattr(model_or_tokenizer, "cfg", None), "n_ctx", None)
    prompts, meta = [], []
    for k, it in enumerate(items):
        q = it.get("question")
        if not isinstance(q, str) or not q.strip():
            raise _item_error(k, f"needs a non-empty 'question' string (got {q!r})")
        try:
            label = normalize_label(it.get("label"), f" of question {q[:60]!r}")
        except PromptError as e:
            raise _item_error(k, str(e)) from None
        for t, ins in enumerate(instructions):
            prompts.append(format_binary_prompt(ins, q, tok if chat else None))
            meta.append({"question": q, "label": label, "kind": it.get("kind", ""), "template": t,
                         "instruction": ins, "gold": 1 if label == "yes" else 0, "chat": chat})
            if n_ctx:
                n_tok = len(tok(prompts[-1], add_special_tokens=False)["input_ids"]) + len(bos_ids(tok))
                if n_tok > n_ctx:
                    raise _item_error(k, f"its prompt is {n_tok} tokens, longer than the model's context of {n_ctx} "
                                         f"(question {q[:50]!r}...)")
    answers = tuple(continuation(prompts[0], c) for c in candidates)
    ps = PromptSet.build(model_or_tokenizer, prompts, answers, metadata=meta)
    for i, m in enumerate(ps.metadata):
        m["pos_cand"], m["neg_cand"], m["query_start"] = _instruction_positions(
            tok, ps.prompts[i], m["instruction"], candidates, int(ps.answer_pos[i]) + 1)
    return ps


def _instruction_positions(tok, prompt: str, instruction: str, candidates: Sequence[str], n_tokens: int
                           ) -> tuple[int, int, int]:
    """Token positions of the candidates named in the instruction (the last token of each one's last
    occurrence in it) and of the first token after the instruction (L_I), found by character offsets so
    that they hold inside a chat template too; `n_tokens` (the prompt's length) gives the BOS shift."""
    enc = tok(prompt, add_special_tokens=False, return_offsets_mapping=True)
    offsets, shift = enc["offset_mapping"], n_tokens - len(enc["input_ids"])
    start = prompt.find(instruction)
    if start < 0:
        raise PromptError(f"the instruction {instruction!r} is not in its prompt {prompt!r}")
    end = start + len(instruction)
    found = []
    for cand in candidates:
        hits = [m.end() for m in re.finditer(rf"(?<!\w){re.escape(cand.strip())}(?!\w)", prompt[start:end])]
        if not hits:
            raise PromptError(f"candidate {cand!r} not found in the instruction {instruction!r}")
        last_char = start + hits[-1] - 1
        found.append(next(t for t, (a, b) in enumerate(offsets) if a <= last_char < b) + shift)
    query_start = next((t for t, (a, b) in enumerate(offsets) if a >= end and b > a), len(offsets)) + shift
    return found[0], found[1], query_start


# ---- decisions and their metrics -----------------------------------------------------------
def decision_metrics(pred_yes: Sequence[bool], gold_yes: Sequence[bool]) -> dict:
    """Accuracy, precision/recall/F1 of 'yes', yes-rate and the precision − recall gap (negative bias).
    Precision with no 'yes' answer, or recall with no gold 'yes', has nothing behind it: NaN with a warning
    (and so are F1 and the gap)."""
    tp = sum(p and g for p, g in zip(pred_yes, gold_yes))
    fp = sum(p and not g for p, g in zip(pred_yes, gold_yes))
    fn = sum((not p) and g for p, g in zip(pred_yes, gold_yes))
    n = len(gold_yes)
    if n == 0:
        raise PromptError("no decisions to score")
    precision = _ratio(tp, tp + fp, "precision", f"no 'yes' answer among {n} decisions")
    recall = _ratio(tp, tp + fn, "recall", f"no gold 'yes' among {n} decisions")
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    correct = sum(p == g for p, g in zip(pred_yes, gold_yes))
    return {"n": n, "accuracy": correct / n, "precision": precision, "recall": recall, "f1": f1,
            "yes_rate": sum(pred_yes) / n, "pr_gap": precision - recall}


def _ratio(num: int, den: int, name: str, why: str) -> float:
    if den == 0:
        warnings.warn(f"{name} is NaN: {why}", stacklevel=3)
        return math.nan
    return num / den


def evaluate_binary(model: HookedModel, ps: PromptSet, ablate: list | None = None, batch_size: int = 32) -> dict:
    """P(yes) vs P(no) at the answer position (renormalised over the two), decisions and metrics,
    overall and per template; `ablate` is a fwd_hooks list (e.g. from lens_bias.ablation)."""
    import pandas as pd

    device = device_of(model)
    p_yes = []
    with torch.no_grad(), model.hooks(fwd_hooks=list(ablate or [])):
        for sub in ps.batches(batch_size):
            sub = sub.to(device)
            logits = model(sub.tokens, attention_mask=sub.attention_mask)
            last = logits[torch.arange(len(sub), device=device), sub.answer_pos]
            two = last.gather(1, sub.answer_ids[:, :2]).float().softmax(-1)
            p_yes.append(two[:, 0].cpu())
    p_yes = check_finite(torch.cat(p_yes), "P(yes) of the yes/no prompts", model)
    gold = [m["label"] == "yes" for m in ps.metadata]
    pred = (p_yes > 0.5).tolist()
    per_template = {t: decision_metrics([p for p, m in zip(pred, ps.metadata) if m["template"] == t],
                                        [g for g, m in zip(gold, ps.metadata) if m["template"] == t])
                    for t in sorted({m["template"] for m in ps.metadata})}
    table = pd.DataFrame([{**m, "p_yes": float(p), "pred": "yes" if p > 0.5 else "no"} for m, p in zip(ps.metadata, p_yes)])
    return {"overall": decision_metrics(pred, gold), "per_template": per_template, "table": table}
