"""LSDM — Least Square Debias Method (Cai et al. 2024, "Locating and Mitigating Gender Bias in
Large Language Models"): causal tracing finds the MLP layers that carry the gender association;
a closed-form least-squares edit of their output weights removes it while preserving the
outputs on other text (ROME/MEMIT's key–value view of an MLP).

Derivation. An MLP's output layer maps keys k = hook_post activations (d_mlp) to values
v = k W_out (d_model). Collect keys H (n × d_mlp) at the edit position of the bias prompts and
preservation keys H₀ (n₀ × d_mlp) at every token of neutral text and at the bias prompts' other
tokens (so the edit does not leak into them). For each bias prompt i find the
change r_i of the MLP output that moves its bias metric (logit difference ' she' − ' he') to
the target (0, or the anti-stereotype mirror −LD): r_i = α_i ĝ along the gender direction ĝ
(the mean gradient of the logit difference with respect to the MLP output, unit length), α_i by
Newton steps on the real model. The edit Δ (d_mlp × d_model) minimises

    (1/n) Σ_i ‖k_i Δ − r_i‖² + λ (1/n₀) Σ_j ‖k₀_j Δ‖² + ε s ‖Δ‖²

— reach the targets, leave preserved outputs unchanged (λ weights C₀ = H₀ᵀH₀/n₀, the
preservation covariance of ROME/MEMIT), ridge ε scaled by s, the mean diagonal of the key
covariances (so ε is scale-free). Setting the gradient to zero:

    Δ = (HᵀH/n + λ C₀ + ε s I)⁻¹ HᵀR/n,      W_out ← W_out + Δ.

With several layers the change still needed is spread over the layers left, one layer at a
time, keys re-read after each edit (MEMIT's schedule).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from .errors import LensBiasError
from .models import clone_model, out_projection
from .metrics import logit_diff
from .prompts import PromptSet

POSITIONS = ("subject", "last")


@dataclass
class LSDMResult:
    """What an LSDM edit did: layers, position, per-layer edit norms, bias before/after on the edit prompts."""

    layers: list[int]
    position: str
    delta_norms: dict[int, float]
    bias_before: float
    bias_after: float
    abs_bias_before: float
    abs_bias_after: float
    extra: dict = field(default_factory=dict)


def edit_positions(ps: PromptSet, position: str) -> Tensor:
    """Token index per prompt: 'subject' = last token of the subject (occupation), 'last' = answer position."""
    if position == "last":
        return ps.answer_pos
    if position == "subject":
        if ps.subject_spans is None:
            raise LensBiasError("position='subject' needs subject spans: build the PromptSet with subjects=[...]")
        return ps.subject_spans[:, 1] - 1
    raise LensBiasError(f"unknown edit position {position!r}; choose one of {POSITIONS}")


def _check_layers(model, layers) -> list[int]:
    layers = sorted({int(l) for l in layers})
    if not layers:
        raise LensBiasError("no layers to edit")
    bad = [l for l in layers if not 0 <= l < model.cfg.n_layers]
    if bad:
        raise LensBiasError(f"layer(s) {bad} out of range: the model has {model.cfg.n_layers} layers")
    return layers


def w_out(model, layer: int) -> Float[Tensor, "d_mlp d_model"]:
    """The MLP output weight of `layer` as a [d_mlp, d_model] view sharing the HF parameter's storage."""
    return out_projection(model, layer, "mlp")


def mlp_keys(model, ps: PromptSet, layer: int, positions: Tensor,
             batch_size: int = 32) -> tuple[Float[Tensor, "n d_mlp"], Float[Tensor, "m d_mlp"]]:
    """MLP hidden activations (hook_post) of `layer`: at one position per prompt (the edit keys),
    and at the prompts' other real tokens but BOS (context keys, to be preserved)."""
    name = f"blocks.{layer}.mlp.hook_post"
    dev = next(model.parameters()).device
    keys, context = [], []
    for start in range(0, len(ps), batch_size):
        b = ps[list(range(start, min(start + batch_size, len(ps))))].to(dev)
        pos = positions[start:start + len(b)].to(dev)
        with torch.no_grad():
            _, cache = model.run_with_cache(b.tokens, attention_mask=b.attention_mask, names_filter=[name])
        rows = torch.arange(len(b), device=dev)
        keys.append(cache[name][rows, pos].float())
        other = b.attention_mask.bool().clone()
        other[rows, pos] = False
        bos = model.tokenizer.bos_token_id
        if bos is not None:
            other &= b.tokens != bos  # BOS keys are the same in every prompt
        context.append(cache[name][other].float())
    return torch.cat(keys), torch.cat(context)


def preservation_keys(model, texts: str | list[str], layer: int, *, max_keys: int = 20000,
                      batch_size: int = 32) -> Float[Tensor, "n0 d_mlp"]:
    """MLP hidden activations of `layer` at every (non-pad, non-BOS) token of neutral text lines."""
    from .metrics import _lines

    tok = model.tokenizer
    dev = next(model.parameters()).device
    name = f"blocks.{layer}.mlp.hook_post"
    lines = _lines(texts)
    out, total = [], 0
    for i in range(0, len(lines), batch_size):
        enc = [([tok.bos_token_id] if tok.bos_token_id is not None else []) +
               tok(t, add_special_tokens=False)["input_ids"][: model.cfg.n_ctx - 1] for t in lines[i:i + batch_size]]
        width = max(len(e) for e in enc)
        ids = torch.tensor([e + [0] * (width - len(e)) for e in enc], device=dev)
        mask = torch.tensor([[1] * len(e) + [0] * (width - len(e)) for e in enc], device=dev)
        with torch.no_grad():
            _, cache = model.run_with_cache(ids, attention_mask=mask, names_filter=[name])
        keep = mask.bool()
        keep[:, 0] = False  # BOS keys are the same for every line
        out.append(cache[name][keep].float())
        total += out[-1].shape[0]
        if total >= max_keys:
            break
    return torch.cat(out)[:max_keys]


def bias_values(model, ps: PromptSet, batch_size: int = 32) -> Float[Tensor, " batch"]:
    """LD = logit(answer₀) − logit(answer₁) per prompt (e.g. ' she' − ' he'), batched, no gradients."""
    dev = next(model.parameters()).device
    out = []
    for b in ps.batches(batch_size):
        b = b.to(dev)
        with torch.no_grad():
            out.append(logit_diff(model(b.tokens, attention_mask=b.attention_mask), b).float())
    return torch.cat(out)


def _ld_with_shift(model, ps: PromptSet, layer: int, positions: Tensor, shift: Tensor) -> Tensor:
    """Logit difference per prompt with `shift` [n, d_model] added to the MLP output at each prompt's position."""
    rows = torch.arange(len(ps), device=shift.device)

    def add(x, hook):
        x = x.clone()
        x[rows, positions] = x[rows, positions] + shift.to(x.dtype)
        return x

    logits = model.run_with_hooks(ps.tokens, attention_mask=ps.attention_mask,
                                  fwd_hooks=[(f"blocks.{layer}.hook_mlp_out", add)])
    return logit_diff(logits, ps).float()


def gender_direction(model, ps: PromptSet, layer: int, positions: Tensor, batch_size: int = 32) -> Float[Tensor, " d_model"]:
    """ĝ = mean over prompts of ∂LD/∂(MLP output at the edit position), unit length."""
    dev = next(model.parameters()).device
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


def trace_sites(model, ps: PromptSet, *, noise: float = 3.0, seed: int = 0, samples: int = 1, progress: bool = False):
    """Causal tracing of MLP outputs summarised per (layer, position kind) — the mean indirect effect
    of restoring the MLP at the subject's last token and at the last token (pandas, best first)."""
    import pandas as pd

    from .tracing import causal_trace

    if ps.subject_spans is None:
        raise LensBiasError("tracing needs subject spans: build the PromptSet with subjects=[...]")
    groups: dict[tuple, list[int]] = {}
    lengths = ps.attention_mask.sum(1)
    for i in range(len(ps)):
        groups.setdefault((int(lengths[i]), int(ps.subject_spans[i, 1])), []).append(i)
    rows = []
    for (length, subj_end), idx in groups.items():
        traced = causal_trace(model, ps[idx], kinds=("mlp",), noise=noise, seed=seed, samples=samples,
                              progress=progress)["mlp"]
        layers = traced.extra.get("layers") or list(range(traced.values.shape[0]))
        for li, layer in enumerate(layers):
            for kind, pos in (("subject", subj_end - 1), ("last", length - 1)):
                rows.append({"layer": layer, "position": kind, "effect": float(traced.effect[li, pos]),
                             "n": len(idx)})
    df = pd.DataFrame(rows)
    df["weighted"] = df["effect"] * df["n"]
    out = df.groupby(["layer", "position"], as_index=False)[["weighted", "n"]].sum()
    out["effect"] = out["weighted"] / out["n"]
    return out.drop(columns=["weighted"]).sort_values("effect", ascending=False, key=abs).reset_index(drop=True)


def lsdm_edit(
    model,
    ps: PromptSet,
    preserve: str | list[str],
    *,
    layers: list[int] | None = None,
    position: str | None = None,
    target: str | float = "zero",
    lam: float = 10.0,
    ridge: float = 1e-3,
    inplace: bool = False,
    batch_size: int = 32,
    progress: bool = True,
):
    """Edit the MLP output weights of `layers` so the bias prompts' logit difference goes to the
    target ('zero', 'mirror' = −LD, or a number) while preserving outputs on the `preserve` text.

    Layers/position default to the top MLP site under causal tracing (`trace_sites`). `lam` weights
    preservation (on the organism λ = 10 generalised best to held-out occupations and templates:
    smaller spreads the edit over neurons that also fire on the edit prompts, larger under-edits).
    Works on a copy unless `inplace`; returns (edited model, LSDMResult).
    """
    from .metrics import _lines

    if len(ps) == 0:
        raise LensBiasError("no bias prompts to edit on")
    preserve = _lines(preserve)
    if layers is None or position is None:
        site = trace_sites(model, ps).iloc[0]
        layers = [int(site["layer"])] if layers is None else layers
        position = str(site["position"]) if position is None else position
    layers = _check_layers(model, layers)
    positions = edit_positions(ps, position)
    target_model = model if inplace else clone_model(model)
    dev = next(target_model.parameters()).device
    ps_dev, pos_dev = ps.to(dev), positions.to(dev)
    ld0 = bias_values(target_model, ps_dev, batch_size)
    if target == "zero":
        goal_final = torch.zeros_like(ld0)
    elif target == "mirror":
        goal_final = -ld0
    elif isinstance(target, (int, float)):
        goal_final = torch.full_like(ld0, float(target))
    else:
        raise LensBiasError(f"unknown target {target!r}; use 'zero', 'mirror' or a number")
    norms = {}
    ld = ld0
    for j, layer in enumerate(tqdm(layers, desc="LSDM layers", disable=not progress)):
        keys, context = mlp_keys(target_model, ps_dev, layer, pos_dev, batch_size)
        # preserve the neutral text's outputs and the edit prompts' own other tokens (the edit must
        # not leak into them, e.g. into the answer position when editing at the subject)
        keys0 = torch.cat([preservation_keys(target_model, preserve, layer, batch_size=batch_size).to(dev), context])
        g = gender_direction(target_model, ps_dev, layer, pos_dev, batch_size)
        goal = ld + (goal_final - ld) / (len(layers) - j)  # the change still needed, spread over the layers left
        alphas = []
        for s in range(0, len(ps), batch_size):
            idx = list(range(s, min(s + batch_size, len(ps))))
            alphas.append(_alphas(target_model, ps_dev[idx], layer, pos_dev[idx], g, goal[idx]))
        residuals = torch.cat(alphas)[:, None] * g[None, :]
        delta = lsdm_delta(keys, residuals, keys0, lam=lam, ridge=ridge)
        with torch.no_grad():
            w = w_out(target_model, layer)
            w.add_(delta.to(w.dtype))
        norms[layer] = float(delta.norm())
        ld = bias_values(target_model, ps_dev, batch_size)
    ld1 = ld
    if ld1.abs().mean() > ld0.abs().mean():
        warnings.warn(f"the LSDM edit made the bias on its own prompts larger (mean |LD| {ld0.abs().mean():.3f} → "
                      f"{ld1.abs().mean():.3f}): this site ({layers}, {position!r}) does not carry it; trace_sites "
                      "ranks the sites")
    result = LSDMResult(layers=layers, position=position, delta_norms=norms,
                        bias_before=float(ld0.mean()), bias_after=float(ld1.mean()),
                        abs_bias_before=float(ld0.abs().mean()), abs_bias_after=float(ld1.abs().mean()),
                        extra={"target": target, "lam": lam, "ridge": ridge})
    return target_model, result


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
