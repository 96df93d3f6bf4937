"""Half precision: what keeps bfloat16 / float16 models finite and close to float32.

- Sums over prompts, tokens or chunks are taken in float32 (or float64) by the methods.
- In float16, activation functions written out in Python overflow: GPT-2's GELU (tanh form) cubes its
  input, so x³ is inf above |x| ≈ 40 — harmless in the forward (tanh(inf) = 1) but 0·inf = NaN in
  every gradient through it (attribution, CRISPR, NASA). `float32_activations` makes the Hugging
  Face activation modules compute in float32 and return float16 — the same function, no overflow.
  load_model and clone_model apply it to float16 models.
"""

from __future__ import annotations

import torch


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


__all__ = ["Float32Activation", "float32_activations"]
