"""Half precision: what keeps bfloat16 / float16 models finite and close to float32.

- Sums over prompts, tokens or chunks are taken in float32 (or float64) by the methods.
- In float16, activation functions written out in Python overflow: GPT-2's GELU (tanh form) cubes its
  input, so x³ is inf above |x| ≈ 40 — harmless in the forward (tanh(inf) = 1) but 0·inf = NaN in
  every gradient through it (attribution, CRISPR, NASA). `float32_activations` makes the Hugging
  Face activation modules compute in float32 and return float16 — the same function, no overflow.
  load_model and clone_model apply it to float16 models.
- Two computations of the same logits from the same weights in half precision round in their own order
  (the bridge's hooked forward and transformers', two attention kernels): `logit_tolerance` is how far
  they may differ, from the dtype's unit roundoff and the model's depth.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


class Float32Activation(torch.nn.Module):
    """act(x) computed in float32 and returned in x's dtype (no parameters: state dicts are unchanged)."""

    def __init__(self, act: torch.nn.Module):
        super().__init__()
        self.act = act

    def forward(self, x):
        return self.act(x.float()).to(x.dtype)


def _is_activation(module) -> bool:
    return type(module).__module__.startswith("transformers.activations")


def float32_activations(model, dtypes=(torch.float16,)) -> int:
    """Wrap every Hugging Face activation module of `model` (a bridge or an HF model) in
    Float32Activation when the model's weights are in `dtypes`; idempotent. Returns how many were
    wrapped."""
    hf = getattr(model, "original_model", model)
    try:
        dtype = next(p for p in hf.parameters() if p.is_floating_point()).dtype
    except StopIteration:
        return 0
    if dtype not in dtypes:
        return 0
    wrapped = 0
    for parent in list(hf.modules()):
        if isinstance(parent, Float32Activation):
            continue
        for name, child in list(parent.named_children()):
            if _is_activation(child) and not isinstance(parent, Float32Activation):
                setattr(parent, name, Float32Activation(child))
                wrapped += 1
    return wrapped


def unit_roundoff(dtype: torch.dtype) -> float:
    """u = half the machine epsilon: 2⁻⁸ bfloat16, 2⁻¹¹ float16, 2⁻²⁴ float32 (the largest relative error of
    one rounding)."""
    return torch.finfo(dtype).eps / 2


def logit_tolerance(dtype: torch.dtype, logits: Tensor, n_layers: int) -> float:
    """How far two computations of `logits` from the same weights in `dtype` may differ when they round in
    another order. Each of the 2·n_layers residual-stream updates (attention, MLP) may be rounded
    differently, by at most u of the stream's scale; independent roundings add in quadrature, and the
    stream reaches the logits scaled to their largest magnitude s = max(1, max|logits|), so

        tol = 4 · u · √(2·n_layers) · s.

    The 4 is measured: transformers' own two attention kernels (eager, sdpa) on the same weights differ by
    up to 2.35·u·√(2L)·s (SmolLM2-135M, 30 layers, bfloat16: 2.5 with s = 35.5; the organism, 4 layers:
    0.74 of it in bfloat16, 0.5 in float16). That 30-layer model gets 4.3 in bfloat16 and 0.54 in float16;
    float32 is held to 1e-4 at least (SmolLM2's bridge vs transformers: 2.4e-5)."""
    s = max(1.0, float(logits.detach().float().abs().max()))
    tol = 4 * unit_roundoff(dtype) * math.sqrt(2 * max(1, n_layers)) * s
    return max(tol, 1e-4) if dtype in (torch.float32, torch.float64) else tol


def rounded_weights(model, dtype: torch.dtype):
    """A float32 copy of `model` (a bridge, `core.clone_model`) whose weights are rounded to `dtype` and back:
    computed in float32, it shows what rounding the weights alone changes — the part of a half-precision
    model's difference from float32 that is the same on every CPU (no half-precision kernel runs)."""
    from .hf import clone_model, hf_state_dict

    copy = clone_model(model)
    with torch.no_grad():
        for w in hf_state_dict(copy).values():
            if w.is_floating_point():
                w.copy_(w.to(dtype).to(w.dtype))
    return copy


def half_tolerance(dtype: torch.dtype, weights_error: float, rounds: int, scale: float = 1.0) -> float:
    """How far a result computed in half precision may be from float32: the error of rounding the weights
    (`weights_error`: the float32 result of `rounded_weights` minus the float32 one — exact, the same on any
    CPU) plus the computation's own roundings, at most u of the result's `scale` each; `rounds` of them in
    sequence (2 per layer forward, as many again backward) add in quadrature, with a margin of 8 (measured:
    ≤ 2.5·u·√rounds·scale over tests/core/test_precision.py, on AVX2 and ATEN_CPU_CAPABILITY=default kernels):

        tol = weights_error + 8 · u · √rounds · scale."""
    return float(weights_error) + 8 * unit_roundoff(dtype) * math.sqrt(rounds) * float(scale)


__all__ = ["Float32Activation", "float32_activations", "half_tolerance", "logit_tolerance", "rounded_weights",
           "unit_roundoff"]
