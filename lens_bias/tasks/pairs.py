"""Counterfactual prompt pairs from a file: rows with a prompt, its corrupted twin, the subject and the
answer words — the input of activation patching, attribution patching and causal tracing."""

from __future__ import annotations

import json
import os

from ..core.errors import DataError, PromptError
from ..core.prompts import PromptSet
from .records import Source, load_records, located


def _answers_of(value, where: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = json.loads(value) if value.lstrip().startswith("[") else value.split("|")
    if not isinstance(value, (list, tuple)) or len(value) < 2 or not all(isinstance(a, str) for a in value):
        raise DataError(f"{where}: 'answers' must be two or more answer words, e.g. [\" she\", \" he\"]")
    return tuple(value)


def load_prompt_pairs(model_or_tokenizer, source: Source, *, answers: tuple[str, ...] = (" he", " she"),
                      need: str = "corrupted") -> PromptSet:
    """Rows with 'prompt', 'corrupted', 'subject' and 'answers' (JSONL, JSON list, CSV with answers as
    ' she| he', or a datasets.Dataset) → a PromptSet. `answers` is the default for rows without
    them; `need` ('corrupted' or 'subject') names the field every row must have."""
    records, where = load_records(source)
    prompts, corrupted, subjects, answer_rows, meta = [], [], [], [], []
    for i, r in enumerate(records):
        if not isinstance(r.get("prompt"), str) or not r["prompt"].strip():
            raise DataError(f"{where(i)}: every row needs a 'prompt' (and 'corrupted', 'subject', 'answers')")
        if not r.get(need):
            raise DataError(f"{where(i)}: no '{need}'" + (" (needed for patching and attribution)"
                                                         if need == "corrupted" else " (causal tracing corrupts it)"))
        prompts.append(r["prompt"])
        corrupted.append(r.get("corrupted") or None)
        subjects.append(r.get("subject") or None)
        answer_rows.append(_answers_of(r["answers"], where(i)) if r.get("answers") else tuple(answers))
        meta.append({k: v for k, v in r.items() if k not in ("prompt", "corrupted", "subject", "answers")})
    try:
        return PromptSet.build(model_or_tokenizer, prompts, answer_rows, corrupted if None not in corrupted else None,
                               subjects=subjects if None not in subjects else None, metadata=meta,
                               on_length_mismatch="drop")
    except PromptError as e:  # about row e.item: name its file and line
        if isinstance(source, (str, os.PathLike)) and getattr(e, "item", None) is not None:
            raise located(source, e) from None
        raise
