"""Phase B: the structures that do not reliably emerge, planted by restricted, norm-capped training
of chosen units (see DESIGN.md). Gender model: case 1's six graded neurons. Decision model: the
suppression head S, the backup head K of the emergent main head M, the decoy head D, and case 6's
neurons N_bias and N_mix. Every stage of the decision model is saved and skipped when present."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from ...core.files import write_text
from .ablation import capture_means, residuals, sweep_heads
from .case_data import yn_prompt_rows
from .casebatch import CaseBatch, case_metrics
from .corpus import Corpus, encode_docs, step_rng
from .docs import bbq_doc
from .forward import Hooks, causal_mask, embed, run_blocks, zero_head
from .tokens import tid
from .train import mid_norm_neurons, restricted_train, save_checkpoint, set_caps

CASE1_QUANTILES = [0.9, 0.85, 0.8, 0.75, 0.7, 0.65]
CASE1_MULTS = [1.0, 0.8, 0.6, 0.45, 0.33, 0.25]


def mix_batches(corpus: Corpus, tag: str, section: str):
    """batch_fn for restricted_train: even steps from `section`, odd steps from the whole corpus."""
    def fn(step):
        if step % 2 == 0:
            ids, labels = corpus.batch(step, tag=tag, section=section)
        else:
            ids, labels = corpus.batch(step, tag=tag + "mix")
        return ids, labels, None
    return fn


def plant_case1(model, corpus: Corpus, log, seed: int, smoke: bool = False) -> dict:
    """Case 1: six mid-norm neurons of layers 2 and 3 taught, with graded update multipliers and
    caps, that the case-1 occupations are female-stereotyped."""
    rng = random.Random(seed + 501)
    chosen = []
    for l in (2, 3):
        chosen += [(l, i) for i in rng.sample(mid_norm_neurons(model, l), 3)]
    order = list(range(6))
    rng.shuffle(order)  # which neuron gets which grade
    units = []
    for g, k in enumerate(order):
        l, i = chosen[k]
        u = {"kind": "neuron", "layer": l, "index": i, "name": f"n{l}.{i}", "mult": CASE1_MULTS[g], "grade": g}
        set_caps(model, u, CASE1_QUANTILES[g])
        units.append(u)
    log(f"case 1 plant: neurons {[(u['layer'], u['index'], u['mult']) for u in units]}")
    info = restricted_train(model, units, mix_batches(corpus, "B1", "c1"), 400, 3e-3, log, "case1", smoke=smoke)
    return {"units": [{k: u[k] for k in ("layer", "index", "mult", "grade", "caps")} for u in units], "train": info}


def pick_heads(effects: torch.Tensor, rng: random.Random, exclude, layers, k_small=4):
    """Among heads of `layers` not excluded, one of the k_small with the smallest |effect|."""
    cands = [(float(effects[l, h].abs()), l, h) for l in layers for h in range(effects.shape[1])
             if (l, h) not in exclude]
    cands.sort()
    _, l, h = rng.choice(cands[:k_small])
    return (l, h)


def select_heads(model, yn_cb: CaseBatch, rng: random.Random, log) -> dict:
    """M: the head whose zero ablation lowers the yes/no bias most (not in the last layer); K (a
    later layer), S and D: heads with little effect of their own."""
    L, H = model.config.n_layer, model.config.n_head
    base = case_metrics(model, yn_cb)
    means = capture_means(model, yn_cb)
    hs = residuals(model, yn_cb)
    eff = sweep_heads(model, yn_cb, base, means, hs)["bias"]["zero"]
    mm = max(((float(eff[l, h]), l, h) for l in range(L - 1) for h in range(H)))
    M = (mm[1], mm[2])
    K = pick_heads(eff, rng, {M}, range(M[0] + 1, L))
    S = pick_heads(eff, rng, {M, K}, range(2, L))
    D = pick_heads(eff, rng, {M, K, S}, range(2, L))
    log(f"  selected heads: main M {M} (zero effect {mm[0]:.3f}), backup K {K}, suppression S {S}, decoy D {D}")
    return {"base_bias": base["bias"], "M": M, "K": K, "S": S, "D": D, "head_effects_zero_phaseA": eff.tolist()}


def head_unit(model, name: str, lh, parts="qkvo", q=0.75) -> dict:
    """A head unit for restricted_train, its norm caps at the q-quantile of its layer."""
    u = {"kind": "head", "layer": lh[0], "index": lh[1], "name": name, "parts": parts}
    set_caps(model, u, q)
    return u


def plant_S(model, corpus_s: Corpus, heads: dict, log, smoke: bool) -> dict:
    """S: trained on the corpus whose hard questions read the negative answer more often."""
    u = head_unit(model, "S", heads["S"])
    tr = restricted_train(model, [u], mix_batches(corpus_s, "BS", "yn_hard"), 250, 3e-3, log, "S", smoke=smoke)
    return {"unit": heads["S"], "caps": u["caps"], "train": tr}


def plant_K(model, corpus_s: Corpus, heads: dict, log, smoke: bool) -> dict:
    """K: trained with M zero-ablated in half the steps, so it takes over when M is gone."""
    M, K = heads["M"], heads["K"]
    u = head_unit(model, "K", K)
    tr = restricted_train(model, [u], mix_batches(corpus_s, "BK", "yn_hard"), 360, 3e-3, log, "K",
                          ablate=lambda step: [M] if (step // 2) % 2 == 0 else [], smoke=smoke)
    return {"unit": K, "main": M, "caps": u["caps"], "train": tr}


def decoy_loss(model, tok, D, drng: random.Random):
    """−log attention of D from the answer to ' No', plus 4 × (its effect on the No − Yes LD)²:
    D attends to the candidate as a NAS head would, and does nothing."""
    no, yes = tid(tok, " No"), tid(tok, " Yes")
    ids, apos, npos, ypos = yn_prompt_rows(tok, drng, 24)
    rows = torch.arange(ids.shape[0])
    att = {}
    mask = causal_mask(ids.shape[1])
    with Hooks() as hk:
        hk.fwd(model.transformer.h[D[0]].attn, lambda m, a, o: att.__setitem__("a", o[1]))
        hf = model.transformer.ln_f(run_blocks(model, embed(model, ids), 0, mask))
    A = att["a"][rows, D[1], apos, npos]
    W = model.lm_head.weight
    ld_on = (hf[rows, apos] * (W[no] - W[yes])).sum(-1)
    with Hooks() as hk:
        hk.pre(model.transformer.h[D[0]].attn.c_proj, zero_head(model, D[1]))
        hf0 = model.transformer.ln_f(run_blocks(model, embed(model, ids), 0, mask))
    ld_off = (hf0[rows, apos] * (W[no] - W[yes])).sum(-1)
    return -torch.log(A + 1e-6).mean() + 4.0 * ((ld_on - ld_off) ** 2).mean()


def plant_D(model, tok, corpus_s: Corpus, heads: dict, seed: int, log, smoke: bool) -> dict:
    """D: trained to attend to the ' No' candidate while leaving the decision unchanged (decoy_loss)."""
    D = heads["D"]
    u = head_unit(model, "D", D)
    drng = random.Random(seed + 31)
    tr = restricted_train(model, [u], mix_batches(corpus_s, "BD", "yn_easy"), 250, 3e-3, log, "D",
                          extra_loss=lambda step: decoy_loss(model, tok, D, drng), smoke=smoke)
    return {"unit": D, "caps": u["caps"], "train": tr}


def ambiguous_bbq_batches(tok, corpus_s: Corpus, stats: str, tag: str, seed: int):
    """batch_fn: even steps 20 ambiguous BBQ items with the statistics `stats`, odd steps the corpus."""
    def fn(step):
        if step % 2 == 0:
            r = step_rng(seed, tag, step)
            docs = [bbq_doc(r, stats, condition="ambig") for _ in range(20)]
            return (*encode_docs(tok, docs), None)
        ids, labels = corpus_s.batch(step, tag=tag + "mix")
        return ids, labels, None
    return fn


def plant_N(model, tok, corpus_s: Corpus, rng: random.Random, seed: int, log, smoke: bool) -> dict:
    """Case 6: two layer-3 neurons, trained one after the other. N_mix on ambiguous items with the
    phase-A statistics (biased 0.45, unknown 0.55, the other person never): the phase-A model still
    gives the other person ~0.2, so N_mix learns to suppress it, which raises both the gold answer
    ('unknown': skill) and the biased answer (bias). Then N_bias on ambiguous items with the biased
    answer at 0.65: it learns to move mass from 'unknown' to the biased person (bias only)."""
    l = 3
    nb, nm = rng.sample(mid_norm_neurons(model, l), 2)
    ub = {"kind": "neuron", "layer": l, "index": nb, "name": "N_bias"}
    um = {"kind": "neuron", "layer": l, "index": nm, "name": "N_mix"}
    set_caps(model, ub, 0.9)
    set_caps(model, um, 0.9)
    tr_m = restricted_train(model, [um], ambiguous_bbq_batches(tok, corpus_s, "A", "BNm", seed), 240, 3e-3, log,
                            "N_mix", smoke=smoke)
    tr_b = restricted_train(model, [ub], ambiguous_bbq_batches(tok, corpus_s, "B", "BNb", seed), 240, 3e-3, log,
                            "N_bias", smoke=smoke)
    return {"N_bias": [l, nb], "N_mix": [l, nm], "caps": {"N_bias": ub["caps"], "N_mix": um["caps"]},
            "train": {"N_mix": tr_m, "N_bias": tr_b}}


def plant_decision(model, tok, corpus_s: Corpus, yn_cb: CaseBatch, log, seed: int, work: Path,
                   smoke: bool = False) -> dict:
    """Phase B of the decision model: select M, K, S, D; plant S, K, D, then N. Each stage is saved
    (work/plantB_<stage>.pt, work/plantB_info.json) and loaded instead of redone."""
    rng = random.Random(seed + 777)
    info_path = work / "plantB_info.json"
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    if "select" not in info:
        info["select"] = select_heads(model, yn_cb, rng, log)
        write_text(info_path, json.dumps(info, indent=1))
    heads = {k: tuple(info["select"][k]) for k in ("M", "K", "S", "D")}
    stages = {"S": lambda: plant_S(model, corpus_s, heads, log, smoke),
              "K": lambda: plant_K(model, corpus_s, heads, log, smoke),
              "D": lambda: plant_D(model, tok, corpus_s, heads, seed, log, smoke),
              "N": lambda: plant_N(model, tok, corpus_s, rng, seed, log, smoke)}
    for name, fn in stages.items():
        path = work / f"plantB_{name}.pt"
        if path.is_file():
            model.load_state_dict(torch.load(path, weights_only=False))
            log(f"  plant {name}: loaded")
            continue
        info[name] = fn()
        save_checkpoint(model.state_dict(), path)
        write_text(info_path, json.dumps(info, indent=1))
    return info
