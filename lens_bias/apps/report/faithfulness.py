"""Faithfulness, measured: does a method's top-k carry the bias? On the held-out test split.

With m the task's bias metric, m_clean its value, m_ref its unbiased reference (the twins for pair tasks,
0 otherwise), B = |m_clean − m_ref| and σ = sign(m_clean − m_ref):

    necessity(k)   = σ·(m_clean − m_ablated(top-k)) / B     the share of the bias the top-k's ablation removes
                     (zero, mean and resample ablation; mean/resample draw from the reference prompts)
    sufficiency(k) = σ·(m_corrupted, top-k clean − m_ref) / B   pair tasks: the twins' run with only the
                     top-k units' clean activations written in — the share of the bias they restore;
                     other tasks: σ·(m with every other unit of the type mean-ablated − m_ref) / B
    random(k)      = the same for k random units, mean ± std over seeds

A layer unit is all heads (attn) or all neurons (mlp) of its layer. Capability: loss on neutral text with
each method's top-k ablated at the largest k (under the first ablation, zero by default; random: its
first draw), and the task's accuracy (yes/no, multiple choice) under every ablation.

A method's score is the area of its necessity curve above random, mean over k and over ablations:
    area = mean_{k, ablation} (necessity − random mean);   spread = mean_{k, ablation} random std
and it beats random when area > 3·spread (and the bias on the test split is measurable).

Ranking rule (`rank_methods`): the (method, unit type) pairs that beat random come first, then the rest; within
each group by area, highest first (NaN last). A method whose top-k does not carry more bias than random units
never ranks above one whose top-k does, however large its area: a large area with a larger spread is noise.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable

import torch
from tqdm.auto import tqdm

from ...core.hooks import device_of, hook_name, run_until
from ...core.metrics import answer_logits_fast
from ...core.models import HookedModel
from ...mitigate.ablation import (
    AblationMethod,
    head_ablation_hooks,
    neuron_ablation_hooks,
    reference_activations,
)
from .tasks import ReportTask, answers_bias, bias_of, neutral_loss
from .units import ABLATABLE, expand, n_units, top_units, unit_label

BEATS_RANDOM = 3.0  # spreads


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


def _grouped(configs: list[list], n: int) -> list:
    """One fwd_hooks list for a batch stacking len(configs) copies of n prompts: copy g runs config g's hooks
    (ablation.py's or restore hooks, unchanged) on its rows, a view whose in-place edits reach the batch."""
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


class Faithfulness:
    """Runs the ablations of one report, sharing what can be shared: the reference activations (computed
    once), the clean run's activations (for restoring), one measurement per distinct unit set, and many unit
    sets per forward (the test prompts stacked once per set, each copy with its own hooks)."""

    def __init__(self, model: HookedModel, task: ReportTask, *, ablations: Iterable[AblationMethod] = ("zero", "mean", "resample"),
                 seeds: int = 5, capability: bool = True, seed: int = 0, max_tokens: int = 16384):
        self.model, self.task, self.ablations, self.seeds = model, task, tuple(ablations), seeds
        self.capability, self.seed, self.max_tokens = capability and bool(task.neutral), seed, max_tokens
        cfg = model.cfg
        self.n_heads, self.d_mlp = cfg.n_heads, cfg.d_mlp
        self.clean = bias_of(model, task)
        self.m_clean = self.clean["bias"]
        self.m_ref = bias_of(model, task, corrupted=True)["bias"] if task.has_twins else 0.0
        gap = self.m_clean - self.m_ref
        self.sign = 1.0 if gap >= 0 else -1.0
        self.scale = abs(gap)
        self.loss_clean = neutral_loss(model, task) if self.capability else float("nan")
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

    def measure(self, configs: list[list], corrupted: bool = False) -> list[dict]:
        """bias_of under each config's hooks: prompt tasks many configs per forward, multiple choice one by one."""
        task = self.task
        if task.kind == "multiple_choice":
            return [bias_of(self.model, task, hooks) for hooks in configs]
        ps = task.test.to(device_of(self.model))  # pyright: ignore[reportAttributeAccessIssue] - pairs and yes/no tasks hold a PromptSet
        n, width = len(ps), ps.tokens.shape[1]
        per = max(1, self.max_tokens // max(1, n * width))
        out = []
        tokens = ps.corrupted_tokens if corrupted else ps.tokens
        for s in range(0, len(configs), per):
            group = configs[s: s + per]
            G = len(group)
            with torch.no_grad():
                a = answer_logits_fast(self.model, tokens.repeat(G, 1), ps.answer_pos.repeat(G),  # pyright: ignore[reportOptionalMemberAccess] - a PromptSet has answer_pos
                                       ps.answer_ids.repeat(G, 1), _grouped(group, n),
                                       ps.attention_mask.repeat(G, 1)).float()
            out += [answers_bias(task, a[g * n:(g + 1) * n], ps.metadata) for g in range(G)]
        return out

    # ---- curves ----------------------------------------------------------------------
    def run(self, scores: dict[str, dict[str, torch.Tensor]], k_values=(1, 2, 4, 8), progress: bool = True):
        """Tidy rows: one per (unit type, method or 'random', k, measure, ablation, seed)."""
        plan = []
        for unit_type in ABLATABLE:
            methods = {m: t for m, t in scores.get(unit_type, {}).items() if n_units(t) > 0}
            if not methods:
                continue
            shape = next(iter(methods.values())).shape
            all_units = [tuple(int(v) for v in torch.unravel_index(torch.tensor(i), shape))
                         for i in range(math.prod(shape))]
            ks = k_grid(k_values, len(all_units))
            for k in ks:
                for method, t in methods.items():
                    plan.append((unit_type, method, k, top_units(t, k), None, all_units, k == ks[-1]))
                for s in range(self.seeds):
                    rng = random.Random(f"{self.seed}-{unit_type}-{k}-{s}")
                    plan.append((unit_type, "random", k, rng.sample(all_units, k), s, all_units, k == ks[-1]))
        # distinct measurements: methods often pick the same units
        nec_keys, suf_keys, cap_keys = {}, {}, {}
        for unit_type, _method, _k, units, s, all_units, last in plan:
            heads, neurons = expand(unit_type, units, self.n_heads, self.d_mlp)  # pyright: ignore[reportArgumentType] - a bridge's cfg has d_mlp
            hn = (tuple(sorted(heads)), tuple(sorted(neurons)))
            for ablation in self.ablations:
                seed = (s or 0) if ablation == "resample" else 0
                nec_keys.setdefault((*hn, ablation, seed), (heads, neurons))
                # capability (a full-vocabulary loss: the costly measurement) at the largest k, under the first
                # ablation: every method's top-k and one random draw
                if last and not s and self.capability and ablation == self.ablations[0]:
                    cap_keys.setdefault((*hn, ablation, seed), (heads, neurons))
            if self.task.has_twins:
                suf_keys.setdefault(hn, (heads, neurons))
            else:
                rest = [u for u in all_units if u not in set(units)]
                suf_keys.setdefault(hn, expand(unit_type, rest, self.n_heads, self.d_mlp))  # pyright: ignore[reportArgumentType] - a bridge's cfg has d_mlp
        total = len(nec_keys) + len(suf_keys) + len(cap_keys)
        bar = tqdm(total=total, desc="faithfulness", unit="measurement", disable=not progress)
        nec = self._run_keys(nec_keys, lambda key, hn: self._ablation_hooks(*hn, key[2], key[3]), False, bar)  # pyright: ignore[reportCallIssue] - hn is a (heads, neurons) pair
        if self.task.has_twins:
            suf = self._run_keys(suf_keys, lambda key, hn: _restore_hooks(self.cache, *hn), True, bar)  # pyright: ignore[reportArgumentType] - twinned tasks have a clean cache
        else:
            suf = self._run_keys(suf_keys, lambda key, hn: self._ablation_hooks(*hn, "mean", 0), False, bar)  # pyright: ignore[reportCallIssue] - hn is a (heads, neurons) pair
        cap = {}
        for key, hn in cap_keys.items():
            cap[key] = neutral_loss(self.model, self.task, self._ablation_hooks(*hn, key[2], key[3]))  # pyright: ignore[reportCallIssue] - hn is a (heads, neurons) pair
            bar.update(1)
        bar.close()
        rows = []
        for unit_type, method, k, units, s, _, _ in plan:
            heads, neurons = expand(unit_type, units, self.n_heads, self.d_mlp)  # pyright: ignore[reportArgumentType] - a bridge's cfg has d_mlp
            hn = (tuple(sorted(heads)), tuple(sorted(neurons)))
            base = {"unit_type": unit_type, "method": method, "k": k, "seed": s,
                    "units": " ".join(unit_label(unit_type, u) for u in units)}
            for ablation in self.ablations:
                key = (*hn, ablation, (s or 0) if ablation == "resample" else 0)
                r = nec[key]
                row = {**base, "measure": "necessity", "ablation": ablation, **r, "value": self.share(r["bias"])}
                if key in cap and not s:
                    row["neutral_loss"] = cap[key]
                rows.append(row)
            m = suf[hn]["bias"]
            rows.append({**base, "measure": "sufficiency", "ablation": "restore" if self.task.has_twins
                         else "mean (all others)", "bias": m, "value": 1.0 - self.share(m)})
        return rows

    def _run_keys(self, keys: dict, hooks_of, corrupted: bool, bar) -> dict:
        items = list(keys.items())
        out = {}
        chunk = 64
        for s in range(0, len(items), chunk):
            part = items[s: s + chunk]
            res = self.measure([hooks_of(key, hn) for key, hn in part], corrupted)
            out.update({key: r for (key, _), r in zip(part, res)})
            bar.update(len(part))
        return out

    def baseline(self) -> dict:
        """The unablated test-split measures the curves are relative to."""
        out = {"bias_clean": self.m_clean, "bias_reference": self.m_ref, "scale": self.scale, "sign": self.sign,
               "neutral_loss": self.loss_clean}
        for key in ("accuracy", "pr_gap"):
            if key in self.clean:
                out[key] = self.clean[key]
        return out


def curves(rows: list[dict]):
    """Per (unit type, measure, ablation, k): each method's value and random's mean ± std (pandas)."""
    import pandas as pd

    df = pd.DataFrame(rows)
    if df.empty:
        return df
    rand = df[df.method == "random"].groupby(["unit_type", "measure", "ablation", "k"])["value"] \
        .agg(random_mean="mean", random_std="std").reset_index()
    meth = df[df.method != "random"][["unit_type", "method", "measure", "ablation", "k", "value", "units",
                                      *[c for c in ("neutral_loss", "accuracy", "pr_gap", "bias") if c in df]]]
    return meth.merge(rand, on=["unit_type", "measure", "ablation", "k"], how="left")


def rank_methods(rows: list[dict], baseline: dict, significant: bool = True):
    """One row per (method, unit type): necessity area above random (mean over k and ablations), its
    spread, z = area/spread, sufficiency area, capability cost, 'beats_random'; best first by the ranking
    rule (module docstring): those that beat random first, then by area."""
    import pandas as pd

    c = curves(rows)
    if c.empty:
        return pd.DataFrame()
    out = []
    for (unit_type, method), d in c.groupby(["unit_type", "method"], sort=False):
        nec = d[d.measure == "necessity"]
        suf = d[d.measure == "sufficiency"]
        area = float((nec["value"] - nec["random_mean"]).mean())
        spread = float(nec["random_std"].fillna(0).mean())
        per_abl = {f"area_{a}": float((g["value"] - g["random_mean"]).mean()) for a, g in nec.groupby("ablation")}
        kmax = nec["k"].max()
        row = {"method": method, "unit_type": unit_type, "area": area, "spread": spread,
               "z": area / spread if spread > 0 else (math.inf if area > 0 else float("nan")),
               **per_abl,
               "sufficiency_area": float((suf["value"] - suf["random_mean"]).mean()) if len(suf) else float("nan"),
               "necessity_k1_zero": _at(nec, 1, "zero"), "random_k1_zero": _at(nec, 1, "zero", "random_mean"),
               "k_max": int(kmax), "top_units": d[(d.k == kmax)]["units"].iloc[0] if len(d) else ""}
        if "neutral_loss" in nec and baseline.get("neutral_loss") == baseline.get("neutral_loss"):
            row["d_neutral_loss_kmax"] = float(nec[nec.k == kmax]["neutral_loss"].mean() - baseline["neutral_loss"])
        if "accuracy" in nec and "accuracy" in baseline:
            row["d_accuracy_kmax"] = float(nec[nec.k == kmax]["accuracy"].mean() - baseline["accuracy"])
        row["beats_random"] = bool(significant and area > BEATS_RANDOM * spread and area > 0)
        out.append(row)
    df = pd.DataFrame(out)
    df = df.assign(_area=df["area"].fillna(-math.inf)) \
        .sort_values(["beats_random", "_area"], ascending=[False, False], kind="stable") \
        .drop(columns="_area").reset_index(drop=True)
    df.insert(0, "rank", range(1, len(df) + 1))
    return df


def _at(nec, k, ablation, col="value") -> float:
    d = nec[(nec.k == k) & (nec.ablation == ablation)]
    return float(d[col].iloc[0]) if len(d) else float("nan")
