"""Activation patching on clean/corrupted prompt pairs, batched over components.

Each component (a residual position, an attention or MLP output, a head's hook_z — the sites of
lens_bias.core.hooks) is patched from the clean run into the corrupted run and the answer metric
is read; the value equals `transformer_lens.patching`'s. One engine, `activation_patching`; the
variants at the end fix its arguments with functools.partial. Many components share one forward:
the corrupted batch is expanded to one (component, prompt) pair per row, chunked to a memory
budget. Work that cannot change the result is skipped:

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
import functools
import warnings
from typing import Callable, Iterable, Literal

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..core.errors import LensBiasError
from ..core.hooks import check_hook_names, device_of, hook_name, last_resid, site_kind, trace
from ..core.methods import ChunkSums, LocateMethod, add_scores, scores_from_sums
from ..core.metrics import FAST_METRICS, Metric, answer_logits_fast, get_metric, metric_from_answers, unembed_answers
from ..core.models import HookedModel
from ..core.prompts import PromptSet
from ..core.scores import ComponentScores

#: the sites activation patching takes
PatchSite = Literal["resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out", "head"]
PATCH_SITES = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out", "head")


def check_pairs(model: HookedModel, ps: PromptSet) -> None:
    """A clear error unless `ps` is a PromptSet of clean/corrupted pairs with two answers per prompt."""
    if not isinstance(ps, PromptSet):
        raise LensBiasError(f"expected a PromptSet, got {type(ps).__name__}")
    if not ps.has_pairs:
        raise LensBiasError("activation patching needs clean/corrupted pairs: build the PromptSet with corrupted=...")
    if ps.tokens.shape != ps.corrupted_tokens.shape:
        raise LensBiasError(f"clean tokens {tuple(ps.tokens.shape)} and corrupted tokens "
                            f"{tuple(ps.corrupted_tokens.shape)} differ in shape")
    if ps.answer_ids.shape[1] < 2:
        raise LensBiasError("the metric needs two answers per prompt (e.g. (' she', ' he'))")


def position_labels(model: HookedModel, ps: PromptSet) -> list[str]:
    """A label per position: its token where every prompt has the same one, else 'a/b/c…'."""
    tok = getattr(model, "tokenizer", None) or model
    labels = []
    for p in range(ps.tokens.shape[1]):
        ids = list(dict.fromkeys(ps.tokens[:, p].tolist()))
        words = [t.replace("Ġ", " ").replace("Ċ", "\\n") for t in tok.convert_ids_to_tokens(ids[:3])]
        labels.append("/".join(words) + ("…" if len(ids) > 3 else ""))
    return labels


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
        mid = hook_name("resid_mid", k)
        with trace(self.model, stop_at=mid) as acts:
            self._block(k, x, prompts)
        return acts[mid]

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
        return unembed_answers(self.model, xa, self.answer_ids[prompts], self.metric, self.W_U, self.b_U)


def _cached_run(model, tokens, attention_mask, names: set[str], extra_hooks=(), capture_blocks: bool = False):
    """One forward (stopped after the last block) caching `names` and, optionally, the arguments
    each block is called with; returns (cache, final residual, block arguments)."""
    captured = {}
    L = model.cfg.n_layers
    last = last_resid(model)
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
    try:
        with trace(model, names, stop_at=last, fwd_hooks=extra_hooks, detach=True) as cache:
            model(tokens, attention_mask=attention_mask, use_cache=False)
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
    model: HookedModel,
    ps: PromptSet,
    site: PatchSite = "resid_pre",
    *,
    per_position: bool = True,
    metric: Metric = "logit_diff",
    layers: Iterable[int] | None = None,
    window: int = 1,
    corruption: Callable[[Tensor], list] | None = None,
    batch_size: int | None = None,
    memory_mb: float = 512,
    fast: bool = True,
    progress: bool = True,
) -> ComponentScores:
    """Patch each site from the clean run into the corrupted run; value = mean metric.

    site: 'resid_pre', 'resid_mid', 'resid_post', 'attn_out', 'mlp_out' or 'head' (attn.hook_z;
    lens_bias.core.hooks lists the hooks). per_position: patch one position at a time ([layer, pos] or
    [layer, pos, head]) or all positions at once ([layer] or [layer, head]). `window` > 1
    restores the same position/head in a window of layers centred on each layer (ROME's
    windowed tracing). `corruption(prompt_idx) -> fwd hooks` makes the corrupted run from the
    clean tokens (e.g. noise on the subject embeddings) instead of `ps.corrupted_tokens`.
    `batch_size` (rows of (site, prompt) per forward) defaults to what fits `memory_mb`.
    metric: 'logit_diff', 'prob_ratio', 'odds_ratio' or a function (logits, PromptSet) → [batch]
    (a function forces the hooked full forward).
    """
    if site not in PATCH_SITES:
        raise LensBiasError(f"unknown patching site {site!r}; choose one of {', '.join(PATCH_SITES)}")
    if corruption is None:
        check_pairs(model, ps)
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
    device = device_of(model)
    ps = ps.to(device)
    if batch_size is None:
        batch_size = _rows_per_chunk(model, ps.tokens.shape[1], memory_mb)
    use_fast = fast and not callable(metric) and metric in FAST_METRICS and _right_padded(ps)
    args = (model, ps, site, per_position, metric, layers, window, corruption, batch_size, progress)
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


def _patch_fast(model, ps, site, per_position, metric, layers, window, corruption, batch_size, progress):
    kind = site_kind(site)
    L, n, P, H = model.cfg.n_layers, len(ps), ps.tokens.shape[1], model.cfg.n_heads
    device = ps.tokens.device
    spans = _spans(layers, window, L)
    comp_layers = sorted({k for lo, hi in spans for k in range(lo, hi)})
    entry_layers = sorted({lo for lo, _ in spans})
    comp_names = {k: hook_name(site, k) for k in comp_layers}
    need = set(comp_names.values())
    for lo in entry_layers:  # the residual states the rows enter from
        need |= {hook_name(r, lo) for r in ("resid_pre", "resid_mid", "resid_post")}
    need_x = need | {hook_name("resid_mid", 0)}
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
        clean_rows = unembed_answers(model, final_c[rows_all, ps.answer_pos], ps.answer_ids, metric, sc.W_U, sc.b_U)
        corr_rows = unembed_answers(model, final_x[rows_all, ps.answer_pos], ps.answer_ids, metric, sc.W_U, sc.b_U)
        # the shortcut must reproduce the corrupted run, on rows in another order and number than the prompts
        shuffled = torch.tensor([n - 1, 0, 0], device=device)
        try:
            check = sc.run(cache_x[hook_name("resid_mid", 0)][shuffled], "mid", 0, shuffled)
        except Exception as e:  # noqa: BLE001 - any failure means: use the hooked path
            raise _ShortcutMismatch(f"{type(e).__name__}: {e}") from None
        corr_check = corr_rows[shuffled]
        if not torch.allclose(check, corr_check, atol=1e-4, rtol=1e-4):
            raise _ShortcutMismatch(f"max |diff| {float((check - corr_check).abs().max()):.2e} on the corrupted run")
        if kind == "head":  # resid_mid = resid_pre + Σ_h z_h W_O[h] + b_O must hold for the head entry
            lo = entry_layers[0]
            W = model.blocks[lo].attn.W_O
            mid = cache_x[hook_name("resid_pre", lo)] + torch.einsum("bphd,hde->bpe", cache_x[comp_names[lo]], W)
            gap = (cache_x[hook_name("resid_mid", lo)] - mid).flatten(0, 1)
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
    bar = tqdm(total=total, desc=f"patching {site}", disable=not progress, unit="row")
    with torch.no_grad():
        for li, (lo, hi) in enumerate(spans):
            # which (site, prompt) patches change anything (clean ≠ corrupted somewhere in the window)
            diff = torch.zeros(n, P, H if kind == "head" else 1, dtype=torch.bool, device=device)
            for k in range(lo, hi):
                d = cache_c[comp_names[k]] != cache_x[comp_names[k]]
                diff |= d.any(-1) if kind == "head" else d.any(-1, keepdim=True)
            entry, at = _entry_of(site, lo)
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
            todo = changed.nonzero()  # [rows, 2] = (site, prompt)
            bar.update(len(comps) * n - len(todo))
            if kind == "head":
                zc, zx = cache_c[comp_names[lo]], cache_x[comp_names[lo]]
                # per head, its output written into the residual: [head, batch, pos, d_model]
                delta = torch.einsum("bphd,hde->hbpe", zc - zx, W_O[lo].to(zc.dtype))
            for s in range(0, len(todo), batch_size):
                chunk = todo[s: s + batch_size]
                ci, prompts = chunk[:, 0], chunk[:, 1]
                pos, head = pos_c[ci], head_c[ci]
                x = _entry_state(site, kind, lo, entry, cache_c, cache_x, prompts, pos, head,
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
    return _result(model, ps, site, kind, per_position, layers, out, clean_rows, corr_rows, metric, window,
                   "activation", fast=True)


def _entry_of(site: str, lo: int) -> tuple[str, int]:
    """Where rows patching `site` at layer `lo` enter the shortcut forward."""
    if site in ("resid_pre",):
        return "pre", lo
    if site in ("resid_mid", "attn_out", "head"):
        return "mid", lo
    return "pre", lo + 1  # resid_post, mlp_out: the next block's input


def _entry_state(site, kind, lo, entry, cache_c, cache_x, prompts, pos, head, per_position, delta, L):
    """The corrupted residual at the entry point with the row's site patched in."""
    pre_x, mid_x = cache_x[hook_name("resid_pre", lo)], cache_x[hook_name("resid_mid", lo)]
    post_x = cache_x[hook_name("resid_post", lo)]
    base = {"resid_pre": pre_x, "resid_mid": mid_x, "attn_out": mid_x, "head": mid_x,
            "resid_post": post_x, "mlp_out": post_x}[site]
    x = base[prompts].clone()
    r = torch.arange(len(prompts), device=x.device)
    if site == "resid_pre":
        new = cache_c[hook_name("resid_pre", lo)]
    elif site == "resid_mid":
        new = cache_c[hook_name("resid_mid", lo)]
    elif site == "resid_post":
        new = cache_c[hook_name("resid_post", lo)]
    elif site == "attn_out":
        new = pre_x + cache_c[hook_name("attn_out", lo)]
    elif site == "mlp_out":
        new = mid_x + cache_c[hook_name("mlp_out", lo)]
    if site == "head":
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


def _result(model, ps, site, kind, per_position, layers, out, clean_rows, corr_rows, metric, window, method,
            fast):
    n_pos, n_heads = ps.tokens.shape[1], model.cfg.n_heads
    shape = [len(layers)] + ([n_pos] if per_position else []) + ([n_heads] if kind == "head" else [])
    dims = ("layer",) + (("pos",) if per_position else ()) + (("head",) if kind == "head" else ())
    per_prompt = out.reshape(*shape, len(ps)).cpu()
    return ComponentScores(per_prompt.mean(-1), dims, site, method, clean_rows.mean().item(),
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
        return metric_from_answers(a, metric)
    with model.hooks(fwd_hooks=hooks):
        logits = model(tokens, attention_mask=ps_rows.attention_mask)
    return get_metric(metric)(logits, ps_rows)


def _patch_generic(model, ps, site, per_position, metric, layers, window, corruption, batch_size, progress):
    """One hooked forward per chunk of rows (any architecture, any metric)."""
    kind = site_kind(site)
    n_layers, n_pos, n_heads = model.cfg.n_layers, ps.tokens.shape[1], model.cfg.n_heads
    device = ps.tokens.device
    spans = _spans(layers, window, n_layers)
    hook_layers = sorted({k for lo, hi in spans for k in range(lo, hi)})
    names = {k: hook_name(site, k) for k in hook_layers}
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
    comp_of_row = torch.arange(total) // n_prompts  # rows: site-major, prompt-minor
    prompt_of_row = torch.arange(total) % n_prompts
    bar = tqdm(total=total, desc=f"patching {site}", disable=not progress, unit="row")
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
    return _result(model, ps, site, kind, per_position, layers, out, clean, corrupted, metric, window,
                   "activation", fast=False)


def patch_with(model: HookedModel, ps: PromptSet, activations: dict[str, Tensor], *, metric="logit_diff") -> Tensor:
    """The per-prompt metric of the corrupted run with whole hook activations replaced
    (e.g. {'blocks.3.hook_mlp_out': clean_cache[...]}): a building block for custom patches."""
    check_pairs(model, ps)
    check_hook_names(model, activations)
    device = device_of(model)
    ps = ps.to(device)

    def setter(value):
        return lambda act, hook: value.to(act.device, act.dtype)

    hooks = [(name, setter(v)) for name, v in activations.items()]
    with torch.no_grad():
        return _metric_rows(model, ps, ps.corrupted_tokens, hooks, metric)


# ---------------------------------------------------------------------------------------
# Variants: one engine, arguments fixed (as transformer_lens.patching declares its own)
# ---------------------------------------------------------------------------------------
#: every residual-stream position before each block → [layer, pos]
patch_resid_pre = functools.partial(activation_patching, site="resid_pre", per_position=True)
#: after each block's attention → [layer, pos]
patch_resid_mid = functools.partial(activation_patching, site="resid_mid", per_position=True)
#: after each block → [layer, pos]
patch_resid_post = functools.partial(activation_patching, site="resid_post", per_position=True)
#: each attention output by position → [layer, pos]
patch_attn_out = functools.partial(activation_patching, site="attn_out", per_position=True)
#: each MLP output by position → [layer, pos]
patch_mlp_out = functools.partial(activation_patching, site="mlp_out", per_position=True)
#: every head at all positions at once → [layer, head]
patch_heads = functools.partial(activation_patching, site="head", per_position=False)
#: every head at each position → [layer, pos, head]
patch_heads_by_pos = functools.partial(activation_patching, site="head", per_position=True)


# ---------------------------------------------------------------------------------------
# As a batch-run method (lens_bias.runs)
# ---------------------------------------------------------------------------------------
def _run_chunk(model, data: PromptSet, lo: int, hi: int, opts: dict, batch_size, state) -> ChunkSums:
    sub = data[lo:hi]
    results = {}
    for site in opts["components"]:
        per_pos = opts["per_position"] if opts["per_position"] is not None else site != "head"
        results[site] = activation_patching(model, sub, site, per_position=per_pos, metric=opts["metric"],
                                            window=opts["window"], batch_size=batch_size, progress=False)
    return add_scores(results, len(sub))


RUN = LocateMethod(
    name="patching",
    summary="activation patching: restore one clean residual/attention/MLP output or head (Vig et al. 2020)",
    data="pairs",
    options={"components": ["resid_pre", "attn_out", "mlp_out", "head"], "per_position": None,
             "metric": "logit_diff", "window": 1, "templates": None, "answers": None, "corrupt_with": "man"},
    run=_run_chunk,
    finalize=lambda model, data, total, opts: scores_from_sums(total, position_labels(model, data)),
    sites=PATCH_SITES,
)
