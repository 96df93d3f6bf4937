"""The synthetic cases' verdicts on each method, checked on the real-model cases with the criteria written in
EXPECTED.md before any method was run on them ("Verdict criteria"). One row per verdict: the claim, what the
synthetic cases measured, what the real cases measured, and whether the claim holds there."""

from __future__ import annotations

import pandas as pd

SIGNED_AP = ("activation patching", "attribution (clean grad)", "attribution (corrupted grad)")


def _row(df: pd.DataFrame, case: str, unit: str, method: str, truth: str = "zero") -> pd.Series | None:
    r = df[(df["case"] == case) & (df["unit"] == unit) & (df["method"] == method) & (df["truth"] == truth)]
    return None if r.empty else r.iloc[0]


def _rec(df, case, unit, method, truth="zero") -> float | None:
    r = _row(df, case, unit, method, truth)
    return None if r is None else float(r["recall@k"])


def _bar(df, case, unit, truth="zero") -> float | None:
    r = _row(df, case, unit, "random", truth)
    return None if r is None else float(r["recall@k"] + 2 * r["recall_std"])


def _fmt(x) -> str:
    return "—" if x is None else f"{x:.2f}"


def _cells(df, pairs) -> str:
    return ", ".join(f"{c} {u}: {_fmt(_rec(df, c, u, m))}" for c, u, m in pairs if _rec(df, c, u, m) is not None)


def _top_site(df_scores: dict, truth: dict, case: str, method: str, key: str) -> bool | None:
    s = df_scores.get(case, {}).get(method, {}).get("site")
    t = truth.get(case, {}).get(key)
    if s is None or t is None:
        return None
    return int(s.float().reshape(-1).nan_to_num(-1e9).argmax()) == int(t.float().reshape(-1).argmax())


def verdict_table(df: pd.DataFrame, scores: dict | None = None, truths: dict | None = None) -> pd.DataFrame:
    """The 13 verdicts of EXPECTED.md: claim, synthetic evidence, real evidence, holds (yes / no / n.a.).
    `scores` {case: case_scores result} and `truths` {case: ground truth dict} serve the site verdicts."""
    scores, truths = scores or {}, truths or {}
    rows = []

    def add(n, method, claim, synthetic, real, holds):
        rows.append({"#": n, "method": method, "synthetic verdict": claim, "synthetic": synthetic, "real": real,
                     "holds on the real model": "n.a." if holds is None else ("yes" if holds else "no")})

    ap = _rec(df, "rprof", "head", "activation patching")
    add(1, "activation patching", "finds every carrier head where twins exist",
        _cells(df, [("case2", "head", "activation patching"), ("case4", "head", "activation patching")]),
        f"rprof head: {_fmt(ap)} (zero), {_fmt(_rec(df, 'rprof', 'head', 'activation patching', 'patch'))} (patch)",
        None if ap is None else ap >= 0.8 and bool(_row(df, "rprof", "head", "activation patching")["beats_baselines"]))  # pyright: ignore[reportOptionalSubscript] - ap is not None: the row exists
    atp = [_rec(df, "rprof", "head", m) for m in SIGNED_AP[1:]]
    add(2, "attribution patching", "finds every carrier head where twins exist (either gradient)",
        _cells(df, [("case2", "head", m) for m in SIGNED_AP[1:]]),
        "rprof head: " + " / ".join(_fmt(x) for x in atp),
        None if None in atp else min(atp) >= 0.8)  # pyright: ignore[reportArgumentType] - no None in atp (checked)
    gxa = _rec(df, "rprof", "head", "grad×activation")
    best = [x for x in (_rec(df, "rprof", "head", m) for m in SIGNED_AP) if x is not None]
    add(3, "grad×activation", "beats AP and AtP against the zero-ablation truth",
        _cells(df, [("case3", "head", "grad×activation")] + [("case3", "head", m) for m in SIGNED_AP]),
        f"rprof head: GxA {_fmt(gxa)} vs best AP/AtP {_fmt(max(best) if best else None)}; rprof neuron: GxA "
        f"{_fmt(_rec(df, 'rprof-neurons', 'neuron', 'grad×activation'))} vs AtP "
        f"{_fmt(_rec(df, 'rprof-neurons', 'neuron', 'attribution (clean grad)'))}",
        None if gxa is None or not best else gxa > max(best))
    for n, m, claim in ((4, "NAS", "does not locate the bias (recall at random level; ranks a decoy high)"),
                        (5, "attention to ' No'", "does not locate it (ranks the decoy first)")):
        r, bar = _rec(df, "ryesno", "head", m), _bar(df, "ryesno", "head")
        add(n, m, claim, _cells(df, [("case3", "head", m), ("case5", "head", m)]),
            f"ryesno head: {_fmt(r)} (random + 2 sd {_fmt(bar)})", None if r is None or bar is None else r <= bar)
    for n, m, claim in ((6, "mean |activation|", "ranks units by size, not effect: no better than random on real units"),
                        (7, "weight norm", "does not locate")):
        real = df[(df["real"]) & (df["method"] == m) & (df["truth"] == "zero")]
        if real.empty:
            add(n, m, claim, "", "", None)
            continue
        above = [f"{r['case']} {r['unit']}" for _, r in real.iterrows() if r["recall@k"] > _bar(df, r["case"], r["unit"])]
        add(n, m, claim, _cells(df, [("case3", "head", m), ("case6", "neuron", m)]),
            ", ".join(f"{r['case']} {r['unit']}: {r['recall@k']:.2f}" for _, r in real.iterrows()) +
            (f"; above random + 2 sd: {', '.join(above)}" if above else ""), not above)
    cr = [(u, _row(df, "rbbq" if u == "head" else "rbbq-neurons", u, "CRISPR λ=1")) for u in ("head", "neuron")]
    cr = [(u, r) for u, r in cr if r is not None]
    add(8, "CRISPR", "beats the baselines on multiple-choice bias units (AUC 0.90–0.96)",
        _cells(df, [("case6", "neuron", "CRISPR λ=1"), ("case7", "neuron", "CRISPR λ=1")]),
        ", ".join(f"rbbq {u}: {r['recall@k']:.2f} / AUC {r['AUC']:.2f}" for u, r in cr),
        None if not cr else all(bool(r["beats_baselines"]) for _, r in cr))
    pairs = [(c, u) for c, u in (("rbbq", "head"), ("rbbq-neurons", "neuron"))
             if all(_rec(df, c, u, m) is not None for m in ("CRISPR λ=1", "CRISPR λ=0", "grad×P(biased)"))]
    add(9, "grad×P(biased)", "attributing P(biased) does at least as well as CRISPR's ŷ",
        _cells(df, [("case7", "neuron", "grad×P(biased)"), ("case7", "neuron", "CRISPR λ=1")]),
        ", ".join(f"{c} {u}: {_fmt(_rec(df, c, u, 'grad×P(biased)'))} vs {_fmt(_rec(df, c, u, 'CRISPR λ=1'))}"
                  for c, u in pairs),
        None if not pairs else all(_rec(df, c, u, "grad×P(biased)") >= _rec(df, c, u, "CRISPR λ=1") for c, u in pairs))  # pyright: ignore[reportOperatorIssue] - pairs have the three recalls (filtered above)
    add(10, "CRISPR λ", "λ = 1 and λ = 0 rank alike",
        _cells(df, [("case6", "neuron", "CRISPR λ=1"), ("case6", "neuron", "CRISPR λ=0")]),
        ", ".join(f"{c} {u}: {_fmt(_rec(df, c, u, 'CRISPR λ=1'))} vs {_fmt(_rec(df, c, u, 'CRISPR λ=0'))}"
                  for c, u in pairs),
        None if not pairs else all(abs(_rec(df, c, u, "CRISPR λ=1") - _rec(df, c, u, "CRISPR λ=0")) <= 0.1  # pyright: ignore[reportOperatorIssue] - pairs have the three recalls (filtered above)
                                   for c, u in pairs))
    ct_d = _top_site(scores, truths, "rprof", "causal tracing", "rprof/bias/pos_mlp_denoise")
    ct_z = _top_site(scores, truths, "rprof", "causal tracing", "rprof/bias/pos_mlp_zero")
    add(11, "causal tracing", "on twins, puts the truth's top MLP site first",
        "case2, case8: yes (tests/bench/test_cases.py)",
        f"rprof: top site = denoise truth's top: {ct_d}; = zero truth's top: {ct_z}", ct_d)
    z = _row(df, "rprof", "site", "causal tracing (noise 0)")
    add(12, "causal tracing (noise 0)", "finds nothing (recall 0, AUC ½)", "case2, case8: 0.00 / 0.50",
        "—" if z is None else f"rprof site: {z['recall@k']:.2f} / {z['AUC']:.2f}",
        None if z is None else z["recall@k"] == 0.0 and abs(z["AUC"] - 0.5) < 1e-9)
    ls = _top_site(scores, truths, "rprof", "LSDM site choice", "rprof/bias/pos_mlp_denoise")
    add(13, "LSDM site choice", "picks the truth's top MLP site", "case2, case8: yes",
        f"rprof: = denoise truth's top site: {ls}", ls)
    return pd.DataFrame(rows)


def interaction_table(truths: dict[str, dict], cases: list[str]) -> pd.DataFrame:
    """What single-unit truth misses, per real case and unit kind, from the truth's own pair and cumulative
    ablations: the largest pair interaction (pair effect − the sum of its two single effects), how many of the
    190 pairs interact by more than 10% of the bias, and the top-k carriers ablated together vs the sum of
    their single effects (zero ablation)."""
    rows = []
    for name in cases:
        t = truths[name]
        base = float(t[f"{name}/bias/base"])
        for kind in ("head", "neuron"):
            if f"{name}/bias/{kind}_pairs_zero" not in t:
                continue
            pair = t[f"{name}/bias/{kind}_pairs_zero"]
            inter = pair - t[f"{name}/{kind}_pairs_singles"].sum(1)
            i = int(inter.abs().argmax())
            idx = t[f"{name}/{kind}_pairs_index"][i].tolist()
            ks = t[f"{name}/{kind}s_cumulative_k"].tolist()
            cum = t[f"{name}/bias/{kind}s_cumulative_zero"].tolist()
            stem = "heads" if kind == "head" else "neurons"
            singles = torch_sorted_effects(t, name, stem)
            cum_cells = "; ".join(f"k={k}: {c:+.2f} (Σ singles {float(singles[:k].sum()):+.2f})"
                                  for k, c in zip(ks, cum) if k in (1, 3, 8, 20))
            rows.append({"case": name, "unit": kind, "bias": round(base, 3),
                         "largest interaction": f"{float(inter[i]):+.3f} ({kind}s {tuple(idx[:2])} + {tuple(idx[2:])})",
                         "pairs interacting > 10% of bias": int((inter.abs() > 0.1 * abs(base)).sum()),
                         "top-k together (zero)": cum_cells})
    return pd.DataFrame(rows)


def torch_sorted_effects(t: dict, name: str, stem: str):
    """Single zero-ablation effects, largest first (swept neurons and the sample together)."""
    import torch

    eff = t[f"{name}/bias/{stem}_zero"].reshape(-1)
    if stem == "neurons":
        eff = torch.cat([eff, t[f"{name}/bias/sample_neurons_zero"]])
    return eff.sort(descending=True).values
