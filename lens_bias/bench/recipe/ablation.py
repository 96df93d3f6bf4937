"""Exhaustive ablation on the Hugging Face modules: the cached residuals, the mean-ablation values,
and the effect of ablating every head, every neuron of chosen layers, every (layer, position)
output and chosen sets of units (plain PyTorch; see forward.py).

effect(unit) = metric(unablated) − metric(unit ablated): positive means the unit supports the metric.
"""

from __future__ import annotations

import time

import torch

from .casebatch import CaseBatch, case_metrics, final_hidden
from .forward import Hooks, dh, embed, head_hook, run_blocks


@torch.no_grad()
def residuals(model, cb: CaseBatch):
    """Inputs of every block [L+1] (the last = final residual before ln_f); `.posts[l]` the MLP
    activations (mlp.act output) of layer l."""
    hs = Resid([embed(model, cb.ids, cb.pos_ids)])
    for l in range(model.config.n_layer):
        with Hooks() as hk:
            hk.fwd(model.transformer.h[l].mlp.act, lambda m, a, o: hs.posts.append(o))
            hs.append(run_blocks(model, hs[-1], l, cb.mask, l + 1))
    return hs


class Resid(list):
    def __init__(self, *a):
        super().__init__(*a)
        self.posts = []


@torch.no_grad()
def capture_means(model, cb: CaseBatch) -> dict:
    """Position-independent means over the case's real tokens: head z [L,H,dh], neuron post [L,d_mlp],
    MLP out and attn out [L,d] (the mean-ablation values)."""
    L, H, d = model.config.n_layer, model.config.n_head, dh(model)
    store = {}
    with Hooks() as hk:
        for l, blk in enumerate(model.transformer.h):
            hk.pre(blk.attn.c_proj, (lambda l: lambda m, a: store.__setitem__(("z", l), a[0]))(l))
            hk.fwd(blk.mlp.act, (lambda l: lambda m, a, o: store.__setitem__(("post", l), o))(l))
            hk.fwd(blk.mlp, (lambda l: lambda m, a, o: store.__setitem__(("mlp", l), o))(l))
            hk.fwd(blk.attn, (lambda l: lambda m, a, o: store.__setitem__(("attn", l), o[0]))(l))
        final_hidden(model, cb)
    r = cb.real
    means = {}
    for (k, l), v in store.items():
        means[(k, l)] = v[r].mean(0)
    means["z"] = torch.stack([means[("z", l)].view(H, d) for l in range(L)])
    return means


def _chunks(seq, n):
    for i in range(0, len(seq), n):
        yield seq[i:i + n]


@torch.no_grad()
def sweep_heads(model, cb: CaseBatch, base: dict, means: dict, hs, log=None) -> dict:
    """effect[metric][method] [L, H] of ablating each head's z at every position."""
    L, H, d = model.config.n_layer, model.config.n_head, dh(model)
    out = {m: {k: torch.zeros(L, H) for k in ("zero", "mean")} for m in base}
    n = cb.n
    for l in range(L):
        units = [(h, meth) for h in range(H) for meth in ("zero", "mean")]
        R = len(units)
        vals = [torch.zeros(d) if meth == "zero" else means["z"][l, h] for h, meth in units]
        rows = [(i * n, (i + 1) * n) for i in range(R)]
        with Hooks() as hk:
            hk.pre(model.transformer.h[l].attn.c_proj, head_hook(model, l, (rows, [h for h, _ in units]), vals))
            hf = final_hidden(model, cb, hs[l].repeat(R, 1, 1), l, R)
        mets = cb.metrics(model, hf)
        for name, v in mets.items():
            for i, (h, meth) in enumerate(units):
                out[name][meth][l, h] = base[name] - v[i]
    return out


def set_ablation_hooks(hk: Hooks, model, group: list[dict], means: dict, n: int) -> None:
    """Hooks ablating set i of `group` in rows i·n … (i+1)·n: heads' z (pre-hook on attn.c_proj)
    and neurons (mlp.act output), zero or mean."""
    d = dh(model)
    for l in range(model.config.n_layer):
        blk = model.transformer.h[l]
        hspec = [(i, h, s["method"]) for i, s in enumerate(group) for (ll, h) in s.get("heads", []) if ll == l]
        nspec = [(i, j, s["method"]) for i, s in enumerate(group) for (ll, j) in s.get("neurons", []) if ll == l]
        if hspec:
            def fh(m, a, hspec=hspec, l=l):
                x = a[0].clone()
                for i, h, meth in hspec:
                    x[i * n:(i + 1) * n, :, h * d:(h + 1) * d] = 0.0 if meth == "zero" else means["z"][l, h]
                return (x,)
            hk.pre(blk.attn.c_proj, fh)
        if nspec:
            def fn(m, a, o, nspec=nspec, l=l):
                o = o.clone()
                for i, j, meth in nspec:
                    o[i * n:(i + 1) * n, :, j] = 0.0 if meth == "zero" else means[("post", l)][j]
                return o
            hk.fwd(blk.mlp.act, fn)


@torch.no_grad()
def ablate_sets(model, cb: CaseBatch, base: dict, means: dict, sets: list[dict], batch: int = 8) -> list[dict]:
    """Each set: {'heads': [(l,h)], 'neurons': [(l,i)], 'method': 'zero'|'mean'}. Returns effects per
    metric for each set (full forwards, `batch` sets at a time)."""
    n = cb.n
    results = []
    h0 = embed(model, cb.ids, cb.pos_ids)
    for group in _chunks(sets, batch):
        R = len(group)
        with Hooks() as hk:
            set_ablation_hooks(hk, model, group, means, n)
            hf = final_hidden(model, cb, h0.repeat(R, 1, 1), 0, R)
        mets = cb.metrics(model, hf)
        for i in range(R):
            results.append({k: float(base[k] - v[i]) for k, v in mets.items()})
    return results


@torch.no_grad()
def sweep_neurons(model, cb: CaseBatch, base: dict, means: dict, hs, layers: list[int], chunk: int = 32,
                  positions: torch.Tensor | None = None, log=None) -> dict:
    """effect[metric][method] [len(layers), d_mlp] of ablating each MLP neuron (its mlp.act output)
    at every position (or only at `positions` [n], one per sequence).

    Exact shortcut: ablating neuron i of layer l changes that block's output by
    -(a_i - v)·W_out[i] and nothing else, so each ablated run starts from the cached output of
    block l plus that change and runs blocks l+1.. (checked against hooked full forwards in
    compute_truth's self-check)."""
    D = model.config.n_inner
    n, T, d = cb.n, cb.ids.shape[1], model.config.n_embd
    out = {m: {k: torch.zeros(len(layers), D) for k in ("zero", "mean")} for m in base}
    t0 = time.time()
    for li, l in enumerate(layers):
        post = hs.posts[l]  # [n, T, D]
        Wout = model.transformer.h[l].mlp.c_proj.weight  # [D, d]
        h_out = hs[l + 1]
        if positions is not None:
            pmask = torch.zeros(n, T)
            pmask[torch.arange(n), positions] = 1.0
        for meth in ("zero", "mean"):
            for idx in _chunks(list(range(D)), chunk):
                R = len(idx)
                idx_t = torch.tensor(idx)
                val = torch.zeros(R) if meth == "zero" else means[("post", l)][idx_t]
                diff = post[:, :, idx_t] - val  # [n, T, R]
                if positions is not None:
                    diff = diff * pmask[:, :, None]
                delta = -torch.einsum("ntr,rd->rntd", diff, Wout[idx_t])
                h = (h_out[None] + delta).reshape(R * n, T, d)
                hf = final_hidden(model, cb, h, l + 1, R)
                mets = cb.metrics(model, hf)
                for name, v in mets.items():
                    out[name][meth][li, idx_t] = base[name] - v
        if log:
            log(f"    neurons layer {l}: {time.time() - t0:.0f}s")
    return out


@torch.no_grad()
def sweep_positions(model, cb: CaseBatch, base: dict, means: dict, hs) -> dict:
    """effect[metric][kind_method] [L, T] of ablating the MLP output / attention output of one layer
    at one position (all sequences must share their length for positions to be aligned)."""
    L, T = model.config.n_layer, cb.ids.shape[1]
    n = cb.n
    out = {m: {} for m in base}
    for kind in ("mlp", "attn"):
        for meth in ("zero", "mean"):
            res = {m: torch.zeros(L, T) for m in base}
            for l in range(L):
                R = T
                val = torch.zeros_like(means[(kind, l)]) if meth == "zero" else means[(kind, l)]

                def fn(m, a, o, R=R, val=val, kind=kind):
                    x = (o[0] if kind == "attn" else o).clone()
                    v = x.view(R, n, T, -1)
                    v[torch.arange(R), :, torch.arange(R), :] = val
                    return (x,) + tuple(o[1:]) if kind == "attn" else x

                blk = model.transformer.h[l]
                with Hooks() as hk:
                    hk.fwd(blk.attn if kind == "attn" else blk.mlp, fn)
                    hf = final_hidden(model, cb, hs[l].repeat(R, 1, 1), l, R)
                mets = cb.metrics(model, hf)
                for name, v in mets.items():
                    res[name][l] = base[name] - v
            for name in base:
                out[name][f"{kind}_{meth}"] = res[name]
    return out


def mlp_layer_effects(model, cb: CaseBatch, base: dict, means: dict) -> dict:
    """effect[metric][method] [L] of ablating a whole MLP layer's output at every position."""
    L = model.config.n_layer
    out = {m: {k: torch.zeros(L) for k in ("zero", "mean")} for m in base}
    for l in range(L):
        for meth in ("zero", "mean"):
            val = torch.zeros_like(means[("mlp", l)]) if meth == "zero" else means[("mlp", l)]
            with Hooks() as hk:
                hk.fwd(model.transformer.h[l].mlp, lambda m, a, o, val=val: o * 0 + val)
                got = case_metrics(model, cb)
            for k in base:
                out[k][meth][l] = base[k] - got[k]
    return out


