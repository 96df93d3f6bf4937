"""Section 3 — NASA (Yu et al. 2024, "Correcting Negative Bias in Large Language Models through Negative
Attention Score Alignment", arXiv 2408.00137).

Measured with the toolkit's defaults on StrategyQA and GSM8K answer verification ('… Is the answer N?', N
right or off by 1–10, alternating), each with the chat template (the default for a model that has one) and
without it (`chat=False`). Questions are split, seeded, into train (NAS, NASA's training data; 4 instructions),
dev (NASA's early stopping) and test (everything reported; 2 instructions). On test: precision − recall gap
and accuracy of the original; with the top-3 NAS heads zero-ablated; with 3 random heads (seeds); with the
3 heads of highest raw attention to the " No" candidate; and after NASA (`lb.nasa_train` on the top-3 NAS
heads, its default options; `steps` and `batch_size` from the budget). Intervals: bootstrap over test
questions (every prompt of a drawn question comes along); paired for changes.

Checks (fixed before the run), per data set and prompt mode:
  negative   the original's P − R gap is positive (CI above 0)
  nas        ablating the top-3 NAS heads narrows |P − R| (CI of the change below 0), leaves a smaller gap than the
             random heads' band and keeps accuracy (drop ≤ 0.02)
  nasa       NASA narrows |P − R| on test (CI of the change below 0) and keeps accuracy (drop ≤ 0.02)
Added after the first run, where SmolLM2 through the chat template never answered "Yes" (precision, hence the
gap, undefined for every condition): where a gap is undefined the checks read the class-balanced No − Yes logit
offset instead (`_offset`, the locate report's yes/no bias metric) — negative bias is then "never yes, offset CI
above 0", narrowing is "offset change CI below 0 and below the random band".
"""

from __future__ import annotations

import random
import warnings

import numpy as np
import pandas as pd

import lens_bias as lb
from lens_bias.core.stats import bootstrap, over_seeds
from lens_bias.mitigate import head_ablation_hooks, random_heads
from lens_bias.tasks import YESNO_INSTRUCTIONS, decision_metrics

from .common import Context, Section, fmt, iv_dict

KEY = "nasa"
PAPER = "NASA (arXiv 2408.00137)"
CLAIM = ("Instruction-tuned models are negatively biased in yes/no decisions; NAS finds heads attending to the "
         "negative candidate, and ablating them or NASA training narrows the P − R gap without losing accuracy.")
K = 3
DATASETS = ("strategyqa", "gsm8k")


def _items(ctx: Context, name: str) -> list[dict]:
    if name == "strategyqa":
        items = lb.load_yes_no(ctx.data / "strategyqa" / "train.json")
    else:
        items = lb.tasks.load_gsm8k(ctx.data / "gsm8k" / "test.jsonl")
    n_ctx = ctx.model.cfg.n_ctx
    tok = ctx.model.tokenizer
    items = [it for it in items if len(tok(it["question"], add_special_tokens=False)["input_ids"]) < n_ctx - 64]
    random.Random(ctx.seed).shuffle(items)
    return items


def _splits(ctx: Context, name: str) -> dict:
    b, items = ctx.budget, _items(ctx, name)
    a, d, t = b.yn_train[name], b.yn_dev[name], b.yn_test[name]
    return {"train": items[:a], "dev": items[a:a + d], "test": items[a + d:a + d + t]}


def _prompts(ctx, split: dict, chat: bool) -> dict:
    ins = YESNO_INSTRUCTIONS
    n_test = ctx.budget.yn_test_instructions
    return {"train": lb.binary_prompts(ctx.model, split["train"], ins, chat=chat),
            "dev": lb.binary_prompts(ctx.model, split["dev"], ins[:2], chat=chat),
            "test": lb.binary_prompts(ctx.model, split["test"], ins[:n_test], chat=chat)}


def _p_yes(ctx, model, ps, hooks=()) -> list[float]:
    return lb.evaluate_binary(model, ps, ablate=list(hooks))["table"]["p_yes"].tolist()


def _nas(ctx, ps) -> dict:
    r = lb.negative_attention_scores(ctx.model, ps, progress=ctx.progress)
    return {"nas": r.nas.tolist(), "att_neg": r.att_neg.tolist(), "top": [list(h) for h in r.top_heads(K)]}


def _top_attention(att_neg, k: int) -> list[list[int]]:
    a = np.asarray(att_neg)
    flat = np.argsort(-a.reshape(-1))[:k]
    return [[int(i // a.shape[1]), int(i % a.shape[1])] for i in flat]


def _nasa(ctx, ps: dict, heads) -> dict:
    steps = ctx.budget.nasa_steps
    res = lb.nasa_train(ctx.model, [tuple(h) for h in heads], ps["train"], ps["dev"], steps=steps,
                        eval_every=max(1, steps // 4), batch_size=ctx.budget.nasa_batch, seed=ctx.seed, progress=ctx.progress)
    out = {"p_yes": _p_yes(ctx, res.model, ps["test"]), "best_step": res.report["best_step"],
           "history": res.report["history"]}
    del res
    return out


# ---------------------------------------------------------------------------------------
# Metrics with intervals over test questions
# ---------------------------------------------------------------------------------------
def _metric(p_yes, gold, idx, key) -> float:
    """One decision metric on the prompts `idx` (NaN when undefined there: the bootstrap counts such draws)."""
    pred = [bool(p_yes[i] > 0.5) for i in idx]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return decision_metrics(pred, [gold[i] for i in idx])[key] if len(idx) else np.nan


def _offset(p_yes, gold, idx) -> float:
    """Class-balanced logit(No) − logit(Yes) = ½(mean over gold-yes + mean over gold-no) of log((1 − P)/P): the
    locate report's yes/no bias metric, defined when the model never answers yes (the P − R gap is not)."""
    p = np.clip(np.asarray(p_yes)[idx], 1e-12, 1 - 1e-12)
    g = np.asarray(gold)[idx]
    lo = np.log1p(-p) - np.log(p)
    return 0.5 * (lo[g].mean() + lo[~g].mean()) if g.any() and (~g).any() else np.nan


def _summary(p_yes, base, gold, groups, n_boot) -> dict:
    p, q = np.asarray(p_yes), np.asarray(base)
    out = {"no_shift": iv_dict(bootstrap(lambda i: _offset(p, gold, i), len(p), n_boot=n_boot, groups=groups,
                                         what="prompts")),
           "no_shift_change": iv_dict(bootstrap(lambda i: _offset(p, gold, i) - _offset(q, gold, i), len(p),
                                                n_boot=n_boot, groups=groups, what="prompts"))}
    for key in ("pr_gap", "accuracy", "yes_rate"):
        out[key] = iv_dict(bootstrap(lambda i, key=key: _metric(p, gold, i, key), len(p), n_boot=n_boot,
                                     groups=groups, what="prompts"))
        out[f"{key}_change"] = iv_dict(bootstrap(lambda i, key=key: _metric(p, gold, i, key) - _metric(q, gold, i, key),
                                                 len(p), n_boot=n_boot, groups=groups, what="prompts"))
    out["abs_gap_change"] = iv_dict(bootstrap(lambda i: abs(_metric(p, gold, i, "pr_gap")) - abs(_metric(q, gold, i, "pr_gap")),
                                              len(p), n_boot=n_boot, groups=groups, what="prompts"))
    return out


def _config(ctx: Context, name: str, chat: bool) -> dict:
    mode = "chat" if chat else "plain"
    split = _splits(ctx, name)
    ps = _prompts(ctx, split, chat)
    opts = {"data": name, "chat": chat, "questions": {k: [it["question"] for it in v] for k, v in split.items()}}
    stage = lambda what, fn, **kw: ctx.stage(KEY, f"{name}-{mode}-{what}", {**opts, **kw}, fn)  # noqa: E731
    nas = stage("nas", lambda: _nas(ctx, ps["train"]))
    test = ps["test"]
    runs = {"original": stage("original", lambda: _p_yes(ctx, ctx.model, test))}
    runs[f"top-{K} NAS heads"] = stage("nas-ablated", lambda: _p_yes(ctx, ctx.model, test, head_ablation_hooks(
        ctx.model, [tuple(h) for h in nas["top"]])), heads=nas["top"])
    att = _top_attention(nas["att_neg"], K)
    runs[f"top-{K} attention-to-No heads"] = stage("attention-ablated", lambda: _p_yes(
        ctx, ctx.model, test, head_ablation_hooks(ctx.model, [tuple(h) for h in att])), heads=att)
    for s in range(ctx.budget.seeds):
        heads = random_heads(ctx.model, K, ctx.seed + s, exclude=[tuple(h) for h in nas["top"]])
        runs[f"random {s}"] = stage(f"random{s}", lambda heads=heads: _p_yes(ctx, ctx.model, test, head_ablation_hooks(
            ctx.model, heads)), heads=[list(h) for h in heads])
    nasa = stage("nasa", lambda: _nasa(ctx, ps, nas["top"]), steps=ctx.budget.nasa_steps)
    runs["NASA (top-3 NAS heads)"] = nasa["p_yes"]
    gold = [m["label"] == "yes" for m in test.metadata]
    groups = [m["question"] for m in test.metadata]
    summ = {k: _summary(v, runs["original"], gold, groups, ctx.budget.n_boot) for k, v in runs.items()}
    return {"data": name, "mode": mode, "nas_top": nas["top"], "att_top": att, "summary": summ, "nasa": nasa,
            "sizes": {k: len(v) for k, v in ps.items()}}


def _narrower(cond: dict, orig: dict, band: dict | None) -> bool:
    """Narrows the negative bias: the P − R gap where it is defined for both (|gap| change CI below 0, below the
    random band), else the No − Yes offset (change CI below 0, below the random band)."""
    if np.isfinite(cond["pr_gap"]["estimate"]) and np.isfinite(orig["pr_gap"]["estimate"]):
        key, change = "pr_gap", "abs_gap_change"
    else:
        key, change = "no_shift", "no_shift_change"
    below = band is None or cond[key]["estimate"] < band[key].low
    return cond[change]["high"] < 0 and below and cond["accuracy_change"]["estimate"] >= -0.02


def _checks(c: dict) -> dict:
    s = c["summary"]
    orig = s["original"]
    rand = [v for k, v in s.items() if k.startswith("random ")]
    band = {key: over_seeds([v[key]["estimate"] for v in rand]) for key in ("pr_gap", "no_shift")}
    tag = f"({c['data']}, {c['mode']})"
    never_yes = orig["yes_rate"]["estimate"] == 0
    negative = orig["pr_gap"]["low"] > 0 or (never_yes and orig["no_shift"]["low"] > 0)
    return {f"negative {tag}": negative,
            f"nas {tag}": _narrower(s[f"top-{K} NAS heads"], orig, band),
            f"nasa {tag}": _narrower(s["NASA (top-3 NAS heads)"], orig, None)}


def run(ctx: Context) -> Section:
    modes = (True, False) if getattr(ctx.model.tokenizer, "chat_template", None) else (False,)
    configs = [_config(ctx, name, chat) for name in DATASETS for chat in modes]
    checks = {k: v for c in configs for k, v in _checks(c).items()}
    rows, long = [], []
    for c in configs:
        s = c["summary"]
        band = {m: iv_dict(over_seeds([v[m]["estimate"] for k, v in s.items() if k.startswith("random ")]))
                for m in ("pr_gap", "accuracy", "yes_rate", "no_shift")}
        for name in ("original", f"top-{K} NAS heads", f"top-{K} attention-to-No heads", "NASA (top-3 NAS heads)"):
            rows.append({"data": c["data"], "prompt": c["mode"], "condition": name, "P − R gap": fmt(s[name]["pr_gap"]),
                         "accuracy": fmt(s[name]["accuracy"]), "yes-rate": fmt(s[name]["yes_rate"]),
                         "No − Yes offset": fmt(s[name]["no_shift"]),
                         "Δ offset vs original": "" if name == "original" else fmt(s[name]["no_shift_change"])})
        rows.append({"data": c["data"], "prompt": c["mode"], "condition": f"{K} random heads × {ctx.budget.seeds} seeds",
                     "P − R gap": fmt(band["pr_gap"]), "accuracy": fmt(band["accuracy"]), "yes-rate": fmt(band["yes_rate"]),
                     "No − Yes offset": fmt(band["no_shift"]), "Δ offset vs original": ""})
        long += [{"data": c["data"], "prompt": c["mode"], "condition": k, "measure": m, **v}
                 for k, d in s.items() for m, v in d.items()]
    table = pd.DataFrame(rows)
    def brief(d):
        return f"gap {fmt(d['pr_gap'])}, offset {fmt(d['no_shift'])}"

    measured = "; ".join(f"{c['data']} {c['mode']}: original {brief(c['summary']['original'])} (yes-rate "
                         f"{c['summary']['original']['yes_rate']['estimate']:.2f}); NAS-3 ablated "
                         f"{brief(c['summary'][f'top-{K} NAS heads'])}; NASA {brief(c['summary']['NASA (top-3 NAS heads)'])}"
                         for c in configs)
    control = "; ".join(
        f"{c['data']} {c['mode']}: random heads offset "
        f"{fmt(over_seeds([v['no_shift']['estimate'] for k, v in c['summary'].items() if k.startswith('random ')]))}, "
        f"attention-to-No {brief(c['summary'][f'top-{K} attention-to-No heads'])}" for c in configs)
    notes = [f"{c['data']} {c['mode']}: prompts {c['sizes']}; NAS top-{K} {c['nas_top']}; attention-to-No top-{K} "
             f"{c['att_top']}; NASA best step {c['nasa']['best_step']}" for c in configs]
    if len({m for m in ("chat", "plain") if any(c["mode"] == m for c in configs)}) == 1:
        notes.append("the tokenizer has no chat template: plain prompts only")
    tables = {"results": pd.DataFrame(long),
              "heads": pd.DataFrame([{"data": c["data"], "prompt": c["mode"], "selection": sel, "rank": r, "layer": l,
                                      "head": h} for c in configs for sel, key in (("nas", "nas_top"), ("attention", "att_top"))
                                     for r, (l, h) in enumerate(c[key])]),
              "nasa_history": pd.DataFrame([{"data": c["data"], "prompt": c["mode"], **h} for c in configs
                                            for h in c["nasa"]["history"]])}
    return Section(KEY, PAPER, CLAIM, measured, control, checks, table, tables, _figures(configs), notes)


def _figures(configs) -> list:
    import plotly.graph_objects as go

    fig = go.Figure()
    for c in configs:
        s = c["summary"]
        names = [k for k in s if not k.startswith("random ")] + ["random (each seed)"]
        rand = [v["pr_gap"]["estimate"] for k, v in s.items() if k.startswith("random ")]
        y = [s[k]["pr_gap"]["estimate"] for k in names[:-1]] + [float(np.mean(rand))]
        up = [s[k]["pr_gap"]["high"] - s[k]["pr_gap"]["estimate"] for k in names[:-1]] + [max(rand) - np.mean(rand)]
        lo = [s[k]["pr_gap"]["estimate"] - s[k]["pr_gap"]["low"] for k in names[:-1]] + [np.mean(rand) - min(rand)]
        fig.add_trace(go.Bar(name=f"{c['data']} {c['mode']}", x=names, y=y,
                             error_y={"type": "data", "array": up, "arrayminus": lo}))
    fig.update_layout(barmode="group", yaxis_title="precision − recall gap (test)")
    return [("P − R gap on the test questions", fig)]
