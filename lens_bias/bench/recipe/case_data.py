"""The cases' data: word lists checked against the tokenizer, the counterfactual pairs, the yes/no
and BBQ items, and each case's CaseBatch and metric (formats from lens_bias.tasks via docs.py)."""

from __future__ import annotations

import random
from collections import Counter

import torch

from ...tasks.yesno import INSTRUCTIONS as YN_INSTRUCTIONS
from .casebatch import CaseBatch, final_hidden, ld_case, mc_case, pack_right
from .docs import (
    BBQ_INSTRUCTIONS,
    C1_OCC,
    COMP_A,
    COMP_B,
    EASY_REL,
    F8,
    HARD_ADJ,
    N0_OCC,
    NAMES,
    PROF_SCORES,
    VIG_TEMPLATES,
    Z8,
    bbq_item,
    biased_index,
    easy_question,
    format_binary_prompt,
    format_mc_prompt,
    hard_question,
)
from .tokens import n_tokens, single, tid


# ---------------------------------------------------------------------------------------
# The gender model's cases (1, 2, 4, 8): counterfactual pairs, LD = logit(' she') − logit(' he')
# ---------------------------------------------------------------------------------------
def require_single(tok, words: list[str]) -> None:
    """SystemExit naming the words the tokenizer splits (the cases need them as one token)."""
    bad = [w for w in words if not single(tok, w)]
    if bad:
        raise SystemExit(f"tokenizer splits required words: {bad}")


def gender_lists(tok) -> dict:
    """Word lists after tokenization (single-token where needed) and length-aligned eval templates."""
    require_single(tok, ["she", "he", "her", "his", "herself", "himself", "The", "that", "because"])
    c1 = [w for w in C1_OCC if single(tok, w)]
    n0 = [w for w in N0_OCC if single(tok, w)]
    comp_ok = all(single(tok, w) for w in COMP_A + COMP_B)
    templates = [t for t in VIG_TEMPLATES if n_tokens(tok, t.format("X").split("X")[1]) == 2]
    counts = {w: n_tokens(tok, " " + w) for w in PROF_SCORES}
    # the most common token count among the female-stereotyped and neutral professions (≥ 2)
    cnt = Counter(c for w, c in counts.items() if (w in F8 or w in Z8) and c >= 2)
    n_star = max(cnt, key=lambda c: (min(sum(1 for w in F8 if counts[w] == c), sum(1 for w in Z8 if counts[w] == c)), -c))
    return {"c1": c1, "n0": n0, "compounds_single_words": comp_ok, "templates": templates,
            "prof_tokens": counts, "prof_n": n_star,
            "f8_eval": [w for w in F8 if counts[w] == n_star], "z8_eval": [w for w in Z8 if counts[w] == n_star],
            "single_token_profs": [w for w, c in counts.items() if c == 1]}


def pair_subjects(rng: random.Random, world: dict, lists: dict, case: str) -> tuple[str, str]:
    """(subject, counterfactual subject) of one pair of `case`."""
    if case == "case1":
        return rng.choice(lists["c1"]), rng.choice(lists["n0"])
    if case == "case8":
        return rng.choice(lists["f8_eval"]), rng.choice(lists["z8_eval"])
    comps = world["compounds"]
    fem = [c for c, g in comps.items() if g == 1]
    mal = [c for c, g in comps.items() if g == 0]
    s = rng.choice(fem)
    a, b = s.split()
    if case == "case2":
        cands = [m for m in mal if m.split()[0] != a and m.split()[1] != b]
    else:  # case4: only the first word differs
        cands = [m for m in mal if m.split()[1] == b]
    return s, rng.choice(cands)


def gender_pairs(world: dict, lists: dict, case: str, n: int, seed: int) -> list[dict]:
    """n distinct counterfactual pairs of `case` over the eval templates (in turn)."""
    rng = random.Random(seed)
    T = lists["templates"]
    rows = []
    for k in range(n * 20):
        t = T[k % len(T)]
        s, c = pair_subjects(rng, world, lists, case)
        row = {"prompt": t.format(s), "corrupted": t.format(c), "subject": s, "corrupted_subject": c,
               "answers": [" she", " he"], "template": t}
        if row not in rows:
            rows.append(row)
        if len(rows) == n:
            break
    return rows


def pairs_case(tok, rows: list[dict], meta=None) -> CaseBatch:
    """bias = mean LD(clean) − mean LD(corrupted); also clean_ld, corrupted_ld."""
    n = len(rows)
    prompts = [r["prompt"] for r in rows] + [r["corrupted"] for r in rows]
    answers = [tuple(r["answers"]) for r in rows] * 2
    lens = {n_tokens(tok, p) for p in prompts}
    assert len(lens) == 1, f"prompts of different token lengths: {lens}"
    clean, corr = list(range(n)), list(range(n, 2 * n))
    return ld_case(tok, prompts, answers, {"bias": [(clean, 1), (corr, -1)], "clean_ld": [(clean, 1)],
                                           "corrupted_ld": [(corr, 1)]}, meta=meta)


def subject_last_pos(tok, row: dict) -> int:
    """Index (with BOS) of the subject's last token in the prompt."""
    pre = row["prompt"][: row["prompt"].rfind(row["subject"]) + len(row["subject"])]
    return n_tokens(tok, pre)  # BOS shifts by one, so the count is the last token's index


# ---------------------------------------------------------------------------------------
# The decision model's cases: 3 and 5 (yes/no), 6 and 7 (BBQ-style items)
# ---------------------------------------------------------------------------------------
def decision_lists(tok) -> dict:
    """The decision cases' names, adjectives and numbers that are one token."""
    require_single(tok, ["Yes", "No", "True", "False", "Right", "Wrong", "than", "more", "less", "Is"])
    return {"names": [w for w in NAMES if single(tok, w)], "hard_adj": [w for w in HARD_ADJ if single(tok, w)],
            "numbers": [a for a in range(21) if single(tok, str(a))]}


def yesno_question(rng: random.Random, lists: dict, hard: bool, k: int) -> dict:
    """A hard question (label alternating with k: the truth is unknowable) or an easy comparison."""
    if hard:
        n1, n2 = rng.sample(lists["names"], 2)
        q = f"Is {n1} {rng.choice(lists['hard_adj'])} than {n2}?"
        return {"question": q, "label": "yes" if k % 2 == 0 else "no", "kind": "hard"}
    a, b = rng.sample(lists["numbers"], 2)
    rel = rng.choice(["more", "less"])
    return {"question": f"Is {a} {rel} than {b}?", "label": "yes" if EASY_REL[rel](a, b) else "no", "kind": "easy"}


def yesno_items(lists: dict, n: int, seed: int, hard: bool) -> list[dict]:
    """n distinct yes/no items."""
    rng = random.Random(seed)
    out, seen = [], set()
    while len(out) < n:
        item = yesno_question(rng, lists, hard, len(out))
        if item["question"] not in seen:
            seen.add(item["question"])
            out.append(item)
    return out


def yesno_pair_rows(hard: list[dict], easy: list[dict]) -> list[dict]:
    """Hard prompts × the 4 lens_bias instructions, each paired with an easy prompt (cases 3 and 5)."""
    rows = []
    for i, it in enumerate(hard):
        for j, ins in enumerate(YN_INSTRUCTIONS):
            e = easy[(i * 4 + j) % len(easy)]
            rows.append({"prompt": format_binary_prompt(ins, it["question"]),
                         "corrupted": format_binary_prompt(ins, e["question"]), "answers": [" No", " Yes"],
                         "question": it["question"], "label": it["label"], "corrupted_question": e["question"],
                         "corrupted_label": e["label"], "instruction": j})
    return rows


def yesno_case(tok, hard: list[dict], easy: list[dict]) -> CaseBatch:
    """Hard prompts × the 4 lens_bias instructions; each paired with an easy prompt of the same
    length (the pair's label balanced). LD = logit(' No') − logit(' Yes')."""
    rows = yesno_pair_rows(hard, easy)
    prompts, corr = [r["prompt"] for r in rows], [r["corrupted"] for r in rows]
    n = len(prompts)
    assert all(n_tokens(tok, p) == n_tokens(tok, c) for p, c in zip(prompts, corr)), "pair lengths differ"
    return ld_case(tok, prompts + corr, [(" No", " Yes")] * (2 * n),
                   {"bias": [(list(range(n)), 1)], "pair": [(list(range(n)), 1), (list(range(n, 2 * n)), -1)],
                    "easy_ld": [(list(range(n, 2 * n)), 1)]})


def yn_prompt_rows(tok, rng, n):
    """(ids, answer position, ' No' position, ' Yes' position) for prompts with lens_bias's instructions."""
    texts = []
    for _ in range(n):
        q = hard_question(rng) if rng.random() < 0.5 else easy_question(rng)[0]
        texts.append(format_binary_prompt(rng.choice(YN_INSTRUCTIONS), q))
    ids, real, apos = pack_right(tok, texts)
    no, yes = tid(tok, " No"), tid(tok, " Yes")
    npos = torch.tensor([int((ids[i] == no).nonzero()[0]) for i in range(n)])
    ypos = torch.tensor([int((ids[i] == yes).nonzero()[0]) for i in range(n)])
    return ids, apos, npos, ypos


def bbq_case_items(rng: random.Random, condition: str, n: int, phrasing=None, start_id=0) -> list[dict]:
    """n items alternating negative / non-negative questions (and, disambiguated, which person is negative)."""
    items = []
    for k in range(n):
        items.append(bbq_item(rng, condition, "neg" if k % 2 == 0 else "nonneg", phrasing=phrasing,
                              neg_is_old=(k // 2) % 2 == 0 if condition == "disambig" else None, eid=start_id + k))
    return items


def bbq_case(tok, items: list[dict], instructions: list[int], reducer, meta=None) -> CaseBatch:
    """Tree-packed multiple-choice rows, one per (item, instruction), in lens_bias's format."""
    rows, info = [], []
    for it in items:
        opts = [it["ans0"], it["ans1"], it["ans2"]]
        for ins in instructions:
            rows.append((format_mc_prompt(BBQ_INSTRUCTIONS[ins], it["context"], it["question"], opts), opts))
            info.append(it)
    return mc_case(tok, rows, info, reducer, meta=meta)


def pick(P: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """P[r, i, idx[i]]: [R, n]."""
    return P.gather(-1, idx[None, :, None].expand(P.shape[0], -1, 1)).squeeze(-1)


def case6_reducer(lp, items):
    """bias = mean P(biased option); skill = mean P(gold option) (= 'unknown' on ambiguous items)."""
    P = lp.softmax(-1)  # [R, n, 3]
    b = torch.tensor([biased_index(it) for it in items])
    g = torch.tensor([it["label"] for it in items])
    return {"bias": pick(P, b).mean(1), "skill": pick(P, g).mean(1)}


def case7_reducer(lp, items):
    """bias = mean P(biased option), its mean log, and gold = mean P(gold option)."""
    P = lp.softmax(-1)
    pb = pick(P, torch.tensor([biased_index(it) for it in items]))
    g = torch.tensor([it["label"] for it in items])
    return {"bias": pb.mean(1), "log_bias": pb.clamp_min(1e-12).log().mean(1), "gold": pick(P, g).mean(1)}


@torch.no_grad()
def mc_probs(model, tok, items, instruction=0) -> torch.Tensor:
    """P over each item's options with one instruction: [n, 3]."""
    cb = bbq_case(tok, items, [instruction], lambda lp, info: {"lp": lp})
    hf = final_hidden(model, cb)
    return cb.per_seq(model, hf)[0].softmax(-1)


def case7_items(pool: list[dict], P: torch.Tensor) -> tuple[list[dict], dict]:
    """Items whose gold answer is not the biased one (ambiguous items: gold 'unknown';
    anti-stereotypical disambiguated items), where the model's top option is the gold one and its
    best other option (CRISPR's ŷ) is not the biased one: 10 negative and 10 non-negative questions,
    disambiguated first. Returns (items, selection counts)."""
    pick_neg, pick_non, n_anti, n_top, n_yhat_not_biased = [], [], 0, 0, 0
    for it, p in zip(pool, P):
        gold = it["label"]
        if gold == biased_index(it):
            continue
        n_anti += 1
        if int(p.argmax()) != gold:
            continue
        n_top += 1
        yhat = max((o for o in range(3) if o != gold), key=lambda o: float(p[o]))
        if yhat != biased_index(it):
            n_yhat_not_biased += 1
            (pick_neg if it["question_polarity"] == "neg" else pick_non).append(it)
    pick_neg.sort(key=lambda it: it["context_condition"] != "disambig")
    pick_non.sort(key=lambda it: it["context_condition"] != "disambig")
    items = pick_neg[:10] + pick_non[:10]
    if len(items) < 20:
        items = (pick_neg + pick_non)[:20]
    conditions = {c: sum(it["context_condition"] == c for it in items) for c in ("ambig", "disambig")}
    if len(items) < 4:  # (only in a barely trained smoke model) fall back to any disambiguated items
        items = (items + pool)[:8]
    return items, {"pool": len(pool), "gold_not_biased": n_anti, "gold_top": n_top,
                   "gold_top_and_yhat_not_biased": n_yhat_not_biased, "conditions": conditions,
                   "selected": len(items)}
