"""Faithfulness, measured: does a method's top-k carry the bias, and at what cost? On the held-out test split.

With m the task's bias metric, m_clean its value, m_ref its unbiased reference (the twins for pair tasks,
0 otherwise), B = |m_clean − m_ref| and σ = sign(m_clean − m_ref):

    necessity(k)   = σ·(m_clean − m_ablated(top-k)) / B     the share of the bias the top-k's ablation removes
                     (zero, mean and resample ablation; mean/resample draw from the reference prompts)
    sufficiency(k) = σ·(m_corrupted, top-k clean − m_ref) / B   pair tasks: the twins' run with only the
                     top-k units' clean activations written in — the share of the bias they restore;
                     other tasks: σ·(m with every other unit of the type mean-ablated − m_ref) / B
    Δloss(k)       = loss on neutral text with the top-k ablated (the first ablation, zero by default) − the
                     clean loss (nats/token): what the removal costs
    random(k)      = the same for k random units: `seeds` draws, each a random order of all units whose first
                     k are its k-set (nested, as a method's top-k are), under the first ablation; the first
                     BAND_DRAWS draws under every ablation and for sufficiency, the first CAPABILITY_DRAWS
                     for Δloss

A layer unit is all heads (attn) or all neurons (mlp) of its layer. Intervals (how sure) come from the
bootstrap of resampling.py: professions and their neutral twins resampled (questions, items).

Beats random (`rank_methods`), fair to a type of 16 heads and to one of 50,000 neurons alike: a rank test.
At each k, the method's necessity (first ablation) is ranked among the random draws' at that k; the
statistic is the mean over k of that rank, and p = (number of curves, the method's included, whose mean
rank is at least the method's) / (seeds + 1) over the method's curve and every random curve — exact when
the method's top-k are as good as a random order's. p_k (one k) is reported too. A method beats random when
p ≤ ALPHA, its area above random is positive and the held-out bias is significant (its interval excludes 0).
With `seeds` draws, p ≥ 1/(seeds + 1): 19 draws or more are needed for p ≤ 0.05.

Ranking rule, capability counted: a method is ranked by the bias its top-k remove beyond k random units',
within a loss budget (default +0.1 nats/token): among the k whose Δloss ≤ budget, k_budget is the one where
removed − random's removed (both necessity under the first ablation) is largest, and that difference is the
method's score ("beyond random": bias removed by ablating many units at once — the organism's 8 of 16 heads —
is not credited to the method when as many random units remove as much). Methods that beat random and have a
k within budget come first, by score; then the rest, by score (none within budget: last), then by area. A
method whose top-k at the largest k raises the loss by more than BREAKS nats is marked as breaking the model.
Without a capability measure (capability=False) the score is the area.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Callable, Iterable

import torch
from tqdm.auto import tqdm

from ...core.errors import LensBiasError, PromptError
from ...core.hooks import device_of, hook_name, run_until
from ...core.models import HookedModel
from ...core.prompts import encode_lines, pad, pad_id_of
from ...locate.patching import Resumed, stacked_hooks
from ...tasks.multiple_choice import option_sequences
from ...mitigate.ablation import (
    AblationMethod,
    head_ablation_hooks,
    neuron_ablation_hooks,
    reference_activations,
)
from .resampling import interval, resampling
from .tasks import ReportTask, answers_bias, mc_bias, mc_prompts
from .units import ABLATABLE, expand, n_units, top_units, unit_label

ALPHA = 0.05  # the rank test's level
BUDGET = 0.1  # nats/token: the capability cost a ranked top-k may have
BREAKS = 1.0  # nats/token: a top-k (largest k) costing more breaks the model
CAPABILITY_DRAWS = 2  # random draws whose capability cost is measured at every k
BAND_DRAWS = 3  # random draws measured under the other ablations and for sufficiency (the curves' bands)
N_EFFECTS = 5  # each method's top heads / neurons whose effect alone is measured (zero ablation, with an interval)
#: ablations whose hooks act alike at every position and prompt (mitigate.ablation: a ← 0, a ← a fixed mean)
POSITION_FREE = ("zero", "mean")
RANK_DRAWS = 19  # random draws for the rank test: p ≥ 1/(draws + 1), so 19 is the fewest that reach 0.05


def k_grid(k_values: Iterable[int], n: int) -> list[int]:
    """The k values to test for a unit type with n units: at most half of them (random needs room)."""
    return sorted({k for k in k_values if 1 <= k <= max(1, n // 2)})


def _clean_cache(model, task: ReportTask) -> dict:
    ps = task.test.to(device_of(model))  # pyright: ignore[reportAttributeAccessIssue] - pairs and yes/no tasks hold a PromptSet
    names = [hook_name(s, l) for s in ("head", "neuron") for l in range(model.cfg.n_layers)]
    with torch.no_grad():
        return run_until(model, ps.tokens, attention_mask=ps.attention_mask, keep=names, detach=True)


def _restore_hooks(cache: dict, heads, neurons) -> list:
    """Hooks writing the clean run's activations of these heads (hook_z) and neurons (hook_post)."""
    by: dict[str, list[int]] = {}
    for site, units in (("head", heads), ("neuron", neurons)):
        for l, i in units:
            by.setdefault(hook_name(site, l), []).append(i)  # pyright: ignore[reportArgumentType] - 'head' or 'neuron'
    hooks = []
    for name, idx in by.items():
        index = torch.tensor(sorted(set(idx)))

        def hook(x, hook, name=name, index=index):
            x[:, :, index.to(x.device)] = cache[name][:, :, index.to(x.device)].to(x.dtype)
            return x
        hooks.append((name, hook))
    return hooks


def first_layer(heads, neurons, n_layers: int) -> int:
    """The first layer a set of units touches: a forward ablating them can start there (n_layers: none)."""
    return min([l for l, _ in heads] + [l for l, _ in neurons] + [n_layers])


class Faithfulness:
    """Runs the ablations of one report, sharing what can be shared: the reference activations (computed
    once), the clean run's activations (for restoring), one measurement per distinct unit set, many unit
    sets per forward (the test prompts stacked once per set, each copy with its own hooks), and the layers
    before a unit set's first layer (each forward resumes there from the recorded run: locate.patching.Resumed)."""

    def __init__(self, model: HookedModel, task: ReportTask, *, ablations: Iterable[AblationMethod] = ("zero", "mean"),
                 seeds: int = RANK_DRAWS, capability: bool = True, seed: int = 0, max_tokens: int = 4096,
                 n_boot: int = 1000):
        self.model, self.task, self.ablations, self.seeds = model, task, tuple(ablations), seeds
        self.capability, self.seed, self.max_tokens = capability and bool(task.neutral), seed, max_tokens
        cfg = model.cfg
        self.L, self.n_heads, self.d_mlp = cfg.n_layers, cfg.n_heads, cfg.d_mlp
        self.boot = resampling(task, n_boot, seed)
        if task.kind == "multiple_choice":
            self.options = _Options(model, task, max_tokens)
        else:
            ps = task.test.to(device_of(model))  # pyright: ignore[reportAttributeAccessIssue] - pairs and yes/no tasks hold a PromptSet
            self.ps = ps
            self.runs = {False: Resumed(model, ps.tokens, ps.attention_mask, ps.answer_pos, ps.answer_ids)}
            if task.has_twins:
                self.runs[True] = Resumed(model, ps.corrupted_tokens, ps.attention_mask, ps.answer_pos,  # pyright: ignore[reportArgumentType] - pairs tasks have twins
                                          ps.answer_ids)
        self.clean = self.measure([([], self.L)])[0]
        self.m_clean = self.clean["bias"]
        self.ref = self.measure([([], self.L)], corrupted=True)[0] if task.has_twins else None
        self.m_ref = self.ref["bias"] if self.ref is not None else 0.0
        self.clean_b = self.boot.mean(self.clean["values"])
        self.ref_b = self.boot.mean(self.ref["values"]) if self.ref is not None else torch.zeros_like(self.clean_b)
        gap = self.m_clean - self.m_ref
        self.sign = 1.0 if gap >= 0 else -1.0
        self.scale = abs(gap)
        self.text = _NeutralText(model, task.neutral) if self.capability else None  # pyright: ignore[reportArgumentType] - capability needs task.neutral (above)
        self.loss_clean = self.text.loss([([], self.L)])[0] if self.text else float("nan")
        needs_ref = any(a != "zero" for a in self.ablations) or not task.has_twins
        self.reference = reference_activations(model, task.reference(model)) if needs_ref else None
        self.cache = _clean_cache(model, task) if task.has_twins else None

    def _ablation_hooks(self, heads, neurons, ablation: AblationMethod, seed: int) -> list:
        ref = self.reference if ablation != "zero" else None
        hooks = []
        if heads:
            hooks += head_ablation_hooks(self.model, heads, ablation, ref, seed)
        if neurons:
            hooks += neuron_ablation_hooks(self.model, neurons, ablation, ref, seed)
        return hooks

    def share(self, m: float) -> float:
        """σ·(m_clean − m)/B: the share of the bias removed (NaN when there is no bias to share)."""
        if not self.scale or self.scale != self.scale:
            return float("nan")
        return self.sign * (self.m_clean - m) / self.scale

    def share_replicates(self, values: torch.Tensor) -> torch.Tensor:
        """The share removed under every bootstrap replicate [n_boot + 1] from an ablated run's row values."""
        gap = self.clean_b - self.ref_b
        return gap.sign() * (self.clean_b - self.boot.mean(values)) / gap.abs()

    def measure(self, configs: list[tuple], corrupted: bool = False, bar=None) -> list[dict]:
        """bias_of under each (hooks, first layer[, position free]) config: prompt tasks many configs per forward,
        each forward resuming at its configs' first layer (and computing the prompts' shared first tokens once
        per config when its hooks act alike everywhere: zero and mean ablation); multiple choice one at a time."""
        task = self.task
        if task.kind == "multiple_choice":
            return self.options.measure(configs, bar)
        run, ps = self.runs[corrupted], self.ps
        n, width = len(ps), ps.tokens.shape[1]
        per = max(1, self.max_tokens // max(1, n * width))
        key = [(c[1], bool(c[2]) if len(c) > 2 else False) for c in configs]
        order = sorted(range(len(configs)), key=lambda i: key[i])  # same first layer and path, same forward
        out: list[dict | None] = [None] * len(configs)
        s = 0
        while s < len(order):
            group = [i for i in order[s: s + per] if key[i] == key[order[s]]]
            layer, free = key[order[s]]
            a = run.answer_logits_many(min(layer, self.L - 1), [configs[i][0] for i in group], free)
            for g, i in enumerate(group):
                out[i] = answers_bias(task, a[g * n:(g + 1) * n], ps.metadata)
            s += len(group)
            if bar is not None:
                bar.update(len(group))
        return out  # pyright: ignore[reportReturnType] - every config is measured

    # ---- the plan: which unit sets are measured ------------------------------------------------
    def plan(self, scores: dict[str, dict[str, torch.Tensor]], k_values) -> list[tuple]:
        """(unit type, method or 'random', k, units, seed or None, all units, is the largest k)."""
        plan = []
        for unit_type in ABLATABLE:
            # 'random' scores are a method only for agreement: the random draws below are the baseline
            methods = {m: t for m, t in scores.get(unit_type, {}).items() if n_units(t) > 0 and m != "random"}
            if not methods:
                continue
            shape = next(iter(methods.values())).shape
            all_units = list(itertools.product(*(range(d) for d in shape)))  # row-major, as top_units indexes
            ks = k_grid(k_values, len(all_units))
            orders = [random.Random(f"{self.seed}-{unit_type}-{s}").sample(all_units, ks[-1])
                      for s in range(self.seeds)]
            for k in ks:
                for method, t in methods.items():
                    plan.append((unit_type, method, k, top_units(t, k), None, all_units, k == ks[-1]))
                for s in range(self.seeds):
                    plan.append((unit_type, "random", k, orders[s][:k], s, all_units, k == ks[-1]))
        return plan

    def _ablations_of(self, s: int | None) -> tuple[str, ...]:
        """A method's top-k and the first BAND_DRAWS random draws: every ablation; further draws (the rank
        test's): the first ablation only."""
        return self.ablations if s is None or s < BAND_DRAWS else self.ablations[:1]

    def _hn(self, unit_type, units):
        heads, neurons = expand(unit_type, units, self.n_heads, self.d_mlp)  # pyright: ignore[reportArgumentType] - a bridge's cfg has d_mlp
        return heads, neurons, (tuple(sorted(heads)), tuple(sorted(neurons)))

    # ---- curves ----------------------------------------------------------------------
    def run(self, scores: dict[str, dict[str, torch.Tensor]], k_values=(1, 2, 4, 8), progress: bool = True):
        """Tidy rows: one per (unit type, method or 'random', k, measure, ablation, seed); necessity rows of
        methods carry an interval (value_lo, value_hi) and, under the first ablation, the neutral loss.
        `self.effects` then holds each method's top units' effect alone."""
        plan = self.plan(scores, k_values)
        effects = self._effect_plan(scores)
        nec_keys, suf_keys, cap_keys = self._keys(plan)
        for _, key, hn in effects:
            nec_keys.setdefault(key, hn)
        bar = tqdm(total=len(nec_keys) + len(suf_keys) + len(cap_keys), desc="faithfulness", unit="measurement",
                   disable=not progress)
        nec = self._run_keys(nec_keys, lambda key, hn: self._ablation_hooks(*hn, key[2], key[3]), False, bar,
                             free=lambda key: key[2] in POSITION_FREE)
        if self.task.has_twins:
            suf = self._run_keys(suf_keys, lambda key, hn: _restore_hooks(self.cache, *hn), True, bar)  # pyright: ignore[reportArgumentType] - twin tasks keep the clean cache
        else:
            suf = self._run_keys(suf_keys, lambda key, hn: self._ablation_hooks(*hn, "mean", 0), False, bar,
                                 free=lambda key: True)
        cap = {}
        if cap_keys:
            items = list(cap_keys.items())
            losses = self.text.loss([(self._ablation_hooks(*hn, key[2], key[3]), first_layer(*hn, self.L))  # pyright: ignore[reportOptionalMemberAccess] - capability keys need the neutral text
                                     for key, hn in items], bar)
            cap = {key: v for (key, _), v in zip(items, losses)}
        bar.close()
        self.effects = [{**info, "value": self.share(nec[key]["bias"]),
                         **dict(zip(("lo", "hi"), interval(self.share_replicates(nec[key]["values"]))))}
                        for info, key, _ in effects]
        return self._rows(plan, nec, suf, cap)

    def _keys(self, plan) -> tuple[dict[tuple, tuple[list, list]], dict[tuple, tuple[list, list]], dict[tuple, tuple[list, list]]]:
        """The distinct measurements of a plan (methods often pick the same units): necessity (units, ablation,
        resample seed), sufficiency (units) and capability keys, each → the (heads, neurons) it stands for."""
        first = self.ablations[0]
        nec_keys, suf_keys, cap_keys = {}, {}, {}
        for unit_type, _method, _k, units, s, all_units, _last in plan:
            heads, neurons, hn = self._hn(unit_type, units)
            for ablation in self._ablations_of(s):
                nec_keys.setdefault((*hn, ablation, (s or 0) if ablation == "resample" else 0), (heads, neurons))
            if self.capability and (s is None or s < CAPABILITY_DRAWS):
                cap_keys.setdefault((*hn, first, (s or 0) if first == "resample" else 0), (heads, neurons))
            if s is not None and s >= BAND_DRAWS:
                continue
            if self.task.has_twins:
                suf_keys.setdefault(hn, (heads, neurons))
            else:
                rest = [u for u in all_units if u not in set(units)]
                suf_keys.setdefault(hn, expand(unit_type, rest, self.n_heads, self.d_mlp))  # pyright: ignore[reportArgumentType] - a bridge's cfg has d_mlp
        return nec_keys, suf_keys, cap_keys

    def _rows(self, plan, nec: dict, suf: dict, cap: dict) -> list[dict]:
        first = self.ablations[0]
        rows = []
        for unit_type, method, k, units, s, _, _ in plan:
            _, _, hn = self._hn(unit_type, units)
            base = {"unit_type": unit_type, "method": method, "k": k, "seed": s,
                    "units": " ".join(unit_label(unit_type, u) for u in units)}
            for ablation in self._ablations_of(s):
                key = (*hn, ablation, (s or 0) if ablation == "resample" else 0)
                r = nec[key]
                row = {**base, "measure": "necessity", "ablation": ablation,
                       **{k_: v for k_, v in r.items() if k_ != "values"}, "value": self.share(r["bias"])}
                if method != "random":
                    row["value_lo"], row["value_hi"] = interval(self.share_replicates(r["values"]))
                if ablation == first and key in cap:
                    row["neutral_loss"] = cap[key]
                rows.append(row)
            if s is not None and s >= BAND_DRAWS:
                continue
            m = suf[hn]["bias"]
            rows.append({**base, "measure": "sufficiency", "ablation": "restore" if self.task.has_twins
                         else "mean (all others)", "bias": m, "value": 1.0 - self.share(m)})
        return rows

    def _effect_plan(self, scores) -> list[tuple[dict, tuple, tuple]]:
        """Each method's top N_EFFECTS units alone, zero-ablated: (info, key, (heads, neurons))."""
        out = []
        for unit_type in ("head", "neuron"):
            for method, t in scores.get(unit_type, {}).items():
                if method == "random" or n_units(t) == 0:
                    continue
                for rank, u in enumerate(top_units(t, N_EFFECTS), 1):
                    heads, neurons, hn = self._hn(unit_type, [u])
                    info = {"unit_type": unit_type, "method": method, "rank": rank, "unit": unit_label(unit_type, u)}
                    out.append((info, (*hn, "zero", 0), (heads, neurons)))
        return out

    def _run_keys(self, keys: dict[tuple, tuple[list, list]], hooks_of: Callable[[tuple, tuple[list, list]], list],
                  corrupted: bool, bar, free=lambda key: False) -> dict:
        items = list(keys.items())
        res = self.measure([(hooks_of(key, hn), first_layer(*hn, self.L), free(key)) for key, hn in items],
                           corrupted, bar)
        return {key: r for (key, _), r in zip(items, res)}

    def baseline(self) -> dict:
        """The unablated test-split measures the curves are relative to, with the bias's interval and z (its
        value over the bootstrap's standard deviation)."""
        bias_b = self.clean_b - self.ref_b
        lo, hi = interval(bias_b)
        sd = float(bias_b[1:].std()) if self.boot.n_boot > 1 else float("nan")
        out = {"bias_clean": self.m_clean, "bias_reference": self.m_ref, "scale": self.scale, "sign": self.sign,
               "neutral_loss": self.loss_clean, "bias_lo": lo, "bias_hi": hi,
               "test_z": (self.m_clean - self.m_ref) / sd if sd > 0 else float("nan"),
               "clusters": self.boot.n_clusters, "twins": self.boot.n_twins, "n_boot": self.boot.n_boot}
        for key in ("accuracy", "pr_gap"):
            if key in self.clean:
                out[key] = self.clean[key]
        return out


class _Options:
    """The multiple-choice bias metric under many hook sets, as bias_of computes it (tasks.mc_bias of the summed
    log-probabilities of each option's tokens), in stacked forwards: the sequences of one instruction begin with
    its text, computed once per hook set when the hooks are position free (Resumed.final_many), and only the
    positions that predict an option token are unembedded."""

    def __init__(self, model, task: ReportTask, max_tokens: int = 4096):
        self.model, self.task = model, task
        tok = model.tokenizer
        prompts, options = mc_prompts(task, task.test)  # pyright: ignore[reportArgumentType] - multiple-choice tasks hold items
        seqs, spans = option_sequences(tok, prompts, options)
        width, n_ctx = max(map(len, seqs)), getattr(model.cfg, "n_ctx", None)
        if n_ctx and width > n_ctx:
            raise PromptError(f"a prompt with its option is {width} tokens, longer than the model's context of "
                              f"{n_ctx}: shorten the contexts or use a model with a longer context")
        self.shape = (len(prompts), len(options[0]))
        per_instruction = len(task.test) * len(options[0])  # mc_prompts is instruction-major
        dev = device_of(model)
        self.parts = []
        for i in range(0, len(seqs), per_instruction):
            sq, sp = seqs[i: i + per_instruction], spans[i: i + per_instruction]
            ids, mask = pad(sq, pad_id_of(tok))
            ids, mask = ids.to(dev), mask.to(dev)
            first = torch.tensor([s - 1 for s, _ in sp], device=dev)  # the first position predicting an option token
            run = Resumed(model, ids, mask, first, torch.zeros(len(sq), 2, dtype=torch.long, device=dev))
            rows = torch.tensor([j for j, (_, m) in enumerate(sp) for _ in range(m)], device=dev)
            pos = torch.tensor([s - 1 + t for s, m in sp for t in range(m)], device=dev)
            target = torch.tensor([sq[j][s + t] for j, (s, m) in enumerate(sp) for t in range(m)], device=dev)
            self.parts.append((run, rows, pos, target, len(sq), max(1, max_tokens // ids.numel())))

    def _logprobs(self, final, rows, pos, target, S: int, s0: int) -> torch.Tensor:
        """Σ log P(option tokens) per sequence (tasks.multiple_choice.sequence_logprobs' formula)."""
        x = self.model.ln_final(final[rows, pos - s0][None])[0]
        logits = x @ self.model.W_U
        if getattr(self.model, "b_U", None) is not None:
            logits = logits + self.model.b_U
        lp = logits.float().log_softmax(-1).gather(1, target[:, None])[:, 0]
        return torch.zeros(S, dtype=lp.dtype, device=lp.device).index_add(0, rows, lp)

    def measure(self, configs: list[tuple], bar=None) -> list[dict]:
        L = self.model.cfg.n_layers
        key = [(c[1], bool(c[2]) if len(c) > 2 else False) for c in configs]
        order = sorted(range(len(configs)), key=lambda i: key[i])
        per = min(p[-1] for p in self.parts)
        out: list[dict | None] = [None] * len(configs)
        s = 0
        while s < len(order):
            group = [i for i in order[s: s + per] if key[i] == key[order[s]]]
            layer, free = key[order[s]]
            lps = [[] for _ in group]
            with torch.no_grad():
                for run, rows, pos, target, S, _ in self.parts:
                    final, s0 = run.final_many(min(layer, L - 1), [configs[i][0] for i in group], free)
                    for g in range(len(group)):
                        lps[g].append(self._logprobs(final[g * S:(g + 1) * S], rows, pos, target, S, s0))
            for g, i in enumerate(group):
                out[i] = mc_bias(self.task, torch.cat(lps[g]).cpu().view(self.shape), self.task.test)  # pyright: ignore[reportArgumentType] - multiple-choice tasks hold items
            s += len(group)
            if bar is not None:
                bar.update(len(group))
        return out  # pyright: ignore[reportReturnType] - every config is measured


class _NeutralText:
    """Next-token loss on the neutral lines (nats/token, tasks.capability.text_loss's formula: BOS + line,
    padding ignored) under many hook sets, each forward resuming at its hooks' first layer. The lines go in
    buckets of similar length (the loss is a sum over tokens: how lines are batched does not change it, and
    little padding is computed)."""

    def __init__(self, model, lines: list[str], max_tokens: int = 4096, buckets: int = 3):
        self.model = model
        tok = model.tokenizer
        seqs = encode_lines(model, lines, max_tokens=model.cfg.n_ctx)
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
        size = -(-len(order) // buckets)
        dev = device_of(model)
        self.parts = []
        for b in range(0, len(order), size):
            ids, mask = pad([seqs[i] for i in order[b: b + size]], pad_id_of(tok))
            ids, mask = ids.to(dev), mask.to(dev)
            n = len(ids)
            zeros = torch.zeros(n, dtype=torch.long, device=dev)
            run = Resumed(model, ids, mask, zeros, torch.zeros(n, 2, dtype=torch.long, device=dev))
            self.parts.append((run, ids.masked_fill(mask == 0, -100)[:, 1:], max(1, max_tokens // max(1, ids.numel()))))
        self.count = sum(int((labels != -100).sum()) for _, labels, _ in self.parts)
        if self.count == 0:
            raise LensBiasError("no tokens to score in the neutral text: every line is a single token")

    def _sum(self, final: torch.Tensor, labels: torch.Tensor) -> float:
        keep = labels != -100  # only the positions that predict a token are unembedded
        x = final[:, :-1][keep]
        logits = self.model.unembed(self.model.ln_final(x[None]))[0]  # the model's own head (softcaps and all)
        return float(torch.nn.functional.cross_entropy(logits.float(), labels[keep], reduction="sum"))

    def loss(self, configs: list[tuple[list, int]], bar=None) -> list[float]:
        from ...core.checks import check_finite

        L = self.model.cfg.n_layers
        total = [0.0] * len(configs)
        order = sorted(range(len(configs)), key=lambda i: configs[i][1])
        per = min(p for _, _, p in self.parts)
        s = 0
        while s < len(order):
            layer = configs[order[s]][1]
            group = [i for i in order[s: s + per] if configs[i][1] == layer]
            hooks = [configs[i][0] for i in group]
            for run, labels, _ in self.parts:
                n = len(labels)
                rows = torch.arange(n, device=labels.device).repeat(len(group))
                final = run.final_resid(min(layer, L - 1), rows, stacked_hooks(hooks, n))
                with torch.no_grad():
                    for g, i in enumerate(group):
                        total[i] += self._sum(final[g * n:(g + 1) * n], labels)
            s += len(group)
            if bar is not None:
                bar.update(len(group))
        return [check_finite(t / self.count, "text loss", self.model) for t in total]


def curves(rows: list[dict]):
    """Per (unit type, measure, ablation, k): each method's value (with its interval) and random's mean ± std,
    and the neutral-loss of random's capability draws (pandas)."""
    import pandas as pd

    df = pd.DataFrame(rows)
    if df.empty:
        return df
    rand = df[df.method == "random"].groupby(["unit_type", "measure", "ablation", "k"])["value"] \
        .agg(random_mean="mean", random_std="std").reset_index()
    if "neutral_loss" in df:
        rl = df[df.method == "random"].groupby(["unit_type", "measure", "ablation", "k"])["neutral_loss"] \
            .agg(random_neutral_loss="mean").reset_index()
        rand = rand.merge(rl, on=["unit_type", "measure", "ablation", "k"], how="left")
    cols = [c for c in ("value_lo", "value_hi", "neutral_loss", "accuracy", "pr_gap", "bias") if c in df]
    meth = df[df.method != "random"][["unit_type", "method", "measure", "ablation", "k", "value", "units", *cols]]
    return meth.merge(rand, on=["unit_type", "measure", "ablation", "k"], how="left")


def rank_test(method_curve: dict[int, float], random_curves: list[dict[int, float]]) -> tuple[float, dict[int, float]]:
    """(p, p by k) of the rank test (module docstring): each curve maps k → necessity."""
    ks = [k for k in method_curve if all(k in r for r in random_curves) and math.isfinite(method_curve[k])]
    S = len(random_curves)
    if not ks or S == 0:
        return float("nan"), {}
    p_k = {k: (1 + sum(r[k] >= method_curve[k] for r in random_curves)) / (S + 1) for k in ks}
    import pandas as pd

    table = pd.DataFrame([method_curve] + random_curves)[ks].astype(float)
    stat = table.rank(axis=0, method="average").mean(axis=1)  # mean rank over k of each curve
    return float((stat >= stat.iloc[0] - 1e-12).sum() / (S + 1)), p_k


def _curve(df, method: str, ablations: list[str]) -> list[dict[int, float]]:
    """method's necessity by k (mean over `ablations`); for 'random' one curve per seed."""
    d = df[(df.method == method) & (df.measure == "necessity") & df.ablation.isin(ablations)]
    if method == "random":
        seeds = sorted(d["seed"].dropna().unique())
        return [dict(d[d.seed == s].groupby("k")["value"].mean()) for s in seeds]
    return [dict(d.groupby("k")["value"].mean())]


def rank_methods(rows: list[dict], baseline: dict, significant: bool = True, budget: float = BUDGET):
    """One row per (method, unit type), best first by the ranking rule (module docstring): bias removed within
    the loss budget (k_budget, removed with its interval, d_loss), random's at the same k, the rank test
    against random (p_random, p@k), beats_random, breaks_model, and the areas (mean over k and ablations
    of necessity − random mean) with random's spread."""
    import pandas as pd

    c = curves(rows)
    if c.empty:
        return pd.DataFrame()
    df = pd.DataFrame(rows)
    first = df[df.measure == "necessity"]["ablation"].iloc[0]
    out = []
    for (unit_type, method), d in c.groupby(["unit_type", "method"], sort=False):
        row = {"method": method, "unit_type": unit_type,
               **_budget_columns(d, first, baseline.get("neutral_loss", float("nan")), budget),
               **_random_columns(d, df[df.unit_type == unit_type], method)}  # pyright: ignore[reportArgumentType] - groupby keys: method names
        if "accuracy" in d and "accuracy" in baseline:
            at = d[(d.measure == "necessity") & (d.k == row["k_max"])]
            row["d_accuracy_kmax"] = float(at["accuracy"].mean() - baseline["accuracy"])
        row["beats_random"] = bool(significant and row["p_random"] <= ALPHA and row["area"] > 0)
        row["breaks_model"] = bool(row["d_neutral_loss_kmax"] > BREAKS)
        out.append(row)
    df = pd.DataFrame(out)
    capped = df["d_loss"].notna().any()
    group = ~(df["beats_random"] & (df["k_budget"].notna() if capped else True))
    key = df["beyond_random"] if capped else df["area"]
    df = df.assign(_g=group, _r=key.fillna(-math.inf), _a=df["area"].fillna(-math.inf)) \
        .sort_values(["_g", "_r", "_a"], ascending=[True, False, False], kind="stable") \
        .drop(columns=["_g", "_r", "_a"]).reset_index(drop=True)
    df.insert(0, "rank", range(1, len(df) + 1))
    return df


def _budget_columns(d, first: str, loss0: float, budget: float) -> dict:
    """A (method, unit type)'s curves under the first ablation → k_budget (of the k whose Δloss ≤ budget, the
    one removing the most beyond random; ties: fewer units), what its top-k remove there (with the interval),
    random's, both Δloss, the top units, and Δloss at the largest k."""
    nan = float("nan")
    at = d[(d.measure == "necessity") & (d.ablation == first)].set_index("k").sort_index()
    kmax = int(at.index.max())
    dloss = (at["neutral_loss"] - loss0) if "neutral_loss" in at and math.isfinite(loss0) else None
    gain = {k: float(at.loc[k, "value"] - at.loc[k, "random_mean"]) for k in at.index if dloss is not None
            and dloss[k] == dloss[k] and dloss[k] <= budget and math.isfinite(at.loc[k, "value"] - at.loc[k, "random_mean"])}
    kb = max(gain, key=lambda k: (gain[k], -k)) if gain else None

    def get(col, minus=0.0):
        return float(at.loc[kb, col] - minus) if kb is not None and col in at else nan

    return {"k_budget": kb, "beyond_random": gain[kb] if kb is not None else nan, "removed": get("value"),
            "removed_lo": get("value_lo"), "removed_hi": get("value_hi"), "d_loss": get("neutral_loss", loss0),
            "random_removed": get("random_mean"), "random_d_loss": get("random_neutral_loss", loss0),
            "k_max": kmax, "top_units": at.loc[kb if kb is not None else kmax, "units"],
            "d_neutral_loss_kmax": float(dloss[kmax]) if dloss is not None else nan}


def _random_columns(d, du, method: str) -> dict:
    """The rank test against the unit type's random draws (du: its rows) and the areas above random."""
    nec, suf = d[d.measure == "necessity"], d[d.measure == "sufficiency"]
    n_seeds = du[du.method == "random"]["seed"].nunique()
    ablations = [a for a in dict.fromkeys(nec["ablation"]) if du[(du.method == "random") & (du.ablation == a)
                 & (du.measure == "necessity")]["seed"].nunique() == n_seeds]  # those every draw was measured under
    p, p_k = rank_test(_curve(du, method, ablations)[0], _curve(du, "random", ablations))
    area = float((nec["value"] - nec["random_mean"]).mean())
    spread = float(nec["random_std"].fillna(0).mean())
    return {"p_random": p, "area": area, "spread": spread,
            "z": area / spread if spread > 0 else (math.inf if area > 0 else float("nan")),
            **{f"area_{a}": float((g["value"] - g["random_mean"]).mean()) for a, g in nec.groupby("ablation")},
            **{f"p@{k}": v for k, v in p_k.items()},
            "sufficiency_area": float((suf["value"] - suf["random_mean"]).mean()) if len(suf) else float("nan"),
            "necessity_k1_zero": _at(nec, 1, "zero"), "random_k1_zero": _at(nec, 1, "zero", "random_mean")}


def _at(nec, k, ablation, col="value") -> float:
    d = nec[(nec.k == k) & (nec.ablation == ablation)]
    return float(d[col].iloc[0]) if len(d) else float("nan")
