"""The LSDM solve: the closed-form least-squares edit of an MLP's W_out (Cai et al. 2024)."""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor

from ...core.errors import LensBiasError


def lsdm_delta(keys: Float[Tensor, "n d_mlp"], residuals: Float[Tensor, "n d_model"],
               preserve: Float[Tensor, "n0 d_mlp"], lam: float = 1.0, ridge: float = 1e-3) -> Float[Tensor, "d_mlp d_model"]:
    """Δ = (HᵀH/n + λ H₀ᵀH₀/n₀ + ε·s·I)⁻¹ HᵀR/n with s the mean diagonal of the key covariances (scale-free ridge)."""
    H, R, H0 = keys.double(), residuals.double(), preserve.double()
    if H.shape[0] == 0 or H0.shape[0] == 0:
        raise LensBiasError("LSDM needs at least one edit key and one preservation key")
    A = H.T @ H / H.shape[0] + lam * (H0.T @ H0) / H0.shape[0]
    scale = A.diagonal().mean().clamp(min=1e-12)
    A = A + ridge * scale * torch.eye(A.shape[0], dtype=A.dtype, device=A.device)
    delta = torch.linalg.solve(A, H.T @ R / H.shape[0])
    if not torch.isfinite(delta).all():
        raise LensBiasError("the least-squares edit is not finite (NaN in the keys?)")
    return delta
