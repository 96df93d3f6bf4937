"""Ablation of attention heads (site 'head' = hook_z) and MLP neurons (site 'neuron' = mlp.hook_post):
zero, mean or resample — reversible, as hooks.

`ablation_hooks` returns a TransformerLens fwd_hooks list, usable with `model.hooks(fwd_hooks=...)`
or `run_with_hooks`; `head_ablation_hooks` / `neuron_ablation_hooks` fix its site; the context
manager `ablate(model, heads=..., neurons=...)` runs the model with both ablated.
"""

from __future__ import annotations

import functools
import random
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal, Sequence

import torch
from torch import Tensor

from ..core.errors import LensBiasError
from ..core.hooks import device_of, hook_name
from ..core.models import HookedModel
from ..core.prompts import PromptSet

AblationMethod = Literal["zero", "mean", "resample"]
METHODS = ("zero", "mean", "resample")
UnitSite = Literal["head", "neuron"]


def units_per_layer(model: HookedModel, site: UnitSite) -> int:
    """Heads per layer (site 'head') or MLP neurons per layer (site 'neuron')."""
    if site not in ("head", "neuron"):
        raise LensBiasError(f"units are heads or neurons, not {site!r}")
    return model.cfg.n_heads if site == "head" else model.cfg.d_mlp


def check_units(model: HookedModel, units: Sequence[tuple[int, int]], site: UnitSite) -> list[tuple[int, int]]:
    """(layer, index) pairs as ints; a clear error for a non-integer, out-of-range or repeated one."""
    what, size = site, units_per_layer(model, site)
    out = []
    for u in units:
        try:
            l, i = u
        except (TypeError, ValueError):
            raise LensBiasError(f"{what} {u!r} is not a (layer, index) pair") from None
        try:
            whole = not any(isinstance(v, bool) or not float(v).is_integer() for v in (l, i))
        except (TypeError, ValueError):
            whole = False
        if not whole:
            raise LensBiasError(f"{what} ({l}, {i}): layer and index must be whole numbers")
        out.append((int(l), int(i)))
    units = out
    twice = next((u for k, u in enumerate(units) if u in units[:k]), None)
    if twice is not None:
        raise LensBiasError(f"{what} {twice} is listed twice; give each {what} once")
    for l, i in units:
        if not 0 <= l < model.cfg.n_layers:
            raise LensBiasError(f"{what} ({l}, {i}): layer {l} out of range (the model has {model.cfg.n_layers} layers)")
        if not 0 <= i < size:
            raise LensBiasError(f"{what} ({l}, {i}): index {i} out of range (the model has {size} {what}s per layer)")
    return units


@dataclass
class Reference:
    """Reference activations for mean and resample ablation, computed once (`reference_activations`)
    and passed as `reference=` to any number of `ablation_hooks` calls: acts maps hook names to
    [batch, pos, ...] activations, mask marks the real (non-pad) positions."""

    acts: dict[str, Tensor]
    mask: Tensor


def reference_activations(model: HookedModel, reference: PromptSet | Tensor,
                          sites: Sequence[UnitSite] = ("head", "neuron")) -> Reference:
    """The reference set's activations at every layer of `sites`, from one forward: reuse them across
    ablations instead of running the reference again for each."""
    names = [hook_name(s, l) for s in sites for l in range(model.cfg.n_layers)]
    return Reference(*_reference_acts(model, reference, names))


def _reference_acts(model, reference, names: list[str]) -> tuple[dict[str, Tensor], Tensor]:
    """Activations of the reference prompts at `names`, with the real (non-pad) positions mask."""
    if isinstance(reference, Reference):
        missing = [n for n in names if n not in reference.acts]
        if missing:
            raise LensBiasError(f"the precomputed reference has no activations at {missing[0]}")
        return {n: reference.acts[n] for n in names}, reference.mask
    if reference is None:
        raise LensBiasError("mean and resample ablation need a reference set: pass reference=PromptSet or tokens")
    if isinstance(reference, PromptSet):
        tokens, mask = reference.tokens, reference.attention_mask
    else:
        tokens = torch.as_tensor(reference)
        mask = torch.ones_like(tokens)
    if tokens.numel() == 0:
        raise LensBiasError("the reference set is empty")
    device = device_of(model)
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens.to(device), attention_mask=mask.to(device),
                                        names_filter=lambda n: n in names)
    return {n: cache[n] for n in names}, mask.to(device)


def ablation_hooks(model: HookedModel, units: Sequence[tuple[int, int]], method: AblationMethod = "zero",
                   reference: PromptSet | Tensor | Reference | None = None, seed: int = 0, *, site: UnitSite) -> list:
    """fwd_hooks ablating units (layer, index) of `site`: 'head' (hook_z) or 'neuron' (mlp.hook_post).
    zero: a ← 0; mean: a ← its mean over the reference set's prompts and real positions; resample:
    a ← its value in a randomly drawn reference prompt. `reference` is a PromptSet, token ids, or a
    `Reference` from `reference_activations` (computed once, reused)."""
    if method not in METHODS:
        raise LensBiasError(f"unknown ablation method {method!r}; choose one of {METHODS}")
    units = check_units(model, units, site)
    by_layer: dict[int, list[int]] = {}
    for l, i in units:
        by_layer.setdefault(l, []).append(i)
    names = {l: hook_name(site, l) for l in by_layer}
    refs, mask = (None, None) if method == "zero" else _reference_acts(model, reference, list(names.values()))
    gen = torch.Generator().manual_seed(seed)
    hooks = []
    for l, idx in by_layer.items():
        index = torch.tensor(idx)
        if method == "mean":
            act = refs[names[l]]  # [b, p, units...]
            m = mask.to(act.dtype).view(*mask.shape, *([1] * (act.ndim - 2)))
            mean = (act * m).sum((0, 1)) / m.sum((0, 1))  # position-independent mean over real tokens
            value = mean[index.to(mean.device)]

            def hook(x, hook, index=index, value=value):
                x[:, :, index.to(x.device)] = value.to(x.dtype)
                return x
        elif method == "resample":
            act = refs[names[l]][:, :, index.to(refs[names[l]].device)]

            def hook(x, hook, act=act, index=index):
                rows = torch.randint(0, act.shape[0], (x.shape[0],), generator=gen)
                src = act[rows.to(act.device)]
                p = min(x.shape[1], src.shape[1])
                x[:, :p, index.to(x.device)] = src[:, :p].to(x.dtype)
                return x
        else:
            def hook(x, hook, index=index):
                x[:, :, index.to(x.device)] = 0.0
                return x
        hooks.append((names[l], hook))
    return hooks


#: fwd_hooks ablating heads (layer, head) at hook_z
head_ablation_hooks = functools.partial(ablation_hooks, site="head")
#: fwd_hooks ablating MLP neurons (layer, neuron) at mlp.hook_post
neuron_ablation_hooks = functools.partial(ablation_hooks, site="neuron")


def combine_hooks(*hook_lists) -> list:
    """One fwd_hooks list from several (hooks on the same point run in order)."""
    return [h for hooks in hook_lists for h in hooks]


@contextmanager
def ablate(model: HookedModel, *, heads: Sequence[tuple[int, int]] = (), neurons: Sequence[tuple[int, int]] = (),
           method: AblationMethod = "zero", reference=None, seed: int = 0):
    """Context manager: run the model with `heads` and `neurons` ablated."""
    hooks = []
    if heads:
        hooks += ablation_hooks(model, heads, method, reference, seed, site="head")
    if neurons:
        hooks += ablation_hooks(model, neurons, method, reference, seed, site="neuron")
    with model.hooks(fwd_hooks=hooks):
        yield model


def random_units(model: HookedModel, n: int, seed: int = 0, exclude=(), *, site: UnitSite) -> list[tuple[int, int]]:
    """n distinct random (layer, index) heads or neurons not in `exclude` — the baseline for a selection."""
    size = units_per_layer(model, site)
    excluded = {tuple(u) for u in exclude}
    pool = [(l, i) for l in range(model.cfg.n_layers) for i in range(size) if (l, i) not in excluded]
    if not 0 < n <= len(pool):
        raise LensBiasError(f"n = {n} {site}s asked for, but only {len(pool)} are available")
    return random.Random(seed).sample(pool, n)
