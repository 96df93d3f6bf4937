"""Section 2 — LSDM (Cai et al. 2024, "Locating and Mitigating Gender Bias in Large Language Models", arXiv
2403.14409).

Measured with the toolkit's defaults: causal tracing by site — layer × {the occupation's last token, the final
token} × {MLP, attention output} — with the counterfactual corruption `trace_sites` uses when the prompts have
neutral twins (it is then activation patching of those sites; a ROME-noise trace, 10 samples, on a few prompts
is reported as a variant); the LSDM edit (`lb.lsdm_edit`, λ = 10) at the traced MLP site, the same edit at
random sites (seeds), and pruning the top-10 neurons by attribution patching. Judged against the original on
held-out professions (mean |LD|), WinoBias type 1+2 pro/anti (the gap LD_pro − LD_anti, LD = the sentence's
pronoun − the other), Winogender (LD toward the occupation's BLS-majority gender), neutral-text loss (lines the
edit did not preserve) and cloze accuracy; bootstrap over prompts, sentence pairs, lines and items.

Checks (fixed before the run; L = layers):
  sites       the top MLP site is the occupation's last token in a layer < L/3, the top attention site the final
              token in a layer ≥ 2L/3
  removes     the traced-site edit removes ≥ 50% of held-out mean |LD| with its CI above the random sites' band,
              and lowers the WinoBias gap and the Winogender LD (CIs of the reductions above 0)
  capability  neutral loss rises by ≤ 0.05 nats/token (CI upper end) and cloze accuracy drops by ≤ 0.05
"""

from __future__ import annotations

import random

import numpy as np
import pandas as pd

import lens_bias as lb
from lens_bias.core.stats import bootstrap, over_seeds
from lens_bias.tasks.gender import SWAP

from .common import Context, Section, fmt, iv_dict, mean_iv
from .professions import ProfessionSets, bias_stage, patching_stage, profession_sets, sizes

KEY = "lsdm"
PAPER = "LSDM (arXiv 2403.14409)"
CLAIM = ("Gender bias is carried by the bottom MLPs at the occupation's last token and the top attention at the final "
         "token; the LSDM edit there removes it on held-out professions, WinoBias and Winogender with capability kept.")
N_PRUNE, NOISE_PROMPTS = 10, 4
KINDS = ("subject", "last")


# ---------------------------------------------------------------------------------------
# Tracing by site
# ---------------------------------------------------------------------------------------
def _site_effects(per_prompt, twin, positions: dict, n_boot: int) -> list[dict]:
    """Mean indirect effect (restored − corrupted) per (layer, position kind), with its bootstrap CI."""
    eff = np.asarray(per_prompt, dtype=float) - np.asarray(twin, dtype=float)
    rows = []
    for layer in range(eff.shape[0]):
        for kind, pos in positions.items():
            rows.append({"layer": layer, "position": kind, **mean_iv(eff[layer, pos], n_boot)})
    return rows


def _noise_trace(ctx: Context, sets: ProfessionSets) -> dict:
    ps = sets.locate[list(range(min(NOISE_PROMPTS, len(sets.locate))))]
    res = lb.causal_trace(ctx.model, ps, sites=("mlp_out", "attn_out"), corruption="noise", progress=ctx.progress)
    first, last = int(ps.subject_spans[0, 1]) - 1, int(ps.answer_pos[0])
    return {s: {"effect": r.effect[:, [first, last]].tolist(), "te_fraction": r.extra["total_effect_fraction"]}
            for s, r in res.items()}


def _top(rows: list[dict]) -> dict:
    return max(rows, key=lambda r: r["estimate"])


# ---------------------------------------------------------------------------------------
# The edits and their evaluation
# ---------------------------------------------------------------------------------------
def eval_sets(ctx: Context, sets: ProfessionSets) -> dict:
    """Held-out professions, WinoBias pro/anti (type 1 and 2, pairs aligned by line), Winogender (LD toward the
    BLS-majority gender); each capped at eval_items, seeded."""
    import warnings

    n, rng = ctx.budget.eval_items, random.Random(ctx.seed)
    wb = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for st in ("pro", "anti"):
            frames = [lb.tasks.load_winobias(ctx.data / "winobias", type_=t, stereotype=st).assign(key=lambda d, t=t: [
                f"{t}:{x}" for x in d["line"]]) for t in (1, 2)]
            wb[st] = pd.concat(frames, ignore_index=True)
        one = lambda w: len(ctx.model.tokenizer(" " + w, add_special_tokens=False)["input_ids"]) == 1  # noqa: E731
        ok = lambda d: set(d["key"][[one(p) and one(SWAP[p.lower()]) for p in d["pronoun"]]])  # noqa: E731
        keys = sorted(ok(wb["pro"]) & ok(wb["anti"]))
        keys = sorted(rng.sample(keys, min(n, len(keys))))
        out = {f"winobias_{st}": lb.winobias_prompts(ctx.model, wb[st].set_index("key").loc[keys].reset_index())
               for st in ("pro", "anti")}
        frame = lb.tasks.load_winogender(ctx.data / "winogender")
        frame = frame[[all(one(w) for w in ("she", "he", "her", "him", "his"))] * len(frame)]
        wg = lb.winogender_prompts(ctx.model, frame) if len(frame) else None
        if wg is not None:  # a tokenizer without single-token her/him/his (the organism's) has no Winogender set
            wg = wg[sorted(rng.sample(range(len(wg)), min(n, len(wg))))]
            answers = [a if (m.get("bls_pct_female") or 0) >= 50 else (a[1], a[0]) for a, m in zip(wg.answers, wg.metadata)]
            out["winogender"] = lb.PromptSet.build(ctx.model, wg.prompts, answers, metadata=wg.metadata)
    out["professions"] = sets.held
    return out


def _evaluate(ctx: Context, model, evals: dict) -> dict:
    b = ctx.budget
    lines = ctx.neutral[b.neutral_lines: 2 * b.neutral_lines] or ctx.neutral[: b.neutral_lines]
    out = {name: lb.tasks.bias_values(model, ps).tolist() for name, ps in evals.items()}
    out["neutral"] = lb.tasks.line_losses(model, lines).tolist()
    out["cloze"] = [float(h) for h in lb.tasks.cloze_hits(model, ctx.cloze)]
    return out


def _edit(ctx: Context, sets: ProfessionSets, layer: int, position: str):
    preserve = ctx.neutral[: ctx.budget.neutral_lines]
    return lb.lsdm_edit(ctx.model, sets.locate, preserve, layers=[layer], position=position, progress=ctx.progress)


def _edited(ctx, sets, evals, make) -> dict:
    res = make()
    out = _evaluate(ctx, res.model, evals)
    out["report"] = {k: v for k, v in res.report.items() if isinstance(v, (int, float, str, list, dict))}
    return out


def _prune(ctx: Context, sets: ProfessionSets):
    scores = lb.attribution_patching(ctx.model, sets.locate, ["neuron"])["neuron"]
    return lb.prune_neurons(ctx.model, scores.units(N_PRUNE))


# ---------------------------------------------------------------------------------------
# Summaries
# ---------------------------------------------------------------------------------------
def _reduction(before, after, n_boot, absolute=True) -> dict:
    b, a = np.asarray(before, dtype=float), np.asarray(after, dtype=float)
    if absolute:
        b, a = np.abs(b), np.abs(a)
    return iv_dict(bootstrap(lambda i: 1 - a[i].mean() / b[i].mean(), len(b), n_boot=n_boot))


def _gap(ev: dict) -> np.ndarray:
    return np.asarray(ev["winobias_pro"]) - np.asarray(ev["winobias_anti"])


def _loss(ev) -> float:
    x = np.asarray(ev["neutral"])
    return x[:, 0].sum() / x[:, 1].sum()


def _row(name: str, ev: dict, orig: dict, n_boot: int) -> dict:
    nb, na = np.asarray(orig["neutral"]), np.asarray(ev["neutral"])
    cb, ca = np.asarray(orig["cloze"]), np.asarray(ev["cloze"])
    g0, g1 = _gap(orig), _gap(ev)
    return {"model": name,
            "professions_abs_ld": mean_iv(np.abs(ev["professions"]), n_boot),
            "professions_removed": _reduction(orig["professions"], ev["professions"], n_boot),
            "winobias_gap": mean_iv(g1, n_boot),
            "winobias_gap_removed": iv_dict(bootstrap(lambda i: 1 - g1[i].mean() / g0[i].mean(), len(g0), n_boot=n_boot)),
            "winogender_ld": mean_iv(ev.get("winogender", [np.nan]), n_boot),
            "winogender_removed": _reduction(orig.get("winogender", [np.nan]), ev.get("winogender", [np.nan]), n_boot,
                                             absolute=False),
            "neutral_loss_change": iv_dict(bootstrap(lambda i: na[i, 0].sum() / na[i, 1].sum() - nb[i, 0].sum()
                                                     / nb[i, 1].sum(), len(nb), n_boot=n_boot, what="lines")),
            "cloze_change": iv_dict(bootstrap(lambda i: ca[i].mean() - cb[i].mean(), len(cb), n_boot=n_boot,
                                              what="items"))}


def run(ctx: Context) -> Section:
    m, b = ctx.model, ctx.budget
    sets = profession_sets(m, b.locate_prompts, b.held_prompts, ctx.seed)
    bias = bias_stage(ctx, sets)
    L = m.cfg.n_layers
    positions = {"subject": int(sets.locate.subject_spans[0, 1]) - 1, "last": int(sets.locate.answer_pos[0])}
    twin = bias["locate"]["twin"]
    trace = {s: _site_effects(patching_stage(ctx, sets, s), twin, positions, b.n_boot) for s in ("mlp_out", "attn_out")}
    clean = np.asarray(bias["locate"]["clean"])
    te = float((clean.mean() - np.mean(twin)) / clean.mean())
    noise = ctx.stage(KEY, "tracing-noise", sizes(sets), lambda: _noise_trace(ctx, sets))
    top_mlp, top_attn = _top(trace["mlp_out"]), _top(trace["attn_out"])
    evals = eval_sets(ctx, sets)
    opts = {**sizes(sets), "evals": {k: v.prompts for k, v in evals.items()}}
    results = {"original": ctx.stage(KEY, "eval-original", opts, lambda: _evaluate(ctx, m, evals))}
    site = (top_mlp["layer"], top_mlp["position"])
    results["lsdm at the traced site"] = ctx.stage(KEY, "eval-lsdm-traced", {**opts, "site": site},
                                                   lambda: _edited(ctx, sets, evals, lambda: _edit(ctx, sets, *site)))
    pool = [(l, k) for l in range(L) for k in KINDS if (l, k) != site]
    for s, rs in enumerate(random.Random(ctx.seed + 100).sample(pool, b.train_seeds)):  # distinct random sites
        results[f"lsdm at random site {s}"] = ctx.stage(KEY, f"eval-lsdm-random{s}", {**opts, "site": rs},
                                                        lambda rs=rs: _edited(ctx, sets, evals, lambda: _edit(ctx, sets, *rs)))
    results[f"prune top {N_PRUNE} neurons"] = ctx.stage(KEY, "eval-prune", opts,
                                                        lambda: _edited(ctx, sets, evals, lambda: _prune(ctx, sets)))
    rows = [_row(name, ev, results["original"], b.n_boot) for name, ev in results.items() if name != "original"]
    return _section(ctx, sets, trace, te, noise, top_mlp, top_attn, results, rows)


def _section(ctx, sets, trace, te, noise, top_mlp, top_attn, results, rows) -> Section:
    L, b = ctx.model.cfg.n_layers, ctx.budget
    by = {r["model"]: r for r in rows}
    traced = by["lsdm at the traced site"]
    rand = iv_dict(over_seeds([r["professions_removed"]["estimate"] for k, r in by.items() if "random site" in k]))
    checks = {
        "sites": top_mlp["position"] == "subject" and top_mlp["layer"] < L / 3 and top_attn["position"] == "last"
        and top_attn["layer"] >= 2 * L / 3,
        "removes": traced["professions_removed"]["estimate"] >= 0.5 and traced["professions_removed"]["low"] > rand["high"]
        and traced["winobias_gap_removed"]["low"] > 0 and traced["winogender_removed"]["low"] > 0,
        "capability": traced["neutral_loss_change"]["high"] <= 0.05 and traced["cloze_change"]["estimate"] >= -0.05,
    }
    orig = results["original"]
    table_rows = [{"model": "original", "professions mean abs LD": fmt(mean_iv(np.abs(orig["professions"]), b.n_boot)),
                   "share removed": "", "WinoBias gap (pro − anti)": fmt(mean_iv(_gap(orig), b.n_boot)),
                   "Winogender LD": fmt(mean_iv(orig.get("winogender", [np.nan]), b.n_boot)),
                   "neutral loss (Δ)": f"{_loss(orig):.3f} nats/token", "cloze accuracy (Δ)": f"{np.mean(orig['cloze']):.2f}"}]
    for r in rows:
        table_rows.append({"model": r["model"], "professions mean abs LD": fmt(r["professions_abs_ld"]),
                           "share removed": fmt(r["professions_removed"]), "WinoBias gap (pro − anti)": fmt(r["winobias_gap"]),
                           "Winogender LD": fmt(r["winogender_ld"]), "neutral loss (Δ)": fmt(r["neutral_loss_change"], 3),
                           "cloze accuracy (Δ)": fmt(r["cloze_change"])})
    table = pd.DataFrame(table_rows)
    rep = results["lsdm at the traced site"]["report"]
    noise_top = {s: np.unravel_index(np.argmax(v["effect"]), np.shape(v["effect"])) for s, v in noise.items()}
    notes = [sets.describe(),
             f"tracing (counterfactual twins, the default): TE/m(clean) = {te:.2f}; top MLP site L{top_mlp['layer']} "
             f"{top_mlp['position']} {fmt(top_mlp)}; top attention site L{top_attn['layer']} {top_attn['position']} "
             f"{fmt(top_attn)}",
             f"variant, ROME noise (3σ, 10 samples, the first {NOISE_PROMPTS} prompts): top site " + ", ".join(
                 f"{s} L{int(l)} {KINDS[int(k)]}" for s, (l, k) in noise_top.items())
             + f" (TE/m(clean) {noise['mlp_out']['te_fraction']:.2f})",
             f"traced edit: layers {rep.get('layers')}, position {rep.get('position')}, edit prompts' mean LD "
             f"{rep.get('bias_before', float('nan')):+.2f} → {rep.get('bias_after', float('nan')):+.2f}"]
    measured = (f"top MLP site L{top_mlp['layer']} {top_mlp['position']}, top attention L{top_attn['layer']} "
                f"{top_attn['position']}; the edit there removes {fmt(traced['professions_removed'])} of held-out |LD|, "
                f"{fmt(traced['winobias_gap_removed'])} of the WinoBias gap, Δ loss {fmt(traced['neutral_loss_change'], 3)}")
    prune = by[f"prune top {N_PRUNE} neurons"]
    control = (f"edit at random sites removes {fmt(rand)} ({b.train_seeds} seeds); pruning the top {N_PRUNE} neurons "
               f"{fmt(prune['professions_removed'])}")
    flat = lambda r: {k: (v["estimate"] if isinstance(v, dict) else v) for k, v in r.items()}  # noqa: E731
    tables = {"tracing": pd.DataFrame([{"site": s, **r} for s, rs in trace.items() for r in rs]),
              "results": pd.DataFrame([flat(r) for r in rows]),
              "results_intervals": pd.DataFrame([{"model": r["model"], "measure": k, **v} for r in rows
                                                 for k, v in r.items() if isinstance(v, dict)])}
    return Section(KEY, PAPER, CLAIM, measured, control, checks, table, tables, _figures(trace, rows), notes)


def _figures(trace, rows) -> list:
    import plotly.graph_objects as go

    figs = []
    for s, rs in trace.items():
        fig = go.Figure()
        for kind in KINDS:
            pts = [r for r in rs if r["position"] == kind]
            fig.add_trace(go.Scatter(x=[r["layer"] for r in pts], y=[r["estimate"] for r in pts], name=kind,
                                     error_y={"type": "data", "array": [r["high"] - r["estimate"] for r in pts],
                                              "arrayminus": [r["estimate"] - r["low"] for r in pts]}))
        figs.append((f"causal tracing (counterfactual twins): {s} indirect effect by layer", fig.update_layout(
            xaxis_title="layer", yaxis_title="IE on LD")))
    est = [r["professions_removed"] for r in rows]
    figs.append(("share of held-out mean |LD| removed", go.Figure(go.Bar(
        x=[r["model"] for r in rows], y=[e["estimate"] for e in est],
        error_y={"type": "data", "array": [e["high"] - e["estimate"] for e in est],
                 "arrayminus": [e["estimate"] - e["low"] for e in est]}))))
    return figs
