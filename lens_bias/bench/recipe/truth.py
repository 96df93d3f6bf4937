"""The ground truth of one case: single-unit ablations of every head, every MLP layer and every
neuron of the layers that matter, checked against hooked full forwards; pairs and cumulative top-k
sets; a summary for the card (plain PyTorch; see forward.py)."""

from __future__ import annotations

import itertools
import json
import random
import time
from dataclasses import dataclass, field

import torch

from .ablation import (
    ablate_sets,
    capture_means,
    mlp_layer_effects,
    residuals,
    sweep_heads,
    sweep_neurons,
    sweep_positions,
)
from .casebatch import CaseBatch, case_metrics
from .forward import Hooks, causal_mask, dh, embed, run_blocks

PRIMARY = "bias"
METHODS = ("zero", "mean")
KS_HEADS = [1, 2, 3, 4, 6, 8, 12, 16]
KS_NEURONS = [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64]
SELF_CHECK_TOL = 2e-3


def rank_of(values: torch.Tensor, index: tuple) -> int:
    """1-based rank of values[index] among all entries, largest first."""
    flat = values.reshape(-1)
    v = values[index]
    return int((flat > v).sum()) + 1


def top_units(t: torch.Tensor, k: int, layers=None):
    """The k entries of a [rows, units] tensor with the largest |value|: (layer, unit, value)."""
    flat = t.reshape(-1)
    idx = flat.abs().argsort(descending=True)[:k]
    W = t.shape[1]
    out = []
    for i in idx.tolist():
        r, c = divmod(i, W)
        out.append((layers[r] if layers is not None else r, c, float(flat[i])))
    return out


@dataclass
class Sweep:
    """What one case's truth has measured so far."""

    name: str
    base: dict
    means: dict
    hs: list
    heads: dict = field(default_factory=dict)
    mlp: dict = field(default_factory=dict)
    neurons: dict = field(default_factory=dict)
    neuron_layers: list = field(default_factory=list)
    T: dict = field(default_factory=dict)

    def put(self, key: str, value: torch.Tensor) -> None:
        self.T[f"{self.name}/{key}"] = value


def sweep_singles(model, cb: CaseBatch, name: str) -> Sweep:
    """The unablated metrics, the mean-ablation values, and every head and MLP layer ablated alone."""
    base = case_metrics(model, cb)
    sw = Sweep(name, base, capture_means(model, cb), residuals(model, cb))
    sw.heads = sweep_heads(model, cb, base, sw.means, sw.hs)
    sw.mlp = mlp_layer_effects(model, cb, base, sw.means)
    for m in base:
        sw.put(f"{m}/base", torch.tensor([base[m]]))
        for meth in METHODS:
            sw.put(f"{m}/heads_{meth}", sw.heads[m][meth])
            sw.put(f"{m}/mlp_layer_{meth}", sw.mlp[m][meth])
    return sw


def choose_neuron_layers(sw: Sweep, neuron_layers, auto_k: int, auto_min_layer: int, planted_neurons,
                         smoke: bool) -> list[int]:
    """'auto': the planted neurons' layers and the auto_k other layers (from auto_min_layer on)
    whose MLP ablation moves the metric most."""
    if neuron_layers == "auto":
        score = torch.maximum(sw.mlp[PRIMARY]["zero"].abs(), sw.mlp[PRIMARY]["mean"].abs())
        score[:auto_min_layer] = -1
        planted_layers = {l for l, _ in planted_neurons}
        extra = [l for l in score.argsort(descending=True).tolist() if l not in planted_layers][:auto_k]
        neuron_layers = sorted(set(extra) | planted_layers)
    return list(neuron_layers)[:1] if smoke else list(neuron_layers)


def neuron_chunk(cb: CaseBatch) -> int:
    """Neurons ablated per batched forward (memory ∝ chunk × tokens)."""
    return max(2, min(64, 6000 // (cb.n * cb.ids.shape[1])))


def sweep_all_neurons(model, cb: CaseBatch, sw: Sweep, log) -> None:
    """Every neuron of sw.neuron_layers ablated alone, at every position."""
    sw.neurons = sweep_neurons(model, cb, sw.base, sw.means, sw.hs, sw.neuron_layers, chunk=neuron_chunk(cb), log=log)
    sw.put("neuron_layers", torch.tensor(sw.neuron_layers))
    for m in sw.base:
        for meth in METHODS:
            sw.put(f"{m}/neurons_{meth}", sw.neurons[m][meth])


def self_check(model, cb: CaseBatch, sw: Sweep) -> float:
    """The shortcut sweeps against hooked full forwards for a few neurons and heads (max |diff|);
    a RuntimeError above SELF_CHECK_TOL."""
    L, layers = model.config.n_layer, sw.neuron_layers
    chk_rng = random.Random(0)
    chk = [(layers[0], chk_rng.randrange(model.config.n_inner)) for _ in range(3)]
    chk += [(layers[-1], int(sw.neurons[PRIMARY]["zero"][-1].abs().argmax()))]
    chk_sets = [{"neurons": [u], "method": m} for u in chk for m in METHODS]
    chk_sets += [{"heads": [(l, 0)], "method": "mean"} for l in (0, L - 1)]
    got = ablate_sets(model, cb, sw.base, sw.means, chk_sets)
    exp = [float(sw.neurons[PRIMARY][m][layers.index(u[0]), u[1]]) for u in chk for m in METHODS]
    exp += [float(sw.heads[PRIMARY]["mean"][l, 0]) for l in (0, L - 1)]
    diff = max(abs(g[PRIMARY] - e) for g, e in zip(got, exp))
    if diff > SELF_CHECK_TOL:
        raise RuntimeError(f"ablation self-check failed for {sw.name}: max diff {diff}")
    return diff


def sweep_position_effects(model, cb: CaseBatch, sw: Sweep, positions: bool, pos_neuron_sweeps, smoke: bool) -> None:
    """Optionally every (layer, position) MLP/attention output ablated; neuron sweeps restricted to
    one position per sequence: (tag, layers, positions [n])."""
    if positions:
        pos = sweep_positions(model, cb, sw.base, sw.means, sw.hs)
        for m in sw.base:
            for k, v in pos[m].items():
                sw.put(f"{m}/pos_{k}", v)
    for tag, layers, ppos in pos_neuron_sweeps:
        if smoke:
            layers = layers[:1]
        res = sweep_neurons(model, cb, sw.base, sw.means, sw.hs, layers, chunk=neuron_chunk(cb), positions=ppos)
        sw.put(f"neuron_layers_{tag}", torch.tensor(layers))
        for m in sw.base:
            for meth in METHODS:
                sw.put(f"{m}/neurons_{tag}_{meth}", res[m][meth])


def neuron_order(sw: Sweep, score: torch.Tensor) -> list[tuple[int, int]]:
    """(layer, neuron) of the swept neurons, largest `score` first."""
    W = score.shape[1]
    order = score.reshape(-1).argsort(descending=True).tolist()
    return [(sw.neuron_layers[r], c) for r, c in (divmod(i, W) for i in order)]


def unit_pairs(sw: Sweep, planted_heads, planted_neurons, extra_pairs) -> tuple[list, list]:
    """Head pairs among the top 8 heads (by max |zero|, |mean|), the planted ones and `extra_pairs`;
    neuron pairs likewise."""
    hz, hm = sw.heads[PRIMARY]["zero"], sw.heads[PRIMARY]["mean"]
    hscore = torch.maximum(hz.abs(), hm.abs())
    top_h = [tuple(divmod(i, hz.shape[1])) for i in hscore.reshape(-1).argsort(descending=True)[:8].tolist()]
    hset = list(dict.fromkeys(top_h + [tuple(h) for h in planted_heads]))
    hpairs = list(itertools.combinations(hset, 2)) + [tuple(map(tuple, p)) for p in extra_pairs]
    hpairs = list(dict.fromkeys(tuple(sorted(p)) for p in hpairs))
    nz, nm = sw.neurons[PRIMARY]["zero"], sw.neurons[PRIMARY]["mean"]
    top_n = neuron_order(sw, torch.maximum(nz.abs(), nm.abs()))[:8]
    nset = list(dict.fromkeys(top_n + [tuple(n) for n in planted_neurons if n[0] in sw.neuron_layers]))
    return hpairs, list(itertools.combinations(nset, 2))


def ablation_sets(sw: Sweep, hpairs, npairs, planted_heads, planted_neurons) -> tuple[list, list, list]:
    """The sets ablated together, in the order `read_sets` reads them: pairs, cumulative top-k by
    single zero effect (largest positive first), then all planted units."""
    hz = sw.heads[PRIMARY]["zero"]
    hord = [tuple(divmod(i, hz.shape[1])) for i in hz.reshape(-1).argsort(descending=True).tolist()]
    nord = neuron_order(sw, sw.neurons[PRIMARY]["zero"])
    sets = []
    for meth in METHODS:
        sets += [{"heads": list(p), "method": meth} for p in hpairs]
        sets += [{"neurons": list(p), "method": meth} for p in npairs]
    for meth in METHODS:
        sets += [{"heads": hord[:k], "method": meth} for k in KS_HEADS]
        sets += [{"neurons": nord[:k], "method": meth} for k in KS_NEURONS]
    for planted, kind in ((planted_neurons, "neurons"), (planted_heads, "heads")):
        if planted:
            sets += [{kind: [tuple(u) for u in planted], "method": meth} for meth in METHODS]
    return sets, hord, nord


def read_sets(sw: Sweep, res: list[dict], hpairs, npairs, hord, nord, planted_heads, planted_neurons):
    """Store the set ablations' effects; returns (pair results per method, planted-together results)."""
    it = iter(res)
    pairs = {}
    for meth in METHODS:
        hp = [next(it) for _ in hpairs]
        npv = [next(it) for _ in npairs]
        for m in sw.base:
            sw.put(f"{m}/head_pairs_{meth}", torch.tensor([r[m] for r in hp]))
            sw.put(f"{m}/neuron_pairs_{meth}", torch.tensor([r[m] for r in npv]) if npv else torch.zeros(0))
        pairs[meth] = hp, npv
    for kind, ps in (("head", hpairs), ("neuron", npairs)):
        index = torch.tensor([[a[0], a[1], b[0], b[1]] for a, b in ps]) if ps else torch.zeros(0, 4)
        sw.put(f"{kind}_pairs_index", index)
    for meth in METHODS:
        ch = [next(it) for _ in KS_HEADS]
        cn = [next(it) for _ in KS_NEURONS]
        for m in sw.base:
            sw.put(f"{m}/heads_cumulative_{meth}", torch.tensor([r[m] for r in ch]))
            sw.put(f"{m}/neurons_cumulative_{meth}", torch.tensor([r[m] for r in cn]))
    sw.put("heads_cumulative_k", torch.tensor(KS_HEADS))
    sw.put("neurons_cumulative_k", torch.tensor(KS_NEURONS))
    sw.put("heads_cumulative_order", torch.tensor(hord[:16]))
    sw.put("neurons_cumulative_order", torch.tensor(nord[:64]))
    together = {}
    if planted_neurons:
        together["neurons"] = {meth: next(it) for meth in METHODS}
    if planted_heads:
        together["heads"] = {meth: next(it) for meth in METHODS}
    return pairs, together


def top_heads_summary(sw: Sweep, m: str) -> list[dict]:
    """The 8 heads with the largest single effect on metric m (zero and mean)."""
    h = sw.heads[m]
    top = top_units(torch.maximum(h["zero"].abs(), h["mean"].abs()), 8)
    return [{"unit": f"head {l}.{i}", "zero": round(float(h["zero"][l, i]), 4),
             "mean": round(float(h["mean"][l, i]), 4)} for l, i, _ in top]


def top_neurons_summary(sw: Sweep, m: str) -> list[dict]:
    """The 10 swept neurons with the largest single effect on metric m (zero and mean)."""
    nr = sw.neurons[m]
    out = []
    for l, i, _ in top_units(torch.maximum(nr["zero"].abs(), nr["mean"].abs()), 10, sw.neuron_layers):
        r = sw.neuron_layers.index(l)
        out.append({"unit": f"neuron {l}.{i}", "zero": round(float(nr["zero"][r, i]), 4),
                    "mean": round(float(nr["mean"][r, i]), 4)})
    return out


def pair_summaries(sw: Sweep, pairs: dict, hpairs, npairs) -> tuple[list, list]:
    """Each pair's joint effect next to the sum of its single effects (heads: largest gap first)."""
    hz, hm = sw.heads[PRIMARY]["zero"], sw.heads[PRIMARY]["mean"]
    nz = sw.neurons[PRIMARY]["zero"]
    heads = []
    for j, (a, b) in enumerate(hpairs):
        heads.append({"pair": f"{a[0]}.{a[1]}+{b[0]}.{b[1]}", "zero": round(pairs["zero"][0][j][PRIMARY], 4),
                      "sum_singles_zero": round(float(hz[a] + hz[b]), 4),
                      "mean": round(pairs["mean"][0][j][PRIMARY], 4),
                      "sum_singles_mean": round(float(hm[a] + hm[b]), 4)})
    heads.sort(key=lambda r: -abs(r["zero"] - r["sum_singles_zero"]))
    neurons = []
    for j, (a, b) in enumerate(npairs):
        ra, rb = sw.neuron_layers.index(a[0]), sw.neuron_layers.index(b[0])
        neurons.append({"pair": f"{a[0]}.{a[1]}+{b[0]}.{b[1]}", "zero": round(pairs["zero"][1][j][PRIMARY], 4),
                        "sum_singles_zero": round(float(nz[ra, a[1]] + nz[rb, b[1]]), 4)})
    return heads, neurons


def summarize(sw: Sweep, pairs, together, hpairs, npairs, check: float, seconds: float) -> dict:
    """The card's summary of one case's truth."""
    def rounded(key):
        return {meth: [round(float(x), 4) for x in sw.T[f"{sw.name}/{PRIMARY}/{key}_{meth}"]] for meth in METHODS}

    head_pairs, neuron_pairs = pair_summaries(sw, pairs, hpairs, npairs)
    summary = {"base": {k: round(v, 4) for k, v in sw.base.items()}, "neuron_layers": sw.neuron_layers,
               "top_heads": {m: top_heads_summary(sw, m) for m in sw.base},
               "top_neurons": {m: top_neurons_summary(sw, m) for m in sw.base},
               "mlp_layers": {m: {meth: [round(float(x), 4) for x in sw.mlp[m][meth]] for meth in METHODS}
                              for m in sw.base},
               "head_pairs": head_pairs, "neuron_pairs": neuron_pairs,
               "cumulative_heads": rounded("heads_cumulative"), "cumulative_neurons": rounded("neurons_cumulative"),
               "seconds": round(seconds, 1), "self_check_max_abs_diff": check}
    if together:
        summary["planted_together"] = {k: {meth: round(v[meth][PRIMARY], 4) for meth in v} for k, v in together.items()}
    return summary


def compute_truth(model, cb: CaseBatch, name: str, log, neuron_layers="auto", auto_k=2, auto_min_layer=0,
                  positions=False, planted_heads=(), planted_neurons=(), extra_pairs=(), pos_neuron_sweeps=(),
                  smoke: bool = False) -> tuple[dict, dict]:
    """All ablation effects of one case. Returns (tensors, summary)."""
    t0 = time.time()
    sw = sweep_singles(model, cb, name)
    log(f"  truth {name}: base {json.dumps({k: round(v, 4) for k, v in sw.base.items()})}")
    sw.neuron_layers = choose_neuron_layers(sw, neuron_layers, auto_k, auto_min_layer, planted_neurons, smoke)
    sweep_all_neurons(model, cb, sw, log)
    log(f"  truth {name}: heads + neurons {sw.neuron_layers} in {time.time() - t0:.0f}s")
    check = self_check(model, cb, sw)
    sweep_position_effects(model, cb, sw, positions, pos_neuron_sweeps, smoke)
    hpairs, npairs = unit_pairs(sw, planted_heads, planted_neurons, extra_pairs)
    sets, hord, nord = ablation_sets(sw, hpairs, npairs, planted_heads, planted_neurons)
    tokens = cb.n * cb.ids.shape[1]
    res = ablate_sets(model, cb, sw.base, sw.means, sets, batch=max(2, min(16, 8000 // tokens)))
    pairs, together = read_sets(sw, res, hpairs, npairs, hord, nord, planted_heads, planted_neurons)
    summary = summarize(sw, pairs, together, hpairs, npairs, check, time.time() - t0)
    log(f"  truth {name} done in {time.time() - t0:.0f}s; top heads {summary['top_heads'][PRIMARY][:3]}; "
        f"top neurons {summary['top_neurons'][PRIMARY][:3]}")
    return sw.T, summary


def unit_effects(T: dict, name: str, metric: str, heads=(), neurons=()) -> dict:
    """Chosen units' single effects (zero, mean) and the rank of their |zero effect|."""
    out = {}
    for l, h in heads:
        out[f"head {l}.{h}"] = {meth: round(float(T[f"{name}/{metric}/heads_{meth}"][l, h]), 4) for meth in METHODS}
        hz = T[f"{name}/{metric}/heads_zero"]
        out[f"head {l}.{h}"]["rank_zero_abs"] = rank_of(hz.abs(), (l, h))
    layers = T[f"{name}/neuron_layers"].tolist()
    for l, i in neurons:
        if l not in layers:
            continue
        r = layers.index(l)
        out[f"neuron {l}.{i}"] = {meth: round(float(T[f"{name}/{metric}/neurons_{meth}"][r, i]), 4) for meth in METHODS}
        out[f"neuron {l}.{i}"]["rank_zero_abs"] = rank_of(T[f"{name}/{metric}/neurons_zero"].abs(), (r, i))
    return out


def hooked_mean_ld(model, cb: CaseBatch, ids, grab=False, patch=None):
    """Mean LD over the first cb.n/2 answers of one forward of `ids`, recording every head's z and
    neuron's activation (retaining their gradients with `grab`); `patch` {(kind, layer): [(unit,
    value)]} overwrites units first."""
    n = cb.n // 2
    d = dh(model)
    W = model.lm_head.weight
    a, ap, rows = cb.answer_ids[:n], cb.answer_pos[:n], torch.arange(n)
    acts = {}

    def fz(m, args, l):
        x = args[0]
        if patch and ("z", l) in patch:
            x = x.clone()
            for h, v in patch[("z", l)]:
                x[:, :, h * d:(h + 1) * d] = v
        if grab:
            x.retain_grad()
        acts[("z", l)] = x
        return (x,)

    def fp(m, args, o, l):
        if patch and ("post", l) in patch:
            o = o.clone()
            for i, v in patch[("post", l)]:
                o[:, :, i] = v
        if grab:
            o.retain_grad()
        acts[("post", l)] = o
        return o

    with Hooks() as hk:
        for l in range(model.config.n_layer):
            hk.pre(model.transformer.h[l].attn.c_proj, lambda m, args, l=l: fz(m, args, l))
            hk.fwd(model.transformer.h[l].mlp.act, lambda m, args, o, l=l: fp(m, args, o, l))
        h0 = embed(model, ids)
        if grab:
            h0 = h0.detach().requires_grad_(True)
        hf = model.transformer.ln_f(run_blocks(model, h0, 0, causal_mask(ids.shape[1])))
    ld = (hf[rows, ap] * (W[a[:, 0]] - W[a[:, 1]])).sum(-1).mean()
    return ld, acts


def patch_diagnostics(model, cb: CaseBatch, heads=(), neurons=()) -> dict:
    """Property check for case 4: for chosen units, the ablation truth next to exact activation
    patching (noising: clean run with the unit's corrupted activation; denoising: corrupted run
    with its clean activation) and the first-order attribution estimates Σ ∂m/∂a·(a_clean − a_corr)
    with the gradient taken in the clean run or in the corrupted run. m = mean LD of the run."""
    n = cb.n // 2
    d = dh(model)
    clean_ids, corr_ids = cb.ids[:n], cb.ids[n:]
    with torch.enable_grad():
        for p in model.parameters():
            p.requires_grad_(False)
        m_clean, ac = hooked_mean_ld(model, cb, clean_ids, grab=True)
        m_clean.backward()
        m_corr, ar = hooked_mean_ld(model, cb, corr_ids, grab=True)
        m_corr.backward()
        for p in model.parameters():
            p.requires_grad_(True)
    out = {"m_clean": round(m_clean.item(), 4), "m_corr": round(m_corr.item(), 4)}
    units = [("z", l, h) for l, h in heads] + [("post", l, i) for l, i in neurons]
    for kind, l, i in units:
        sl = (slice(None), slice(None), slice(i * d, (i + 1) * d)) if kind == "z" else (slice(None), slice(None), i)
        xc, xr = ac[(kind, l)][sl].detach(), ar[(kind, l)][sl].detach()
        gc, gr = ac[(kind, l)].grad[sl], ar[(kind, l)].grad[sl]
        with torch.no_grad():
            mn, _ = hooked_mean_ld(model, cb, clean_ids, patch={(kind, l): [(i, xr)]})
            md, _ = hooked_mean_ld(model, cb, corr_ids, patch={(kind, l): [(i, xc)]})
        tag = f"{'head' if kind == 'z' else 'neuron'} {l}.{i}"
        out[tag] = {"noising_patch": round(m_clean.item() - mn.item(), 4),
                    "denoising_patch": round(md.item() - m_corr.item(), 4),
                    "attribution_clean_grad": round(float((gc * (xc - xr)).sum()), 4),
                    "attribution_corrupted_grad": round(float((gr * (xc - xr)).sum()), 4)}
    return out
