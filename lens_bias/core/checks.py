"""The one finite check: NaN or inf in a model's weights or in a method's output is an error that says
where it came from — the first non-finite parameter, or float16 overflow when the weights are finite —
never a table of NaN with exit code 0.

`check_finite(x, what, model)` costs one reduction over the output; the model's parameters are
scanned only when the output is not finite, to name the culprit. `check_weights_finite(model)`
scans them up front (load_model, mitigations, export).
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import torch
from torch import Tensor

from .errors import LensBiasError


class NonFiniteError(LensBiasError):
    """NaN or inf in a model's weights or in a result computed from them."""


def first_nonfinite_parameter(model) -> tuple[str, int, int, tuple[int, ...]] | None:
    """(name, number of non-finite entries, numel, index of the first) of the first parameter holding
    NaN/inf, or None when every weight is finite. (Buffers are not weights: some models keep -inf
    masks in them. Parameters offloaded to disk are on the meta device and are not read here: the
    outputs' own check catches what they hold.)"""
    if model is None or not hasattr(model, "named_parameters"):
        return None
    seen = set()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.is_meta or p.data_ptr() in seen or p.numel() == 0 or not p.is_floating_point():
                continue
            seen.add(p.data_ptr())
            bad = ~torch.isfinite(p)
            if bad.any():
                first = tuple(int(i) for i in bad.nonzero()[0].tolist())
                return name.replace("._original_component", ""), int(bad.sum()), p.numel(), first
    return None


def nonfinite_cause(model) -> str:
    """Why a result from `model` is not finite: its first non-finite weight, float16 overflow, or the input."""
    hit = first_nonfinite_parameter(model)
    if hit is not None:
        name, n, numel, first = hit
        return (f"the model's weight {name} holds {n} non-finite value{'s' * (n != 1)} of {numel} (first at "
                f"index {list(first)}); reload or repair the model")
    dtype = _dtype_of(model)
    if dtype == torch.float16:
        return ("every weight is finite, so the activations overflowed float16 (largest value 65504); "
                "use dtype='bfloat16' or 'float32'")
    return "every weight is finite: the input or an intervention produced them"


def _dtype_of(model) -> torch.dtype | None:
    try:
        return next(p for p in model.parameters() if p.is_floating_point()).dtype
    except (StopIteration, AttributeError):
        return None


def check_weights_finite(model, what: str = "model") -> None:
    """A NonFiniteError naming the first parameter that holds NaN or inf (one pass over the weights)."""
    hit = first_nonfinite_parameter(model)
    if hit is not None:
        name, n, numel, first = hit
        raise NonFiniteError(f"{what}: weight {name} holds {n} non-finite value{'s' * (n != 1)} (NaN/inf) of "
                             f"{numel}, first at index {list(first)}; reload or repair the model")


def _tensors(x: Any) -> Iterable[Tensor]:
    if isinstance(x, Tensor):
        yield x
    elif isinstance(x, (int, float)):
        yield torch.tensor(float(x))
    elif isinstance(x, dict):
        for v in x.values():
            yield from _tensors(v)
    elif isinstance(x, (list, tuple)):
        for v in x:
            yield from _tensors(v)
    elif hasattr(x, "values") and isinstance(getattr(x, "values"), Tensor):  # ComponentScores
        yield x.values


def count_nonfinite(x: Any) -> tuple[int, int]:
    """(non-finite entries, all entries) over a tensor, a number, or a dict/list/ComponentScores of them."""
    bad = total = 0
    for t in _tensors(x):
        if t.is_floating_point() or t.is_complex():
            bad += int((~torch.isfinite(t.detach())).sum())
        total += t.numel()
    return bad, total


def check_finite(x, what: str, model=None):
    """`x` (a tensor, a number, or a dict/list/ComponentScores of them) unchanged; a NonFiniteError
    when it holds NaN or inf, naming `what` and — with `model` — the first non-finite weight, or
    float16 overflow when every weight is finite."""
    if isinstance(x, float) and math.isfinite(x):
        return x
    bad, total = count_nonfinite(x)
    if bad:
        cause = nonfinite_cause(model) if model is not None else "check the model's weights and dtype"
        raise NonFiniteError(f"{what}: {bad} of {total} value{'s' * (total != 1)} are NaN or inf; {cause}")
    return x


__all__ = ["NonFiniteError", "check_finite", "check_weights_finite", "count_nonfinite", "first_nonfinite_parameter",
           "nonfinite_cause"]
