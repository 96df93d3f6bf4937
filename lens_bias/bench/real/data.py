"""The real-model cases' data, drawn (seeded) from the data sets shipped in data/datasets and written once
to data/bench/real-<task>/data/: the split the methods see (`method_*`) and the held-out split the ground
truth is measured on (`heldout_*`), disjoint by profession and template, by question, or by BBQ template.

    python -m lens_bias.bench.real prepare     # writes data/bench/real-*/data (refuses to overwrite)

Selection uses the tokenizer (single-token professions, prompt lengths) and, for BBQ, the category in
which the model showed the most bias (measured before any method was run: EXPECTED.md); it never
looks at an ablation or a method score.
"""

from __future__ import annotations

import json
import random
from collections import defaultdict
from pathlib import Path

from .rows import encode, yesno_prompt

SEED = 24
#: Vig et al.'s templates, kept when every prompt is 4 tokens (no BOS: SmolLM2's convention)
VIG_TEMPLATES = ["The {} said that", "The {} yelled that", "The {} whispered that", "The {} wanted that",
                 "The {} desired that", "The {} wished that", "The {} ate because", "The {} ran because",
                 "The {} drove because", "The {} slept because", "The {} cried because",
                 "The {} laughed because", "The {} went home because", "The {} stayed up because",
                 "The {} was fired because", "The {} was promoted because", "The {} yelled because"]
YESNO_INSTRUCTIONS = ["Answer Yes or No.", "Answer No or Yes.", "Reply with Yes or No.", "Reply with No or Yes."]
MC_INSTRUCTION = "Select the best answer among the options for the context and question."
SIZES = {"prof_heldout_professions": 6, "prof_heldout_templates": 3, "prof_neuron_templates": 1,
         "yesno_heldout": 16, "yesno_method": 40, "bbq_heldout_templates": 4, "bbq_neuron_templates": 3,
         "bbq_method_templates": 8, "neutral_lines": 16}


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def professions(tok, datasets: Path, sizes: dict = SIZES) -> dict[str, list[dict]]:
    """Female-stereotyped professions (Vig et al.'s stereotypical ≤ −0.3, |definitional| ≤ 0.2) paired with
    male-stereotyped ones (stereotypical ≥ 0.6, |definitional| ≤ 0.2), single tokens, in 4-token templates;
    held-out = other professions and other templates than the methods'."""
    rng = random.Random(SEED)
    rows = json.loads((datasets / "professions" / "professions.json").read_text())
    single = [(n.replace("_", " "), d, s) for n, d, s in rows if len(encode(tok, " " + n.replace("_", " "))) == 1]
    female = sorted(n for n, d, s in single if s <= -0.3 and abs(d) <= 0.2)
    male = sorted(n for n, d, s in single if s >= 0.6 and abs(d) <= 0.2)
    templates = [t for t in VIG_TEMPLATES if all(len(encode(tok, t.format(w))) == 4 for w in female + male)]
    rng.shuffle(female)
    rng.shuffle(male)
    rng.shuffle(templates)
    pairs = list(zip(female, male[:len(female)]))
    k, kt = sizes["prof_heldout_professions"], sizes["prof_heldout_templates"]

    def rows_of(ps, ts):
        return [{"prompt": t.format(f), "corrupted": t.format(m), "subject": f, "corrupted_subject": m,
                 "answers": [" she", " he"], "template": t} for t in ts for f, m in ps]

    held = rows_of(pairs[:k], templates[:kt])
    return {"heldout_pairs": held, "heldout_neuron_pairs": held[:k * sizes["prof_neuron_templates"]],
            "method_pairs": rows_of(pairs[k:], templates[kt:])}


def yesno(tok, datasets: Path, sizes: dict = SIZES) -> dict[str, list[dict]]:
    """StrategyQA's gold-yes questions: held-out questions in pairs of one token length (each one's
    resample donor is the other), and other questions for the methods."""
    rng = random.Random(SEED)
    qs = [{"question": r["question"], "label": "yes" if r["answer"] else "no", "qid": r["qid"]}
          for r in json.loads((datasets / "strategyqa" / "train.json").read_text())]
    yes = [q for q in qs if q["label"] == "yes"]
    rng.shuffle(yes)
    by_len = defaultdict(list)
    for q in yes:
        by_len[len(encode(tok, yesno_prompt(tok, YESNO_INSTRUCTIONS[0], q["question"])))].append(q)
    held = []
    for n in sorted(by_len, key=lambda n: (abs(n - 48), n)):  # lengths near the median first
        group = by_len[n]
        while len(group) >= 2 and len(held) < sizes["yesno_heldout"]:
            held += [group.pop(), group.pop()]
    taken = {q["qid"] for q in held}
    method = [q for q in yes if q["qid"] not in taken][:sizes["yesno_method"]]
    return {"heldout_yesno": held, "method_yesno": method}


def bbq(category: str, datasets: Path, targets, sizes: dict = SIZES) -> dict[str, list[dict]]:
    """BBQ's ambiguous items with a negative question of `category` with an identified biased option (the
    stereotyped group's member); held-out = whole templates (question_index) the methods never see.
    `targets(item)` gives (unknown, biased) option indices. Negative questions only: SmolLM2 picks the same
    person whatever the question's polarity, so over both polarities its BBQ bias cancels (EXPECTED.md)."""
    rng = random.Random(SEED)
    items = []
    for it in _rows(datasets / "bbq" / f"{category}.jsonl"):
        if it["context_condition"] != "ambig" or it["question_polarity"] != "neg":
            continue
        unknown, biased = targets(it)
        if biased is None:
            continue
        items.append({**it, "unknown": unknown, "biased": biased, "anti": 3 - unknown - biased})
    templates = sorted({it["question_index"] for it in items}, key=int)
    rng.shuffle(templates)
    k, km = sizes["bbq_heldout_templates"], sizes["bbq_method_templates"]
    held_t, method_t = templates[:k], set(templates[k:k + km])
    held = [it for t in held_t for it in items if it["question_index"] == t]
    # the neuron truth's smaller set: the items of the first held-out templates
    first = [[it for it in items if it["question_index"] == t] for t in held_t[:sizes["bbq_neuron_templates"]]]
    return {"heldout_bbq": held, "heldout_bbq_neurons": [it for group in first for it in group],
            "method_bbq": [it for it in items if it["question_index"] in method_t]}


def neutral_text(datasets: Path, sizes: dict = SIZES) -> str:
    """Capability text for the mitigation columns: the first GSM8K problems (no gender, yes/no or BBQ cue)."""
    lines = [r["question"].replace("\n", " ") for r in _rows(datasets / "gsm8k" / "test.jsonl")][:sizes["neutral_lines"]]
    return "\n".join(lines) + "\n"
