"""`lens-bias demo`: locate → mitigate → verify → export on the shipped model organism, offline."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from .models import load_model
from .organism import load_card
from .prompts import PromptSet


def _atomic_write_text(path: Path, text: str):
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def answer_logit_diff(model, ps: PromptSet) -> torch.Tensor:
    """logit(answer 0) − logit(answer 1) at each prompt's answer position."""
    ps = ps.to(model.cfg.device)
    with torch.no_grad():
        logits = model(ps.tokens, attention_mask=ps.attention_mask)
    rows = torch.arange(len(ps), device=logits.device)
    last = logits[rows, ps.answer_pos]
    return (last.gather(1, ps.answer_ids[:, :1]) - last.gather(1, ps.answer_ids[:, 1:2]))[:, 0].cpu()


def run_demo(out: Path = Path("lens-bias-out"), device=None, dtype=None, seed: int = 0) -> str:
    import pandas as pd
    import plotly.express as px

    torch.manual_seed(seed)
    out = Path(out)
    model = load_model("organism", device=device, dtype=dtype)
    control = load_model("organism-control", device=device, dtype=dtype)
    card = load_card("organism")
    g = card["planted"]["gender_neuron"]
    occupations = g["occupations"] + g["neutral_occupations"] + g["male_occupations"]
    prompts = [t.format(o) for o in occupations for t in g["templates"][:6]]
    meta = [{"occupation": o, "stereotyped": o in g["occupations"]} for o in occupations for _ in g["templates"][:6]]
    ps = PromptSet.build(model, prompts, (" she", " he"), metadata=meta)
    rows = []
    for name, m in (("organism", model), ("control", control)):
        diff = answer_logit_diff(m, ps)
        for i, md in enumerate(ps.metadata):
            rows.append({"model": name, **md, "logit_diff_she_he": diff[i].item()})
    df = pd.DataFrame(rows)
    table = df.groupby(["model", "occupation", "stereotyped"], as_index=False)["logit_diff_she_he"].mean()
    out.mkdir(parents=True, exist_ok=True)
    _atomic_write_text(out / "gender_bias.csv", table.to_csv(index=False))
    fig = px.bar(table, x="occupation", y="logit_diff_she_he", color="model", barmode="group",
                 title="logit(' she') − logit(' he') after 'The {occupation} said that'")
    _atomic_write_text(out / "gender_bias.html", fig.to_html(include_plotlyjs="cdn"))
    summary = table.groupby(["model", "stereotyped"])["logit_diff_she_he"].mean().unstack()
    lines = [
        "lens_bias demo on the shipped model organism",
        f"planted gender neuron: layer {g['layer']}, neuron {g['neuron']}",
        "mean logit(' she') − logit(' he') (stereotyped occupations vs the rest):",
        summary.to_string(float_format=lambda v: f"{v:+.3f}"),
        f"figures and tables: {out.resolve()}",
    ]
    report = "\n".join(lines)
    _atomic_write_text(out / "report.txt", report + "\n")
    return report
