"""The report's figures (plotly) and its one self-contained HTML page (plotly.js embedded once: the page
opens offline). Figures hold finite numbers only: an undefined value is left out, never drawn as 0."""

from __future__ import annotations

import html
import math

from .faithfulness import BEATS_RANDOM
from .units import ABLATABLE

UNIT_TITLES = {"head": "heads (layer, head)", "neuron": "neurons (layer, neuron)",
               "layer": "layer components (attn | mlp)", "site": "sites (layer, position, site)"}
PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf", "#bcbd22"]


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def _colors(report) -> dict[str, str]:
    names = [m for m in report.methods if m != "random"]
    return {m: PALETTE[i % len(PALETTE)] for i, m in enumerate(names)}


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
            r = r[r["random_mean"].map(_finite) & r["random_std"].map(_finite)]
            if len(r):
                ks = r["k"].tolist()
                hi = (r["random_mean"] + r["random_std"]).tolist()
                lo = (r["random_mean"] - r["random_std"]).tolist()
                fig.add_trace(go.Scatter(x=ks + ks[::-1], y=hi + lo[::-1], mode="lines", fill="toself", fillcolor="rgba(120,120,120,0.2)",
                                         line={"width": 0}, hoverinfo="skip", name="random ± std",
                                         legendgroup="random", showlegend=False), i, j)
                fig.add_trace(go.Scatter(x=ks, y=r["random_mean"].tolist(), mode="lines", name="random k units",
                                         line={"color": "gray", "dash": "dash"}, legendgroup="random",
                                         showlegend="random" not in shown), i, j)
                shown.add("random")
            for m, g in d.groupby("method", sort=False):
                g = g.sort_values("k")
                g = g[g["value"].map(_finite)]
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
    """The main figure: necessity curves of one ablation, one panel per unit type."""
    fig = curves_figure(report, "necessity", [ablation])
    fig.update_layout(title=f"{report.task.name} on {report.model_name}: share of the bias removed by "
                            f"{ablation}-ablating each method's top-k vs k random units", height=430)
    return fig


def ranking_figure(report):
    """Necessity area above random per (method, unit type), with random's spread as the error bar."""
    import plotly.graph_objects as go

    r = report.ranking
    r = r[r["area"].map(_finite)] if len(r) else r
    labels = [f"{m} · {u}" for m, u in zip(r["method"], r["unit_type"])]
    colors = ["#2ca02c" if b else "#999999" for b in r["beats_random"]]
    fig = go.Figure(go.Bar(x=r["area"].tolist(), y=labels, orientation="h", marker_color=colors,
                           error_x={"type": "data", "array": [BEATS_RANDOM * s for s in r["spread"].fillna(0)]},
                           hovertemplate="%{y}: area %{x:.3f}<extra></extra>"))
    fig.update_layout(title=f"Method ranking: green (beats random) first, then by necessity above random "
                            f"(mean over k and ablations); error bar = {BEATS_RANDOM:g}× random's spread",
                      yaxis={"autorange": "reversed"}, xaxis_title="share of the bias, above random",
                      height=max(260, 28 * len(labels) + 120))
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
                               colorbar={"title": "Spearman ρ"}))
    fig.update_layout(title=f"Agreement on {UNIT_TITLES[unit_type]}: Spearman ρ (hover: top-k overlap)",
                      height=120 + 40 * len(names), width=200 + 60 * len(names), yaxis={"autorange": "reversed"})
    return fig


def capability_figure(report, ablation: str = "zero"):
    """Neutral-text loss change with each method's top-k ablated at the largest k, beside k random units."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    base = report.baseline.get("neutral_loss")
    rows = [r for r in report.rows if r["measure"] == "necessity" and r["ablation"] == ablation
            and _finite(r.get("neutral_loss")) and (r["method"] != "random" or r["seed"] == 0)]
    if not rows or not _finite(base):
        return None
    units = [u for u in ABLATABLE if any(r["unit_type"] == u for r in rows)]
    fig = make_subplots(rows=1, cols=len(units), shared_yaxes=True,
                        subplot_titles=[f"{UNIT_TITLES[u]}, k = {max(r['k'] for r in rows if r['unit_type'] == u)}"
                                        for u in units])
    colors = _colors(report)
    for j, u in enumerate(units, 1):
        rr = [r for r in rows if r["unit_type"] == u]
        names = [r["method"] for r in rr]
        fig.add_trace(go.Bar(x=names, y=[r["neutral_loss"] - base for r in rr], showlegend=False,
                             marker_color=[colors.get(n, "gray") for n in names],
                             text=[r["units"] for r in rr], hovertemplate="%{x}: Δ loss %{y:.3f}<br>%{text}<extra></extra>"),
                      1, j)
    fig.update_yaxes(title_text="Δ neutral-text loss (nats/token)", col=1)
    fig.update_layout(title=f"Capability: neutral-text loss change with each method's top-k {ablation}-ablated "
                            f"(clean {base:.3f}; random: one draw)", height=380)
    return fig


def report_figures(report) -> dict:
    """Every figure of the page, by name."""
    figs = {"ranking": ranking_figure(report), "necessity_zero": necessity_figure(report, "zero")
            if "zero" in set(report.curves.get("ablation", [])) else None,
            "necessity": curves_figure(report, "necessity"), "sufficiency": curves_figure(report, "sufficiency")}
    for u in report.scores:
        if len(report.scores[u]) > 1:
            figs[f"agreement_{u}"] = agreement_figure(report, u)
    figs["capability"] = capability_figure(report, "zero" if "zero" in set(report.curves.get("ablation", []))
                                           else report.rows[0]["ablation"] if report.rows else "zero")
    return {k: v for k, v in figs.items() if v is not None}


# ---------------------------------------------------------------------------------------
# The page
# ---------------------------------------------------------------------------------------
CSS = """body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1200px;
color:#222;padding:0 1em}h1{font-size:1.6em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;font-size:.85em;margin:.6em 0}td,th{border:1px solid #ddd;padding:.25em .5em;
text-align:left;vertical-align:top}th{background:#f4f4f4}.ok{color:#1a7f1a;font-weight:600}.no{color:#999}
.note{background:#fff8e1;border-left:4px solid #f0b400;padding:.4em .8em;margin:.4em 0}code{background:#f4f4f4;
padding:0 .2em}.small{font-size:.85em;color:#555}"""

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
B = |m_clean − m_ref|, σ its sign, m_ref the twins' metric (pairs) or 0. Random: k random units, mean ± std
over seeds.</li>
<li><b>Ranking</b>: area = mean over k and ablations of (necessity − random mean); a method beats random when
its area exceeds """ + f"{BEATS_RANDOM:g}" + """ × random's spread (mean std) and the held-out bias is significant.
Methods that beat random rank first, then the rest; within each group by area (a large area with a larger
spread is noise, and never ranks above a method that beats random).</li>
</ul>"""


RANK_RULE = ("<p class='small'>Ranking rule: the (method, unit type) pairs whose top-k beat random (necessity area "
             f"above random &gt; {BEATS_RANDOM:g} × random's spread, on a significant held-out bias) come first, then "
             "the rest; within each group by area, highest first.</p>")


def _table(df, cols=None, floats: int = 3) -> str:
    if df is None or not len(df):
        return "<p class='small'>(none)</p>"
    d = df[[c for c in cols if c in df]] if cols else df
    return d.to_html(index=False, float_format=lambda v: f"{v:.{floats}f}", na_rep="–", border=0, escape=True)


def report_html(report) -> str:
    """The whole page: ranking first, planted units, curves, agreement, top units, capability, rules."""
    import plotly.io as pio

    figs = report_figures(report)
    first = [True]

    def fig_html(name):
        f = figs.get(name)
        if f is None:
            return ""
        out = pio.to_html(f, full_html=False, include_plotlyjs=bool(first[0]), config={"displaylogo": False})
        first[0] = False
        return out

    b = report.baseline
    task = report.task
    esc = html.escape
    head = (f"<h1>Locate report — {esc(task.name)} on {esc(report.model_name)}</h1>"
            f"<p>{esc(task.description)}. {task.sizes()['locate']} prompts/items locate, {task.sizes()['test']} held out "
            f"for the ablations. Methods: {esc(', '.join(report.methods))}.</p>"
            f"<p>Bias metric on the held-out prompts: <b>{b['bias_clean']:+.3f}</b> (reference {b['bias_reference']:+.3f}"
            f", t = {b.get('test_t', float('nan')):.1f}); neutral-text loss {b.get('neutral_loss', float('nan')):.3f}"
            + (f"; accuracy {b['accuracy']:.3f}" if "accuracy" in b else "")
            + (f"; precision − recall {b['pr_gap']:+.3f}" if "pr_gap" in b else "") + ".</p>")
    notes = "".join(f"<div class='note'>{esc(n)}</div>" for n in report.notes)
    r = report.ranking.copy()
    if len(r):
        r["beats_random"] = r["beats_random"].map(lambda v: "✓" if v else "")
    ranking = _table(r, ["rank", "method", "unit_type", "area", "spread", "z", "beats_random", "area_zero", "area_mean",
                         "area_resample", "sufficiency_area", "necessity_k1_zero", "random_k1_zero",
                         "d_neutral_loss_kmax", "d_accuracy_kmax", "top_units"])
    planted = ""
    if report.planted:
        rows = "".join(f"<tr><td>{esc(p['name'])}</td><td>{esc(p['unit'])}</td><td>"
                       + ", ".join(f"{esc(m)} #{k}" for m, k in p["ranks"].items()) + "</td></tr>"
                       for p in report.planted)
        planted = ("<h2>Planted units (model organism)</h2><table><tr><th>planted</th><th>unit</th>"
                   f"<th>rank by each method</th></tr>{rows}</table>")
    top = _table(report.top_units, ["unit_type", "method", "rank", "unit", "score", "most_active", "attends_to", "token"])
    timings = ", ".join(f"{k} {v['seconds']:.1f} s{' (cached)' if v.get('cached') else ''}"
                        for k, v in report.timings.items())
    agreement = "".join(fig_html(f"agreement_{u}") for u in report.scores)
    body = (head + notes + "<h2>Which method's top units carry the bias</h2>" + RANK_RULE + fig_html("ranking") + ranking
            + planted + "<h2>Necessity</h2>" + fig_html("necessity_zero") + fig_html("necessity")
            + "<h2>Sufficiency</h2>" + fig_html("sufficiency")
            + "<h2>Where the methods agree</h2>" + agreement
            + _table(report.agreement, ["unit_type", "method_a", "method_b", "n_units", "spearman",
                                        "overlap@1", "overlap@2", "overlap@4", "overlap@8"], 2)
            + "<h2>Top units</h2>" + top + "<h2>Capability</h2>" + fig_html("capability")
            + "<h2>Rules</h2>" + RULES + f"<p class='small'>Timings: {esc(timings)}.</p>")
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>Locate report — {esc(task.name)}</title>"
            f"<style>{CSS}</style></head><body>{body}</body></html>")
