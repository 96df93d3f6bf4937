"""Activation patching on clean/corrupted prompt pairs, batched over components.

Each component (a residual position, an attention or MLP output, a head's hook_z — the sites of
lens_bias.core.hooks) is patched from the clean run into the corrupted run and the answer metric
is read; the value equals `transformer_lens.patching`'s. One engine, `activation_patching`; the
variants at the end fix its arguments with functools.partial. Many components share one forward:
the corrupted batch is expanded to one (component, prompt) pair per row, in chunks. Work that
cannot change the result is skipped:

- layers: a row enters at the patched layer from the cached corrupted residual (`resid_pre`, or
  `resid_mid` with the patched attention/head output added, which also skips the patched layer's
  attention) by calling the model's blocks directly — the bridge's `start_at_layer` still runs
  the earlier blocks. Where it enters follows how the blocks compose (`Layout`): in GPT-NeoX's
  parallel blocks an attention, head or MLP patch enters the next block with that output swapped
  in the residual; where no closed form holds (a head under Gemma's post-attention norm, OPT's MLP
  that cannot be called alone) the row enters at the block's input and a hook patches inside it;
- positions before the change: with causal attention, positions before the first one the patch
  changes (the first token where clean and corrupted differ, or the patched position) are the
  corrupted run's in every patched run. A row computes only positions s..answer; the keys and
  values of positions < s come from the corrupted run (recorded once, handed to the attention
  as its KV cache). Cost is proportional to the tokens from the first difference onwards, so
  pairs that share long prefixes are cheap;
- the end: the last block's MLP, the final norm and the unembedding run at the answer position
  only, on the answer rows of W_U and the final soft cap (in float32: logit differences of
  bf16/fp16 models keep their precision);
- no-op rows (clean activation == corrupted, or a position after the answer, or a last-layer
  position other than the answer's) take the corrupted value.

Self-checks guard the fast path: the shortcut forward, with and without a cached prefix, must
reproduce the corrupted run's answer metric; a patched output must be what its layer adds to the
residual; the answer-only unembedding must give the model's own logits. Architectures that fail one
fall back, with one FastPathWarning per model naming the architecture, to one hooked forward per
chunk of rows (or the full logits); `fast=False` forces that path. Every decoder family of
lens_bias.core.families runs the fast path (tests/core/test_families.py).

Memory: `memory_mb` bounds what patching adds on top of the model's weights: the caches of one
group of prompts (the clean and corrupted activations at the patched sites and entry residuals,
the corrupted keys/values, the heads' output deltas) plus the activations of one forward (a
chunk of patched rows, or the group's own cached forward). Prompts are processed in groups and
rows in chunks sized from that budget, so the peak does not grow with the batch or data set
size. It does not cover the result table (layers × components × prompts floats) or the
allocator's slack. On CPU a chunk's activations are also capped at CPU_CHUNK_MB: larger chunks
compute no faster and fall out of the processor's caches.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import inspect
import warnings
import weakref
from dataclasses import dataclass, replace
from typing import Callable, Iterable, Literal

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..core.checks import NonFiniteError, check_finite, nonfinite_cause
from ..core.errors import LensBiasError
from ..core.hooks import Site, check_hook_names, device_of, hook_name, last_resid, run_until, site_kind, trace
from ..core.methods import ChunkSums, LocateMethod, add_scores, scores_from_sums
from ..core.metrics import FAST_METRICS, Metric, MetricName, get_metric, metric_from_answers, soft_cap
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
    assert ps.corrupted_tokens is not None  # has_pairs
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
# Checks and the answer metric
# ---------------------------------------------------------------------------------------


def _low_precision(model) -> bool:
    dt = next(model.parameters()).dtype
    return dt in (torch.float16, torch.bfloat16)


def _tolerance(model) -> float:
    """How closely two evaluations of the same forward agree in the model's dtype (abs = rel)."""
    dt = next(model.parameters()).dtype
    return {torch.bfloat16: 6e-2, torch.float16: 1e-2}.get(dt, 1e-4)


class _Answers:
    """The per-row metric from final residuals at the answer position: final norm in the model's dtype,
    then only the answer columns of W_U (odds_ratio: the whole row, for its softmax) in float32."""

    def __init__(self, model: HookedModel, ps: PromptSet, metric: MetricName):
        self.model, self.metric, self.ids = model, metric, ps.answer_ids
        self.W_U, b_U = model.W_U, getattr(model, "b_U", None)
        self.b_U = None if b_U is None else b_U.float()
        self.W_full = self.W_U.float() if metric == "odds_ratio" else None
        self.bad = torch.zeros((), dtype=torch.bool, device=self.W_U.device)

    def __call__(self, x: Tensor, prompts: Tensor) -> Tensor:
        ids = self.ids[prompts]
        x = self.model.ln_final(x[:, None])[:, 0].float()
        if self.metric == "odds_ratio":
            logits = soft_cap(self.model, x @ self.W_full + (self.b_U if self.b_U is not None else 0))  # pyright: ignore[reportOperatorIssue] - W_full is set when the metric is odds_ratio
            a = logits.gather(1, ids)
            logp = logits.log_softmax(-1).gather(1, ids)
        else:
            a, logp = torch.einsum("rd,dra->ra", x, self.W_U[:, ids].float()), None
            if self.b_U is not None:
                a = a + self.b_U[ids]
            a = soft_cap(self.model, a)
        self.bad |= ~torch.isfinite(a).all()  # checked once at the end (no sync per chunk)
        return metric_from_answers(a, self.metric, logp)  # pyright: ignore[reportArgumentType] - metric is a MetricName (the fast path's)

    def check(self, what: str) -> None:
        if bool(self.bad):
            raise NonFiniteError(f"{what} contain NaN or inf; {nonfinite_cause(self.model)}")


# ---------------------------------------------------------------------------------------
# The shortcut forward: enter at a layer from a residual state, run positions s..e-1 only,
# leave at the answer position
# ---------------------------------------------------------------------------------------
#: names under which blocks take a KV cache
_PAST_NAMES = ("past_key_values", "past_key_value", "layer_past")
#: block arguments the shortcut knows how to cut to a window of positions
_WINDOWED_ARGS = ("attention_mask", "position_embeddings", "position_ids", "cache_position")


class _KVRecorder:
    """Handed to each attention as its KV cache in the corrupted run: keeps every layer's keys and values."""

    def __init__(self):
        self.kv: dict[int, tuple[Tensor, Tensor]] = {}

    def update(self, key, value, layer_idx, *args, **kwargs):
        self.kv[layer_idx] = (key.detach(), value.detach())
        return key, value


class _PrefixKV:
    """Handed to each attention as its KV cache in a patched forward of positions s..e-1: puts the
    corrupted run's keys and values of positions 0..s-1 in front (causal attention leaves them unchanged)."""

    def __init__(self, kv: dict, prompts: Tensor, s: int):
        self.kv, self.prompts, self.s = kv, prompts, s

    def update(self, key, value, layer_idx, *args, **kwargs):
        if self.s == 0:
            return key, value
        pk, pv = self.kv[layer_idx]
        return (torch.cat([pk[self.prompts, ..., : self.s, :], key], -2),
                torch.cat([pv[self.prompts, ..., : self.s, :], value], -2))


def _positional_names(block) -> list[str] | None:
    fn = getattr(block, "original_component", None) or block
    try:
        params = inspect.signature(fn.forward).parameters.values()
    except (TypeError, ValueError):
        return None
    return [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]


def _by_name(names: list[str] | None, args: tuple, kwargs: dict) -> dict | None:
    """A block call's arguments other than the hidden states, by name (None when they cannot be named)."""
    if names is None or len(args) > len(names):
        return None
    named = dict(zip(names[1:], args[1:]))
    named.update({k: v for k, v in kwargs.items() if k != "hidden_states"})
    return named


def _index_batch(obj, n_prompts: int, prompts: Tensor):
    """Captured block arguments, with every per-prompt tensor indexed by `prompts` (rows)."""
    if isinstance(obj, Tensor):
        return obj[prompts] if obj.ndim >= 1 and obj.shape[0] == n_prompts else obj
    if isinstance(obj, (tuple, list)):
        return type(obj)(_index_batch(o, n_prompts, prompts) for o in obj)
    if isinstance(obj, dict):
        return {k: _index_batch(v, n_prompts, prompts) for k, v in obj.items()}
    return obj


def _window_arg(name: str, v, s: int, e: int | None):
    """A (row-indexed) block argument cut to query positions s..e-1 and key positions 0..e-1."""
    if not isinstance(v, (Tensor, tuple, list)) or (s == 0 and e is None):
        return v
    if name == "attention_mask":
        return v[..., s:e, :e] if v.ndim == 4 else v[..., :e]  # pyright: ignore[reportCallIssue, reportArgumentType, reportAttributeAccessIssue] - v is a tensor here
    if name == "position_embeddings":
        return type(v)(t[..., s:e, :] for t in v)
    if name in ("position_ids", "cache_position"):
        return v[..., s:e]  # pyright: ignore[reportCallIssue, reportArgumentType] - v is a tensor here
    return v


def _has_position_axis(v, n_pos: int) -> bool:
    if isinstance(v, Tensor):
        return n_pos in tuple(v.shape[1:])
    if isinstance(v, (tuple, list)):
        return any(_has_position_axis(o, n_pos) for o in v)
    if isinstance(v, dict):
        return any(_has_position_axis(o, n_pos) for o in v.values())
    return False


@dataclass(frozen=True)
class Layout:
    """How a model's blocks compose, which decides where a patched row can enter the shortcut forward.

    parallel: attention and MLP both read resid_pre (GPT-NeoX/Pythia): no resid_mid, a block runs whole;
    mlp_half: resid_post = resid_mid + [ln2_post](mlp(ln2(resid_mid))) can be computed from the block's
    modules (not OPT's MLP, which the bridge cannot call alone);
    head_linear: the attention adds Σ_h z_h W_O[h] + b_O to the residual as is (no post-attention norm,
    as Gemma 2/3 have), so a head's patch is a delta of the residual.
    """

    parallel: bool
    mlp_half: bool
    head_linear: bool


def layout(model: HookedModel) -> Layout:
    """The Layout of a bridge's blocks (read from its modules and hooks; the fast path checks it numerically)."""
    blk = model.blocks[0]
    parallel = hook_name("resid_mid", 0) not in getattr(model, "hook_dict", {hook_name("resid_mid", 0): None})
    mlp_half = not parallel and hasattr(blk, "ln2") and getattr(blk.mlp, "name", "mlp") is not None
    return Layout(parallel, mlp_half, head_linear=not hasattr(blk, "ln1_post"))


class _Shortcut:
    """Runs blocks k..L-1 on positions s..e-1 from a residual state, with the arguments the model
    gave them and the corrupted run's keys/values of positions 0..s-1."""

    def __init__(self, model, block_args: list[dict], past_names: list[str | None], kv: dict, n_prompts: int,
                 n_pos: int, answers: _Answers, answer_pos: Tensor, lay: Layout):
        self.model, self.block_args, self.past_names, self.kv = model, block_args, past_names, kv
        self.n, self.P, self.answers, self.answer_pos = n_prompts, n_pos, answers, answer_pos
        self.L, self.mlp_half = model.cfg.n_layers, lay.mlp_half
        # a window needs every attention to take our KV cache and every argument to be cuttable
        self.windowed = all(p is not None for p in past_names) and all(
            not _has_position_axis(v, n_pos) for args in block_args for k, v in args.items()
            if k not in _WINDOWED_ARGS)

    def _kwargs(self, k: int, prompts: Tensor, s: int, e: int, memo: dict) -> dict:
        out = {}
        for name, v in self.block_args[k].items():
            key = (name, id(v))
            if key not in memo:
                memo[key] = _window_arg(name, _index_batch(v, self.n, prompts), s, e if e < self.P else None)
            out[name] = memo[key]
        if self.past_names[k] is not None:
            out[self.past_names[k]] = _PrefixKV(self.kv, prompts, s)
        if "use_cache" in self.block_args[k] or self.past_names[k] is not None:
            out["use_cache"] = False
        return out

    def _block(self, k: int, x: Tensor, kw: dict) -> Tensor:
        out = self.model.blocks[k](x, **kw)
        return out[0] if isinstance(out, (tuple, list)) else out

    def _mlp_half(self, k: int, x: Tensor) -> Tensor:
        blk = self.model.blocks[k]
        h = blk.mlp(blk.ln2(x))
        post = getattr(blk, "ln2_post", None)  # Gemma 2/3: a norm on the MLP's output before the residual add
        return x + (h if post is None else post(h))

    def _attn_half(self, k: int, x: Tensor, kw: dict) -> Tensor:
        mid = hook_name("resid_mid", k)
        with trace(self.model, stop_at=mid) as acts:
            self._block(k, x, kw)
        return acts[mid]

    def run(self, x: Tensor, entry: str, layer: int, prompts: Tensor, s: int = 0, full_last: bool = False) -> Tensor:
        """Metric per row after entering with residual `x` [rows, e - s, d] (positions s..e-1) at
        `layer` ('pre' or 'hook': block input, 'mid': after the attention, 'pre' at L: the final residual)."""
        L, rows = self.L, torch.arange(len(prompts), device=x.device)
        full_last = full_last or not self.mlp_half  # the last block cannot be cut after its attention
        e = s + x.shape[1]
        ans = self.answer_pos[prompts] - s
        if entry == "pre" and layer == L:
            xa = x[rows, ans]
        elif entry == "mid" and layer == L - 1 and not full_last:
            xa = self._mlp_half(L - 1, x[rows, ans][:, None])[:, 0]
        else:
            memo: dict = {}
            start = layer
            if entry == "mid":
                x = self._mlp_half(layer, x)
                start = layer + 1
            for k in range(start, L - 1):
                x = self._block(k, x, self._kwargs(k, prompts, s, e, memo))
            kw = self._kwargs(L - 1, prompts, s, e, memo)
            if full_last:
                xa = self._block(L - 1, x, kw)[rows, ans]
            else:
                mid = self._attn_half(L - 1, x, kw)
                xa = self._mlp_half(L - 1, mid[rows, ans][:, None])[:, 0]
        return self.answers(xa, prompts)

    def final(self, x: Tensor, layer: int, prompts: Tensor, s: int = 0, past=None) -> Tensor:
        """The final residual at positions s..e-1 after entering block `layer` with `x` [rows, e - s, d]; `past(k)`
        is block k's KV-cache object (default: the recorded run's keys/values of positions before s)."""
        e = s + x.shape[1]
        memo: dict = {}
        for k in range(layer, self.L):
            kw = self._kwargs(k, prompts, s, e, memo)
            if past is not None and self.past_names[k] is not None:
                kw[self.past_names[k]] = past(k)
            x = self._block(k, x, kw)
        return x


class _RowPrefixKV:
    """A KV cache for a window s..e-1 whose positions 0..s-1 come from one recorded prefix per group of rows
    (`kv[layer]` [groups, heads, s, d], `group` [rows]: each row's group)."""

    def __init__(self, kv: dict, group: Tensor):
        self.kv, self.group = kv, group

    def update(self, key, value, layer_idx, *args, **kwargs):
        pk, pv = self.kv[layer_idx]
        return torch.cat([pk[self.group], key], -2), torch.cat([pv[self.group], value], -2)


def stacked_hooks(configs: list[list], n: int) -> list:
    """One fwd_hooks list for a batch stacking len(configs) copies of n rows: copy g runs config g's hooks
    (unchanged) on its rows, a view whose in-place edits reach the batch."""
    by: dict[str, list] = {}
    for g, hooks in enumerate(configs):
        for name, fn in hooks:
            by.setdefault(name, []).append((g, fn))

    def make(lst):
        def hook(x, hook):
            for g, fn in lst:
                fn(x.narrow(0, g * n, n), hook)
            return x
        return hook

    return [(name, make(lst)) for name, lst in by.items()]


class Resumed:
    """Hooked forwards of one batch of prompts that start at a layer: one recorded forward keeps every block's
    input and arguments, and a forward whose hooks act at layer l or later enters block l from the recorded
    input — the layers before l cannot change, so the result is the full hooked forward's (checked on the
    recorded run itself; a model the shortcut does not fit runs the full forward, with the same results).

    `answer_logits(layer, prompts, hooks)` → [rows, 2] answer logits at the answer positions (rows = prompt
    indices, repeats allowed: many hook sets per forward); `final_resid(...)` → the final residual at every
    position (for a full-vocabulary loss). `answer_logits_many(layer, configs, position_free=True)` runs
    several hook sets at once and, when every prompt begins with the same tokens and the hooks act alike at
    every position and row (zero or mean ablation: not resampling, not restoring a cached run), computes
    those shared tokens once per hook set instead of once per prompt (their keys and values serve every
    prompt's later positions: causal attention)."""

    def __init__(self, model: HookedModel, tokens: Tensor, attention_mask: Tensor, answer_pos: Tensor,
                 answer_ids: Tensor):
        self.model, self.tokens, self.mask = model, tokens, attention_mask
        self.answer_pos, self.answer_ids = answer_pos, answer_ids
        L, (n, P) = model.cfg.n_layers, tokens.shape
        self.L = L
        names = {hook_name("resid_pre", k) for k in range(L)}
        with torch.no_grad():
            cache, block_args, past_names, kv = _cached_run(model, tokens, attention_mask, names, capture_blocks=True)
        self.resid = [cache[hook_name("resid_pre", k)] for k in range(L)]
        self._ids = answer_ids
        self.sc = None
        m = attention_mask
        if all(a is not None for a in block_args) and bool((m[:, :1] == 1).all()) and bool((m[:, 1:] <= m[:, :-1]).all()):
            self.sc = _Shortcut(model, block_args, past_names, kv, n, P, None, answer_pos, layout(model))  # pyright: ignore[reportArgumentType] - block_args checked above; Resumed reads final(), never answers
            rows = torch.tensor([n - 1, 0, 0][: max(1, min(3, 2 * n))], device=tokens.device) % n
            try:
                with torch.no_grad():
                    got = self._logits(self.sc.final(self.resid[0][rows], 0, rows), rows)
                    want = self._logits(cache[last_resid(model)][rows], rows)
                tol = _tolerance(model)
                ok = torch.allclose(got, want, atol=tol * (1 + float(want.abs().max())), rtol=tol)
            except Exception:  # noqa: BLE001 - any failure means: do not use this path
                ok = False
            if not ok:
                warnings.warn("the resumed forward does not reproduce this model's run; using full forwards", stacklevel=2)
                self.sc = None
        self.s0 = self._shared_prefix() if self.sc is not None and self.sc.windowed else 0
        if self.s0:
            try:
                got = self.answer_logits_many(0, [[], []])
                ok = torch.allclose(got, self._logits(cache[last_resid(model)], torch.arange(n, device=tokens.device)).repeat(2, 1),
                                    atol=_tolerance(model) * (1 + float(got.abs().max())), rtol=_tolerance(model))
            except Exception:  # noqa: BLE001 - any failure means: do not use this path
                ok = False
            if not ok:
                self.s0 = 0

    def _shared_prefix(self) -> int:
        """How many leading positions every prompt shares (same tokens, no padding), up to the first answer."""
        t, m = self.tokens, self.mask
        same = ((t == t[:1]) & (m == 1)).all(0).int()
        s0 = int(same.cumprod(0).sum())
        return min(s0, int(self.answer_pos.min()))

    def _logits(self, final: Tensor, prompts: Tensor, s: int = 0) -> Tensor:
        """Answer logits [rows, n_answers] (float32) from final residuals at positions s.. ."""
        rows = torch.arange(len(prompts), device=final.device)
        x = self.model.ln_final(final[rows, self.answer_pos[prompts] - s][:, None])[:, 0].float()
        ids = self._ids[prompts]
        a = torch.einsum("rd,dra->ra", x, self.model.W_U[:, ids].float())
        b_U = getattr(self.model, "b_U", None)
        return a + b_U.float()[ids] if b_U is not None else a

    def final_resid(self, layer: int, prompts: Tensor, hooks: Iterable = ()) -> Tensor:
        """The final residual [rows, P, d] of the prompts `prompts` under `hooks`, which act at layer ≥ `layer`."""
        with torch.no_grad(), self.model.hooks(fwd_hooks=list(hooks)):
            if self.sc is None or layer <= 0:
                return run_until(self.model, self.tokens[prompts], attention_mask=self.mask[prompts],
                                 detach=True)[last_resid(self.model)]
            return self.sc.final(self.resid[layer][prompts], layer, prompts)

    def answer_logits(self, layer: int, prompts: Tensor, hooks: Iterable = ()) -> Tensor:
        """Answer logits [rows, n_answers] at the answer positions under `hooks` (acting at layer ≥ `layer`)."""
        final = self.final_resid(layer, prompts, hooks)
        with torch.no_grad():
            return self._logits(final, prompts)

    def answer_logits_many(self, layer: int, configs: list[list], position_free: bool = True) -> Tensor:
        """Answer logits [len(configs) × n, n_answers] of every prompt under each hook set of `configs` (all
        acting at layer ≥ `layer`), one forward; the shared first tokens once per set when `position_free`."""
        final, s0 = self.final_many(layer, configs, position_free)
        rows = torch.arange(len(self.tokens), device=self.tokens.device).repeat(len(configs))
        with torch.no_grad():
            return self._logits(final, rows, s0)

    def final_many(self, layer: int, configs: list[list], position_free: bool = True) -> tuple[Tensor, int]:
        """(final residual [len(configs) × n, P − s, d] of every prompt under each hook set, s): the positions
        from s on, s = the shared first tokens (computed once per hook set) when `position_free`, else 0."""
        n = len(self.tokens)
        rows = torch.arange(n, device=self.tokens.device).repeat(len(configs))
        s0 = self.s0 if position_free else 0
        if not s0:
            return self.final_resid(layer, rows, stacked_hooks(configs, n)), 0
        assert self.sc is not None  # s0 > 0 only with the shortcut (__init__)
        G, layer = len(configs), max(layer, 0)
        with torch.no_grad():
            first = torch.zeros(G, dtype=torch.long, device=rows.device)  # prompt 0 stands for the shared tokens
            rec = _KVRecorder()
            with self.model.hooks(fwd_hooks=stacked_hooks(configs, 1)):
                self.sc.final(self.resid[layer][first, :s0], layer, first, 0, lambda k: rec)
            past = _RowPrefixKV(rec.kv, torch.arange(G, device=rows.device).repeat_interleave(n))
            with self.model.hooks(fwd_hooks=stacked_hooks(configs, n)):
                return self.sc.final(self.resid[layer][rows, s0:], layer, rows, s0, lambda k: past), s0


def _cached_run(model, tokens, attention_mask, names: set[str], extra_hooks=(), capture_blocks: bool = False):
    """One forward (stopped after the last block) caching `names` and, optionally, the arguments each
    block is called with and every attention's keys and values.
    Returns (cache, block arguments by name, each block's KV-cache argument name, keys/values)."""
    L = model.cfg.n_layers
    captured: dict[int, dict] = {}
    past_names: list[str | None] = [None] * L
    recorder = _KVRecorder()
    handles = []
    if capture_blocks:
        def capture(k, names_k):
            def pre(module, args, kwargs):
                named = _by_name(names_k, args, kwargs)
                if named is None:
                    return None
                if k not in captured:
                    captured[k] = {n: v for n, v in named.items() if n not in _PAST_NAMES and n != "use_cache"}
                past = next((p for p in _PAST_NAMES if p in names_k), None)
                if past is None:
                    return None
                past_names[k] = past
                hidden = args[0] if args else kwargs["hidden_states"]
                return (hidden,), {**named, past: recorder, "use_cache": False}
            return pre
        for k in range(L):
            names_k = _positional_names(model.blocks[k])
            handles.append(model.blocks[k].register_forward_pre_hook(capture(k, names_k), with_kwargs=True))
    try:
        with trace(model, names | {last_resid(model)}, stop_at=last_resid(model), fwd_hooks=extra_hooks,
                   detach=True) as cache:
            model(tokens, attention_mask=attention_mask, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    _trim_heap(tokens.device)
    return cache, [captured.get(k) for k in range(L)], past_names, recorder.kv


# ---------------------------------------------------------------------------------------
# Memory plan
# ---------------------------------------------------------------------------------------
#: on CPU, at most this many MiB of activations per patched forward (≈ 512 tokens of a d_model-768
#: GPT-2): bigger chunks compute no faster, their activations fall out of the processor's caches and
#: every allocation of that size costs page faults
CPU_CHUNK_MB = 48


def _dims(model) -> dict:
    cfg = model.cfg
    d = cfg.d_model
    H = cfg.n_heads
    d_head = getattr(cfg, "d_head", None) or d // H
    kvh = getattr(cfg, "n_key_value_heads", None) or H
    return {"d": d, "H": H, "d_mlp": getattr(cfg, "d_mlp", None) or 4 * d, "d_kv": kvh * d_head,
            "bytes": torch.finfo(next(model.parameters()).dtype).bits // 8}


def _forward_bytes(m: dict, rows: int, n_query: int, n_keys: int) -> float:
    """Activations alive at once in one block forward of `rows` × `n_query` positions attending to
    `n_keys` keys, for model dimensions `m` (_dims; estimated, calibrated on GPT-2 and Llama bridges: the
    MLP's hidden layer and its activation function's temporaries dominate, then the attention scores
    and the keys/values)."""
    per_query = 14 * m["d"] + 4 * m["d_mlp"] + 3 * m["H"] * n_keys
    per_key = 4 * m["d_kv"] + 2 * m["d"]
    return rows * m["bytes"] * (n_query * per_query + n_keys * per_key)


def _bytes_per_prompt(model, kind: str, n_pos: int, n_cached: int, n_kv_layers: int) -> float:
    """What one prompt adds to a group's caches: `n_cached` [pos, d_model]-sized activations (both
    runs), keys and values, the head deltas of one layer (float32)."""
    m = _dims(model)
    per_pos = m["bytes"] * (n_cached * m["d"] + 2 * n_kv_layers * m["d_kv"])
    if kind == "head":
        per_pos += 4 * m["H"] * m["d"]
    return n_pos * per_pos


class _Plan:
    """Prompts per group and the size of each patched forward, so that one group's caches plus one
    forward's activations fit `memory_mb` (and, on CPU, CPU_CHUNK_MB)."""

    def __init__(self, model, ps: PromptSet, kind: str, n_cached: int, n_kv_layers: int, memory_mb: float,
                 batch_size: int | None, vocab_rows: bool = False):
        n, P = ps.tokens.shape
        self.dims, self.P = _dims(model), P
        budget = memory_mb * 2**20
        per_prompt = _bytes_per_prompt(model, kind, P, n_cached, n_kv_layers)
        own = _forward_bytes(self.dims, 1, P, P)  # the group's cached forward, per prompt
        if vocab_rows:  # full logits [rows, pos, vocab] (a metric function on the hooked path)
            own += P * model.cfg.d_vocab * 4
        self.per_row_full = own
        group = int(budget // (per_prompt + own))
        if group < 1:
            raise LensBiasError(f"memory_mb={memory_mb:g} is too small for one prompt of {P} tokens "
                                f"(needs ≈ {(per_prompt + own) / 2**20:.1f} MiB)")
        self.group = min(group, n)
        self.work = budget - self.group * per_prompt  # ≥ one forward of the whole group
        if device_of(model).type == "cpu":
            self.work = min(self.work, max(CPU_CHUNK_MB * 2**20, own))
        self.max_rows = batch_size

    def fits(self, rows: int, n_query: int, n_keys: int) -> bool:
        """Whether a forward of `rows` rows, `n_query` positions each, attending to `n_keys` keys fits."""
        if self.max_rows is not None and rows > self.max_rows:
            return False
        return _forward_bytes(self.dims, rows, n_query, n_keys) <= self.work

    def full_rows(self) -> int:
        """Rows per hooked full forward."""
        rows = max(1, int(self.work // self.per_row_full))
        return min(rows, self.max_rows) if self.max_rows is not None else rows


# ---------------------------------------------------------------------------------------
# Activation patching
# ---------------------------------------------------------------------------------------
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
    `memory_mb` bounds the memory patching adds (caches of a group of prompts plus one forward's
    activations; see the module docstring); `batch_size` caps the (site, prompt) rows per forward.
    metric: 'logit_diff', 'prob_ratio', 'odds_ratio' or a function (logits, PromptSet) → [batch]
    (a function forces the hooked full forward). NaN/inf in the model's outputs raise a LensBiasError.
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
    if not memory_mb > 0:
        raise LensBiasError(f"memory_mb must be > 0, got {memory_mb}")
    if not callable(metric):
        get_metric(metric)  # a clear error for unknown names
    n_layers = model.cfg.n_layers
    layers = list(range(n_layers)) if layers is None else list(layers)
    bad = [l for l in layers if not 0 <= l < n_layers]
    if bad or not layers:
        raise LensBiasError(f"layer(s) {bad or layers} out of range: the model has {n_layers} layers")
    device = device_of(model)
    ps = ps.to(device)
    kind = site_kind(site)
    spans = _spans(layers, window, n_layers)
    check_hook_names(model, sorted({hook_name(site, k) for lo, hi in spans for k in range(lo, hi)}))
    metric_name = metric if not callable(metric) else getattr(metric, "__name__", str(metric))
    problem = None if callable(metric) else _unembedding_problem(model, ps, metric)
    if problem:  # the model's logits are not what the answer-only unembedding computes: use its own logits
        warn_fallback(model, "unembedding", f"answer logits from the final residual do not match the model's "
                      f"logits ({problem}); every patched run computes the full logits instead")
        metric = get_metric(metric)
    n_cached, n_kv_layers = _cache_count(site, kind, spans, n_layers, layout(model))
    plan = _Plan(model, ps, kind, n_cached, n_kv_layers, memory_mb, batch_size, vocab_rows=callable(metric))
    group = plan.group
    n, P = ps.tokens.shape
    n_comps = (P if per_position else 1) * (model.cfg.n_heads if kind == "head" else 1)
    bar = tqdm(total=len(layers) * n_comps * n, desc=f"patching {site}", disable=not progress, unit="row")
    use_fast = fast and not callable(metric) and metric in FAST_METRICS and _right_padded(ps)
    parts, used_fast = [], use_fast
    try:
        for g0 in range(0, n, group):
            idx = torch.arange(g0, min(n, g0 + group), device=device)
            sub = ps if len(idx) == n else _rows(ps, idx)
            corr = corruption if corruption is None or len(idx) == n else _sub_corruption(corruption, idx)
            args = (model, sub, site, per_position, metric, layers, window, corr, plan, bar)
            res = None
            if used_fast:
                try:
                    res = _patch_fast(*args)
                except _ShortcutMismatch as e:
                    warn_fallback(model, "shortcut", f"the shortcut forward does not fit this model ({e}); "
                                  "using one hooked forward per chunk of rows (same values, slower)")
                    used_fast = False
                    if parts:  # start again on the hooked path, so every prompt is scored the same way
                        return activation_patching(model, ps, site, per_position=per_position, metric=metric,
                                                   layers=layers, window=window, corruption=corruption,
                                                   batch_size=batch_size, memory_mb=memory_mb, fast=False,
                                                   progress=progress)
            if res is None:
                res = _patch_generic(*args)
            parts.append(res)
            _trim_heap(device)
    finally:
        bar.close()
    out = torch.cat([p[0] for p in parts], -1)
    clean_rows = torch.cat([p[1] for p in parts])
    corr_rows = torch.cat([p[2] for p in parts])
    extra = {"prefix": all(p[3] for p in parts)} if used_fast else {}
    return _result(model, ps, site, kind, per_position, layers, out, clean_rows, corr_rows, metric_name, window,
                   "activation", fast=used_fast, **extra)


#: per model, the fallbacks it has been warned about (each is said once per model)
_WARNED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class FastPathWarning(UserWarning):
    """A fast path does not fit the model: lens_bias uses the plain hooked computation instead."""


def warn_fallback(model: HookedModel, kind: str, message: str) -> None:
    """Warn, once per model and kind of fallback, that a fast path fell back (naming the architecture)."""
    seen = _WARNED.setdefault(model, set())
    if kind in seen:
        return
    seen.add(kind)
    hf = getattr(model, "original_model", model)
    arch = (getattr(hf.config, "architectures", None) or [type(hf).__name__])[0]
    warnings.warn(f"lens_bias fast path off for {arch}: {message}", FastPathWarning, stacklevel=3)


def _unembedding_problem(model, ps: PromptSet, metric: Metric) -> str | None:
    """None when the answer metric computed from the final residual (final norm, answer columns of W_U,
    soft cap) equals the one from the model's own logits, on the first three tokens of (up to) two
    prompts; else how far apart."""
    sub = _rows(ps, torch.arange(min(2, len(ps)), device=ps.tokens.device))
    k = min(3, sub.tokens.shape[1])
    sub = replace(sub, tokens=sub.tokens[:, :k], attention_mask=torch.ones_like(sub.tokens[:, :k]),
                  answer_pos=torch.full_like(sub.answer_pos, k - 1))
    rows = torch.arange(len(sub), device=sub.tokens.device)
    last = last_resid(model)
    with torch.no_grad(), trace(model, [last]) as acts:
        want = get_metric(metric)(model(sub.tokens, attention_mask=sub.attention_mask), sub).float()
    with torch.no_grad():
        got = _Answers(model, sub, metric)(acts[last][rows, sub.answer_pos], rows)  # pyright: ignore[reportArgumentType] - only named (fast) metrics get here
    tol = _tolerance(model)
    if not torch.isfinite(want).all() or torch.allclose(got, want, atol=tol * (1 + float(want.abs().max())), rtol=tol):
        return None  # non-finite logits are reported by the methods themselves
    return f"max |diff| {float((got - want).abs().max()):.2e}"


def _trim_heap(device: torch.device) -> None:
    """Hand freed CPU heap memory back to the OS: glibc keeps freed blocks otherwise, and the resident
    size would grow forward after forward although nothing is alive (a no-op off glibc and off the CPU)."""
    if device.type != "cpu":
        return
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _rows(ps: PromptSet, idx: Tensor) -> PromptSet:
    """Prompts `idx` of `ps` with every position kept (PromptSet indexing drops all-padding columns)."""
    pick = lambda x: None if x is None else x[idx.to(x.device)]  # noqa: E731
    i = idx.tolist()
    return replace(ps, prompts=[ps.prompts[j] for j in i], tokens=pick(ps.tokens),
                   attention_mask=pick(ps.attention_mask), answer_pos=pick(ps.answer_pos),
                   answers=[ps.answers[j] for j in i], answer_ids=pick(ps.answer_ids),
                   corrupted_prompts=None if ps.corrupted_prompts is None else [ps.corrupted_prompts[j] for j in i],
                   corrupted_tokens=pick(ps.corrupted_tokens), subject_spans=pick(ps.subject_spans),
                   metadata=[ps.metadata[j] for j in i])


def _sub_corruption(corruption, idx: Tensor):
    """`corruption` for a group of prompts (its prompt indices are the group's)."""
    return lambda prompt_idx: corruption(idx[prompt_idx.to(idx.device)])


def _right_padded(ps: PromptSet) -> bool:
    m = ps.attention_mask
    return bool((m[:, :1] == 1).all()) and bool((m[:, 1:] <= m[:, :-1]).all())


class _ShortcutMismatch(Exception):
    pass


def _spans(layers, window, n_layers):
    """Each scored layer l restores layers [lo, hi) (just l when window == 1), as ROME's window."""
    return [(max(0, l - window // 2), min(n_layers, l - (-window // 2))) for l in layers]


def _entry_sites(site: Site, lay: Layout) -> tuple[Site, ...]:
    """The corrupted run's activations at a patched layer that the rows' entry state is built from
    (and, for an output added to the residual, that check it adds up)."""
    entry, _ = _entry_of(site, 0, lay)
    if entry == "hook" or site == "resid_pre":
        return ("resid_pre",)
    if site in ("resid_mid", "resid_post"):
        return (site,)
    if lay.parallel:
        return ("resid_pre", "resid_post", "mlp_out" if site != "mlp_out" else "attn_out")
    return ("resid_mid", "resid_post") if site == "mlp_out" else ("resid_pre", "resid_mid")


def _cache_count(site, kind, spans, n_layers, lay: Layout) -> tuple[int, int]:
    """([pos, d_model]-sized activations cached per prompt, layers whose keys/values are kept)."""
    comp_layers = {k for lo, hi in spans for k in range(lo, hi)}
    entries = {lo for lo, _ in spans}
    n = 2 * len(comp_layers) + len(_entry_sites(site, lay)) * len(entries) + 3
    first = min(at + (entry == "mid") for entry, at in (_entry_of(site, lo, lay) for lo in entries))
    return n, max(0, n_layers - first)


def _added(site: Site, lay: Layout, cache: dict, lo: int) -> Tensor:
    """What the attention (site attn_out/head) or the MLP (mlp_out) of layer `lo` added to the residual in
    a cached run, from the residual states (float32)."""
    get = lambda name: cache[hook_name(name, lo)].float()  # noqa: E731
    if not lay.parallel:
        return get("resid_post") - get("resid_mid") if site == "mlp_out" else get("resid_mid") - get("resid_pre")
    other = "attn_out" if site == "mlp_out" else "mlp_out"
    return get("resid_post") - get("resid_pre") - get(other)


def _patch_fast(model, ps, site, per_position, metric, layers, window, corruption, plan, bar):
    """(metric [layer, component, prompt], clean metric, corrupted metric, prefix reuse on) of one group."""
    kind = site_kind(site)
    L, n, P, H = model.cfg.n_layers, len(ps), ps.tokens.shape[1], model.cfg.n_heads
    device = ps.tokens.device
    spans = _spans(layers, window, L)
    comp_layers = sorted({k for lo, hi in spans for k in range(lo, hi)})
    entry_layers = sorted({lo for lo, _ in spans})
    comp_names = {k: hook_name(site, k) for k in comp_layers}
    lay = layout(model)
    need = set(comp_names.values())
    for lo in entry_layers:  # the residual states the rows enter from
        need |= {hook_name(r, lo) for r in _entry_sites(site, lay)}
    corrupt_tokens = ps.tokens if corruption is not None else ps.corrupted_tokens
    all_idx = torch.arange(n, device=device)
    answers = _Answers(model, ps, metric)
    last = last_resid(model)
    tol = _tolerance(model)
    with torch.no_grad():
        cache_c, _, _, _ = _cached_run(model, ps.tokens, ps.attention_mask, set(comp_names.values()))
        final_c = cache_c[last] if last in comp_names.values() else cache_c.pop(last)
        base_hooks = list(corruption(all_idx)) if corruption is not None else []
        cache_x, block_args, past_names, kv = _cached_run(model, corrupt_tokens, ps.attention_mask, need, base_hooks,
                                                          capture_blocks=True)
        final_x = cache_x[last]
        clean_rows = answers(final_c[all_idx, ps.answer_pos], all_idx)
        corr_rows = answers(final_x[all_idx, ps.answer_pos], all_idx)
        answers.check("the clean and corrupted runs' answer logits")
        del final_c
        if any(a is None for a in block_args):
            raise _ShortcutMismatch("some blocks were not called as modules")
        sc = _Shortcut(model, block_args, past_names, kv, n, P, answers, ps.answer_pos, lay)  # pyright: ignore[reportArgumentType] - checked above: no block without arguments
        # the shortcut must reproduce the corrupted run, on rows in another order and number than the
        # prompts, from the first entry used, over all positions and over a window after a cached prefix
        lo0 = entry_layers[0]
        entry0, at0 = _entry_of(site, lo0, lay)
        base0 = cache_x[_base_name(site, lo0, lay)]
        shuffled = torch.tensor([n - 1, 0, 0], device=device)
        expect = corr_rows[shuffled]

        def agrees(s):
            try:
                got = sc.run(base0[shuffled, s:int(ps.answer_pos[shuffled].max()) + 1], entry0, at0, shuffled, s)
            except Exception as e:  # noqa: BLE001 - any failure means: do not use this path
                return f"{type(e).__name__}: {e}"
            if not torch.allclose(got, expect, atol=tol, rtol=tol):
                return f"max |diff| {float((got - expect).abs().max()):.2e} on the corrupted run"
            return None

        problem = agrees(0)
        if problem:
            raise _ShortcutMismatch(problem)
        s_check = int(ps.answer_pos[shuffled].min()) // 2
        if sc.windowed and s_check > 0 and agrees(s_check):
            sc.windowed = False  # exact, but without reusing the prefix
        if entry0 != "hook" and site in ("attn_out", "mlp_out", "head"):
            _check_added(model, site, lay, cache_x, lo0, tol)

    pos_axis = list(range(P)) if per_position else [-1]
    head_axis = list(range(H)) if kind == "head" else [-1]
    comps = [(p, h) for p in pos_axis for h in head_axis]
    C = len(comps)
    comp_t = torch.tensor(comps, device=device)  # [C, 2]
    pos_c, head_c = comp_t[:, 0], comp_t[:, 1].clamp(min=0)
    ans = ps.answer_pos
    out = torch.empty(len(layers), C, n, device=device)
    upto = torch.arange(P, device=device)[None, :, None] <= ans[:, None, None]  # positions that can matter
    with torch.no_grad():
        for li, (lo, hi) in enumerate(spans):
            # which (site, prompt) patches change anything (clean ≠ corrupted somewhere in the window)
            diff = torch.zeros(n, P, H if kind == "head" else 1, dtype=torch.bool, device=device)
            for k in range(lo, hi):
                d = cache_c[comp_names[k]] != cache_x[comp_names[k]]
                diff |= d.any(-1) if kind == "head" else d.any(-1, keepdim=True)
            diff &= upto
            entry, at = _entry_of(site, lo, lay)
            final_only = (entry == "pre" and at == L) or (entry == "mid" and at == L - 1 and hi - lo == 1)
            # after the last attention, a patch changes its own position only
            last_only = lo == L - 1 and hi - lo == 1 and site != "resid_pre"
            if per_position:
                changed = diff[:, pos_c, head_c].T  # [C, n]
                if last_only:
                    changed &= pos_c[:, None] == ans[None, :]
                start = pos_c[:, None].expand(C, n)
            else:
                changed = diff.any(1)[:, head_c].T
                start = diff.int().argmax(1)[:, head_c].T  # the first position the patch changes
            if final_only:
                start = ans[None, :].expand(C, n)
            out[li] = corr_rows[None, :].expand(C, n)
            todo = changed.nonzero()  # [rows, 2] = (component, prompt)
            bar.update(C * n - len(todo))
            if not len(todo):
                continue
            s_row = start[todo[:, 0], todo[:, 1]] if sc.windowed or final_only else torch.zeros_like(todo[:, 0])
            order = torch.argsort(s_row * n + todo[:, 1], stable=True)
            todo, s_row = todo[order], s_row[order]
            e_row = ans[todo[:, 1]] + 1 if sc.windowed or final_only else torch.full_like(s_row, P)
            delta = None
            if kind == "head" and entry != "hook":  # per head, its output added to the residual: [head, batch, pos, d_model]
                zc, zx = cache_c[comp_names[lo]].float(), cache_x[comp_names[lo]].float()
                delta = torch.einsum("bphd,hde->hbpe", zc - zx, model.blocks[lo].attn.W_O.float())
                del zc, zx
            first_hook = lo if entry == "hook" else lo + 1
            full_last = hi == L and hi - first_hook > 0  # patch hooks inside the last block
            for ci, prompts, s, e in _chunks(todo, s_row.tolist(), e_row, plan):
                pos, head = pos_c[ci], head_c[ci]
                x = _entry_state(site, lo, lay, cache_c, cache_x, prompts, pos, head, per_position, delta, s, e)
                hooks = []
                for k in range(first_hook, hi):
                    name = comp_names[k]
                    hooks.append((name, _patch_hook(cache_c[name], torch.arange(len(prompts), device=device),
                                                    prompts, pos if per_position else torch.full_like(pos, -1),
                                                    head if kind == "head" else torch.full_like(head, -1), kind,
                                                    s, e)))
                ctx = model.hooks(fwd_hooks=hooks) if hooks else contextlib.nullcontext()
                with ctx:
                    out[li, ci, prompts] = sc.run(x, entry, at, prompts, s, full_last=full_last)
                bar.update(len(prompts))
            del delta
            _trim_heap(device)
    answers.check("the patched runs' answer logits")
    return out, clean_rows, corr_rows, sc.windowed


def _chunks(todo: Tensor, s_row: list[int], e_row: Tensor, plan: _Plan):
    """Consecutive rows (sorted by start) cut to forwards that fit the plan: yields
    (components, prompts, s, e), positions s..e-1 (s: the chunk's first start, e: its last end)."""
    e_list = e_row.tolist()
    i, R = 0, len(s_row)
    while i < R:
        s = s_row[i]
        j, e = i, s + 1
        while j < R and plan.fits(j - i + 1, max(e, e_list[j]) - s, max(e, e_list[j])):
            e = max(e, e_list[j])
            j += 1
        j = max(j, i + 1)
        e = max(e, max(e_list[i:j]))
        yield todo[i:j, 0], todo[i:j, 1], s, e
        i = j


def _entry_of(site: Site, lo: int, lay: Layout) -> tuple[str, int]:
    """Where rows patching `site` at layer `lo` enter the shortcut forward: ('pre', l) block l's input,
    ('mid', l) after block l's attention, ('hook', lo) block lo's input with the site patched by a hook
    inside block lo (for outputs that do not enter the residual as they are)."""
    if site == "resid_pre":
        return "pre", lo
    if site in ("resid_post", "mlp_out"):
        return "pre", lo + 1  # the next block's input
    if lay.parallel:  # attention and MLP both read resid_pre: their outputs add up to the next block's input
        return ("pre", lo + 1) if site == "attn_out" or lay.head_linear else ("hook", lo)
    if lay.mlp_half and (site != "head" or lay.head_linear):
        return "mid", lo
    return "hook", lo


def _base_name(site: Site, lo: int, lay: Layout) -> str:
    """The corrupted residual that rows patching `site` at layer `lo` start from."""
    entry, at = _entry_of(site, lo, lay)
    if entry == "mid":
        return hook_name("resid_mid", lo)
    return hook_name("resid_post", lo) if at > lo else hook_name("resid_pre", lo)


def _check_added(model: HookedModel, site: Site, lay: Layout, cache_x: dict, lo: int, tol: float) -> None:
    """A _ShortcutMismatch unless the patched output is what its layer adds to the residual (attn_out,
    mlp_out) or, for heads, Σ_h z_h W_O[h] + a constant (b_O) — checked on the corrupted run."""
    added = _added(site, lay, cache_x, lo)
    if site == "head":
        out = torch.einsum("bphd,hde->bpe", cache_x[hook_name("head", lo)].float(), model.blocks[lo].attn.W_O.float())
    else:
        out = cache_x[hook_name(site, lo)].float()
    gap = (added - out).flatten(0, 1)
    scale = tol * (1 + float(added.abs().max()) + float(cache_x[_base_name(site, lo, lay)].float().abs().max()))
    if not torch.allclose(gap, gap[:1].expand_as(gap) if site == "head" else torch.zeros_like(gap), atol=scale,
                          rtol=tol):
        what = "Σ_h z_h W_O[h] + b_O" if site == "head" else f"hook {hook_name(site, lo)}"
        raise _ShortcutMismatch(f"what layer {lo} adds to the residual is not {what}")


def _entry_state(site, lo, lay, cache_c, cache_x, prompts, pos, head, per_position, delta, s, e):
    """The corrupted residual at the entry point, positions s..e-1, with the row's site patched in
    (for a 'hook' entry, unpatched: the hook patches inside the block)."""
    base = cache_x[_base_name(site, lo, lay)]
    if _entry_of(site, lo, lay)[0] == "hook":
        return base[prompts, s:e]
    r = torch.arange(len(prompts), device=base.device)
    rel = pos - s
    if site == "head":
        x = base[prompts, s:e]
        if per_position:
            x = x.clone()
            x[r, rel] = (x[r, rel].float() + delta[head, prompts, pos]).to(x.dtype)
        else:
            x = (x.float() + delta[head, prompts, s:e]).to(x.dtype)
        return x

    def new(rows, cols):
        name = hook_name(site, lo)
        if site in ("resid_pre", "resid_mid", "resid_post"):
            return cache_c[name][rows, cols]
        # attn_out / mlp_out: the corrupted residual with the output it added swapped for the clean one
        return (base[rows, cols].float() + cache_c[name][rows, cols].float() - cache_x[name][rows, cols].float()
                ).to(base.dtype)

    if per_position:
        x = base[prompts, s:e].clone()
        x[r, rel] = new(prompts, pos)
        return x
    return new(prompts[:, None], torch.arange(s, e, device=base.device)[None, :])


def _result(model, ps, site, kind, per_position, layers, out, clean_rows, corr_rows, metric, window, method,
            fast, **extra):
    n_pos, n_heads = ps.tokens.shape[1], model.cfg.n_heads
    shape = [len(layers)] + ([n_pos] if per_position else []) + ([n_heads] if kind == "head" else [])
    dims = ("layer",) + (("pos",) if per_position else ()) + (("head",) if kind == "head" else ())
    per_prompt = out.reshape(*shape, len(ps)).float().cpu()
    return ComponentScores(per_prompt.mean(-1), dims, site, method, clean_rows.float().mean().item(),
                           corr_rows.float().mean().item(), position_labels(model, ps),
                           {"layers": layers, "metric": str(metric), "window": window, "per_prompt": per_prompt,
                            "fast": fast, **extra})


def _patch_hook(clean_act: Tensor, rows: Tensor, prompts: Tensor, pos: Tensor, head: Tensor, kind: str,
                s: int = 0, e: int | None = None):
    """A hook writing clean activations into `rows` at (pos, head); -1 means all positions/heads.
    The activation covers positions s..e-1 of each prompt."""
    all_pos = bool((pos < 0).all())
    span = slice(s, e)

    def hook(act, hook):
        if kind == "pos":
            if all_pos:
                act[rows] = clean_act[prompts, span]
            else:
                act[rows, pos - s] = clean_act[prompts, pos]
        else:
            if all_pos:
                act[rows, :, head] = clean_act[prompts, span, head]
            else:
                act[rows, pos - s, head] = clean_act[prompts, pos, head]
        return act

    return hook


def _metric_rows(model, ps_rows: PromptSet, tokens, hooks, metric) -> Tensor:
    """The per-row metric of one hooked forward (answer logits in float32; a function metric gets the full logits)."""
    rows = torch.arange(len(ps_rows), device=tokens.device)
    if not callable(metric) and metric in FAST_METRICS:
        final = run_until(model, tokens, attention_mask=ps_rows.attention_mask, fwd_hooks=hooks)[last_resid(model)]
        answers = _Answers(model, ps_rows, metric)
        out = answers(final[rows, ps_rows.answer_pos], rows)
        answers.check("the model's answer logits")
        return out
    with model.hooks(fwd_hooks=hooks):
        logits = model(tokens, attention_mask=ps_rows.attention_mask)
    check_finite(logits, "the model's logits", model)
    return get_metric(metric)(logits, ps_rows).float()


def _patch_generic(model, ps, site, per_position, metric, layers, window, corruption, plan, bar):
    """One hooked forward per chunk of rows (any architecture, any metric)."""
    kind = site_kind(site)
    n_layers, n_pos, n_heads = model.cfg.n_layers, ps.tokens.shape[1], model.cfg.n_heads
    batch_size = plan.full_rows()
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
            sub = _rows(ps, prompts)
            toks = sub.tokens if corruption is not None else sub.corrupted_tokens
            out[rows.to(device)] = _metric_rows(model, sub, toks, hooks, metric)
            bar.update(len(rows))
    n_comps = len(pos_axis) * len(head_axis)
    out = out.view(len(layers), n_comps, n_prompts)
    return out, clean, corrupted, False


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
