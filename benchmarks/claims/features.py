"""Section 1 — feature-based analysis (Prakash & Lee 2024, "Interpreting Bias in Large Language Models: a
feature-based approach", arXiv 2406.12347) on professions templates.

Measured with the toolkit's defaults on the locate prompts: activation patching (clean into the neutral
twin) of every MLP output, attention output and residual-stream state by layer × position, and of every head
(all positions); attribution patching (default `at="clean"`, variant `at="corrupted"`) of the same
components, per prompt, and their agreement (Pearson, Spearman, top-10 overlap by magnitude; bootstrap over
prompts). Held out (other professions, other templates): the share of the bias restored by patching the top
MLP site, the top attention site and the top 3 heads, against random sites / random heads (seeds). The
paper's mitigation, counterfactual-data fine-tuning of the components found (`lb.mitigate.
counterfactual_finetune`: its closest documented form, CDA restricted to the components — the paper's own
text could not be read offline): the top 2 MLP layers (origin) and the top 3 heads (propagation), each
against as many random components (seeds), judged on the held-out prompts' mean |LD| and neutral-text loss.

Checks (fixed before the run; L = layers):
  early      the largest MLP effect is at the occupation's token in a layer < L/3, and on held-out prompts
             patching that site restores more of the bias than any of the random sites' band (CI above it)
  moved      the largest attention-output effect is at the final token, in a later layer than that MLP; the
             residual stream carries the effect at the occupation's token first and at the final token last;
             held out, the top 3 heads restore more than random heads' band
  agree      AtP vs AP: Spearman ≥ 0.5 for heads and each layer × position map, top-10 overlap ≥ 0.5 for heads
  debias     counterfactual fine-tuning of the found components removes ≥ 50% of held-out mean |LD| with its
             CI above the random components' band, for at least one arm, at ≤ 0.1 nats/token neutral-loss cost
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

import lens_bias as lb
from lens_bias.core.hooks import device_of, hook_name
from lens_bias.core.stats import bootstrap, over_seeds
from lens_bias.locate.attribution import agreement_of
from lens_bias.mitigate import counterfactual_finetune, counterfactual_texts, random_heads

from .common import Context, Section, fmt, iv_dict, mean_iv
from .professions import ProfessionSets, bias_stage, patching_stage, profession_sets, sizes

KEY = "features"
PAPER = "Feature-based analysis (arXiv 2406.12347)"
CLAIM = ("On professions templates, bias-carrying features arise in early MLPs at the occupation, attention heads "
         "move them to the final token, activation and attribution patching agree, and counterfactual-data debiasing "
         "of the components found removes the bias.")
SITES = ("mlp_out", "attn_out", "resid_pre")
K_HEADS, M_LAYERS, TOPK = 3, 2, 10


def ld(model, ps) -> list[float]:
    return lb.tasks.bias_values(model, ps).tolist()


def _attribution(ctx: Context, ps, at: str) -> dict:
    """Per-prompt attribution scores (one forward+backward per prompt), same layouts as `_patching`."""
    out = {s: [] for s in (*SITES, "head")}
    for i in range(len(ps)):
        r = lb.attribution_patching(ctx.model, ps[[i]], ["head", *SITES], at=at)
        for s in out:
            out[s].append(r[s].values.tolist())
    return {s: np.moveaxis(np.array(v), 0, -1).tolist() for s, v in out.items()}  # prompt axis last


# ---------------------------------------------------------------------------------------
# Held-out confirmation: patch chosen components together, read the share of the bias restored
# ---------------------------------------------------------------------------------------
def _caches(model, ps) -> tuple[dict, dict]:
    names = {hook_name(s, l) for s in (*SITES, "head") for l in range(model.cfg.n_layers)}
    dev = device_of(model)
    with torch.no_grad():
        runs = [model.run_with_cache(t.to(dev), attention_mask=ps.attention_mask.to(dev),
                                     names_filter=lambda n: n in names)[1] for t in (ps.tokens, ps.corrupted_tokens)]
    return ({n: runs[0][n] for n in names}, {n: runs[1][n] for n in names})


def _patched(model, ps, caches, components) -> list[float]:
    """The corrupted run's per-prompt LD with each component's clean activation written in: ('site', layer, pos)
    or ('head', layer, head) at all positions."""
    clean, corr = caches
    acts = {}
    for site, layer, idx in components:
        name = hook_name(site, layer)
        a = acts.setdefault(name, corr[name].clone())
        if site == "head":
            a[:, :, idx] = clean[name][:, :, idx]
        else:
            a[:, idx] = clean[name][:, idx]
    return lb.locate.patch_with(model, ps, acts).tolist()


def _share(patched, clean, twin, n_boot, seed=0) -> dict:
    p, c, t = (np.asarray(x, dtype=float) for x in (patched, clean, twin))
    return iv_dict(bootstrap(lambda i: (p[i] - t[i]).mean() / (c[i] - t[i]).mean(), len(p), n_boot=n_boot, seed=seed))


def _held_out(ctx: Context, sets: ProfessionSets, found: dict, bias: dict) -> dict:
    m, held, b = ctx.model, sets.held, ctx.budget
    caches = _caches(m, held)
    clean, twin = bias["held"]["clean"], bias["held"]["twin"]
    L, first = m.cfg.n_layers, int(held.subject_spans[0, 0])
    last = int(held.answer_pos[0])
    out = {}
    for name, comps in (("mlp_top1", [("mlp_out", *found["mlp_top1"])]), ("attn_top1", [("attn_out", *found["attn_top1"])]),
                        ("heads_top3", [("head", l, h) for l, h in found["heads"]])):
        out[name] = _share(_patched(m, held, caches, comps), clean, twin, b.n_boot)
    rng = np.random.default_rng(ctx.seed)
    for site, key in (("mlp_out", "mlp_random"), ("attn_out", "attn_random")):
        sites = [(int(rng.integers(L)), int(rng.integers(first, last + 1))) for _ in range(b.seeds)]
        out[key] = [_share(_patched(m, held, caches, [(site, l, p)]), clean, twin, b.n_boot)["estimate"]
                    for l, p in sites]
    out["heads_random"] = [_share(_patched(m, held, caches, [("head", l, h) for l, h in random_heads(
        m, K_HEADS, ctx.seed + s, exclude=found["heads"])]), clean, twin, b.n_boot)["estimate"] for s in range(b.seeds)]
    return out


# ---------------------------------------------------------------------------------------
# Counterfactual-data debiasing of the found components vs random components
# ---------------------------------------------------------------------------------------
def _evaluate(ctx: Context, model, sets: ProfessionSets) -> dict:
    return {"held_ld": ld(model, sets.held), "twin_ld": ld(model, sets.held.swapped()),
            "neutral_loss": lb.text_loss(model, ctx.neutral[: ctx.budget.neutral_lines])}


def _finetune(ctx: Context, sets: ProfessionSets, units, site: str, seed: int) -> dict:
    texts = counterfactual_texts(sets.locate)
    res = counterfactual_finetune(ctx.model, units, texts, site=site, steps=ctx.budget.cf_steps, seed=seed,
                                  progress=ctx.progress)
    out = _evaluate(ctx, res.model, sets)
    out.update(units=[list(u) if isinstance(u, tuple) else u for u in units], loss=res.report["history"])
    del res
    return out


def _random_layers(model, m: int, seed: int, exclude) -> list[int]:
    pool = [l for l in range(model.cfg.n_layers) if l not in set(exclude)]
    return sorted(np.random.default_rng(seed).choice(pool, size=m, replace=False).tolist())


def _debias(ctx: Context, sets: ProfessionSets, found: dict) -> dict:
    arms = {"mlp": ("mlp", found["mlp_layers"], lambda s: _random_layers(ctx.model, M_LAYERS, s, found["mlp_layers"])),
            "heads": ("head", [tuple(h) for h in found["heads"]],
                      lambda s: random_heads(ctx.model, K_HEADS, s, exclude=found["heads"]))}
    out = {"original": ctx.stage(KEY, "debias-original", {}, lambda: _evaluate(ctx, ctx.model, sets))}
    for arm, (site, units, rand) in arms.items():
        out[arm] = ctx.stage(KEY, f"debias-{arm}-found", {"units": [[int(x) for x in np.atleast_1d(u)] for u in units]},
                             lambda: _finetune(ctx, sets, units, site, ctx.seed))
        out[f"{arm}_random"] = [ctx.stage(KEY, f"debias-{arm}-random{s}", {"s": s},
                                          lambda s=s: _finetune(ctx, sets, rand(ctx.seed + 100 + s), site, ctx.seed))
                                for s in range(ctx.budget.train_seeds)]
    return out


def _reduction(before, after, n_boot) -> dict:
    b, a = np.abs(np.asarray(before)), np.abs(np.asarray(after))
    return iv_dict(bootstrap(lambda i: 1 - a[i].mean() / b[i].mean(), len(b), n_boot=n_boot))


# ---------------------------------------------------------------------------------------
# Summaries
# ---------------------------------------------------------------------------------------
def _effects(patch: dict, twin) -> dict[str, np.ndarray]:
    """Per-prompt effects (patched − corrupted) [.., prompt]."""
    t = np.asarray(twin, dtype=float)
    return {s: np.asarray(v, dtype=float) - t for s, v in patch.items()}


def _found(eff: dict, first: int, last: int, L: int) -> dict:
    mean = {s: v.mean(-1) for s, v in eff.items()}
    mlp_l, mlp_p = np.unravel_index(mean["mlp_out"].argmax(), mean["mlp_out"].shape)
    attn_l, attn_p = np.unravel_index(mean["attn_out"].argmax(), mean["attn_out"].shape)
    heads = np.argsort(-mean["head"].reshape(-1))[:K_HEADS]
    H = mean["head"].shape[1]
    resid = mean["resid_pre"]
    return {"mlp_top1": [int(mlp_l), int(mlp_p)], "attn_top1": [int(attn_l), int(attn_p)],
            "heads": [[int(i // H), int(i % H)] for i in heads],
            "mlp_layers": sorted(int(l) for l in np.argsort(-mean["mlp_out"].sum(1))[:M_LAYERS]),
            "resid_first": float(resid[0, first]), "resid_first_last": float(resid[0, last]),
            "resid_end_first": float(resid[L - 1, first]), "resid_end_last": float(resid[L - 1, last]),
            "crossover": next((l for l in range(L) if resid[l, last] > resid[l, first]), None)}


def _agreement(eff: dict, atp: dict, n_boot: int, seed: int) -> dict:
    out = {}
    for s, ap in eff.items():
        at = np.asarray(atp[s], dtype=float)
        keep = np.abs(ap).sum(-1).reshape(-1) > 0  # components no prompt changes (before the occupation) say nothing
        a2, p2 = at.reshape(-1, at.shape[-1])[keep], ap.reshape(-1, ap.shape[-1])[keep]
        row = {}
        for stat in ("pearson", "spearman", f"top{TOPK}_overlap"):
            row[stat] = iv_dict(bootstrap(lambda i, stat=stat: agreement_of(
                torch.tensor(a2[:, i].mean(1)), torch.tensor(p2[:, i].mean(1)), TOPK)[stat], a2.shape[1],
                n_boot=n_boot, seed=seed))
        out[s] = row
    return out


def _figures(eff: dict, atp: dict, tokens: list[str], debias: dict) -> list:
    import plotly.graph_objects as go

    figs = []
    for s in (*SITES, "head"):
        z = eff[s].mean(-1)
        x = tokens if s != "head" else [f"head {h}" for h in range(z.shape[1])]
        figs.append((f"activation patching — {s} (mean effect on LD, locate prompts)",
                     go.Figure(go.Heatmap(z=z.tolist(), x=x, y=[f"layer {l}" for l in range(z.shape[0])],
                                          colorscale="RdBu", zmid=0)).update_layout(yaxis={"autorange": "reversed"})))
    a, p = np.asarray(atp["head"]).mean(-1).reshape(-1), eff["head"].mean(-1).reshape(-1)
    figs.append(("heads: attribution patching vs activation patching",
                 go.Figure(go.Scatter(x=p.tolist(), y=a.tolist(), mode="markers")).update_layout(
                     xaxis_title="activation patching effect", yaxis_title="attribution score")))
    names, est, lo, hi = [], [], [], []
    for k, v in debias.items():
        if k.startswith("reduction_"):
            names.append(k.removeprefix("reduction_"))
            est.append(v["estimate"])
            lo.append(v["estimate"] - v["low"])
            hi.append(v["high"] - v["estimate"])
    figs.append(("counterfactual fine-tuning: share of held-out mean |LD| removed",
                 go.Figure(go.Bar(x=names, y=est, error_y={"type": "data", "array": hi, "arrayminus": lo}))))
    return figs


def run(ctx: Context) -> Section:
    m, b = ctx.model, ctx.budget
    sets = profession_sets(m, b.locate_prompts, b.held_prompts, ctx.seed)
    size = sizes(sets)
    bias = bias_stage(ctx, sets)
    patch = {s: patching_stage(ctx, sets, s) for s in (*SITES, "head")}
    atp = {at: ctx.stage(KEY, f"attribution-{at}", size, lambda at=at: _attribution(ctx, sets.locate, at))
           for at in ("clean", "corrupted")}
    L = m.cfg.n_layers
    first, last = int(sets.locate.subject_spans[0, 1]) - 1, int(sets.locate.answer_pos[0])
    eff = _effects(patch, bias["locate"]["twin"])
    found = _found(eff, first, last, L)
    held = ctx.stage(KEY, "held-out", {**size, "found": found}, lambda: _held_out(ctx, sets, found, bias))
    agree = {at: _agreement(eff, atp[at], b.n_boot, ctx.seed) for at in atp}
    deb = _debias(ctx, sets, found)
    before = deb["original"]["held_ld"]
    summary = {"original_abs_ld": mean_iv(np.abs(before), b.n_boot)}
    for arm in ("mlp", "heads"):
        summary[f"reduction_{arm}"] = _reduction(before, deb[arm]["held_ld"], b.n_boot)
        summary[f"reduction_{arm}_random"] = iv_dict(over_seeds(
            [_reduction(before, r["held_ld"], 10)["estimate"] for r in deb[f"{arm}_random"]]))
        summary[f"loss_{arm}"] = deb[arm]["neutral_loss"] - deb["original"]["neutral_loss"]
    return _section(ctx, sets, bias, eff, atp["clean"], found, held, agree, summary, first, last)


def _section(ctx, sets, bias, eff, atp_clean, found, held, agree, summary, first, last) -> Section:
    L = ctx.model.cfg.n_layers
    rand = {k: iv_dict(over_seeds(held[k])) for k in ("mlp_random", "attn_random", "heads_random")}
    early = (found["mlp_top1"][1] == first and found["mlp_top1"][0] < L / 3
             and held["mlp_top1"]["low"] > rand["mlp_random"]["high"])
    moved = (found["attn_top1"][1] == last and found["attn_top1"][0] > found["mlp_top1"][0]
             and found["resid_first"] > found["resid_first_last"] and found["resid_end_last"] > found["resid_end_first"]
             and held["heads_top3"]["low"] > rand["heads_random"]["high"])
    ag = agree["clean"]
    agree_ok = all(ag[s]["spearman"]["estimate"] >= 0.5 for s in ag) and ag["head"][f"top{TOPK}_overlap"]["estimate"] >= 0.5
    arms_ok = [summary[f"reduction_{a}"]["estimate"] >= 0.5 and summary[f"reduction_{a}"]["low"]
               > summary[f"reduction_{a}_random"]["high"] and summary[f"loss_{a}"] <= 0.1 for a in ("mlp", "heads")]
    checks = {"early": early, "moved": moved, "agree": agree_ok, "debias": any(arms_ok)}
    hb = bias["held"]
    rows = [
        ("bias: held-out LD (stereotyped − other pronoun)", fmt(mean_iv(hb["clean"], ctx.budget.n_boot)),
         f"neutral twins {fmt(mean_iv(hb['twin'], ctx.budget.n_boot))}", ""),
        (f"top MLP site L{found['mlp_top1'][0]} pos {found['mlp_top1'][1]} (occupation = pos {first}): held-out share "
         "restored", fmt(held["mlp_top1"]), f"{ctx.budget.seeds} random MLP sites {fmt(rand['mlp_random'])}",
         "early" if early else "early ✗"),
        (f"top attention site L{found['attn_top1'][0]} pos {found['attn_top1'][1]} (final = pos {last}): share",
         fmt(held["attn_top1"]), f"random attention sites {fmt(rand['attn_random'])}", ""),
        (f"top 3 heads {', '.join(f'L{l}H{h}' for l, h in found['heads'])}: held-out share", fmt(held["heads_top3"]),
         f"3 random heads × {ctx.budget.seeds} seeds {fmt(rand['heads_random'])}", "moved" if moved else "moved ✗"),
        ("residual stream: first layer where the final token's effect passes the occupation's",
         str(found["crossover"]), f"layer 0: occ {found['resid_first']:+.2f} / final {found['resid_first_last']:+.2f}", ""),
    ]
    for s in ("head", *SITES):
        rows.append((f"AP vs AtP ({s}): Spearman / Pearson / top-{TOPK} overlap",
                     f"{fmt(ag[s]['spearman'])} / {fmt(ag[s]['pearson'])} / {fmt(ag[s][f'top{TOPK}_overlap'])}",
                     "variant at=corrupted: Spearman " + fmt(agree["corrupted"][s]["spearman"]),
                     ("agree" if agree_ok else "agree ✗") if s == "head" else ""))
    for a, what in (("mlp", f"MLP layers {found['mlp_layers']}"), ("heads", "the top 3 heads")):
        rows.append((f"CF fine-tune of {what}: share of held-out mean |LD| removed (Δ neutral loss "
                     f"{summary[f'loss_{a}']:+.3f})", fmt(summary[f"reduction_{a}"]),
                     f"random × {ctx.budget.train_seeds} {fmt(summary[f'reduction_{a}_random'])}",
                     ("debias" if checks["debias"] else "debias ✗") if a == "heads" else ""))
    table = pd.DataFrame(rows, columns=["measure", "on the model [95% CI]", "control", "check"])
    measured = (f"top MLP L{found['mlp_top1'][0]}@pos{found['mlp_top1'][1]} restores {fmt(held['mlp_top1'])} held out; "
                f"heads {', '.join(f'L{l}H{h}' for l, h in found['heads'])} {fmt(held['heads_top3'])}; AP~AtP Spearman "
                f"(heads) {fmt(ag['head']['spearman'])}; CF fine-tune removes {fmt(summary['reduction_heads'])} (heads), "
                f"{fmt(summary['reduction_mlp'])} (MLPs)")
    control = (f"random sites {fmt(rand['mlp_random'])}, random heads {fmt(rand['heads_random'])}, random-component "
               f"fine-tune {fmt(summary['reduction_heads_random'])} / {fmt(summary['reduction_mlp_random'])}")
    tables = {"bias": pd.DataFrame({k: v for k, v in bias["held"].items()}),
              "found": pd.DataFrame([found]), "held_out": pd.DataFrame(
                  [{"what": k, **v} for k, v in held.items() if isinstance(v, dict)]
                  + [{"what": k, **rand[k]} for k in rand]),
              "agreement": pd.DataFrame([{"at": at, "site": s, "stat": st, **v} for at, d in agree.items()
                                         for s, r in d.items() for st, v in r.items()]),
              "debias": pd.DataFrame([{"what": k, **v} if isinstance(v, dict) else {"what": k, "estimate": v}
                                      for k, v in summary.items()])}
    figures = _figures(eff, atp_clean, sets.locate.str_tokens(ctx.model, 0), summary)
    return Section(KEY, PAPER, CLAIM, measured, control, checks, table, tables, figures, notes=[sets.describe()])
