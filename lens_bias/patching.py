"""Activation patching on clean/corrupted prompt pairs, batched over components.

Each component (a residual position, an attention or MLP output, a head) is patched from the
clean run into the corrupted run and the answer metric is read. Many components go through one
forward: the corrupted batch is repeated, one (component, prompt) pair per row, and one hook per
hook point writes the clean activation into the rows that patch it. The forward stops after the
last block and unembeds only the answer position and the answer tokens (a 50k vocabulary is
half of a small model's forward), so results equal `transformer_lens.patching` exactly while
skipping what cannot change.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from .errors import LensBiasError
from .metrics import get_metric
from .prompts import PromptSet

#: component name → (hook name template, kind). kind "pos": [batch, pos, d]; "head": [batch, pos, head, d_head].
COMPONENTS: dict[str, tuple[str, str]] = {
    "resid_pre": ("blocks.{}.hook_resid_pre", "pos"),
    "resid_mid": ("blocks.{}.hook_resid_mid", "pos"),
    "resid_post": ("blocks.{}.hook_resid_post", "pos"),
    "attn_out": ("blocks.{}.hook_attn_out", "pos"),
    "mlp_out": ("blocks.{}.hook_mlp_out", "pos"),
    "head": ("blocks.{}.attn.hook_z", "head"),
}


class _Stop(Exception):
    pass


@dataclass
class ComponentScores:
    """Scores of model components (patching effects, attributions, traced effects).

    `values` has one axis per name in `dims` (e.g. ("layer", "pos") or ("layer", "head")).
    For activation patching `values` is the metric after patching; `clean`/`corrupted` are the
    unpatched metrics, so `normalized` = (value − corrupted)/(clean − corrupted).
    """

    values: Tensor
    dims: tuple[str, ...]
    component: str
    method: str
    clean: float = float("nan")
    corrupted: float = float("nan")
    tokens: list[str] | None = None
    extra: dict = field(default_factory=dict)

    @property
    def effect(self) -> Tensor:
        """value − corrupted (activation patching) or the score itself (attribution)."""
        if self.method == "activation" or self.method == "tracing":
            return self.values - self.corrupted
        return self.values

    @property
    def normalized(self) -> Tensor:
        """(value − corrupted)/(clean − corrupted) for patching; score/(clean − corrupted) for attribution."""
        gap = self.clean - self.corrupted
        if not gap or gap != gap:
            raise LensBiasError("clean and corrupted metrics are equal or unknown: nothing to normalise by")
        return self.effect / gap

    def to_frame(self):
        """Tidy table: one row per component with its coordinates, token string and scores."""
        import pandas as pd

        idx = torch.cartesian_prod(*[torch.arange(n) for n in self.values.shape]) if self.values.ndim > 1 \
            else torch.arange(self.values.shape[0])[:, None]
        vals = self.values.reshape(-1).tolist()
        eff = self.effect.reshape(-1).tolist()
        gap = self.clean - self.corrupted
        rows = []
        for k, coord in enumerate(idx.tolist()):
            row = {"component": self.component, "method": self.method}
            row.update(dict(zip(self.dims, coord)))
            if "pos" in row and self.tokens is not None and row["pos"] < len(self.tokens):
                row["token"] = self.tokens[row["pos"]]
            row["value"] = vals[k]
            row["effect"] = eff[k]
            if gap and gap == gap:
                row["normalized"] = eff[k] / gap
            rows.append(row)
        return pd.DataFrame(rows)

    def top(self, k: int = 10):
        """The k components with the largest |effect|."""
        df = self.to_frame()
        return df.reindex(df["effect"].abs().sort_values(ascending=False).index).head(k).reset_index(drop=True)

    def argmax(self) -> tuple[int, ...]:
        """Coordinates of the component with the largest effect (signed)."""
        flat = int(self.effect.reshape(-1).argmax())
        return tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), self.values.shape))


# ---------------------------------------------------------------------------------------
# Fast forward: stop after the last block, unembed the answer position and tokens only
# ---------------------------------------------------------------------------------------
def answer_logits_fast(
    model,
    tokens: Int[Tensor, "batch pos"],
    answer_pos: Int[Tensor, " batch"],
    answer_ids: Int[Tensor, "batch n_answers"],
    fwd_hooks: list = (),
    attention_mask: Tensor | None = None,
    W_U: Tensor | None = None,
    b_U: Tensor | None = None,
) -> Float[Tensor, "batch n_answers"]:
    """Answer-token logits at the answer positions, equal to the full forward's, skipping the
    unembedding of every other position and token."""
    store = {}

    def grab(x, hook):
        store["resid"] = x
        raise _Stop

    last = f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"
    try:
        with model.hooks(fwd_hooks=list(fwd_hooks) + [(last, grab)]):
            model(tokens, attention_mask=attention_mask)
    except _Stop:
        pass
    resid = store["resid"]
    rows = torch.arange(resid.shape[0], device=resid.device)
    x = model.ln_final(resid[rows, answer_pos.to(resid.device)][:, None])[:, 0]  # [batch, d_model]
    W_U = model.W_U if W_U is None else W_U
    w = W_U[:, answer_ids.to(W_U.device)]  # [d_model, batch, n_answers]
    out = torch.einsum("bd,dba->ba", x, w)
    if b_U is None:
        b_U = getattr(model, "b_U", None)
    if b_U is not None:
        out = out + b_U[answer_ids.to(b_U.device)]
    return out


def _metric_rows(model, ps_rows: PromptSet, tokens, hooks, metric, fast: bool, W_U, b_U) -> Tensor:
    if fast:
        a = answer_logits_fast(model, tokens, ps_rows.answer_pos, ps_rows.answer_ids, hooks,
                               ps_rows.attention_mask, W_U, b_U)
        d = a[:, 0] - a[:, 1]
        return d if metric == "logit_diff" else d.exp()
    with model.hooks(fwd_hooks=hooks):
        logits = model(tokens, attention_mask=ps_rows.attention_mask)
    return get_metric(metric)(logits, ps_rows)


def _check_pairs(model, ps: PromptSet):
    if not isinstance(ps, PromptSet):
        raise LensBiasError(f"expected a PromptSet, got {type(ps).__name__}")
    if not ps.has_pairs:
        raise LensBiasError("activation patching needs clean/corrupted pairs: build the PromptSet with corrupted=...")
    if ps.tokens.shape != ps.corrupted_tokens.shape:
        raise LensBiasError(f"clean tokens {tuple(ps.tokens.shape)} and corrupted tokens "
                            f"{tuple(ps.corrupted_tokens.shape)} differ in shape")
    if ps.answer_ids.shape[1] < 2:
        raise LensBiasError("the metric needs two answers per prompt (e.g. (' she', ' he'))")


def _str_tokens(model, ps: PromptSet) -> list[str]:
    return [t.replace("Ġ", " ") for t in ps.str_tokens(model, 0)]


def activation_patching(
    model,
    ps: PromptSet,
    component: str = "resid_pre",
    *,
    per_position: bool = True,
    metric: str | Callable = "logit_diff",
    layers: Iterable[int] | None = None,
    window: int = 1,
    corruption: Callable[[Tensor], list] | None = None,
    batch_size: int = 64,
    progress: bool = True,
) -> ComponentScores:
    """Patch each component from the clean run into the corrupted run; value = mean metric.

    component: one of COMPONENTS ('resid_pre', 'resid_mid', 'resid_post', 'attn_out', 'mlp_out',
    'head'). per_position: patch one position at a time ([layer, pos] or [layer, pos, head])
    or all positions at once ([layer] or [layer, head]). `window` > 1 restores the same
    position/head in a window of layers centred on each layer (ROME's windowed tracing).
    `corruption(prompt_idx) -> fwd hooks` makes the corrupted run from the clean tokens (e.g.
    noise on the subject embeddings) instead of `ps.corrupted_tokens`. `batch_size` is the
    number of (component, prompt) rows per forward (the memory budget).
    """
    if component not in COMPONENTS:
        raise LensBiasError(f"unknown component {component!r}; choose one of {sorted(COMPONENTS)}")
    if corruption is None:
        _check_pairs(model, ps)
    elif not isinstance(ps, PromptSet) or ps.answer_ids.shape[1] < 2:
        raise LensBiasError("expected a PromptSet with two answers per prompt")
    if batch_size < 1:
        raise LensBiasError(f"batch_size must be ≥ 1, got {batch_size}")
    if window < 1:
        raise LensBiasError(f"window must be ≥ 1, got {window}")
    device = next(model.parameters()).device
    ps = ps.to(device)
    template, kind = COMPONENTS[component]
    n_layers, n_pos, n_heads = model.cfg.n_layers, ps.tokens.shape[1], model.cfg.n_heads
    layers = list(range(n_layers)) if layers is None else list(layers)
    bad = [l for l in layers if not 0 <= l < n_layers]
    if bad:
        raise LensBiasError(f"layer(s) {bad} out of range: the model has {n_layers} layers")
    fast = metric in ("logit_diff", "prob_ratio")
    W_U = model.W_U if fast else None
    b_U = getattr(model, "b_U", None) if fast else None
    # each scored layer l restores layers [lo, hi) (just l when window == 1)
    spans = [(max(0, l - window // 2), min(n_layers, l - (-window // 2))) for l in layers]
    hook_layers = sorted({k for lo, hi in spans for k in range(lo, hi)})
    names = {k: template.format(k) for k in hook_layers}
    corrupt_tokens = ps.tokens if corruption is not None else ps.corrupted_tokens
    all_idx = torch.arange(len(ps), device=device)
    with torch.no_grad():
        _, cache = model.run_with_cache(ps.tokens, attention_mask=ps.attention_mask,
                                        names_filter=lambda n: n in names.values())
        clean = _metric_rows(model, ps, ps.tokens, [], metric, fast, W_U, b_U).mean().item()
        base_hooks = corruption(all_idx) if corruption is not None else []
        corrupted = _metric_rows(model, ps, corrupt_tokens, base_hooks, metric, fast, W_U, b_U).mean().item()

    # every component as (index into `layers`, pos or -1, head or -1)
    pos_axis = list(range(n_pos)) if per_position else [-1]
    head_axis = list(range(n_heads)) if kind == "head" else [-1]
    comps = torch.tensor([(li, p, h) for li in range(len(layers)) for p in pos_axis for h in head_axis])
    lo_of = torch.tensor([s[0] for s in spans])
    hi_of = torch.tensor([s[1] for s in spans])
    n_prompts = len(ps)
    total = len(comps) * n_prompts
    out = torch.zeros(total, device=device)
    comp_of_row = torch.arange(total) // n_prompts  # rows: component-major, prompt-minor
    prompt_of_row = torch.arange(total) % n_prompts
    bar = tqdm(total=total, desc=f"patching {component}", disable=not progress, unit="row")
    with torch.no_grad():
        for start in range(0, total, batch_size):
            rows = torch.arange(start, min(start + batch_size, total))
            c = comps[comp_of_row[rows]]
            prompts = prompt_of_row[rows].to(device)
            lo, hi = lo_of[c[:, 0]], hi_of[c[:, 0]]
            hooks = list(corruption(prompts)) if corruption is not None else []
            for k in hook_layers:
                sel = ((lo <= k) & (k < hi)).nonzero()[:, 0]
                if len(sel):
                    sd = sel.to(device)
                    hooks.append((names[k], _patch_hook(cache[names[k]], sd, prompts[sd],
                                                        c[sel, 1].to(device), c[sel, 2].to(device), kind)))
            sub = ps[prompts.tolist()]
            toks = sub.tokens if corruption is not None else sub.corrupted_tokens
            out[rows.to(device)] = _metric_rows(model, sub, toks, hooks, metric, fast, W_U, b_U)
            bar.update(len(rows))
    bar.close()
    per_comp = out.view(len(comps), n_prompts).mean(1).cpu()
    shape = [len(layers)] + ([n_pos] if per_position else []) + ([n_heads] if kind == "head" else [])
    dims = ("layer",) + (("pos",) if per_position else ()) + (("head",) if kind == "head" else ())
    return ComponentScores(per_comp.view(shape), dims, component, "activation", clean, corrupted,
                           _str_tokens(model, ps), {"layers": layers, "metric": str(metric), "window": window})


def _patch_hook(clean_act: Tensor, rows: Tensor, prompts: Tensor, pos: Tensor, head: Tensor, kind: str):
    """A hook writing clean activations into `rows` at (pos, head); -1 means all positions/heads."""
    all_pos = bool((pos < 0).all())

    def hook(act, hook):
        if kind == "pos":
            if all_pos:
                act[rows] = clean_act[prompts]
            else:
                act[rows, pos] = clean_act[prompts, pos]
        else:
            if all_pos:
                act[rows, :, head] = clean_act[prompts, :, head]
            else:
                act[rows, pos, head] = clean_act[prompts, pos, head]
        return act

    return hook


def patch_with(model, ps: PromptSet, activations: dict[str, Tensor], *, metric="logit_diff") -> Tensor:
    """The per-prompt metric of the corrupted run with whole hook activations replaced
    (e.g. {'blocks.3.hook_mlp_out': clean_cache[...]}): a building block for custom patches."""
    _check_pairs(model, ps)
    device = next(model.parameters()).device
    ps = ps.to(device)

    def setter(value):
        return lambda act, hook: value.to(act.device, act.dtype)

    hooks = [(name, setter(v)) for name, v in activations.items()]
    fast = metric in ("logit_diff", "prob_ratio")
    with torch.no_grad():
        return _metric_rows(model, ps, ps.corrupted_tokens, hooks, metric, fast,
                            model.W_U if fast else None, getattr(model, "b_U", None) if fast else None)
