"""Activation patching on clean/corrupted prompt pairs, batched over components.

Each component (a residual position, an attention or MLP output, a head's hook_z) is patched from
the clean run into the corrupted run and the answer metric is read; the value equals
`transformer_lens.patching`'s. Many components share one forward: the corrupted batch is
expanded to one (component, prompt) pair per row, chunked to a memory budget. Work that cannot
change the result is skipped (see ../shared/notes/patching-speed.md):

- the forward starts at the patched layer from the cached corrupted residual (`resid_pre`, or
  `resid_mid` with the patched attention/head output added, which also skips the patched
  layer's attention) by calling the model's blocks directly — the bridge's `start_at_layer`
  still runs the earlier blocks;
- it stops inside the last block: the last MLP, the final norm and the unembedding run at the
  answer position only, on the answer rows of W_U;
- rows whose patch is a no-op (clean activation == corrupted, e.g. positions before the first
  differing token, or a last-layer position other than the answer's) take the corrupted value.

A self-check (the shortcut forward must reproduce the corrupted run's answer logits) guards the
fast path; architectures it does not fit fall back, with a warning, to one hooked forward per
chunk of rows (`fast=False` forces that path).
"""

from __future__ import annotations

import contextlib
import warnings
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

#: metrics the fast path computes from the answer position alone
FAST_METRICS = ("logit_diff", "prob_ratio", "odds_ratio")


class _Stop(Exception):
    pass


@dataclass
class ComponentScores:
    """Scores of model components (patching effects, attributions, traced effects).

    `values` has one axis per name in `dims` (e.g. ("layer", "pos") or ("layer", "head")).
    For activation patching and tracing `values` is the mean metric after patching and
    `clean`/`corrupted` the unpatched means, so `normalized` = (value − corrupted)/(clean − corrupted);
    for attribution `values` is the estimated effect itself. `tokens` labels the positions.
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
        """value − corrupted (activation patching, tracing) or the score itself (attribution)."""
        if self.method in ("activation", "tracing"):
            return self.values - self.corrupted
        return self.values

    @property
    def normalized(self) -> Tensor:
        """effect/(clean − corrupted): 0 = corrupted behaviour, 1 = clean behaviour."""
        gap = self.clean - self.corrupted
        if not gap or gap != gap:
            raise LensBiasError("clean and corrupted metrics are equal or unknown: nothing to normalise by")
        return self.effect / gap

    def to_frame(self):
        """Tidy table: one row per component (component, method, layer, head/neuron, pos, token, value,
        effect, normalized)."""
        import pandas as pd

        shape = tuple(self.values.shape)
        idx = torch.cartesian_prod(*[torch.arange(n) for n in shape]) if len(shape) > 1 \
            else torch.arange(shape[0])[:, None]
        cols = {d: idx[:, i].tolist() for i, d in enumerate(self.dims)}
        layers = self.extra.get("layers")
        if layers is not None and "layer" in cols:
            cols["layer"] = [layers[i] for i in cols["layer"]]
        df = pd.DataFrame({"component": self.component, "method": self.method, **cols})
        if "pos" in cols and self.tokens is not None:
            df["token"] = [self.tokens[p] if p < len(self.tokens) else "" for p in cols["pos"]]
        df["value"] = self.values.reshape(-1).tolist()
        df["effect"] = self.effect.reshape(-1).tolist()
        gap = self.clean - self.corrupted
        if gap and gap == gap:
            df["normalized"] = df["effect"] / gap
        return df

    def top(self, k: int = 10):
        """The k components with the largest |effect|."""
        df = self.to_frame()
        return df.reindex(df["effect"].abs().sort_values(ascending=False).index).head(k).reset_index(drop=True)

    def argmax(self) -> tuple[int, ...]:
        """Coordinates (indices into `values`) of the component with the largest signed effect."""
        flat = int(self.effect.reshape(-1).argmax())
        return tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), self.values.shape))


# ---------------------------------------------------------------------------------------
# helpers shared with attribution and tracing
# ---------------------------------------------------------------------------------------
def _device(model):
    return next(model.parameters()).device


def check_hook_names(model, names: Iterable[str]) -> None:
    """A LensBiasError naming every hook that the model does not have."""
    hook_dict = getattr(model, "hook_dict", None)
    if hook_dict is None:
        return
    missing = [n for n in names if n not in hook_dict]
    if missing:
        some = ", ".join(sorted(k for k in hook_dict if k.startswith("blocks.0."))[:12])
        raise LensBiasError(f"hook name(s) {missing} do not exist in this model (layer-0 hooks include: {some}, ...)")


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


def position_labels(model, ps: PromptSet) -> list[str]:
    """A label per position: its token where every prompt has the same one, else 'a/b/c…'."""
    tok = getattr(model, "tokenizer", None) or model
    labels = []
    for p in range(ps.tokens.shape[1]):
        ids = list(dict.fromkeys(ps.tokens[:, p].tolist()))
        words = [t.replace("Ġ", " ").replace("Ċ", "\\n") for t in tok.convert_ids_to_tokens(ids[:3])]
        labels.append("/".join(words) + ("…" if len(ids) > 3 else ""))
    return labels


_str_tokens = position_labels  # older private name, used by attribution


def _metric_from_answers(a: Tensor, metric: str, logp: Tensor | None = None) -> Tensor:
    """Per-row metric from answer logits [rows, n_answers] (and answer log-probs for odds_ratio)."""
    if metric == "odds_ratio":
        lo = logp - torch.log1p(-logp.exp().clamp(max=1 - 1e-7))
        return (lo[:, 0] - lo[:, 1]).exp()
    d = a[:, 0] - a[:, 1]
    return d if metric == "logit_diff" else d.exp()


def _unembed_answers(model, x: Float[Tensor, "rows d_model"], answer_ids: Tensor, metric: str, W_U, b_U) -> Tensor:
    """The per-row metric from final-layer residuals at the answer position."""
    x = model.ln_final(x[:, None])[:, 0]
    if metric == "odds_ratio":
        logits = x @ W_U + (b_U if b_U is not None else 0)
        logp = logits.float().log_softmax(-1).gather(1, answer_ids)
        return _metric_from_answers(logits.gather(1, answer_ids), metric, logp)
    out = torch.einsum("rd,dra->ra", x, W_U[:, answer_ids])
    if b_U is not None:
        out = out + b_U[answer_ids]
    return _metric_from_answers(out, metric)


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


# ---------------------------------------------------------------------------------------
# The shortcut forward: enter at a layer from a residual state, leave at the answer position
# ---------------------------------------------------------------------------------------
def _index_batch(obj, n_prompts: int, prompts: Tensor):
    """Captured block arguments, with every per-prompt tensor indexed by `prompts` (rows)."""
    if isinstance(obj, Tensor):
        return obj[prompts.to(obj.device)] if obj.ndim >= 2 and obj.shape[0] == n_prompts else obj
    if isinstance(obj, tuple):
        return tuple(_index_batch(o, n_prompts, prompts) for o in obj)
    if isinstance(obj, list):
        return [_index_batch(o, n_prompts, prompts) for o in obj]
    if isinstance(obj, dict):
        return {k: _index_batch(v, n_prompts, prompts) for k, v in obj.items()}
    return obj


class _Shortcut:
    """Runs blocks k..L-1 from a residual state with the arguments the model gave them."""

    def __init__(self, model, block_args: list, n_prompts: int, answer_pos: Tensor, answer_ids: Tensor,
                 metric: str):
        self.model, self.block_args, self.n = model, block_args, n_prompts
        self.answer_pos, self.answer_ids, self.metric = answer_pos, answer_ids, metric
        self.L = model.cfg.n_layers
        self.W_U, self.b_U = model.W_U, getattr(model, "b_U", None)

    def _block(self, k: int, x: Tensor, prompts: Tensor) -> Tensor:
        args, kwargs = self.block_args[k]
        out = self.model.blocks[k](x, *_index_batch(args, self.n, prompts), **_index_batch(kwargs, self.n, prompts))
        return out[0] if isinstance(out, (tuple, list)) else out

    def _mlp_half(self, k: int, x: Tensor) -> Tensor:
        blk = self.model.blocks[k]
        return x + blk.mlp(blk.ln2(x))

    def _attn_half(self, k: int, x: Tensor, prompts: Tensor) -> Tensor:
        store = {}

        def grab(act, hook):
            store["mid"] = act
            raise _Stop

        try:
            with self.model.hooks(fwd_hooks=[(f"blocks.{k}.hook_resid_mid", grab)]):
                self._block(k, x, prompts)
        except _Stop:
            pass
        return store["mid"]

    def run(self, x: Tensor, entry: str, layer: int, prompts: Tensor, hooks=(), full_last: bool = False) -> Tensor:
        """Metric per row after entering with residual `x` at `layer` ('pre': block input,
        'mid': after the attention, 'pre' at L: the final residual)."""
        L, rows = self.L, torch.arange(len(prompts), device=x.device)
        ans = self.answer_pos[prompts]
        ctx = self.model.hooks(fwd_hooks=list(hooks)) if hooks else contextlib.nullcontext()
        with ctx:
            if entry == "mid" and layer == L - 1:
                xa = self._mlp_half(L - 1, x[rows, ans][:, None])[:, 0]
            elif entry == "pre" and layer == L:
                xa = x[rows, ans]
            else:
                start = layer
                if entry == "mid":
                    x = self._mlp_half(layer, x)
                    start = layer + 1
                for k in range(start, L - 1):
                    x = self._block(k, x, prompts)
                if full_last:
                    xa = self._block(L - 1, x, prompts)[rows, ans]
                else:
                    mid = self._attn_half(L - 1, x, prompts)
                    xa = self._mlp_half(L - 1, mid[rows, ans][:, None])[:, 0]
        return _unembed_answers(self.model, xa, self.answer_ids[prompts], self.metric, self.W_U, self.b_U)


def _cached_run(model, tokens, attention_mask, names: set[str], extra_hooks=(), capture_blocks: bool = False):
    """One forward (stopped after the last block) caching `names` and, optionally, the arguments
    each block is called with; returns (cache, final residual, block arguments)."""
    cache, captured = {}, {}
    L = model.cfg.n_layers
    last = f"blocks.{L - 1}.hook_resid_post"

    def saver(name):
        def save(x, hook):
            cache[name] = x.detach().clone()
            if name == last:
                raise _Stop
            return x
        return save

    handles = []
    if capture_blocks:
        def capture(k):
            def pre(module, args, kwargs):
                if k not in captured:
                    kw = {n: (None if "past" in n else (False if n == "use_cache" else v)) for n, v in kwargs.items()
                          if n != "hidden_states"}
                    captured[k] = (tuple(args[1:]), kw)
            return pre
        handles = [model.blocks[k].register_forward_pre_hook(capture(k), with_kwargs=True) for k in range(L)]
    hooks = list(extra_hooks) + [(n, saver(n)) for n in sorted(names | {last})]
    try:
        with model.hooks(fwd_hooks=hooks):
            try:
                model(tokens, attention_mask=attention_mask, use_cache=False)
            except _Stop:
                pass
    finally:
        for h in handles:
            h.remove()
    return cache, cache[last], [captured.get(k) for k in range(L)]


# ---------------------------------------------------------------------------------------
# Activation patching
# ---------------------------------------------------------------------------------------
def _rows_per_chunk(model, n_pos: int, memory_mb: float) -> int:
    cfg = model.cfg
    d_mlp = getattr(cfg, "d_mlp", None) or 4 * cfg.d_model
    per_row = 4 * n_pos * (10 * cfg.d_model + 3 * d_mlp + 3 * cfg.n_heads * n_pos)
    return max(1, int(memory_mb * 2**20 // per_row))


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
    batch_size: int | None = None,
    memory_mb: float = 512,
    fast: bool = True,
    progress: bool = True,
) -> ComponentScores:
    """Patch each component from the clean run into the corrupted run; value = mean metric.

    component: one of COMPONENTS ('resid_pre', 'resid_mid', 'resid_post', 'attn_out', 'mlp_out',
    'head' = attn.hook_z). per_position: patch one position at a time ([layer, pos] or
    [layer, pos, head]) or all positions at once ([layer] or [layer, head]). `window` > 1
    restores the same position/head in a window of layers centred on each layer (ROME's
    windowed tracing). `corruption(prompt_idx) -> fwd hooks` makes the corrupted run from the
    clean tokens (e.g. noise on the subject embeddings) instead of `ps.corrupted_tokens`.
    `batch_size` (rows of (component, prompt) per forward) defaults to what fits `memory_mb`.
    metric: 'logit_diff', 'prob_ratio', 'odds_ratio' or a function (logits, PromptSet) → [batch]
    (a function forces the hooked full forward).
    """
    if component not in COMPONENTS:
        raise LensBiasError(f"unknown component {component!r}; choose one of {sorted(COMPONENTS)}")
    if corruption is None:
        _check_pairs(model, ps)
    elif not isinstance(ps, PromptSet) or ps.answer_ids.shape[1] < 2:
        raise LensBiasError("expected a PromptSet with two answers per prompt")
    if batch_size is not None and batch_size < 1:
        raise LensBiasError(f"batch_size must be ≥ 1, got {batch_size}")
    if window < 1:
        raise LensBiasError(f"window must be ≥ 1, got {window}")
    if not callable(metric):
        get_metric(metric)  # a clear error for unknown names
    n_layers = model.cfg.n_layers
    layers = list(range(n_layers)) if layers is None else list(layers)
    bad = [l for l in layers if not 0 <= l < n_layers]
    if bad or not layers:
        raise LensBiasError(f"layer(s) {bad or layers} out of range: the model has {n_layers} layers")
    device = _device(model)
    ps = ps.to(device)
    if batch_size is None:
        batch_size = _rows_per_chunk(model, ps.tokens.shape[1], memory_mb)
    use_fast = fast and not callable(metric) and metric in FAST_METRICS and _right_padded(ps)
    args = (model, ps, component, per_position, metric, layers, window, corruption, batch_size, progress)
    if use_fast:
        try:
            res = _patch_fast(*args)
        except _ShortcutMismatch as e:
            warnings.warn(f"shortcut forward does not fit this model ({e}); using one hooked forward per chunk")
            res = None
        if res is not None:
            return res
    return _patch_generic(*args)


def _right_padded(ps: PromptSet) -> bool:
    m = ps.attention_mask
    return bool((m[:, :1] == 1).all()) and bool((m[:, 1:] <= m[:, :-1]).all())


class _ShortcutMismatch(Exception):
    pass


def _spans(layers, window, n_layers):
    """Each scored layer l restores layers [lo, hi) (just l when window == 1), as ROME's window."""
    return [(max(0, l - window // 2), min(n_layers, l - (-window // 2))) for l in layers]


def _patch_fast(model, ps, component, per_position, metric, layers, window, corruption, batch_size, progress):
    template, kind = COMPONENTS[component]
    L, n, P, H = model.cfg.n_layers, len(ps), ps.tokens.shape[1], model.cfg.n_heads
    device = ps.tokens.device
    spans = _spans(layers, window, L)
    comp_layers = sorted({k for lo, hi in spans for k in range(lo, hi)})
    entry_layers = sorted({lo for lo, _ in spans})
    comp_names = {k: template.format(k) for k in comp_layers}
    need = set(comp_names.values())
    for lo in entry_layers:  # the residual states the rows enter from
        need |= {f"blocks.{lo}.hook_resid_pre", f"blocks.{lo}.hook_resid_mid", f"blocks.{lo}.hook_resid_post"}
    need_x = need | {"blocks.0.hook_resid_mid"}
    corrupt_tokens = ps.tokens if corruption is not None else ps.corrupted_tokens
    all_idx = torch.arange(n, device=device)
    with torch.no_grad():
        cache_c, final_c, _ = _cached_run(model, ps.tokens, ps.attention_mask, set(comp_names.values()))
        base_hooks = list(corruption(all_idx)) if corruption is not None else []
        cache_x, final_x, block_args = _cached_run(model, corrupt_tokens, ps.attention_mask, need_x, base_hooks,
                                                   capture_blocks=True)
        if any(a is None for a in block_args):
            raise _ShortcutMismatch("some blocks were not called as modules")
        sc = _Shortcut(model, block_args, n, ps.answer_pos, ps.answer_ids, metric)
        rows_all = torch.arange(n, device=device)
        clean_rows = _unembed_answers(model, final_c[rows_all, ps.answer_pos], ps.answer_ids, metric, sc.W_U, sc.b_U)
        corr_rows = _unembed_answers(model, final_x[rows_all, ps.answer_pos], ps.answer_ids, metric, sc.W_U, sc.b_U)
        # the shortcut must reproduce the corrupted run, on rows in another order and number than the prompts
        shuffled = torch.tensor([n - 1, 0, 0], device=device)
        try:
            check = sc.run(cache_x["blocks.0.hook_resid_mid"][shuffled], "mid", 0, shuffled)
        except Exception as e:  # noqa: BLE001 - any failure means: use the hooked path
            raise _ShortcutMismatch(f"{type(e).__name__}: {e}") from None
        corr_check = corr_rows[shuffled]
        if not torch.allclose(check, corr_check, atol=1e-4, rtol=1e-4):
            raise _ShortcutMismatch(f"max |diff| {float((check - corr_check).abs().max()):.2e} on the corrupted run")
        if kind == "head":  # resid_mid = resid_pre + Σ_h z_h W_O[h] + b_O must hold for the head entry
            lo = entry_layers[0]
            W = model.blocks[lo].attn.W_O
            mid = cache_x[f"blocks.{lo}.hook_resid_pre"] + torch.einsum("bphd,hde->bpe", cache_x[comp_names[lo]], W)
            gap = (cache_x[f"blocks.{lo}.hook_resid_mid"] - mid).flatten(0, 1)
            if not torch.allclose(gap, gap[:1].expand_as(gap), atol=1e-4, rtol=1e-4):
                raise _ShortcutMismatch("the attention output is not Σ_h z_h W_O[h] + b_O")

    pos_axis = list(range(P)) if per_position else [-1]
    head_axis = list(range(H)) if kind == "head" else [-1]
    comps = [(p, h) for p in pos_axis for h in head_axis]
    out = torch.empty(len(layers), len(comps), n, device=device)
    W_O = {}
    if kind == "head":
        W_O = {k: model.blocks[k].attn.W_O for k in entry_layers}  # [head, d_head, d_model]
    total = len(layers) * len(comps) * n
    bar = tqdm(total=total, desc=f"patching {component}", disable=not progress, unit="row")
    with torch.no_grad():
        for li, (lo, hi) in enumerate(spans):
            # which (component, prompt) patches change anything (clean ≠ corrupted somewhere in the window)
            diff = torch.zeros(n, P, H if kind == "head" else 1, dtype=torch.bool, device=device)
            for k in range(lo, hi):
                d = cache_c[comp_names[k]] != cache_x[comp_names[k]]
                diff |= d.any(-1) if kind == "head" else d.any(-1, keepdim=True)
            entry, at = _entry_of(component, lo)
            final_only = (entry == "pre" and at == L) or (entry == "mid" and at == L - 1)
            comp_t = torch.tensor(comps, device=device)  # [C, 2]
            pos_c, head_c = comp_t[:, 0], comp_t[:, 1].clamp(min=0)
            if per_position:
                changed = diff[:, pos_c, head_c].T  # [C, n]
                if final_only:
                    changed &= pos_c[:, None] == ps.answer_pos[None, :]
            else:
                changed = diff[:, :, head_c].any(1).T
            out[li] = corr_rows[None, :].expand(len(comps), n)
            todo = changed.nonzero()  # [rows, 2] = (component, prompt)
            bar.update(len(comps) * n - len(todo))
            if kind == "head":
                zc, zx = cache_c[comp_names[lo]], cache_x[comp_names[lo]]
                # per head, its output written into the residual: [head, batch, pos, d_model]
                delta = torch.einsum("bphd,hde->hbpe", zc - zx, W_O[lo].to(zc.dtype))
            for s in range(0, len(todo), batch_size):
                chunk = todo[s: s + batch_size]
                ci, prompts = chunk[:, 0], chunk[:, 1]
                pos, head = pos_c[ci], head_c[ci]
                x = _entry_state(component, kind, lo, entry, cache_c, cache_x, prompts, pos, head,
                                 per_position, delta if kind == "head" else None, L)
                hooks = []
                for k in range(lo + 1, hi):
                    name = comp_names[k]
                    hooks.append((name, _patch_hook(cache_c[name], torch.arange(len(chunk), device=device), prompts,
                                                    pos if per_position else torch.full_like(pos, -1),
                                                    head if kind == "head" else torch.full_like(head, -1), kind)))
                full_last = hi == L and hi - lo > 1  # window hooks inside the last block
                out[li, ci, prompts] = sc.run(x, entry, at, prompts, hooks, full_last=full_last)
                bar.update(len(chunk))
    bar.close()
    return _result(model, ps, component, kind, per_position, layers, out, clean_rows, corr_rows, metric, window,
                   "activation", fast=True)


def _entry_of(component: str, lo: int) -> tuple[str, int]:
    """Where rows patching `component` at layer `lo` enter the shortcut forward."""
    if component in ("resid_pre",):
        return "pre", lo
    if component in ("resid_mid", "attn_out", "head"):
        return "mid", lo
    return "pre", lo + 1  # resid_post, mlp_out: the next block's input


def _entry_state(component, kind, lo, entry, cache_c, cache_x, prompts, pos, head, per_position, delta, L):
    """The corrupted residual at the entry point with the row's component patched in."""
    pre_x, mid_x = cache_x[f"blocks.{lo}.hook_resid_pre"], cache_x[f"blocks.{lo}.hook_resid_mid"]
    post_x = cache_x[f"blocks.{lo}.hook_resid_post"]
    base = {"resid_pre": pre_x, "resid_mid": mid_x, "attn_out": mid_x, "head": mid_x,
            "resid_post": post_x, "mlp_out": post_x}[component]
    x = base[prompts].clone()
    r = torch.arange(len(prompts), device=x.device)
    if component == "resid_pre":
        new = cache_c[f"blocks.{lo}.hook_resid_pre"]
    elif component == "resid_mid":
        new = cache_c[f"blocks.{lo}.hook_resid_mid"]
    elif component == "resid_post":
        new = cache_c[f"blocks.{lo}.hook_resid_post"]
    elif component == "attn_out":
        new = pre_x + cache_c[f"blocks.{lo}.hook_attn_out"]
    elif component == "mlp_out":
        new = mid_x + cache_c[f"blocks.{lo}.hook_mlp_out"]
    if component == "head":
        if per_position:
            x[r, pos] += delta[head, prompts, pos]
        else:
            x += delta[head, prompts]
        return x
    if per_position:
        x[r, pos] = new[prompts, pos]
    else:
        x = new[prompts].clone()
    return x


def _result(model, ps, component, kind, per_position, layers, out, clean_rows, corr_rows, metric, window, method,
            fast):
    n_pos, n_heads = ps.tokens.shape[1], model.cfg.n_heads
    shape = [len(layers)] + ([n_pos] if per_position else []) + ([n_heads] if kind == "head" else [])
    dims = ("layer",) + (("pos",) if per_position else ()) + (("head",) if kind == "head" else ())
    per_prompt = out.reshape(*shape, len(ps)).cpu()
    return ComponentScores(per_prompt.mean(-1), dims, component, method, clean_rows.mean().item(),
                           corr_rows.mean().item(), position_labels(model, ps),
                           {"layers": layers, "metric": str(metric), "window": window, "per_prompt": per_prompt,
                            "fast": fast})


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


def _metric_rows(model, ps_rows: PromptSet, tokens, hooks, metric) -> Tensor:
    if not callable(metric) and metric in ("logit_diff", "prob_ratio"):
        a = answer_logits_fast(model, tokens, ps_rows.answer_pos, ps_rows.answer_ids, hooks, ps_rows.attention_mask)
        return _metric_from_answers(a, metric)
    with model.hooks(fwd_hooks=hooks):
        logits = model(tokens, attention_mask=ps_rows.attention_mask)
    return get_metric(metric)(logits, ps_rows)


def _patch_generic(model, ps, component, per_position, metric, layers, window, corruption, batch_size, progress):
    """One hooked forward per chunk of rows (any architecture, any metric)."""
    template, kind = COMPONENTS[component]
    n_layers, n_pos, n_heads = model.cfg.n_layers, ps.tokens.shape[1], model.cfg.n_heads
    device = ps.tokens.device
    spans = _spans(layers, window, n_layers)
    hook_layers = sorted({k for lo, hi in spans for k in range(lo, hi)})
    names = {k: template.format(k) for k in hook_layers}
    check_hook_names(model, names.values())
    corrupt_tokens = ps.tokens if corruption is not None else ps.corrupted_tokens
    all_idx = torch.arange(len(ps), device=device)
    with torch.no_grad():
        _, cache = model.run_with_cache(ps.tokens, attention_mask=ps.attention_mask,
                                        names_filter=lambda n: n in names.values())
        clean = _metric_rows(model, ps, ps.tokens, [], metric)
        base_hooks = list(corruption(all_idx)) if corruption is not None else []
        corrupted = _metric_rows(model, ps, corrupt_tokens, base_hooks, metric)

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
            out[rows.to(device)] = _metric_rows(model, sub, toks, hooks, metric).float()
            bar.update(len(rows))
    bar.close()
    n_comps = len(pos_axis) * len(head_axis)
    out = out.view(len(layers), n_comps, n_prompts)
    return _result(model, ps, component, kind, per_position, layers, out, clean, corrupted, metric, window,
                   "activation", fast=False)


def patch_with(model, ps: PromptSet, activations: dict[str, Tensor], *, metric="logit_diff") -> Tensor:
    """The per-prompt metric of the corrupted run with whole hook activations replaced
    (e.g. {'blocks.3.hook_mlp_out': clean_cache[...]}): a building block for custom patches."""
    _check_pairs(model, ps)
    check_hook_names(model, activations)
    device = _device(model)
    ps = ps.to(device)

    def setter(value):
        return lambda act, hook: value.to(act.device, act.dtype)

    hooks = [(name, setter(v)) for name, v in activations.items()]
    with torch.no_grad():
        return _metric_rows(model, ps, ps.corrupted_tokens, hooks, metric)
