"""Plotly figures of component scores: layer × head and layer × position heatmaps, bars."""

from __future__ import annotations

import torch

from .errors import LensBiasError
from .files import write_text
from .scores import ComponentScores


def _values(scores: ComponentScores, normalized: bool) -> torch.Tensor:
    if normalized:
        try:
            return scores.normalized
        except LensBiasError:
            pass
    return scores.effect


def heatmap(scores: ComponentScores, *, normalized: bool = True, title: str | None = None):
    """A heatmap of 2-D scores: layer × head, layer × position (token labels) or layer × neuron."""
    import plotly.graph_objects as go

    z = _values(scores, normalized)
    if z.ndim == 3 and scores.dims == ("layer", "pos", "head"):
        z = z.abs().amax(-1) * torch.sign(z.sum(-1))  # strongest head per position
        dims = ("layer", "pos")
    else:
        dims = scores.dims
    if z.ndim != 2:
        raise LensBiasError(f"heatmap needs 2-D scores, got dims {scores.dims}")
    layers = scores.extra.get("layers", list(range(z.shape[0])))
    x_axis = dims[1]
    if x_axis == "pos" and scores.tokens is not None:
        x = [f"{i}: {t}" for i, t in enumerate(scores.tokens[: z.shape[1]])]
    else:
        x = [f"{x_axis} {i}" for i in range(z.shape[1])]
    y = [f"layer {l}" for l in layers]
    label = "normalised effect" if normalized else "effect"
    hover = [[f"layer {layers[i]}, {x[j]}<br>{label}: {z[i, j]:.4f}" for j in range(z.shape[1])]
             for i in range(z.shape[0])]
    lim = float(z.abs().max()) or 1.0
    fig = go.Figure(go.Heatmap(z=z.tolist(), x=x, y=y, text=hover, hoverinfo="text",
                               colorscale="RdBu", zmid=0, zmin=-lim, zmax=lim, colorbar={"title": label}))
    fig.update_layout(title=title or f"{scores.method} — {scores.component}", xaxis_title=x_axis,
                      yaxis_title="layer", yaxis={"autorange": "reversed"})
    return fig


def top_bar(scores: ComponentScores, k: int = 20, *, title: str | None = None):
    """A bar chart of the k components with the largest |effect|."""
    import plotly.express as px

    top = scores.top(k)
    coord = list(scores.dims)
    top["component_id"] = top[coord].astype(str).agg(".".join, axis=1).radd(scores.component + " ")
    fig = px.bar(top, x="component_id", y="effect", hover_data=coord,
                 title=title or f"top {k} — {scores.method} {scores.component}")
    fig.update_layout(xaxis_title="component (" + ".".join(coord) + ")")
    return fig


def save_figure(fig, path) -> None:
    """Write a figure as a self-contained HTML file (plotly.js inside: opens offline), atomically."""
    write_text(path, fig.to_html(include_plotlyjs=True))


def markdown_table(df, index: bool = False) -> str:
    """A pandas table as GitHub markdown (floats to 3 decimals), without the tabulate package."""
    if index:
        df = df.reset_index()
    cols = list(df.columns)
    lines = ["| " + " | ".join(map(str, cols)) + " |", "|" + "---|" * len(cols)]
    for _, r in df.iterrows():
        lines.append("| " + " | ".join(f"{v:.3f}" if isinstance(v, float) else str(v).replace("|", "\\|") for v in r) + " |")
    return "\n".join(lines)
