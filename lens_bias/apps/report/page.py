"""The report's figures (plotly) and its one self-contained HTML page.

plotly.js is inlined once, in <head>, before any figure's script runs: the page opens offline and every
figure renders (core/browser.py opens it in Chromium in the tests). Figures hold finite numbers only: an
undefined value is left out, never drawn as 0.

The first screen answers the reader's question — where is the bias, how sure are we, what does removing it do
to the bias and to capability against random units, where do the methods agree — in one paragraph
(`answer_text`) and one figure (`answer_figure`); the details follow. Table cells are cut to one line, the
full text on hover; the pairwise agreement table is in tables/agreement.csv only (the heatmaps show it).
"""

from __future__ import annotations

import html
import math

from .faithfulness import ALPHA, BREAKS
from .units import ABLATABLE

UNIT_TITLES = {"head": "heads (layer, head)", "neuron": "neurons (layer, neuron)",
               "layer": "layer components (attn | mlp)", "site": "sites (layer, position, site)"}
UNIT_WORDS = {"head": ("head", "heads"), "neuron": ("neuron", "neurons"), "layer": ("layer component", "layer components")}
PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf", "#bcbd22"]
CONFIG = {"displaylogo": False, "responsive": True}
CLIP = 1.5  # nats: Δloss beyond this is drawn at the edge (the hover gives the value)


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _finite_rows(col):
    """Boolean mask of a column's finite numbers (bool even when the column is empty: an empty map is float64,
    which pandas would read as a list of columns)."""
    return col.map(_finite).astype(bool)


def _colors(report) -> dict[str, str]:
    names = [m for m in report.methods if m != "random"]
    return {m: PALETTE[i % len(PALETTE)] for i, m in enumerate(names)}


def _first_ablation(report) -> str:
    c = report.curves
    return str(c[c.measure == "necessity"]["ablation"].iloc[0]) if len(c) else "zero"


def winner(report):
    """The ranking's first row when it beats random within the budget, else None."""
    r = report.ranking
    if not len(r):
        return None
    top = r.iloc[0]
    return top if bool(top["beats_random"]) and _finite(top.get("removed", math.nan)) else None


# ---------------------------------------------------------------------------------------
# The first screen
# ---------------------------------------------------------------------------------------
def _pct(x) -> str:
    return ("0%" if abs(x) < 0.005 else f"{x:.0%}") if _finite(x) else "–"


def _signed(x) -> str:
    return ("+0.000" if abs(x) < 5e-4 else f"{x:+.3f}") if _finite(x) else "–"


def _ci(lo, hi) -> str:
    return f" [{_pct(lo)}, {_pct(hi)}]" if _finite(lo) and _finite(hi) else ""


def _agreement_sentence(report, top) -> str:
    """Which other methods share the winner's top units (top-4 overlap, Spearman ρ over all units)."""
    a = report.agreement
    if not len(a):
        return ""
    u, m = top["unit_type"], top["method"]
    k = 4 if "overlap@4" in a else 1
    col = f"overlap@{k}"
    d = a[(a.unit_type == u) & (a.method_a == m) & (a.method_b != "random")]
    d = d[_finite_rows(d[col])].sort_values(col, ascending=False)
    if not len(d):
        return ""
    parts = [f"{r['method_b']} shares {round(r[col] * k)}" + (f" (ρ = {r['spearman']:.2f})" if _finite(r["spearman"]) else "")
             for _, r in d.head(3).iterrows()]
    return f"of {m}'s top {k} {UNIT_WORDS[u][1]}, " + "; ".join(parts) + "."


def answer_parts(report) -> list[tuple[str, str]]:
    """The first screen's answer as (label, sentence) pairs: the bias, where, how sure, what removing it does,
    where methods agree, what breaks the model."""
    b, task = report.baseline, report.task
    gap = b["bias_clean"] - b["bias_reference"]
    what = {"pairs": "professions and their neutral twins", "yesno": "questions", "multiple_choice": "items"}[task.kind]
    ci = (f" [{b['bias_lo']:+.2f}, {b['bias_hi']:+.2f}]" if _finite(b.get("bias_lo")) and _finite(b.get("bias_hi")) else "")
    n = task.sizes()["test"]
    if task.kind == "pairs":
        bias = (f"{b['bias_clean']:+.2f} against {b['bias_reference']:+.2f} on the neutral twins: a gap of {gap:+.2f}{ci} "
                f"(95% interval; {n} held-out prompts, {what} resampled).")
    else:
        bias = f"{b['bias_clean']:+.3f}{ci} (95% interval; {n} held-out prompts, {what} resampled)."
    parts = [("Bias", bias)]
    top = winner(report)
    broken = report.ranking[report.ranking["breaks_model"]] if len(report.ranking) else report.ranking
    if top is None:
        r = report.ranking
        best = f" The best by bias removed is {r.iloc[0]['method']} ({r.iloc[0]['unit_type']})." if len(r) else ""
        parts.append(("Where", f"not found: no method's top units beat random units (rank test, p ≤ {ALPHA:g}) within "
                               f"+{report.loss_budget:g} nats/token of neutral-text loss.{best}"))
    else:
        u, m, k = top["unit_type"], top["method"], int(top["k_budget"])
        one, many = UNIT_WORDS[u]
        word = many if k > 1 else one
        parts.append(("Where", f"{', '.join(str(top['top_units']).split(' '))} — the top {k} {word} by {m}, the method "
                               f"whose top units remove the most bias beyond random units within "
                               f"+{report.loss_budget:g} nats/token of neutral-text loss."))
        eff = report.top_units
        eff = eff[(eff.unit_type == u) & (eff.method == m)] if len(eff) and "effect" in eff else eff.iloc[0:0]
        alone = ""
        if len(eff) and _finite(eff.iloc[0]["effect"]):
            e = eff.iloc[0]
            alone = f"{e['unit']} alone removes {_pct(e['effect'])}{_ci(e['effect_lo'], e['effect_hi'])} of it; "
        n_draws = len({r["seed"] for r in report.rows if r["method"] == "random"})
        parts.append(("How sure", f"{alone}its top-k beat {n_draws} random draws of {many} (rank test p = "
                                  f"{top['p_random']:.3f})."))
        rand = f" at {_signed(top['random_d_loss'])}" if _finite(top["random_d_loss"]) else ""
        parts.append(("Removing them", f"ablating the top {k} removes {_pct(top['removed'])}"
                                       f"{_ci(top['removed_lo'], top['removed_hi'])} of the bias at {_signed(top['d_loss'])} "
                                       f"nats/token of neutral-text loss; {k} random {word} remove "
                                       f"{_pct(top['random_removed'])}{rand}."))
        agree = _agreement_sentence(report, top)
        if agree:
            parts.append(("Methods agree", agree))
    if len(broken):
        names = ", ".join(f"{r.method} ({r.unit_type}, top-{r.k_max}: +{r.d_neutral_loss_kmax:.1f})"
                          for r in broken.itertuples())
        parts.append(("⚠ Breaks the model", f"{names} nats/token of neutral-text loss — these remove bias by breaking "
                                             "the model."))
    return parts


def answer_text(report) -> str:
    """The first screen's answer, plain text."""
    return " ".join(f"{label}: {text}" for label, text in answer_parts(report))


def answer_html(report) -> str:
    return "".join(f"<div><b>{html.escape(label)}.</b> {html.escape(text)}</div>" for label, text in answer_parts(report))


def answer_figure(report):
    """The first screen's figure: the winner's top units alone (effect ± interval); its top-k against random
    units (bias removed, with intervals); what that costs (Δ neutral-text loss), against random units."""
    from plotly.subplots import make_subplots

    top = winner(report)
    if top is None:
        return None
    u, m = top["unit_type"], top["method"]
    first = _first_ablation(report)
    fig = make_subplots(rows=1, cols=3, horizontal_spacing=0.1, column_widths=[0.28, 0.36, 0.36],
                        subplot_titles=[f"each top {UNIT_WORDS[u][0]} alone ({m})",
                                        f"its top-k vs k random {UNIT_WORDS[u][1]} ({first} ablation)",
                                        "cost: Δ neutral-text loss"])
    c = report.curves
    d = c[(c.unit_type == u) & (c.method == m) & (c.measure == "necessity") & (c.ablation == first)].sort_values("k")
    _effects_panel(fig, report, u, m)
    _removal_panel(fig, d, m)
    _cost_panel(fig, report, d)
    for col in (2, 3):
        fig.update_xaxes(type="log", dtick=math.log10(2), title_text="k", row=1, col=col)
    fig.update_layout(height=330, margin={"t": 40, "b": 50, "l": 60, "r": 20},
                      legend={"orientation": "h", "y": -0.3, "x": 0.3})
    return fig


def _band(x: list, lo: list, hi: list, color: str):
    import plotly.graph_objects as go

    return go.Scatter(x=x + x[::-1], y=hi + lo[::-1], fill="toself", mode="lines", fillcolor=color,
                      line={"width": 0}, hoverinfo="skip", showlegend=False)


def _effects_panel(fig, report, u: str, m: str) -> None:
    """Panel 1: each of the method's top units zero-ablated alone, with its 95% interval."""
    import plotly.graph_objects as go

    e = report.top_units
    e = e[(e.unit_type == u) & (e.method == m)].sort_values("rank") if len(e) and "effect" in e else e.iloc[0:0]
    e = e[_finite_rows(e["effect"])]
    if not len(e):
        return
    lo = (e["effect"] - e["effect_lo"]).fillna(0).clip(lower=0)
    hi = (e["effect_hi"] - e["effect"]).fillna(0).clip(lower=0)
    fig.add_trace(go.Bar(x=e["effect"].tolist(), y=e["unit"].tolist(), orientation="h", marker_color="#1f77b4",
                         error_x={"type": "data", "symmetric": False, "array": hi.tolist(), "arrayminus": lo.tolist()},
                         showlegend=False, hovertemplate="%{y}: removes %{x:.0%} alone<extra></extra>"), 1, 1)
    fig.update_yaxes(autorange="reversed", row=1, col=1)
    fig.update_xaxes(tickformat=".0%", title_text="share of the bias removed", row=1, col=1)


def _removal_panel(fig, d, m: str) -> None:
    """Panel 2: the share of the bias the top-k remove (95% band) against k random units (mean ± std)."""
    import plotly.graph_objects as go

    ks = d["k"].tolist()
    if "value_lo" in d and d["value_lo"].map(_finite).all():
        fig.add_trace(_band(ks, d["value_lo"].tolist(), d["value_hi"].tolist(), "rgba(31,119,180,0.18)"), 1, 2)
    r = d[_finite_rows(d["random_mean"])]
    std = r["random_std"].fillna(0)
    fig.add_trace(_band(r["k"].tolist(), (r["random_mean"] - std).tolist(), (r["random_mean"] + std).tolist(),
                        "rgba(120,120,120,0.2)"), 1, 2)
    fig.add_trace(go.Scatter(x=r["k"].tolist(), y=r["random_mean"].tolist(), mode="lines",
                             line={"color": "gray", "dash": "dash"}, name="random (mean ± std)", legendgroup="random"),
                  1, 2)
    fig.add_trace(go.Scatter(x=ks, y=d["value"].tolist(), mode="lines+markers", line={"color": "#1f77b4"},
                             name=f"{m} top-k", legendgroup="m", text=d["units"].tolist(),
                             hovertemplate="k=%{x}: removes %{y:.0%}<br>%{text}<extra></extra>"), 1, 2)
    fig.update_yaxes(tickformat=".0%", title_text="bias removed", row=1, col=2)


def _cost_panel(fig, report, d) -> None:
    """Panel 3: Δ neutral-text loss of the top-k against k random units, and the budget."""
    import plotly.graph_objects as go

    base = report.baseline.get("neutral_loss")
    if "neutral_loss" not in d or not _finite(base):
        return
    fig.add_trace(go.Scatter(x=d["k"].tolist(), y=(d["neutral_loss"] - base).tolist(), mode="lines+markers",
                             line={"color": "#1f77b4"}, showlegend=False, legendgroup="m",
                             hovertemplate="k=%{x}: Δloss %{y:+.3f}<extra></extra>"), 1, 3)
    if "random_neutral_loss" in d:
        rl = d[_finite_rows(d["random_neutral_loss"])]
        fig.add_trace(go.Scatter(x=rl["k"].tolist(), y=(rl["random_neutral_loss"] - base).tolist(), mode="lines",
                                 line={"color": "gray", "dash": "dash"}, showlegend=False, legendgroup="random",
                                 hovertemplate="random k=%{x}: Δloss %{y:+.3f}<extra></extra>"), 1, 3)
    fig.add_hline(y=report.loss_budget, line={"color": "#d62728", "dash": "dot", "width": 1}, row=1, col=3,
                  annotation_text=f"budget +{report.loss_budget:g}", annotation_position="top left")
    fig.update_yaxes(title_text="Δloss (nats/token)", row=1, col=3)


# ---------------------------------------------------------------------------------------
# Details
# ---------------------------------------------------------------------------------------
def curves_figure(report, measure: str = "necessity", ablations: list[str] | None = None):
    """Rows = ablations, columns = unit types: each method's curve over k and random's mean ± std band."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    c = report.curves
    c = c[c.measure == measure] if len(c) else c
    units = [u for u in ABLATABLE if len(c) and (c.unit_type == u).any()]
    abls = ablations or (list(dict.fromkeys(c["ablation"])) if len(c) else [])
    if not units or not abls:
        return go.Figure().update_layout(title=f"{measure}: nothing to show")
    fig = make_subplots(rows=len(abls), cols=len(units), shared_yaxes=True, horizontal_spacing=0.04,
                        vertical_spacing=0.08, subplot_titles=[f"{UNIT_TITLES[u]} — {a}" for a in abls for u in units])
    colors = _colors(report)
    shown = set()
    for i, a in enumerate(abls, 1):
        for j, u in enumerate(units, 1):
            d = c[(c.unit_type == u) & (c.ablation == a)]
            r = d.drop_duplicates("k").sort_values("k")
            r = r[_finite_rows(r["random_mean"]) & _finite_rows(r["random_std"])]
            if len(r):
                ks = r["k"].tolist()
                hi = (r["random_mean"] + r["random_std"]).tolist()
                lo = (r["random_mean"] - r["random_std"]).tolist()
                fig.add_trace(go.Scatter(x=ks + ks[::-1], y=hi + lo[::-1], mode="lines", fill="toself",
                                         fillcolor="rgba(120,120,120,0.2)", line={"width": 0}, hoverinfo="skip",
                                         name="random ± std", legendgroup="random", showlegend=False), i, j)
                fig.add_trace(go.Scatter(x=ks, y=r["random_mean"].tolist(), mode="lines", name="random k units",
                                         line={"color": "gray", "dash": "dash"}, legendgroup="random",
                                         showlegend="random" not in shown), i, j)
                shown.add("random")
            for m, g in d.groupby("method", sort=False):
                g = g.sort_values("k")
                g = g[_finite_rows(g["value"])]
                if not len(g):
                    continue
                fig.add_trace(go.Scatter(x=g["k"].tolist(), y=g["value"].tolist(), mode="lines+markers", name=m,
                                         line={"color": colors.get(m, "black")}, legendgroup=m,
                                         showlegend=m not in shown, text=g["units"].tolist(),
                                         hovertemplate=f"{m}<br>k=%{{x}}<br>{measure} %{{y:.3f}}<br>%{{text}}<extra></extra>"),
                              i, j)
                shown.add(m)
    fig.update_xaxes(type="log", dtick=math.log10(2), title_text="k")
    what = {"necessity": "share of the bias removed by ablating the top-k",
            "sufficiency": "share of the bias the top-k alone carry"}[measure]
    fig.update_yaxes(title_text=what if measure == "necessity" else "share kept", col=1)
    fig.update_layout(title=f"{measure.capitalize()}: {what} (held-out prompts) vs k random units",
                      height=260 * len(abls) + 120, legend={"orientation": "h", "y": -0.12})
    return fig


def necessity_figure(report, ablation: str = "zero"):
    """Necessity curves of one ablation, one panel per unit type."""
    fig = curves_figure(report, "necessity", [ablation])
    fig.update_layout(title=f"{report.task.name} on {report.model_name}: share of the bias removed by "
                            f"{ablation}-ablating each method's top-k vs k random units", height=430)
    return fig


def _loss_panels(report, ablation: str):
    """(necessity curves under `ablation`, their unit types, one subplot per unit type, the neutral loss
    before, the methods' colours), or None when the report measured no neutral loss."""
    from plotly.subplots import make_subplots

    c = report.curves
    base = report.baseline.get("neutral_loss")
    if not len(c) or "neutral_loss" not in c or not _finite(base):
        return None
    c = c[(c.measure == "necessity") & (c.ablation == ablation)]
    units = [u for u in ABLATABLE if (c.unit_type == u).any()]
    fig = make_subplots(rows=1, cols=len(units), shared_yaxes=True, horizontal_spacing=0.04,
                        subplot_titles=[UNIT_TITLES[u] for u in units])
    return c, units, fig, base, _colors(report)


def ranking_figure(report):
    """Bias removed against its cost: each method's top-k (k = 1, 2, 4, …) as a path of (Δ neutral-text loss,
    share of the bias removed) under the first ablation, random draws in grey, the budget as a line.
    Δloss beyond CLIP nats is drawn at the edge (a triangle; the hover gives the value)."""
    import plotly.graph_objects as go

    first = _first_ablation(report)
    panels = _loss_panels(report, first)
    if panels is None:
        return None
    c, units, fig, base, colors = panels
    shown = set()
    rand = [r for r in report.rows if r["method"] == "random" and r["measure"] == "necessity"
            and r["ablation"] == first and _finite(r.get("neutral_loss"))]
    for j, u in enumerate(units, 1):
        rr = [r for r in rand if r["unit_type"] == u]
        if rr:
            x = [r["neutral_loss"] - base for r in rr]
            fig.add_trace(go.Scatter(x=[min(v, CLIP) for v in x], y=[r["value"] for r in rr], mode="markers",
                                     marker={"color": "rgba(120,120,120,0.5)", "size": 6}, name="random k units",
                                     legendgroup="random", showlegend="random" not in shown,
                                     text=[f"k={r['k']} Δloss {v:+.3f}" for r, v in zip(rr, x)],
                                     hovertemplate="random %{text}<br>removes %{y:.0%}<extra></extra>"), 1, j)
            shown.add("random")
        for m, g in c[c.unit_type == u].groupby("method", sort=False):
            g = g.sort_values("k")
            g = g[_finite_rows(g["value"]) & _finite_rows(g["neutral_loss"])]
            if not len(g):
                continue
            x = (g["neutral_loss"] - base).tolist()
            fig.add_trace(go.Scatter(x=[min(v, CLIP) for v in x], y=g["value"].tolist(), mode="lines+markers",
                                     marker={"symbol": ["triangle-right" if v > CLIP else "circle" for v in x], "size": 8},
                                     line={"color": colors.get(m, "black")}, name=m, legendgroup=m,
                                     showlegend=m not in shown,
                                     text=[f"k={k} Δloss {v:+.3f}" for k, v in zip(g["k"], x)],
                                     hovertemplate=f"{m} %{{text}}<br>removes %{{y:.0%}}<extra></extra>"), 1, j)
            shown.add(m)
        fig.add_vline(x=report.loss_budget, line={"color": "#d62728", "dash": "dot", "width": 1}, row=1, col=j)  # pyright: ignore[reportArgumentType] - plotly accepts int rows and cols (its hints say "all")
    fig.update_xaxes(title_text="Δ neutral-text loss (nats/token)", range=[-0.05, CLIP * 1.04])
    fig.update_yaxes(title_text="share of the bias removed", tickformat=".0%", col=1)
    fig.update_layout(title=f"Bias removed against its cost ({first} ablation, top-k for each k; red line: the "
                            f"+{report.loss_budget:g}-nat budget; ▶ beyond +{CLIP:g})", height=400,
                      legend={"orientation": "h", "y": -0.2})
    return fig


def agreement_figure(report, unit_type: str):
    """Spearman's ρ between every pair of methods on one unit type; hover: top-k overlaps."""
    import plotly.graph_objects as go

    a = report.agreement
    a = a[a.unit_type == unit_type]
    names = list(report.scores.get(unit_type, {}))
    z, text = [], []
    for x in names:
        zr, tr = [], []
        for y in names:
            if x == y:
                zr.append(1.0)
                tr.append(f"{x}")
                continue
            row = a[(a.method_a == x) & (a.method_b == y)]
            rho = float(row["spearman"].iloc[0]) if len(row) else float("nan")
            ov = " ".join(f"@{c.split('@')[1]} {row[c].iloc[0]:.2f}" for c in row.columns
                          if c.startswith("overlap@") and len(row) and _finite(row[c].iloc[0]))
            zr.append(rho if _finite(rho) else 0.0)
            tr.append(f"{x} vs {y}<br>ρ = {rho:.2f}" if _finite(rho) else f"{x} vs {y}<br>ρ undefined")
            tr[-1] += f"<br>top-k overlap {ov}" if ov else ""
        z.append(zr)
        text.append(tr)
    cell = [[("–" if "undefined" in t else f"{v:.2f}") for v, t in zip(zr, tr)] for zr, tr in zip(z, text)]
    fig = go.Figure(go.Heatmap(z=z, x=names, y=names, zmin=-1, zmax=1, zmid=0, colorscale="RdBu",
                               text=cell, texttemplate="%{text}", hovertext=text, hoverinfo="text",
                               colorbar={"title": "ρ"}))
    fig.update_layout(title=f"{UNIT_TITLES[unit_type]}", height=140 + 36 * len(names), width=260 + 60 * len(names),
                      yaxis={"autorange": "reversed"}, margin={"t": 40, "b": 10})
    return fig


def capability_figure(report, ablation: str | None = None):
    """Δ neutral-text loss with each method's top-k ablated, by k, beside k random units (mean of the draws
    measured), one panel per unit type; the budget as a line."""
    import plotly.graph_objects as go

    ablation = ablation or _first_ablation(report)
    panels = _loss_panels(report, ablation)
    if panels is None:
        return None
    c, units, fig, base, colors = panels
    shown = set()
    for j, u in enumerate(units, 1):
        d = c[c.unit_type == u]
        r = d.drop_duplicates("k").sort_values("k")
        if "random_neutral_loss" in r:
            r = r[_finite_rows(r["random_neutral_loss"])]
            fig.add_trace(go.Scatter(x=r["k"].tolist(), y=(r["random_neutral_loss"] - base).tolist(), mode="lines",
                                     line={"color": "gray", "dash": "dash"}, name="random k units",
                                     legendgroup="random", showlegend="random" not in shown), 1, j)
            shown.add("random")
        for m, g in d.groupby("method", sort=False):
            g = g[_finite_rows(g["neutral_loss"])].sort_values("k")
            if not len(g):
                continue
            fig.add_trace(go.Scatter(x=g["k"].tolist(), y=(g["neutral_loss"] - base).tolist(), mode="lines+markers",
                                     line={"color": colors.get(m, "black")}, name=m, legendgroup=m,
                                     showlegend=m not in shown, text=g["units"].tolist(),
                                     hovertemplate=f"{m} k=%{{x}}: Δloss %{{y:+.3f}}<br>%{{text}}<extra></extra>"), 1, j)
            shown.add(m)
        fig.add_hline(y=report.loss_budget, line={"color": "#d62728", "dash": "dot", "width": 1}, row=1, col=j)  # pyright: ignore[reportArgumentType] - plotly accepts int rows and cols (its hints say "all")
    fig.update_xaxes(type="log", dtick=math.log10(2), title_text="k")
    fig.update_yaxes(title_text="Δ neutral-text loss (nats/token)", col=1)
    fig.update_layout(title=f"Capability: neutral-text loss change with each method's top-k {ablation}-ablated "
                            f"(clean {base:.3f} nats/token)", height=380, legend={"orientation": "h", "y": -0.2})
    return fig


def report_figures(report) -> dict:
    """Every figure of the page, by name."""
    figs = {"answer": answer_figure(report), "ranking": ranking_figure(report),
            "necessity": curves_figure(report, "necessity"), "sufficiency": curves_figure(report, "sufficiency"),
            "capability": capability_figure(report)}
    for u in report.scores:
        if len(report.scores[u]) > 1:
            figs[f"agreement_{u}"] = agreement_figure(report, u)
    return {k: v for k, v in figs.items() if v is not None}


# ---------------------------------------------------------------------------------------
# The page
# ---------------------------------------------------------------------------------------
CSS = """body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:1em auto;max-width:1360px;
color:#222;padding:0 1em}h1{font-size:1.35em;margin:.2em 0 .3em}h2{font-size:1.2em;border-bottom:1px solid #ddd;
padding-bottom:.2em;margin-top:1.6em}.answer{font-size:.98em;line-height:1.4;margin:.3em 0 .4em;max-width:80em}.answer div{margin:.1em 0}
table{border-collapse:collapse;font-size:.82em;margin:.6em 0;table-layout:auto}td,th{border:1px solid #ddd;
padding:.2em .45em;text-align:left;vertical-align:top;white-space:nowrap;overflow:hidden;text-overflow:ellipsis;
max-width:15em}th{background:#f4f4f4}td.num{text-align:right}.ok{color:#1a7f1a;font-weight:600}
.bad{color:#b00020;font-weight:600}.note{background:#fff8e1;border-left:4px solid #f0b400;padding:.3em .8em;
margin:.3em 0;font-size:.9em}code{background:#f4f4f4;padding:0 .2em}.small{font-size:.85em;color:#555}
.scroll{overflow-x:auto}.sub{color:#555;font-size:.9em;margin:0 0 .4em}.flex{display:flex;flex-wrap:wrap;gap:1em}"""

RULES = """<ul class="small">
<li><b>Units.</b> head = (layer, head); neuron = (layer, neuron); layer component = a layer's whole attention
(all heads) or MLP (all neurons); site = (layer, position, site) for resid_pre, attn_out, mlp_out.</li>
<li><b>Aggregation</b> (finer → coarser, first-order effects add): neurons of a layer → its MLP (sum); heads of
a layer → its attention (sum); a site's positions → the layer component (sum). Exact for attribution (linear in
z and in the neurons); first-order for patching and tracing.</li>
<li><b>Sign.</b> Every score is oriented so that a unit that carries the bias ranks high: patching/tracing —
restoring the clean unit moves the metric toward the clean bias; attribution (clean-run gradient) — corrupting it
takes bias away; gradient × activation — its first-order push on the bias metric; NAS — prefers " No"; CRISPR —
raises the biased option. Weight norm, mean |activation| and attention to " No" rank by size.</li>
<li><b>Faithfulness</b> on the held-out prompts. necessity(k) = σ·(m_clean − m_ablated)/B, the share of the bias
removed by ablating the top-k (zero / mean / resample; mean and resample draw from the reference prompts: the
twins for pair tasks); sufficiency(k) = the share of the bias present when only the top-k carry clean
activations (pair tasks: written into the twins' run; other tasks: every other unit mean-ablated).
B = |m_clean − m_ref|, σ its sign, m_ref the twins' metric (pairs) or 0. Cost: Δ neutral-text loss with the top-k
ablated (first ablation). Random: k random units — each draw a random order of all units, its first k.</li>
<li><b>How sure.</b> Intervals are 95% bootstrap intervals over the held-out prompts, resampling professions and,
independently, their neutral twins (a twin word shared by several professions is one draw), questions or items.</li>
<li><b>Beats random</b>: a rank test, fair to few units and to many. At each k the method's necessity (first
ablation) is ranked among the random draws' (each draw a random order of all units, its first k); p = the share of curves (the method's and every random draw's)
whose mean rank over k is at least the method's. A method beats random when p ≤ """ + f"{ALPHA:g}" + """, it
removes more than random on average, and the held-out bias's interval excludes 0.</li>
<li><b>Ranking</b>: by the bias the top-k remove beyond k random units within the loss budget (of the k whose
Δloss ≤ budget, the one where removed − random's removed is largest), those that beat random first; a method
with no k within budget ranks last. ⚠ = ablating its top-k at the largest
k raises the loss by more than """ + f"{BREAKS:g}" + """ nat: it removes bias by breaking the model.</li>
</ul>"""


def _cell(v, fmt: str = "") -> str:
    """One table cell; fmt: 'pct', 'signed', 'int' or '' (3 decimals); text is cut to one line, whole on hover."""
    if v is None or (isinstance(v, float) and v != v):
        return "<td class='num'>–</td>"
    if isinstance(v, bool):
        return f"<td>{'✓' if v else ''}</td>"
    if isinstance(v, (int, float)):
        if isinstance(v, float) and not math.isfinite(v):
            return f"<td class='num'>{'∞' if v > 0 else '−∞'}</td>"
        s = {"pct": lambda: _pct(v), "signed": lambda: _signed(v), "int": lambda: f"{int(v)}"}.get(
            fmt, lambda: f"{v}" if isinstance(v, int) else f"{v:.3f}")()
        return f"<td class='num'>{s}</td>"
    s = html.escape(str(v))
    return f"<td title=\"{s}\">{s}</td>"


def table(df, cols: list[tuple[str, str]], fmt: dict[str, str] | None = None) -> str:
    """An HTML table of `cols` (column, header) with one-line cells: long text is cut, the whole on hover;
    `fmt` maps a column to its number format (see _cell)."""
    if df is None or not len(df):
        return "<p class='small'>(none)</p>"
    fmt = fmt or {}
    cols = [(c, h) for c, h in cols if c in df]
    head = "".join(f"<th title=\"{html.escape(c)}\">{html.escape(h)}</th>" for c, h in cols)
    body = []
    for _, r in df.iterrows():
        cells = [_cell(r[c].item() if hasattr(r[c], "item") else r[c], fmt.get(c, "")) for c, _ in cols]
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<div class='scroll'><table><tr>{head}</tr>{''.join(body)}</table></div>"


def _ranking_table(report) -> str:
    r = report.ranking.copy()
    if not len(r):
        return table(r, [])
    r["beats_random"] = r["beats_random"].map(lambda v: "✓" if v else "")
    r["breaks_model"] = [f"⚠ {d:+.2f}" if b else (f"{d:+.2f}" if _finite(d) else "–")
                         for b, d in zip(r["breaks_model"], r["d_neutral_loss_kmax"])]
    r["removed_ci"] = [_ci(lo, hi).strip() for lo, hi in zip(r["removed_lo"], r["removed_hi"])]
    cols = [("rank", "#"), ("method", "method"), ("unit_type", "unit"), ("k_budget", "k"),
            ("removed", "bias removed"), ("removed_ci", "95% interval"), ("d_loss", "Δloss"),
            ("random_removed", "random removes"), ("random_d_loss", "random Δloss"),
            ("beyond_random", "beyond random"), ("p_random", "p vs random"),
            ("beats_random", "beats random"), ("breaks_model", "Δloss at largest k"), ("sufficiency_area", "sufficiency"),
            ("top_units", "top units")]
    return table(r, cols, {"removed": "pct", "random_removed": "pct", "beyond_random": "pct", "k_budget": "int",
                           "d_loss": "signed", "random_d_loss": "signed", "rank": "int"})


def report_html(report) -> str:
    """The whole page: the answer and its figure first, then ranking, planted units, curves, agreement, top units,
    capability, rules. plotly.js once, in <head>."""
    import plotly.io as pio
    from plotly.offline import get_plotlyjs

    figs = report_figures(report)

    def fig_html(name):
        f = figs.get(name)
        return "" if f is None else pio.to_html(f, full_html=False, include_plotlyjs=False, config=CONFIG)

    b = report.baseline
    task = report.task
    esc = html.escape
    sizes = task.sizes()
    head = (f"<h1>Where is the bias? {esc(task.name)} on {esc(report.model_name)}</h1>"
            f"<div class='answer'>{answer_html(report)}</div>")
    sub = (f"<p class='sub'>{esc(task.description)}. {sizes['locate']} prompts/items locate, {sizes['test']} held out. "
           f"Methods: {esc(', '.join(report.methods))}. Neutral-text loss {b.get('neutral_loss', float('nan')):.3f}"
           + (f"; accuracy {b['accuracy']:.3f}" if "accuracy" in b else "")
           + (f"; precision − recall {b['pr_gap']:+.3f}" if "pr_gap" in b else "") + ".</p>")
    notes = "".join(f"<div class='note'>{esc(n)}</div>" for n in report.notes)
    planted = ""
    if report.planted:
        rows = "".join(f"<tr><td>{esc(p['name'])}</td><td>{esc(p['unit'])}</td><td>"
                       + ", ".join(f"{esc(m)} #{k}" + (f" (tied with {p['ties'][m]})" if p.get('ties', {}).get(m) else "")
                                   for m, k in p["ranks"].items()) + "</td></tr>"
                       for p in report.planted)
        planted = ("<h2>Planted units (model organism)</h2><table><tr><th>planted</th><th>unit</th>"
                   f"<th>rank by each method</th></tr>{rows}</table>")
    top = table(report.top_units, [("unit_type", "unit type"), ("method", "method"), ("rank", "#"), ("unit", "unit"),
                                   ("score", "score"), ("effect", "alone removes"), ("effect_lo", "from"),
                                   ("effect_hi", "to"), ("most_active", "most active on (special tokens hidden)"),
                                   ("attends_to", "answer attends to"), ("token", "token")],
                {"effect": "pct", "effect_lo": "pct", "effect_hi": "pct", "rank": "int"})
    timings = ", ".join(f"{k} {v['seconds']:.1f} s{' (cached)' if v.get('cached') else ''}"
                        for k, v in report.timings.items())
    agreement = "<div class='flex'>" + "".join(fig_html(f"agreement_{u}") for u in report.scores) + "</div>"
    body = (head + fig_html("answer") + sub + notes
            + "<h2>Ranking: bias removed within the budget</h2>" + _ranking_table(report) + fig_html("ranking")
            + planted + "<h2>Necessity</h2>" + fig_html("necessity")
            + "<h2>Sufficiency</h2>" + fig_html("sufficiency")
            + "<h2>Where the methods agree (Spearman ρ; hover: top-k overlap)</h2>" + agreement
            + "<p class='small'>Every pair of methods: <code>tables/agreement.csv</code>.</p>"
            + "<h2>Top units</h2>" + top + "<h2>Capability</h2>" + fig_html("capability")
            + "<h2>Rules</h2>" + RULES + f"<p class='small'>Timings: {esc(timings)}.</p>")
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'>"
            f"<meta name='viewport' content='width=device-width, initial-scale=1'>"
            f"<title>Locate report — {esc(task.name)}</title><style>{CSS}</style>"
            f"<script type='text/javascript'>{get_plotlyjs()}</script></head><body>{body}</body></html>")
