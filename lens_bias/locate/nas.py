"""Negative Attention Score, NAS (Yu et al. 2024, "Correcting Negative Bias in Large Language Models
through Negative Attention Score Alignment", NAACL 2025).

For a yes/no prompt whose instruction names both candidates, let A[i, k] be a head's attention
from query position i to key position k, t_Yes / t_No the positions of the positive (" Yes")
and negative (" No") candidate tokens in the instruction, L_I the first position after the
instruction and L_P the last prompt position (the one that predicts the answer). Per head and
prompt:

    NAS = Σ_{i=L_I}^{L_P} (A[i,t_Yes] + A[i,t_No]) · log((A[i,t_No] + ε) / (A[i,t_Yes] + ε)),   ε = 1e-9

large and positive when the head attends to the candidates and prefers the negative one; the
score of a head is its mean over the data set (prompts). `queries="answer"` sums over i = L_P
only (an option, not the paper's definition).

Source: the paper's own method section could not be read offline; the formula is its Eq. as
restated by Zheng et al.'s survey of attention heads (Eq. 7: i runs over prompt tokens, log of No
over Yes) and the query range L_I..L_P by summaries of the paper. ε only guards log(0).

Also reported: the mean attention over the same query positions to the negative candidate
(att_neg) and to the positive one (att_pos). Only the candidates' key columns of the patterns are
kept (a hook reads them and drops the rest): one forward per batch, no full cache.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from jaxtyping import Bool, Float
from torch import Tensor
from tqdm.auto import tqdm

from ..core.checks import check_finite
from ..core.errors import LensBiasError
from ..core.hooks import device_of, hook_name, last_resid, trace, unit_names
from ..core.methods import ChunkSums, LocateMethod
from ..core.models import HookedModel
from ..core.prompts import PromptSet
from ..core.scores import ComponentScores

EPS = 1e-9
NASQueries = Literal["after_instruction", "answer"]


def nas_terms(att_neg: Float[Tensor, "*batch query"], att_pos: Float[Tensor, "*batch query"],
              queries: Bool[Tensor, "*batch query"]) -> Float[Tensor, " *batch"]:
    """NAS = Σ_{i∈Q} (A[i,t_Yes] + A[i,t_No]) · log((A[i,t_No] + ε)/(A[i,t_Yes] + ε)) — the attention of
    every query position to each candidate in, the mask of the query positions Q; differentiable."""
    terms = (att_pos + att_neg) * (torch.log(att_neg + EPS) - torch.log(att_pos + EPS))
    return (terms * queries.to(terms.dtype)).sum(-1)


def query_mask(ps: PromptSet, queries: NASQueries = "after_instruction") -> Bool[Tensor, "batch pos"]:
    """Q per prompt: positions L_I..L_P (from the first token after the instruction to the answer
    position) or, with queries='answer', L_P alone."""
    if queries not in ("after_instruction", "answer"):
        raise LensBiasError(f"queries must be 'after_instruction' or 'answer', not {queries!r}")
    pos = torch.arange(ps.tokens.shape[1], device=ps.tokens.device)[None, :]
    last = ps.answer_pos.to(pos.device)[:, None]
    if queries == "answer":
        return pos == last
    first = torch.tensor([m["query_start"] for m in ps.metadata], device=pos.device)[:, None]
    return (pos >= first) & (pos <= last)


@dataclass
class NASResult(ComponentScores):
    """NAS per head: `values` (also `.nas`) [layer, head] is the data-set mean; `per_prompt`
    [prompt, layer, head]; `att_neg`/`att_pos` the mean attention to each candidate."""

    per_prompt: Tensor | None = None
    att_neg: Tensor | None = None
    att_pos: Tensor | None = None
    metadata: list[dict] = field(default_factory=list)

    @classmethod
    def of(cls, nas: Tensor, per_prompt: Tensor, att_neg: Tensor, att_pos: Tensor,
           metadata: list[dict] | None = None) -> NASResult:
        return cls(nas, ("layer", "head"), "head", "nas", per_prompt=per_prompt, att_neg=att_neg, att_pos=att_pos,
                   metadata=list(metadata or []))

    @property
    def nas(self) -> Tensor:
        return self.values

    def ranking(self):
        """Heads by NAS, highest first (pandas: layer, head, nas, att_neg, att_pos, rank)."""
        import pandas as pd

        L, H = self.nas.shape
        df = pd.DataFrame([{"layer": l, "head": h, "nas": float(self.nas[l, h]),
                            "att_neg": float(self.att_neg[l, h]), "att_pos": float(self.att_pos[l, h])}  # pyright: ignore[reportOptionalSubscript] - negative_attention_scores sets att_neg/att_pos
                           for l in range(L) for h in range(H)])
        df = df.sort_values("nas", ascending=False).reset_index(drop=True)
        df["rank"] = range(1, len(df) + 1)
        return df

    def top_heads(self, k: int = 5) -> list[tuple[int, int]]:
        """The k heads with the highest NAS, as (layer, head)."""
        return self.units(k)  # pyright: ignore[reportReturnType] - units of a [layer, head] score are pairs

    def per_prompt_frame(self):
        """One row per (prompt, layer, head) with the prompt's metadata."""
        import pandas as pd

        n, L, H = self.per_prompt.shape  # pyright: ignore[reportOptionalMemberAccess] - kept per prompt (checked above)
        rows = []
        for i in range(n):
            meta = self.metadata[i] if self.metadata else {}
            for l in range(L):
                for h in range(H):
                    rows.append({"prompt": i, "layer": l, "head": h, "nas": float(self.per_prompt[i, l, h]),  # pyright: ignore[reportOptionalSubscript] - kept per prompt (checked above)
                                 **{k: meta.get(k) for k in ("question", "template", "label")}})
        return pd.DataFrame(rows)

    def independence(self, heads: list[tuple[int, int]] | None = None):
        """For each head: variance of its per-prompt NAS across questions (template fixed, then
        averaged) vs across templates (question fixed). A head that reads the instruction's
        candidate whatever the question has small across-question variance."""
        import pandas as pd

        heads = heads or self.top_heads(3)
        df = self.per_prompt_frame()
        out = []
        for l, h in heads:
            d = df[(df.layer == l) & (df["head"] == h)]
            out.append({"layer": l, "head": h,
                        "var_across_questions": float(d.groupby("template")["nas"].var().mean()),
                        "var_across_templates": float(d.groupby("question")["nas"].var().mean())})
        return pd.DataFrame(out)


def negative_attention_scores(model: HookedModel, ps: PromptSet, batch_size: int = 32, progress: bool = True, *,
                              queries: NASQueries = "after_instruction") -> NASResult:
    """NAS of every head, mean over prompts (module docstring), from one forward per batch that keeps
    only the candidates' key columns of the attention patterns."""
    if not ps.metadata or "neg_cand" not in ps.metadata[0] or "query_start" not in ps.metadata[0]:
        raise LensBiasError("NAS needs candidate positions: build the prompts with lens_bias.tasks.binary_prompts")
    L = model.cfg.n_layers
    device = device_of(model)
    per_prompt, neg_all, pos_all = [], [], []
    names = list(unit_names(model, "pattern").values())
    batches = list(ps.batches(batch_size))
    for sub in tqdm(batches, desc="NAS", disable=not progress):
        sub = sub.to(device)
        rows = torch.arange(len(sub), device=device)
        kneg = torch.tensor([m["neg_cand"] for m in sub.metadata], device=device)
        kpos = torch.tensor([m["pos_cand"] for m in sub.metadata], device=device)
        mask = query_mask(sub, queries)[:, None, :]  # [batch, 1, query]
        got: dict[int, tuple[Tensor, Tensor]] = {}

        def grab(pattern, hook, layer=None):  # pattern [batch, head, query, key] → [batch, head, query]
            got[layer] = (pattern[rows, :, :, kneg].float(), pattern[rows, :, :, kpos].float())  # pyright: ignore[reportArgumentType] - the hook factory passes the layer
            return pattern

        hooks = [(n, (lambda l: lambda p, hook: grab(p, hook, l))(l)) for l, n in enumerate(names)]
        # the logits are not needed: stop after the last block
        with torch.no_grad(), trace(model, stop_at=last_resid(model), fwd_hooks=hooks):
            model(sub.tokens, attention_mask=sub.attention_mask)
        n_q = mask.sum(-1).clamp(min=1)
        per_prompt.append(torch.stack([nas_terms(*got[l], mask) for l in range(L)], 1).cpu())  # [batch, layer, head]
        neg_all.append(torch.stack([(got[l][0] * mask).sum(-1) / n_q for l in range(L)], 1).cpu())
        pos_all.append(torch.stack([(got[l][1] * mask).sum(-1) / n_q for l in range(L)], 1).cpu())
    pp = torch.cat(per_prompt)
    check_finite(pp, "NAS (attention to the candidates)", model)
    return NASResult.of(pp.mean(0), pp, torch.cat(neg_all).mean(0), torch.cat(pos_all).mean(0), ps.metadata)


def nas_heatmap(result: NASResult, title: str = "Negative Attention Score per head"):
    """Plotly layer × head heatmap of NAS."""
    import plotly.graph_objects as go

    z = result.nas
    L, H = z.shape
    text = [[f"layer {l}, head {h}<br>NAS {z[l, h]:.3f}<br>attn→No {result.att_neg[l, h]:.3f}"  # pyright: ignore[reportOptionalSubscript] - negative_attention_scores sets att_neg
             f"<br>attn→Yes {result.att_pos[l, h]:.3f}" for h in range(H)] for l in range(L)]  # pyright: ignore[reportOptionalSubscript] - negative_attention_scores sets att_pos
    lim = float(z.abs().max()) or 1.0
    fig = go.Figure(go.Heatmap(z=z.tolist(), x=[f"head {h}" for h in range(H)], y=[f"layer {l}" for l in range(L)],
                               text=text, hoverinfo="text", colorscale="RdBu_r", zmid=0, zmin=-lim, zmax=lim,
                               colorbar={"title": "NAS"}))
    fig.update_layout(title=title, yaxis={"autorange": "reversed"})
    return fig


def head_attention_figure(model: HookedModel, ps: PromptSet, layer: int, head: int, index: int = 0):
    """Bar chart of one head's attention from the answer position over the tokens of one prompt."""
    import plotly.graph_objects as go

    sub = ps[index].to(device_of(model))
    name = hook_name("pattern", layer)
    with torch.no_grad():
        _, cache = model.run_with_cache(sub.tokens, names_filter=lambda n: n == name)
    q = int(sub.answer_pos[0])
    att = cache[name][0, head, q, : q + 1].float().cpu()
    toks = [t.replace("Ġ", " ").replace("Ċ", "\\n") for t in sub.str_tokens(model, 0)[: q + 1]]
    colors = ["crimson" if i == sub.metadata[0].get("neg_cand") else
              ("seagreen" if i == sub.metadata[0].get("pos_cand") else "steelblue") for i in range(q + 1)]
    fig = go.Figure(go.Bar(x=[f"{i}:{t}" for i, t in enumerate(toks)], y=att.tolist(), marker_color=colors))
    fig.update_layout(title=f"L{layer}H{head} attention from the answer position — {ps.prompts[index]!r}",
                      yaxis_title="attention")
    return fig


# ---------------------------------------------------------------------------------------
# As a batch-run method (lens_bias.runs)
# ---------------------------------------------------------------------------------------
def _run_chunk(model, data: PromptSet, lo: int, hi: int, opts: dict, batch_size, state) -> ChunkSums:
    res = negative_attention_scores(model, data[lo:hi], batch_size=batch_size or 32, progress=False,
                                    queries=opts["queries"])
    n = hi - lo
    return ChunkSums({"nas": res.per_prompt.double().sum(0), "att_neg": res.att_neg.double() * n,  # pyright: ignore[reportOptionalMemberAccess] - a chunk's result holds every field
                      "att_pos": res.att_pos.double() * n}, n, rows={"per_prompt": res.per_prompt})  # pyright: ignore[reportOptionalMemberAccess, reportArgumentType] - a chunk's result holds every field


def _finalize(model, data: PromptSet, total: ChunkSums, opts: dict) -> NASResult:
    n = total.count
    return NASResult.of((total.sums["nas"] / n).float(), total.rows.get("per_prompt", torch.empty(0)),
                        (total.sums["att_neg"] / n).float(), (total.sums["att_pos"] / n).float(), data.metadata)


RUN = LocateMethod(
    name="nas",
    summary="Negative Attention Score of every head on yes/no prompts (Yu et al. 2024, NASA)",
    data="yesno",
    options={"queries": "after_instruction"},
    run=_run_chunk,
    finalize=_finalize,
)
