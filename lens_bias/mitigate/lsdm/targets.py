"""LSDM targets: the change r_i of the MLP output at the edit position that moves each bias prompt's
logit difference to its goal — r_i = α_i ĝ along the gender direction ĝ, α_i by Newton steps on
the real model (ROME's compute_v plays this role there)."""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor

from ...core.errors import LensBiasError
from ...core.hooks import device_of, hook_name
from ...core.metrics import logit_diff
from ...core.models import HookedModel
from ...core.prompts import PromptSet


def _ld_with_shift(model, ps: PromptSet, layer: int, positions: Tensor, shift: Tensor) -> Tensor:
    """Logit difference per prompt with `shift` [n, d_model] added to the MLP's value v = k W_out at each
    prompt's position (the MLP output, or in Gemma 2/3 what its post-MLP norm reads: what an edit of
    W_out changes by kΔ)."""
    rows = torch.arange(len(ps), device=shift.device)

    def add(x, hook):
        x = x.clone()
        x[rows, positions] = x[rows, positions] + shift.to(x.dtype)
        return x

    logits = model.run_with_hooks(ps.tokens, attention_mask=ps.attention_mask,
                                  fwd_hooks=[(hook_name("mlp_value", layer), add)])
    return logit_diff(logits, ps).float()


def gender_direction(model: HookedModel, ps: PromptSet, layer: int, positions: Tensor, batch_size: int = 32) -> Float[Tensor, " d_model"]:
    """ĝ = mean over prompts of ∂LD/∂(MLP output at the edit position), unit length."""
    dev = device_of(model)
    g = torch.zeros(model.cfg.d_model, device=dev)
    for start in range(0, len(ps), batch_size):
        idx = list(range(start, min(start + batch_size, len(ps))))
        shift = torch.zeros(len(idx), model.cfg.d_model, device=dev, requires_grad=True)
        ld = _ld_with_shift(model, ps[idx].to(dev), layer, positions[idx].to(dev), shift)
        g += torch.autograd.grad(ld.sum(), shift)[0].sum(0)
    if not torch.isfinite(g).all() or g.norm() < 1e-12:
        raise LensBiasError(f"the bias metric does not depend on layer {layer}'s MLP output at these positions")
    return g / g.norm()


def _alphas(model, ps, layer, positions, g, goal, steps: int = 8) -> Tensor:
    """α per prompt with LD(MLP output + α ĝ) = goal, by Newton steps on the real model."""
    alpha = torch.zeros(len(ps), device=g.device)
    for _ in range(steps):
        a = alpha.clone().requires_grad_(True)
        ld = _ld_with_shift(model, ps, layer, positions, a[:, None] * g)
        (slope,) = torch.autograd.grad(ld.sum(), a)
        err = (ld - goal).detach()
        if err.abs().max() < 1e-3:
            break
        slope = torch.where(slope.abs() < 1e-6, torch.full_like(slope, 1e-6), slope)
        alpha = alpha - (err / slope).clamp(-50, 50)
    return alpha.detach()


def target_residuals(model: HookedModel, ps: PromptSet, layer: int, positions: Tensor, goal: Float[Tensor, " batch"],
                     batch_size: int = 32) -> Float[Tensor, "batch d_model"]:
    """R: per prompt the change r_i = α_i ĝ of `layer`'s MLP output at its edit position that brings
    its logit difference to goal_i."""
    g = gender_direction(model, ps, layer, positions, batch_size)
    alphas = []
    for s in range(0, len(ps), batch_size):
        idx = list(range(s, min(s + batch_size, len(ps))))
        alphas.append(_alphas(model, ps[idx], layer, positions[idx], g, goal[idx]))
    return torch.cat(alphas)[:, None] * g[None, :]
