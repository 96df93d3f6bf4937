"""Ablation of attention heads (hook_z) and MLP neurons (mlp.hook_post): zero, mean or resample.

Hook factories return TransformerLens fwd_hooks lists, usable with `model.hooks(fwd_hooks=...)`
or `run_with_hooks`; the context managers compose (`with ablate_heads(...), ablate_neurons(...)`).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Sequence

import torch
from torch import Tensor

from .errors import LensBiasError
from .prompts import PromptSet

METHODS = ("zero", "mean", "resample")


def _check(model, units: Sequence[tuple[int, int]], what: str, size: int):
    units = [tuple(int(v) for v in u) for u in units]
    for l, i in units:
        if not 0 <= l < model.cfg.n_layers:
            raise LensBiasError(f"{what} ({l}, {i}): layer {l} out of range (the model has {model.cfg.n_layers} layers)")
        if not 0 <= i < size:
            raise LensBiasError(f"{what} ({l}, {i}): index {i} out of range (the model has {size} {what}s per layer)")
    return units


def _reference_acts(model, reference, names: list[str]) -> dict[str, Tensor]:
    """Activations of the reference prompts at `names`, with the real (non-pad) positions mask."""
    if reference is None:
        raise LensBiasError("mean and resample ablation need a reference set: pass reference=PromptSet or tokens")
    if isinstance(reference, PromptSet):
        tokens, mask = reference.tokens, reference.attention_mask
    else:
        tokens = torch.as_tensor(reference)
        mask = torch.ones_like(tokens)
    if tokens.numel() == 0:
        raise LensBiasError("the reference set is empty")
    device = next(model.parameters()).device
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens.to(device), attention_mask=mask.to(device),
                                        names_filter=lambda n: n in names)
    return {n: cache[n] for n in names}, mask.to(device)


def _hooks(model, units, method, reference, seed, template, what, size):
    if method not in METHODS:
        raise LensBiasError(f"unknown ablation method {method!r}; choose one of {METHODS}")
    units = _check(model, units, what, size)
    by_layer: dict[int, list[int]] = {}
    for l, i in units:
        by_layer.setdefault(l, []).append(i)
    names = {l: template.format(l) for l in by_layer}
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

            def hook(x, hook, act=act):
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


def head_ablation_hooks(model, heads: Sequence[tuple[int, int]], method: str = "zero",
                        reference: PromptSet | Tensor | None = None, seed: int = 0) -> list:
    """fwd_hooks ablating heads (layer, head) at blocks.{l}.attn.hook_z: z ← 0, mean z over the
    reference set (over prompts and real positions), or z of a randomly drawn reference prompt."""
    return _hooks(model, heads, method, reference, seed, "blocks.{}.attn.hook_z", "head", model.cfg.n_heads)


def neuron_ablation_hooks(model, neurons: Sequence[tuple[int, int]], method: str = "zero",
                          reference: PromptSet | Tensor | None = None, seed: int = 0) -> list:
    """fwd_hooks ablating MLP neurons (layer, neuron) at blocks.{l}.mlp.hook_post (same methods)."""
    return _hooks(model, neurons, method, reference, seed, "blocks.{}.mlp.hook_post", "neuron", model.cfg.d_mlp)


def combine_hooks(*hook_lists) -> list:
    """One fwd_hooks list from several (hooks on the same point run in order)."""
    return [h for hooks in hook_lists for h in hooks]


@contextmanager
def ablate_heads(model, heads, method: str = "zero", reference=None, seed: int = 0):
    """Context manager: run the model with `heads` ablated."""
    with model.hooks(fwd_hooks=head_ablation_hooks(model, heads, method, reference, seed)):
        yield model


@contextmanager
def ablate_neurons(model, neurons, method: str = "zero", reference=None, seed: int = 0):
    """Context manager: run the model with `neurons` ablated."""
    with model.hooks(fwd_hooks=neuron_ablation_hooks(model, neurons, method, reference, seed)):
        yield model


def prune_heads(model, heads: Sequence[tuple[int, int]], *, inplace: bool = False):
    """Permanent pruning: zero each head's slice of the attention output projection (the W_O rows
    that read its z) — equal to zero-ablating hook_z, and it exports; on a copy unless `inplace`."""
    from .export import hf_state_dict
    from .models import clone_model, out_projection

    heads = _check(model, heads, "head", model.cfg.n_heads)
    target = model if inplace else clone_model(model)
    d_head = target.cfg.d_head
    for l, h in heads:
        with torch.no_grad():
            out_projection(target, l, "attn")[h * d_head:(h + 1) * d_head].zero_()
    hf_state_dict(target)  # the edited weights must stay reachable under Hugging Face names
    return target


def random_heads(model, n: int, seed: int = 0, exclude=()) -> list[tuple[int, int]]:
    """n distinct random (layer, head) pairs not in `exclude` — the baseline for a head selection."""
    import random

    pool = [(l, h) for l in range(model.cfg.n_layers) for h in range(model.cfg.n_heads) if (l, h) not in set(exclude)]
    if not 0 < n <= len(pool):
        raise LensBiasError(f"n = {n} heads asked for, but only {len(pool)} are available")
    return random.Random(seed).sample(pool, n)
