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

The maths is cut as ROME's: keys.py (H, H₀), targets.py (R), solve.py (Δ), this file (the edit).
"""

from __future__ import annotations

import random
import warnings
from typing import Literal

import torch
from tqdm.auto import tqdm

from ...core.errors import LensBiasError
from ...core.hf import clone_model, out_projection
from ...core.hooks import device_of
from ...core.models import HookedModel
from ...core.prompts import PromptSet
from ...locate.tracing import trace_sites
from ...tasks.capability import bias_values, text_lines
from ...tasks.gender import professions_prompts
from ..edits import Mitigation
from ..methods import MitigationMethod, MitigationRequest, MitigationRun, Occupations
from .keys import EditPosition, edit_positions, mlp_keys, preservation_keys
from .solve import lsdm_delta
from .targets import target_residuals


def _check_layers(model, layers) -> list[int]:
    layers = sorted({int(l) for l in layers})
    if not layers:
        raise LensBiasError("no layers to edit")
    bad = [l for l in layers if not 0 <= l < model.cfg.n_layers]
    if bad:
        raise LensBiasError(f"layer(s) {bad} out of range: the model has {model.cfg.n_layers} layers")
    return layers


def lsdm_edit(
    model: HookedModel,
    ps: PromptSet,
    preserve: str | list[str],
    *,
    layers: list[int] | None = None,
    position: EditPosition | None = None,
    target: Literal["zero", "mirror"] | float = "zero",
    lam: float = 10.0,
    ridge: float = 1e-3,
    inplace: bool = False,
    batch_size: int = 32,
    progress: bool = True,
) -> Mitigation:
    """Edit the MLP output weights of `layers` so the bias prompts' logit difference goes to the
    target ('zero', 'mirror' = −LD, or a number) while preserving outputs on the `preserve` text:
    W_out ← W_out + Δ, Δ = (HᵀH/n + λH₀ᵀH₀/n₀ + εsI)⁻¹HᵀR/n.

    Layers/position default to the top MLP site under causal tracing (`trace_sites`). `lam` weights
    preservation (on the organism λ = 10 generalised best to held-out occupations and templates:
    smaller spreads the edit over neurons that also fire on the edit prompts, larger under-edits).
    Works on a copy unless `inplace`. The report holds layers, position, per-layer ‖Δ‖ and the
    mean (and mean |·|) logit difference of the edit prompts before and after.
    """
    if len(ps) == 0:
        raise LensBiasError("no bias prompts to edit on")
    preserve = text_lines(preserve)
    if layers is None or position is None:
        site = trace_sites(model, ps).iloc[0]
        layers = [int(site["layer"])] if layers is None else layers
        position = str(site["position"]) if position is None else position  # pyright: ignore[reportAssignmentType] - trace_sites' positions are EditPosition names
    layers = _check_layers(model, layers)
    positions = edit_positions(ps, position)  # pyright: ignore[reportArgumentType] - position is filled above
    target_model = model if inplace else clone_model(model)
    dev = device_of(target_model)
    ps_dev, pos_dev = ps.to(dev), positions.to(dev)
    ld0 = bias_values(target_model, ps_dev, batch_size)
    if target == "zero":
        goal_final = torch.zeros_like(ld0)
    elif target == "mirror":
        goal_final = -ld0
    elif isinstance(target, (int, float)) and not isinstance(target, bool):
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
        goal = ld + (goal_final - ld) / (len(layers) - j)  # the change still needed, spread over the layers left
        residuals = target_residuals(target_model, ps_dev, layer, pos_dev, goal, batch_size)
        delta = lsdm_delta(keys, residuals, keys0, lam=lam, ridge=ridge)
        with torch.no_grad():
            w = out_projection(target_model, layer, "mlp")
            w.add_(delta.to(w.dtype))
        norms[layer] = float(delta.norm())
        ld = bias_values(target_model, ps_dev, batch_size)
    ld1 = ld
    if ld1.abs().mean() > ld0.abs().mean():
        warnings.warn(f"the LSDM edit made the bias on its own prompts larger (mean |LD| {ld0.abs().mean():.3f} → "
                      f"{ld1.abs().mean():.3f}): this site ({layers}, {position!r}) does not carry it; trace_sites "
                      "ranks the sites", stacklevel=2)
    return Mitigation.of(model, target_model, "lsdm", layers=layers, position=position, delta_norms=norms,
                         bias_before=float(ld0.mean()), bias_after=float(ld1.mean()),
                         abs_bias_before=float(ld0.abs().mean()), abs_bias_after=float(ld1.abs().mean()),
                         target=target, lam=lam, ridge=ridge)


# ---------------------------------------------------------------------------------------
# As a mitigation of `lens-bias mitigate` (lens_bias.mitigate.registry)
# ---------------------------------------------------------------------------------------
def occupation_split(model: HookedModel, occupations: Occupations, seed: int = 0) -> tuple[PromptSet, PromptSet]:
    """(edit, held-out) she/he prompt sets: 70% of the occupations × half the templates (both shuffled
    with `seed`) to edit on, with the counterfactual twins the site choice needs; the rest held out."""
    def she_he(words, templates, corrupt_with=None):
        return professions_prompts(model, words, templates, answers=(" she", " he"), corrupt_with=corrupt_with)

    rng = random.Random(seed)
    words, templates = occupations.words[:], occupations.templates[:]
    rng.shuffle(words)
    rng.shuffle(templates)
    cut_w, cut_t = max(1, int(0.7 * len(words))), max(1, len(templates) // 2)
    edit = she_he(words[:cut_w], templates[:cut_t], occupations.twins)
    held_out = she_he(words[cut_w:] or words, templates[cut_t:] or templates)
    return edit, held_out


def _run(model: HookedModel, request: MitigationRequest, occupations: Occupations) -> MitigationRun:
    """LSDM at the site causal tracing picks, judged on the held-out occupations and templates."""
    edit_set, held_out = occupation_split(model, occupations, request.seed)
    result = lsdm_edit(model, edit_set, request.neutral_text, progress=request.progress)
    res = result.report
    norm = sum(v ** 2 for v in res["delta_norms"].values()) ** 0.5
    return MitigationRun(result, {
        "bias_held_out": lambda m: bias_values(m, held_out).mean().item(),
        "abs_bias_held_out": lambda m: bias_values(m, held_out).abs().mean().item(),
    }, [f"LSDM edit of MLP layer(s) {res['layers']} at the {res['position']} token, ‖Δ‖ = {norm:.3f}; edit prompts "
        f"LD {res['bias_before']:+.3f} → {res['bias_after']:+.3f}"])


RUN = MitigationMethod(
    name="lsdm",
    summary="causal tracing + closed-form least-squares edit of an MLP's W_out (Cai et al. 2024)",
    units=None,
    data="occupations",
    run=_run,
    help="70% of the occupations and half the templates are edited on, the rest are the held-out evaluation",
)
