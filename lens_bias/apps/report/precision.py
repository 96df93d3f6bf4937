"""Does half precision change the report's answer? A float32 check on a sample.

In bfloat16 (8 mantissa bits) or float16, small differences flip the argmax tokens CRISPR takes a max over
and reorder units whose scores are close, so a method's ranking can change without any error. When the
model is in half precision, every method runs again on a sample of the locate prompts (items) in the model's
dtype and in a float32 copy of the same weights, and the report says where their top units disagree:

    overlap@k = |top_k(half) ∩ top_k(float32)| / k on the sample, k = min(8, half the units)

A method whose overlap is below AGREE, or whose top unit differs, gets a note naming both top units; the
held-out bias is compared as well (a change beyond 10% of its size, or of its sign, is noted).
"""

from __future__ import annotations

import dataclasses
import warnings

import torch
from transformer_lens.model_bridge import TransformerBridge

from ...core.hf import to_hf_model
from ...core.hooks import device_of
from ...core.prompts import PromptSet
from .agreement import overlap
from .methods import run_method
from .tasks import ReportTask, bias_of
from .units import top_units, unit_label

HALF = (torch.float16, torch.bfloat16)
SAMPLE = 8
AGREE = 0.5


def model_dtype(model) -> torch.dtype:
    return next(p for p in model.parameters() if p.is_floating_point()).dtype


def float32_copy(model) -> TransformerBridge:
    """The same weights in float32, as a new bridge (the half-precision model is left as it is)."""
    source = getattr(model, "lens_bias_source", None) or model.original_model.config._name_or_path
    hf = to_hf_model(model, attn_implementation="eager", dtype=torch.float32)
    copy = TransformerBridge.boot_transformers(str(source), hf_model=hf, tokenizer=model.tokenizer,
                                               device=device_of(model), dtype=torch.float32)
    copy.eval()
    copy.lens_bias_source = source
    return copy


def _sample(task: ReportTask, n: int) -> ReportTask:
    data = task.locate[list(range(min(n, len(task.locate))))] if isinstance(task.locate, PromptSet) \
        else list(task.locate[:n])
    return dataclasses.replace(task, locate=data)


def precision_check(model, task: ReportTask, methods: list[str], orient: dict, opts: dict,
                    n: int = SAMPLE) -> tuple[list[str], list[dict]]:
    """(notes, rows): each method's top units on `n` locate prompts in the model's half precision and in
    float32 (module docstring); no notes when the model is in float32."""
    dtype = model_dtype(model)
    if dtype not in HALF:
        return [], []
    name = str(dtype).removeprefix("torch.")
    f32 = float32_copy(model)
    sample = _sample(task, n)
    notes, rows = [], []
    for m in methods:
        if m == "random":
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            half, _ = run_method(m, model, sample, orient, opts, False)
            full, _ = run_method(m, f32, sample, orient, opts, False)
        if half is None or full is None:
            continue
        for unit_type in half:
            a, b = half[unit_type].float().cpu(), full[unit_type].float().cpu()
            finite = int(torch.isfinite(b).sum())
            k = max(1, min(8, finite // 2))
            ov = overlap(a, b, k)
            ta, tb = top_units(a, 1), top_units(b, 1)
            same_top = ta == tb
            rows.append({"method": m, "unit_type": unit_type, "k": k, "overlap": ov, "same_top": same_top,
                         "top_half": unit_label(unit_type, ta[0]) if ta else "", "top_float32":
                         unit_label(unit_type, tb[0]) if tb else ""})
            if not (ov >= AGREE) or not same_top:
                notes.append(f"{name} changes {m} ({unit_type}): on {len(sample.locate)} sample prompts its top-{k} "
                             f"share {ov:.0%} with a float32 run of the same weights (top unit "
                             f"{rows[-1]['top_half']} vs {rows[-1]['top_float32']}): read this ranking with care, or "
                             "run in float32")
    b_half, b_full = bias_of(model, task)["bias"], bias_of(f32, task)["bias"]
    if not (abs(b_half - b_full) <= 0.1 * abs(b_full)) or (b_half > 0) != (b_full > 0):
        notes.append(f"{name} changes the held-out bias: {b_half:+.3f} against {b_full:+.3f} in float32")
    del f32
    return notes, rows


__all__ = ["float32_copy", "precision_check"]
