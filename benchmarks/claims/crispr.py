"""Section 4 — CRISPR (Yang et al., ACL 2024, "Mitigating Biases for Instruction-following Language Models via
Bias Neurons Elimination", arXiv 2311.09627).

Measured with the toolkit's defaults on every shipped BBQ category (Age, Nationality, Religion; test-sized
subsets), items split by template (seeded: no template in two splits). First, is there bias? The original's
s_AMB, s_DIS and accuracy on dev ∪ test items (chat template, the default; plain prompts as a variant).
Where s_AMB's CI does not lie above 0, the model shows no stereotyped bias to remove there: the section says
so and stops for that category. Otherwise: CRISPR bias scores (`lb.crispr_scores`, the paper's order, λ = 1)
on train under the first instructions, n chosen on dev (`prune_curve`: the smallest n with the lowest dev
s_AMB whose disambiguated accuracy stays within 0.02), and on test the original vs the top-n neurons pruned
vs n random neurons (seeds); then original vs pruned under each of the 10 instructions, marking those that
were not used to find the neurons. Intervals: bootstrap over items (every instruction's answer to a drawn
item comes along); paired for changes.

Checks (fixed before the run), per category:
  bias     s_AMB of the original is positive (CI above 0) — if not, the category stops here
  prune    pruning lowers s_AMB on test (CI of the change below 0) below the random neurons' band, with
           accuracy kept (drop ≤ 0.02)
  robust   pruning lowers s_AMB (robust_items test items) under ≥ 8 of the 10 instructions and under ≥ 80% of the
           instructions not used to find the neurons
"""

from __future__ import annotations

import random
import warnings

import numpy as np
import pandas as pd

import lens_bias as lb
from lens_bias.core.stats import bootstrap, over_seeds
from lens_bias.mitigate import neuron_ablation_hooks, random_neurons
from lens_bias.organism import data_path, load_card
from lens_bias.tasks import MC_INSTRUCTIONS, bbq_scores
from lens_bias.tasks.multiple_choice import BBQ_CATEGORIES

from .common import Context, Section, fmt, iv_dict

KEY = "crispr"
PAPER = "CRISPR (arXiv 2311.09627)"
CLAIM = ("In an instruction-following model a few bias neurons carry BBQ bias: pruning as few as three reduces it "
         "without losing accuracy, robustly across instructions.")
NS = (1, 3, 10, 30)
MEASURES = ("bias_ambig", "bias_disambig", "accuracy")


def _sources(ctx: Context) -> dict:
    """Category → BBQ file: the shipped categories, or for the model organism its own BBQ-style Age items (the
    shipped ones are longer than its context)."""
    try:
        load_card(ctx.model)
        return {"Age (organism items)": data_path("bbq")}
    except Exception:  # noqa: BLE001 - any other model
        return {c: ctx.data / "bbq" / f"{c}.jsonl" for c in BBQ_CATEGORIES}


def _splits(ctx: Context, path) -> dict:
    b = ctx.budget
    items = list(lb.load_bbq(path))
    train, dev, test = lb.tasks.split_by_template(items, seed=ctx.seed)
    rng = random.Random(ctx.seed)
    pick = lambda xs, n: rng.sample(xs, min(n, len(xs)))  # noqa: E731
    return {"train": pick(train, b.bbq_train), "dev": pick(dev, b.bbq_dev), "test": pick(test, b.bbq_test),
            "check": pick(dev + test, b.bbq_check_items)}


def _answers(ctx, items, instructions, chat=None, hooks=()) -> list[dict]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # items without an identifiable biased option are counted in the table
        t = lb.bbq_evaluate(ctx.model, items, instructions, hooks=list(hooks), table=True, chat=chat)["table"]
    return t.astype(object).where(t.notna(), None).to_dict("records")


def _scores(rows, idx=None) -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return bbq_scores([rows[i] for i in idx] if idx is not None else rows)


def _intervals(rows: list[dict], n_boot: int, base: list[dict] | None = None) -> dict:
    """s_AMB, s_DIS, accuracy with a bootstrap over items; with `base` (same items and instructions), the change."""
    groups = [r["item"] for r in rows]
    out = {}
    for m in MEASURES:
        out[m] = iv_dict(bootstrap(lambda i, m=m: _scores(rows, i)[m], len(rows), n_boot=n_boot, groups=groups,
                                   what="answers"))
        if base is not None:
            out[f"{m}_change"] = iv_dict(bootstrap(lambda i, m=m: _scores(rows, i)[m] - _scores(base, i)[m], len(rows),
                                                   n_boot=n_boot, groups=groups, what="answers"))
    return out


def _choose_n(curve: list[dict]) -> int:
    c = pd.DataFrame(curve)
    ok = c[(c.n > 0) & (c.accuracy_disambig >= c.accuracy_disambig.iloc[0] - 0.02)]
    return int((ok if len(ok) else c[c.n > 0]).sort_values(["bias_ambig", "n"]).iloc[0]["n"])


def _curve(ctx, scores_units, dev, ins) -> list[dict]:
    rows = [{"n": 0, **_scores(_answers(ctx, dev, ins))}]
    for n in NS:
        rows.append({"n": n, **_scores(_answers(ctx, dev, ins, hooks=neuron_ablation_hooks(ctx.model, scores_units[:n])))})
    return rows


def _category(ctx: Context, category: str, path) -> dict:
    b = ctx.budget
    split = _splits(ctx, path)
    ins = MC_INSTRUCTIONS[: b.bbq_instructions]
    opts = {"category": category, "items": {k: [it["context"] + it["question"] for it in v] for k, v in split.items()}}
    stage = lambda what, fn, **kw: ctx.stage(KEY, f"{category}-{what}", {**opts, **kw}, fn)  # noqa: E731
    check = stage("check-chat", lambda: _answers(ctx, split["check"], ins))
    plain = stage("check-plain", lambda: _answers(ctx, split["check"], ins[:1], chat=False)) \
        if getattr(ctx.model.tokenizer, "chat_template", None) else None
    out = {"category": category, "sizes": {k: len(v) for k, v in split.items()},
           "check": _intervals(check, b.n_boot), "plain": _intervals(plain, b.n_boot) if plain else None}
    out["biased"] = out["check"]["bias_ambig"]["low"] > 0
    out["forced"] = not out["biased"] and ctx.crispr_anyway
    if not out["biased"] and not out["forced"]:
        return out
    units = stage("scores", lambda: [list(u) for u in lb.crispr_scores(ctx.model, split["train"], ins,
                                                                        progress=ctx.progress).units(max(NS))])
    units = [tuple(u) for u in units]
    curve = stage("curve", lambda: _curve(ctx, units, split["dev"], ins))
    n = _choose_n(curve)
    top = units[:n]
    test = {"original": stage("test-original", lambda: _answers(ctx, split["test"], ins)),
            "pruned": stage("test-pruned", lambda: _answers(ctx, split["test"], ins, hooks=neuron_ablation_hooks(
                ctx.model, top)), n=n)}
    for s in range(b.train_seeds):
        rand = random_neurons(ctx.model, n, ctx.seed + s, exclude=top)
        test[f"random {s}"] = stage(f"test-random{s}", lambda rand=rand: _answers(
            ctx, split["test"], ins, hooks=neuron_ablation_hooks(ctx.model, rand)), n=n)
    few = split["test"][: b.robust_items]
    robust = {t: {"original": stage(f"robust{t}-original", lambda t=t: _answers(ctx, few, [MC_INSTRUCTIONS[t]])),
                  "pruned": stage(f"robust{t}-pruned", lambda t=t: _answers(ctx, few, [MC_INSTRUCTIONS[t]],
                                                                          hooks=neuron_ablation_hooks(ctx.model, top)), n=n)}
              for t in range(len(MC_INSTRUCTIONS))}
    out.update(n=n, neurons=[list(u) for u in top], curve=curve,
               test={k: _intervals(v, b.n_boot, test["original"] if k != "original" else None) for k, v in test.items()},
               robust=[{"instruction": t, "used_to_find": t < len(ins),
                        **{f"{k}_{m}": _scores(v[k])[m] for k in ("original", "pruned") for m in MEASURES}}
                       for t, v in robust.items()])
    return out


def _checks(c: dict) -> dict:
    cat = c["category"]
    out = {f"bias ({cat})": c["biased"]}
    if "test" not in c:
        return out
    t = c["test"]
    band = over_seeds([v["bias_ambig"]["estimate"] for k, v in t.items() if k.startswith("random ")])
    out[f"prune ({cat})"] = (t["pruned"]["bias_ambig_change"]["high"] < 0 and t["pruned"]["bias_ambig"]["estimate"]
                             < band.low and t["pruned"]["accuracy_change"]["estimate"] >= -0.02)
    lower = [r["pruned_bias_ambig"] < r["original_bias_ambig"] for r in c["robust"]]
    unseen = [r["pruned_bias_ambig"] < r["original_bias_ambig"] for r in c["robust"] if not r["used_to_find"]]
    out[f"robust ({cat})"] = sum(lower) >= 8 and sum(unseen) >= 0.8 * len(unseen)
    return out


def run(ctx: Context) -> Section:
    cats = [_category(ctx, c, p) for c, p in _sources(ctx).items()]
    checks = {k: v for c in cats for k, v in _checks(c).items()}
    rows, long, notes = [], [], []
    mode = "chat" if getattr(ctx.model.tokenizer, "chat_template", None) else "plain"
    for c in cats:
        chk, pl = c["check"], c["plain"]
        rows.append({"category": c["category"], "condition": f"original (dev ∪ test, {mode})", "s_AMB": fmt(chk["bias_ambig"]),
                     "s_DIS": fmt(chk["bias_disambig"]), "accuracy": fmt(chk["accuracy"])})
        if pl:
            rows.append({"category": c["category"], "condition": "variant: plain prompt, 1 instruction",
                         "s_AMB": fmt(pl["bias_ambig"]), "s_DIS": fmt(pl["bias_disambig"]), "accuracy": fmt(pl["accuracy"])})
        long += [{"category": c["category"], "condition": "check", "measure": m, **v} for m, v in chk.items()]
        if c["forced"]:
            notes.append(f"{c['category']}: variant — no bias (s_AMB {fmt(chk['bias_ambig'])}), CRISPR run anyway "
                         "(--crispr-anyway)")
        elif not c["biased"]:
            notes.append(f"{c['category']}: no stereotyped bias in ambiguous contexts (s_AMB {fmt(chk['bias_ambig'])}, "
                         f"{c['sizes']['check']} items): nothing for CRISPR to remove; stopped here")
            continue
        t = c["test"]
        band = {m: iv_dict(over_seeds([v[m]["estimate"] for k, v in t.items() if k.startswith("random ")])) for m in MEASURES}
        for k in ("original", "pruned"):
            rows.append({"category": c["category"], "condition": f"test: {k}" + (f" (top {c['n']} neurons)" if k == "pruned" else ""),
                         "s_AMB": fmt(t[k]["bias_ambig"]), "s_DIS": fmt(t[k]["bias_disambig"]), "accuracy": fmt(t[k]["accuracy"])})
        rows.append({"category": c["category"], "condition": f"test: {c['n']} random neurons × {sum(k.startswith('random ') for k in t)} seeds",
                     "s_AMB": fmt(band["bias_ambig"]), "s_DIS": fmt(band["bias_disambig"]), "accuracy": fmt(band["accuracy"])})
        low = sum(r["pruned_bias_ambig"] < r["original_bias_ambig"] for r in c["robust"])
        notes.append(f"{c['category']}: n = {c['n']} chosen on dev ({c['neurons']}); pruning lowers s_AMB under {low} of "
                     f"{len(c['robust'])} instructions (not used to find the neurons: "
                     f"{[r['instruction'] for r in c['robust'] if not r['used_to_find']]})")
        long += [{"category": c["category"], "condition": k, "measure": m, **v} for k, d in t.items() for m, v in d.items()]
    biased = [c for c in cats if "test" in c]
    measured = "; ".join(f"{c['category']} s_AMB {fmt(c['check']['bias_ambig'])}, accuracy {fmt(c['check']['accuracy'])}"
                         for c in cats)
    if biased:
        measured += "; pruned: " + "; ".join(f"{c['category']} s_AMB {fmt(c['test']['pruned']['bias_ambig'])}" for c in biased)
    control = ("n random neurons (seeds), instructions not used to find the neurons" if biased else
               "no category shows stereotyped ambiguous-context bias: pruning was not run")
    tables = {"results": pd.DataFrame(long),
              "robustness": pd.DataFrame([{"category": c["category"], **r} for c in biased for r in c["robust"]]),
              "prune_curve": pd.DataFrame([{"category": c["category"], **r} for c in biased for r in c["curve"]])}
    return Section(KEY, PAPER, CLAIM, measured, control, checks, pd.DataFrame(rows), tables, _figures(cats), notes)


def _figures(cats) -> list:
    import plotly.graph_objects as go

    fig = go.Figure()
    for m in ("bias_ambig", "bias_disambig", "accuracy"):
        ivs = [c["check"][m] for c in cats]
        fig.add_trace(go.Bar(name=m, x=[c["category"] for c in cats], y=[v["estimate"] for v in ivs],
                             error_y={"type": "data", "array": [v["high"] - v["estimate"] for v in ivs],
                                      "arrayminus": [v["estimate"] - v["low"] for v in ivs]}))
    fig.update_layout(barmode="group", title="the original on BBQ (dev ∪ test items)")
    return [("BBQ scores of the original", fig)]
