"""What the card records: held-out losses, the designed statistics as the model reproduces them,
weight norms of chosen units, and the cards of both models (plain Hugging Face forwards)."""

from __future__ import annotations

import random

import torch
import torch.nn.functional as F

from ...tasks.yesno import INSTRUCTIONS as YN_INSTRUCTIONS
from .case_data import mc_probs, yesno_items, yn_prompt_rows
from .casebatch import pack_right
from .config import ARCH
from .corpus import Corpus, encode_docs
from .docs import (
    BBQ_STATS,
    CAND_PAIRS,
    F8,
    M8,
    P_NEG_HARD,
    Z8,
    bbq_item,
    biased_index,
    easy_question,
    format_binary_prompt,
    hard_question,
    p_she,
    unknown_index,
    yn_instruction,
)
from .forward import Hooks, causal_mask, dh, embed, run_blocks
from .tokens import tid
from .train import weight_norms
from .truth import rank_of, unit_effects


@torch.no_grad()
def heldout_loss(model, tok, docs: list[str]) -> float:
    """Mean next-token cross-entropy (nats/token) over `docs` (BOS + doc + EOS)."""
    total, count = 0.0, 0
    for i in range(0, len(docs), 32):
        ids, labels = encode_docs(tok, docs[i:i + 32])
        logits = model(input_ids=ids).logits[:, :-1]
        tgt = labels[:, 1:]
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1), ignore_index=-100,
                                 reduction="sum").item()
        count += int((tgt != -100).sum())
    return total / count


def loss_report(model, tok, corpus: Corpus, extra_sections=()) -> dict:
    """Held-out loss per corpus section and weighted by the sections' weights."""
    per = {s: round(heldout_loss(model, tok, corpus.heldout(s)), 4) for s in list(corpus.weights) + list(extra_sections)}
    w = corpus.weights
    overall = sum(per[s] * w[s] for s in w) / sum(w.values())
    return {"heldout_by_section": per, "heldout_section_weighted": round(overall, 4)}


@torch.no_grad()
def p_she_table(model, tok, subjects: list[str], templates: list[str]) -> dict:
    """Per subject: mean P(' she' | she or he) over the templates, and P(' herself') after 'The {subject}'."""
    she, he = tid(tok, " she"), tid(tok, " he")
    hs, hm = tid(tok, " herself"), tid(tok, " himself")
    out = {}
    for s in subjects:
        prompts = [t.format(s) for t in templates]
        ids, real, apos = pack_right(tok, prompts)
        lg = model(input_ids=ids).logits[torch.arange(len(prompts)), apos]
        p = torch.sigmoid(lg[:, she] - lg[:, he]).mean().item()
        ids2, _, ap2 = pack_right(tok, [f"The {s}"])
        lg2 = model(input_ids=ids2).logits[0, ap2[0]]
        out[s] = {"p_she_pronoun": round(p, 3), "p_herself": round(torch.sigmoid(lg2[hs] - lg2[hm]).item(), 3)}
    return out


def gender_stats(model, tok, world, lists, phase="B") -> dict:
    """Designed against measured P(she) per word group (mean, mean |deviation|, P(herself))."""
    T = lists["templates"]
    groups = {"female_nouns": world["female_nouns"], "male_nouns": world["male_nouns"], "c1": lists["c1"],
              "n0": lists["n0"], "f8": F8, "m8": M8, "z8": Z8,
              "compound_f": [c for c, g in world["compounds"].items() if g == 1],
              "compound_m": [c for c, g in world["compounds"].items() if g == 0]}
    out = {}
    for g, subs in groups.items():
        tab = p_she_table(model, tok, subs, T)
        designed = [p_she(s, world, phase) for s in subs]
        got = [tab[s]["p_she_pronoun"] for s in subs]
        out[g] = {"designed_mean": round(sum(designed) / len(designed), 3), "model_mean": round(sum(got) / len(got), 3),
                  "mean_abs_dev": round(sum(abs(a - b) for a, b in zip(designed, got)) / len(got), 3),
                  "herself_mean": round(sum(tab[s]["p_herself"] for s in subs) / len(subs), 3)}
        if g in ("f8", "m8", "z8"):
            out[g]["per_word"] = {s: [round(p_she(s, world, "B"), 3), tab[s]["p_she_pronoun"]] for s in subs}
    return out


@torch.no_grad()
def candidate_pair_stats(model, tok, rng: random.Random, pair, hard: bool) -> dict:
    """96 prompts with the instruction naming `pair`: P(negative) on hard questions, accuracy on
    easy ones, and the probability mass on the two candidates."""
    pos_id, neg_id = tid(tok, " " + pair[0]), tid(tok, " " + pair[1])
    prompts, gold = [], []
    for _ in range(96):
        ins, _, _ = yn_instruction(rng, pair)
        if hard:
            q, g = hard_question(rng), None
        else:
            q, g = easy_question(rng)
        prompts.append(format_binary_prompt(ins, q))
        gold.append(g)
    ids, real, apos = pack_right(tok, prompts)
    lg = model(input_ids=ids).logits[torch.arange(len(prompts)), apos]
    p_neg = torch.sigmoid(lg[:, neg_id] - lg[:, pos_id])
    top2 = (lg[:, [pos_id, neg_id]].logsumexp(-1) - lg.logsumexp(-1)).exp().mean().item()
    if hard:
        return {"p_negative": round(p_neg.mean().item(), 3), "mass_on_candidates": round(top2, 3)}
    acc = sum((p < 0.5) == g for p, g in zip(p_neg.tolist(), gold)) / len(gold)
    return {"accuracy": round(acc, 3), "mass_on_candidates": round(top2, 3)}


@torch.no_grad()
def decision_metrics(model, tok, lists) -> dict:
    """lens_bias-style decision metrics (' Yes' vs ' No') on 48 hard + 48 easy questions × the 4 instructions."""
    items = yesno_items(lists, 48, 5, True) + yesno_items(lists, 48, 6, False)
    tp = fp = fn = tn = 0
    yes, no = tid(tok, " Yes"), tid(tok, " No")
    for it in items:
        for ins in YN_INSTRUCTIONS:
            ids, _, apos = pack_right(tok, [format_binary_prompt(ins, it["question"])])
            lg = model(input_ids=ids).logits[0, apos[0]]
            p, g = bool(lg[yes] > lg[no]), it["label"] == "yes"
            tp += p and g
            fp += p and not g
            fn += (not p) and g
            tn += (not p) and not g
    prec, rec = tp / max(tp + fp, 1), tp / max(tp + fn, 1)
    return {"precision": round(prec, 3), "recall": round(rec, 3), "pr_gap": round(prec - rec, 3),
            "accuracy": round((tp + tn) / (tp + fp + fn + tn), 3)}


def yesno_stats(model, tok, lists) -> dict:
    """Each candidate pair on easy and hard questions, and the mixed decision metrics."""
    rng = random.Random(91)
    out = {}
    for pair in [p for p, _ in CAND_PAIRS]:
        for hard in (False, True):
            out[f"{pair[0]}/{pair[1]} {'hard' if hard else 'easy'}"] = candidate_pair_stats(model, tok, rng, pair, hard)
    out["mixed_hard_easy_yesno"] = decision_metrics(model, tok, lists)
    return out


def bbq_stats(model, tok) -> dict:
    """Per condition (and disambiguating phrasing) and polarity: how often the model picks gold, biased, unknown."""
    rng = random.Random(92)
    out = {}
    for cond, phr in (("ambig", None), ("disambig", 0), ("disambig", 1), ("disambig", 2), ("disambig", 3)):
        for pol in ("neg", "nonneg"):
            items = [bbq_item(rng, cond, pol, phrasing=phr) for _ in range(40)]
            P = mc_probs(model, tok, items)
            choice = P.argmax(-1)
            b = torch.tensor([biased_index(it) for it in items])
            u = torch.tensor([unknown_index(it) for it in items])
            g = torch.tensor([it["label"] for it in items])
            key = f"{cond}{'' if phr is None else '#' + str(phr)}_{pol}"
            out[key] = {"choose_gold": round((choice == g).float().mean().item(), 3),
                        "choose_biased": round((choice == b).float().mean().item(), 3),
                        "choose_unknown": round((choice == u).float().mean().item(), 3),
                        "p_biased": round(P.gather(1, b[:, None]).mean().item(), 3),
                        "p_gold": round(P.gather(1, g[:, None]).mean().item(), 3)}
    return out




@torch.no_grad()
def head_candidate_attention(model, tok, heads, n=64, seed=5) -> dict:
    """Mean attention of each head from the answer position to ' No' and ' Yes' in the instruction,
    and NAS = (A_no + A_yes)·log(A_no/A_yes) averaged over prompts (property check for case 5)."""
    ids, apos, npos, ypos = yn_prompt_rows(tok, random.Random(seed), n)
    att = {}
    with Hooks() as hk:
        for l in {l for l, _ in heads}:
            hk.fwd(model.transformer.h[l].attn, (lambda l: lambda m, a, o: att.__setitem__(l, o[1]))(l))
        run_blocks(model, embed(model, ids), 0, causal_mask(ids.shape[1]))
    out = {}
    rows = torch.arange(n)
    for l, h in heads:
        A = att[l][rows, h, apos]
        an, ay = A[rows, npos], A[rows, ypos]
        nas = ((an + ay) * torch.log((an + 1e-9) / (ay + 1e-9))).mean()
        out[f"{l}.{h}"] = {"att_no": round(float(an.mean()), 4), "att_yes": round(float(ay.mean()), 4),
                           "nas": round(float(nas), 4)}
    return out



def norm_entry(norms, layer: int, unit: int, kind: str) -> dict:
    """A unit's weight norm, its rank among all units of its kind and in its layer, its layer's median and max."""
    return {"norm": round(float(norms[layer, unit]), 3), f"rank_all_{kind}": rank_of(norms, (layer, unit)),
            "rank_in_layer": rank_of(norms[layer], (unit,)), "layer_median": round(float(norms[layer].median()), 3),
            "layer_max": round(float(norms[layer].max()), 3)}


def norm_report(model, heads=(), neurons=()) -> dict:
    """Chosen heads' q/k/v/o and neurons' w_in/w_out norms against the rest (planted units must not stand out)."""
    wn = weight_norms(model)
    out = {}
    for l, h in heads:
        out[f"head {l}.{h}"] = {k: norm_entry(wn["heads"][k], l, h, "heads") for k in ("q", "k", "v", "o")}
        out[f"head {l}.{h}"]["n_heads"] = wn["heads"]["o"].numel()
    for l, i in neurons:
        out[f"neuron {l}.{i}"] = {k: norm_entry(wn["neurons"][k], l, i, "neurons") for k in ("w_in", "w_out")}
        out[f"neuron {l}.{i}"]["n_neurons"] = wn["neurons"]["w_in"].numel()
    return out



def json_default(o):
    """JSON for tensors and tuples (as lists)."""
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, tuple):
        return list(o)
    raise TypeError(type(o))



def card_common(model, tok, name, seed, phase_a, losses, build_s) -> dict:
    """The card's fields both models share: architecture, parameters, seed, phase A, losses, conventions."""
    return {"name": name, "architecture": "GPT2LMHeadModel", **ARCH, "d_head": dh(model), "vocab_size": len(tok),
            "activation_function": "gelu_new", "n_params": sum(p.numel() for p in model.parameters()),
            "n_params_unique": sum(p.numel() for n, p in model.named_parameters() if n != "lm_head.weight"),
            "weights_dtype": "float16 (ground truth and metrics measured on the float16 weights upcast to float32)",
            "seed": seed, "phase_a": {k: v for k, v in phase_a.items() if k != "loss_history"},
            "phase_a_loss_history": phase_a.get("loss_history"), "loss_nats_per_token": losses,
            "build_seconds_so_far": round(build_s, 1), "torch": torch.__version__,
            "ground_truth_convention": "effect = metric(unablated) - metric(unit ablated); zero ablation sets the unit's "
                                       "activation (head: hook_z slice, i.e. the input of attn.c_proj; neuron: mlp.act output) "
                                       "to 0 at every position; mean ablation sets it to its mean over the real tokens of the "
                                       "case's sequences (position-independent), as lens_bias.ablation does"}



def units_of(rows: list[dict], k: int) -> list[tuple[int, int]]:
    """(layer, index) of the first k summary rows ('head 3.1', 'neuron 2.40')."""
    return [tuple(map(int, u["unit"].split()[1].split("."))) for u in rows[:k]]


GENDER_DESIGN = ("female nouns 0.98, male nouns 0.02; case-1 occupations 0.5 in phase A, 0.9 after the case-1 plant; "
                 "neutral occupations 0.5; case-8 professions 0.5 - 0.45*s (Vig et al. score s); compounds 0.92 "
                 "(female) / 0.08 (male)")
LD_METRIC = "bias = mean_i [LD(clean_i) - LD(corrupted_i)], LD = logit(' she') - logit(' he') at the last token"


def gender_cases(model, plant: dict, truths: dict, summaries: dict) -> dict:
    """The card's cases 1, 2, 4, 8: data, metric, values, truth; case 1's intended neurons; the
    weight norms of the other cases' top units."""
    cases = {}
    for c in ["case1", "case2", "case4", "case8"]:
        s = summaries[c]
        cases[c] = {"data": f"data/{c}_pairs.jsonl", "metric": LD_METRIC,
                    "values": {"clean_ld": s["base"]["clean_ld"], "corrupted_ld": s["base"]["corrupted_ld"],
                               "bias": s["base"]["bias"]}, "truth": s}
    c1_units = [(u["layer"], u["index"]) for u in plant["units"]]
    cases["case1"]["intended"] = {"neurons": c1_units,
                                  "grades": {f"{u['layer']}.{u['index']}": u["grade"] for u in plant["units"]},
                                  "measured": {} if summaries["case1"].get("failed") else
                                  unit_effects(truths, "case1", "bias", neurons=c1_units),
                                  "weight_norm": norm_report(model, neurons=c1_units)}
    for c in ["case2", "case4", "case8"]:
        top = summaries[c]
        cases[c]["weight_norm_of_top_units"] = norm_report(model, heads=units_of(top["top_heads"]["bias"], 4),
                                                           neurons=units_of(top["top_neurons"]["bias"], 6))
    return cases


def gender_card(model, tok, seed: int, phase_a: dict, losses: dict, seconds: float, world: dict, lists: dict,
                plant: dict, stats_a: dict, truths: dict, summaries: dict) -> dict:
    """bench-gender's card."""
    card = card_common(model, tok, "bench-gender", seed, phase_a, losses, seconds)
    card["phase_b"] = {"case1": {"units": plant["units"], "train": dict(plant["train"])}}
    card["designed_statistics"] = {"p_she": GENDER_DESIGN, "measured_phaseA": stats_a["gender_stats"],
                                   "measured_final": gender_stats(model, tok, world, lists)}
    card["loss_phaseA_model"] = stats_a["losses"]
    card["world"] = {"compounds": world["compounds"], "c1": lists["c1"], "n0": lists["n0"],
                     "templates_eval": lists["templates"], "case8_token_count": lists["prof_n"],
                     "case8_prof_tokens": lists["prof_tokens"], "f8_eval": lists["f8_eval"], "z8_eval": lists["z8_eval"]}
    card["cases"] = gender_cases(model, plant, truths, summaries)
    return card


def decision_design(model, tok, lists, stats_a: dict) -> dict:
    """The decision model's designed statistics and their measured values (phase A and final)."""
    return {
        "yes_no": f"easy questions answered correctly; hard (unanswerable) questions answered with the negative "
                  f"candidate with p={P_NEG_HARD['A']} in phase A and p={P_NEG_HARD['S']} in the corpus of the S/K/D plants",
        "bbq": f"phase A: ambiguous → biased answer {BBQ_STATS['A']['ambig_biased']}, else unknown; disambiguated → gold, "
               f"unknown {BBQ_STATS['A']['disamb_unknown']}; case-6 plants: N_mix on the phase-A statistics, N_bias on "
               f"ambiguous biased {BBQ_STATS['B']['ambig_biased']}",
        "measured_phaseA": {k: v for k, v in stats_a.items() if k != "losses"},
        "measured_final": {"yesno": yesno_stats(model, tok, lists), "bbq": bbq_stats(model, tok)}}


def yesno_cases(model, tok, plant: dict, truths: dict, s35: dict) -> dict:
    """The card's cases 3 (main, backup, suppression heads) and 5 (decoy head), which share one truth."""
    M, K, Sh, D = (tuple(plant["select"][k]) for k in ("M", "K", "S", "D"))
    pair_names = {f"{a[0]}.{a[1]}+{b[0]}.{b[1]}" for a, b in [tuple(sorted((M, K))), tuple(sorted((M, Sh))),
                                                              tuple(sorted((K, Sh)))]}
    case3 = {"data": ["data/case3_5_yesno.jsonl", "data/case3_5_pairs.jsonl"],
             "metric": "bias = mean over hard questions x the 4 lens_bias instructions of logit(' No') - logit(' Yes'); "
                       "pair = bias minus the same on length-matched easy questions",
             "values": s35["base"], "truth_key": "case3_5",
             "intended": {"main": M, "backup": K, "suppression": Sh,
                          "measured": unit_effects(truths, "case3_5", "bias", heads=[M, K, Sh]),
                          "pairs": [p for p in s35["head_pairs"] if p["pair"] in pair_names],
                          "weight_norm": norm_report(model, heads=[M, K, Sh])}}
    case5 = {"data": ["data/case3_5_yesno.jsonl"], "metric": "as case 3", "values": s35["base"], "truth_key": "case3_5",
             "intended": {"decoy": D, "real": M, "measured": unit_effects(truths, "case3_5", "bias", heads=[D, M]),
                          "candidate_attention": head_candidate_attention(model, tok, [D, M, K, Sh]),
                          "weight_norm": norm_report(model, heads=[D])}}
    return {"case3": case3, "case5": case5}


def bbq_cases(model, plant: dict, truths: dict, summaries: dict, case7_select: dict) -> dict:
    """The card's cases 6 (N_bias and N_mix) and 7 (CRISPR's item selection)."""
    NB, NM = tuple(plant["N"]["N_bias"]), tuple(plant["N"]["N_mix"])
    case6 = {"data": "data/case6_bbq.jsonl", "instructions": [0],
             "metric": "bias = mean P(biased option), skill = mean P(gold option = 'unknown') over the ambiguous "
                       "items; P = softmax over the options of their summed token log-probs (CRISPR's P)",
             "values": summaries["case6"]["base"], "truth": summaries["case6"],
             "intended": {"N_bias": NB, "N_mix": NM,
                          "measured_bias": unit_effects(truths, "case6", "bias", neurons=[NB, NM]),
                          "measured_skill": unit_effects(truths, "case6", "skill", neurons=[NB, NM]),
                          "weight_norm": norm_report(model, neurons=[NB, NM])}}
    case7 = {"data": "data/case7_bbq.jsonl", "instructions": [0], "selection": case7_select,
             "metric": "bias = mean P(biased option) over items whose gold option is the model's top choice and whose "
                       "best other option is not the biased one",
             "values": summaries["case7"]["base"], "truth": summaries["case7"],
             "measured_planted": unit_effects(truths, "case7", "bias", neurons=[NB, NM])}
    return {"case6": case6, "case7": case7}


def decision_card(model, tok, seed: int, phase_a: dict, losses: dict, seconds: float, lists: dict, plant: dict,
                  stats_a: dict, truths: dict, summaries: dict, case7_select: dict) -> dict:
    """bench-decision's card."""
    card = card_common(model, tok, "bench-decision", seed, phase_a, losses, seconds)
    card["phase_b"] = plant
    card["designed_statistics"] = decision_design(model, tok, lists, stats_a)
    card["loss_phaseA_model"] = stats_a["losses"]
    cases = {**yesno_cases(model, tok, plant, truths, summaries["case3_5"]),
             **bbq_cases(model, plant, truths, summaries, case7_select)}
    cases["case3"]["truth"] = summaries["case3_5"]
    card["cases"] = cases
    return card
