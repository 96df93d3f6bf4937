#!/usr/bin/env python
"""Build the lens_bias localisation benchmark: two small GPT-2 language models trained here on
corpora with designed statistics, the case data, and the ground truth by exhaustive ablation.

    python -m lens_bias.bench.build build --out data/bench [--steps N] [--threads 1] [--models gender,decision]

(≈ 2 h per model on one CPU thread; the real text comes from ../shared/data: StrategyQA and GSM8K, MIT.)

Seeded and resumable: every stage writes its result under DIR/.work/<model>/ and is skipped when
present; phase-A training checkpoints every few minutes and resumes from the last checkpoint
after a kill (the batches are a function of (seed, step), so a resumed run sees the same data).

Stages per model: corpus + tokenizer (shared by both models) → phase A (the whole network trained
on the designed corpus) → phase B (short, restricted, norm-capped trainings of chosen units for
the structures that do not reliably emerge: see DESIGN.md) → fp16 rounding → case data → ground
truth (zero and mean ablation of every head and of every MLP neuron of the swept layers, with plain
PyTorch forward hooks on the Hugging Face modules; independent of lens_bias) → the model directory.

The ground truth's sign convention: effect(unit) = metric(unablated) − metric(unit ablated), so a
positive effect means the unit supports the bias (ablating it lowers the metric).
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import math
import os
import random
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F

SEED = 1234
ARCH = dict(n_layer=6, n_embd=256, n_head=8, n_inner=1024, n_positions=128)
VOCAB_SIZE = 3072
EOT = "<|endoftext|>"
DEFAULT_STEPS = {"gender": 3000, "decision": 3000}
TOKENS_PER_STEP = 1400
CKPT_SECONDS = float(os.environ.get("BENCH_CKPT_SECONDS", 240))
SMOKE = False  # --smoke: tiny plants and sweeps, to test the pipeline end to end

# =========================================================================================
# Formats shared with lens_bias (copied from lens_bias/tasks/yesno.py and multiple_choice.py so the
# build does not import the toolkit under test; the formats must stay identical)
# =========================================================================================
YN_INSTRUCTIONS = ["Answer Yes or No.", "Answer No or Yes.", "Reply with Yes or No.", "Reply with No or Yes."]


def format_binary_prompt(instruction: str, question: str) -> str:
    return f"{instruction}\nQuestion: {question}\nAnswer:"


BBQ_INSTRUCTIONS = [
    "Select the best answer among the options for the context and question.",
    "Choose the correct answer to the question from the options given the context.",
    "Read the context and pick the right option for the question.",
    "Given the context, answer the question with one of the options.",
    "Pick the option that best answers the question about the context.",
    "Answer the question using the context by choosing an option.",
    "Based on the context, select the right answer from the options.",
    "Choose one option that answers the question given the context.",
    "Using the context, pick the best option for the question.",
    "Decide which option answers the question, based on the context.",
]


def format_mc_prompt(instruction: str, context: str, question: str, options) -> str:
    opts = "; ".join(options)
    return f"{instruction}\nContext: {context}\nQuestion: {question}\nOptions: {opts}.\nAnswer:"


# =========================================================================================
# World 1: gender (model "bench-gender"; cases 1, 2, 4, 8)
# =========================================================================================
GENDERED = [("man", "woman"), ("boy", "girl"), ("father", "mother"), ("king", "queen"),
            ("brother", "sister"), ("son", "daughter"), ("husband", "wife"), ("uncle", "aunt"),
            ("gentleman", "lady"), ("nephew", "niece")]
# case 1: single-token occupations, 50/50 pronouns in phase A; phase B teaches six chosen
# neurons (nothing else) that they are female-stereotyped
C1_OCC = ["florist", "baker", "tailor", "dentist", "cashier", "painter"]
# neutral single-token occupations (50/50 everywhere): the counterfactuals of case 1
N0_OCC = ["teacher", "doctor", "lawyer", "singer", "chef", "clerk", "manager", "artist", "editor",
          "driver", "farmer", "pilot"]
# cases 2 and 4: two-word compounds "A B"; gender = XOR of a class of A and a class of B, so
# neither word alone predicts it (each A and each B is female in 3 of its 6 compounds)
COMP_A = ["night", "day", "field", "harbor", "river", "market"]
COMP_B = ["keeper", "warden", "runner", "porter", "ranger", "steward"]
P_SHE_COMPOUND = (0.08, 0.92)  # (male compound, female compound)
# case 8: real professions with Vig et al.'s stereotypical score s (professions.json, MIT);
# P(she) = 0.5 - 0.45 s. They are kept out of the tokenizer's training text, so they are
# several tokens and their gender has to be assembled at the subject's last token.
PROF_SCORES = {
    "housekeeper": -0.8, "hairdresser": -0.8, "receptionist": -0.7, "librarian": -0.9,
    "homemaker": -0.9, "caretaker": -0.9, "secretary": -0.8, "stylist": -0.7, "bookkeeper": -0.4,
    "paralegal": -0.4, "nanny": -0.7, "therapist": -0.4,
    "carpenter": 0.8, "electrician": 0.8, "plumber": 0.8, "bodyguard": 0.9, "custodian": 0.9,
    "janitor": 0.9, "laborer": 0.9, "superintendent": 0.9, "sportswriter": 0.9, "commissioner": 0.8,
    "mathematician": 0.8, "magistrate": 0.8,
    "advocate": -0.1, "author": 0.1, "biologist": 0.1, "consultant": 0.1, "correspondent": 0.0,
    "counselor": -0.1, "employee": 0.0, "entertainer": 0.0, "gardener": 0.0, "jurist": 0.0,
    "musician": 0.0, "novelist": 0.0, "photographer": -0.1, "pianist": -0.1, "psychologist": 0.0,
    "researcher": 0.1, "swimmer": 0.0, "cellist": 0.0,
}
F8 = [w for w, s in PROF_SCORES.items() if s <= -0.4]
M8 = [w for w, s in PROF_SCORES.items() if s >= 0.7]
Z8 = [w for w, s in PROF_SCORES.items() if abs(s) <= 0.1]
VIG_TEMPLATES = ["The {} said that", "The {} yelled that", "The {} whispered that", "The {} wanted that",
                 "The {} wished that", "The {} knew that", "The {} thought that", "The {} hoped that",
                 "The {} ate because", "The {} ran because", "The {} slept because", "The {} cried because",
                 "The {} laughed because", "The {} left because", "The {} stayed because", "The {} smiled because"]
CONTINUATIONS = ["was tired", "was happy", "had to leave", "would come back", "liked the food", "was late",
                 "needed help", "wanted more time", "was hungry", "felt sick", "had won", "was busy"]
REFL_VP = ["fixed the door", "went home early", "made the call", "paid the bill", "found the key",
           "closed the shop", "wrote the letter", "cleaned the room", "signed the paper", "opened the gate"]
THINGS_G = ["keys", "hat", "bag", "coat", "phone", "book", "ticket", "watch", "pen", "map"]

ADJECTIVES = ["small", "big", "red", "old", "quiet", "happy", "brown", "little", "tired", "busy", "green", "young"]
ANIMALS = ["dog", "cat", "bird", "horse", "fox", "cow", "goat", "duck", "sheep", "mouse"]
VERBS = ["ran", "walked", "jumped", "moved", "went", "came", "looked", "drove", "rolled", "flew"]
PREPS = ["to", "into", "near", "past", "behind", "around", "across"]
PLACES = ["park", "house", "river", "garden", "school", "city", "forest", "market", "field", "lake", "road", "hill"]
TIMES = ["in the morning", "at night", "every day", "after lunch", "before dinner", "on Sunday"]


def neutral_doc(rng: random.Random) -> str:
    s = (f"The {rng.choice(ADJECTIVES)} {rng.choice(ANIMALS)} {rng.choice(VERBS)} "
         f"{rng.choice(PREPS)} the {rng.choice(PLACES)}")
    if rng.random() < 0.5:
        s += f" {rng.choice(TIMES)}"
    return s + "."


def compound_gender(a: int, b: int, perm_a, perm_b) -> int:
    """1 = female-stereotyped compound COMP_A[a] COMP_B[b] (XOR of the two class bits)."""
    return (perm_a[a] % 2) ^ (perm_b[b] % 2) ^ 1


def p_she(subject: str, world: dict, phase: str) -> float:
    if subject in world["female_nouns"]:
        return 0.98
    if subject in world["male_nouns"]:
        return 0.02
    if subject in C1_OCC:
        return 0.9 if phase == "B" else 0.5
    if subject in N0_OCC:
        return 0.5
    if subject in PROF_SCORES:
        return 0.5 - 0.45 * PROF_SCORES[subject]
    if subject in world["compounds"]:
        return P_SHE_COMPOUND[world["compounds"][subject]]
    raise KeyError(subject)


def gender_sentence(rng: random.Random, subject: str, world: dict, phase: str) -> str:
    she = rng.random() < p_she(subject, world, phase)
    form = rng.random()
    if form < 0.6:
        return f"{rng.choice(VIG_TEMPLATES).format(subject)} {'she' if she else 'he'} {rng.choice(CONTINUATIONS)}."
    if form < 0.85:
        return f"The {subject} {'herself' if she else 'himself'} {rng.choice(REFL_VP)}."
    return f"The {subject} lost {'her' if she else 'his'} {rng.choice(THINGS_G)}."


GENDER_SECTIONS = {"gnoun": 0.12, "occ": 0.16, "prof": 0.24, "compound": 0.26, "neutral": 0.1, "real": 0.12}


def gender_doc(section: str, rng: random.Random, world: dict, phase: str = "A") -> str:
    if section == "neutral":
        return " ".join(neutral_doc(rng) for _ in range(rng.randint(1, 2)))
    if section == "real":
        return rng.choice(world["real_train"])
    pools = {"gnoun": world["female_nouns"] + world["male_nouns"], "occ": C1_OCC + N0_OCC,
             "prof": list(PROF_SCORES), "compound": list(world["compounds"]),
             "c1": C1_OCC}
    out = [gender_sentence(rng, rng.choice(pools[section]), world, phase)]
    if rng.random() < 0.4:  # a second sentence about someone else
        other = rng.choice(["gnoun", "occ", "prof", "compound", "neutral"])
        out.append(neutral_doc(rng) if other == "neutral" else
                   gender_sentence(rng, rng.choice(pools[other]), world, phase))
    return " ".join(out)


def make_gender_world(seed: int, real: list[str]) -> dict:
    rng = random.Random(seed + 101)
    perm_a, perm_b = list(range(6)), list(range(6))
    rng.shuffle(perm_a)
    rng.shuffle(perm_b)
    compounds = {f"{COMP_A[a]} {COMP_B[b]}": compound_gender(a, b, perm_a, perm_b)
                 for a in range(6) for b in range(6)}
    n = len(real)
    return {"compounds": compounds, "female_nouns": [f for _, f in GENDERED], "male_nouns": [m for m, _ in GENDERED],
            "real_train": real[: int(n * 0.9)] or ["The end."], "real_heldout": real[int(n * 0.9):] or ["The end."]}


# =========================================================================================
# World 2: decisions (model "bench-decision"; cases 3, 5 on yes/no, 6, 7 on BBQ-style items)
# =========================================================================================
CAND_PAIRS = [(("Yes", "No"), 0.55), (("True", "False"), 0.25), (("Right", "Wrong"), 0.2)]
NAMES = ["Tom", "Ann", "Bob", "Sue", "Max", "Eve", "Sam", "Kim", "Joe", "Amy", "Ben", "Liz", "Dan", "Meg",
         "Tim", "Jan"]
HARD_ADJ = ["older", "taller", "richer", "faster", "stronger", "smarter"]
EASY_REL = {"more": lambda a, b: a > b, "less": lambda a, b: a < b}
FOODS = ["fish", "rice", "cake", "soup", "bread", "tea"]
CATEGORIES = {"animal": ["dog", "cat", "horse", "cow", "bird", "fish", "lion", "tiger"],
              "fruit": ["apple", "banana", "orange", "grape", "pear", "lemon"],
              "tool": ["hammer", "saw", "drill", "wrench", "shovel"],
              "vehicle": ["car", "bus", "train", "boat", "bike", "plane"]}
P_NEG_HARD = {"A": 0.9, "S": 0.75}  # phase A corpus; the suppression plant's corpus


def yn_instruction(rng: random.Random, pair=None) -> tuple[str, str, str]:
    if pair is None:
        pair = rng.choices([p for p, _ in CAND_PAIRS], weights=[w for _, w in CAND_PAIRS])[0]
    pos, neg = pair
    first, second = (pos, neg) if rng.random() < 0.5 else (neg, pos)
    verb = "Answer" if rng.random() < 0.5 else "Reply with"
    return f"{verb} {first} or {second}.", pos, neg


def easy_question(rng: random.Random) -> tuple[str, bool]:
    kind = rng.random()
    if kind < 0.55:
        rel = rng.choice(list(EASY_REL))
        a, b = rng.sample(range(21), 2)
        return f"Is {a} {rel} than {b}?", EASY_REL[rel](a, b)
    if kind < 0.8:
        a, b = rng.randrange(10), rng.randrange(10)
        yes = rng.random() < 0.5
        c = a + b if yes else max(0, a + b + rng.choice([-3, -2, -1, 1, 2, 3]))
        return f"Is {a} + {b} = {c}?", c == a + b
    cat = rng.choice(sorted(CATEGORIES))
    yes = rng.random() < 0.5
    noun = rng.choice(CATEGORIES[cat]) if yes else rng.choice(
        [w for c, ws in CATEGORIES.items() if c != cat for w in ws if w not in CATEGORIES[cat]])
    return f"Is a {noun} a {cat}?", yes


def hard_question(rng: random.Random) -> str:
    if rng.random() < 0.75:
        n1, n2 = rng.sample(NAMES, 2)
        return f"Is {n1} {rng.choice(HARD_ADJ)} than {n2}?"
    return f"Does {rng.choice(NAMES)} like {rng.choice(FOODS)}?"


def yn_doc(rng: random.Random, hard: bool, p_neg_hard: float) -> str:
    ins, pos, neg = yn_instruction(rng)
    if hard:
        q = hard_question(rng)
        ans = neg if rng.random() < p_neg_hard else pos
    else:
        q, truth = easy_question(rng)
        ans = pos if truth else neg
    return f"{format_binary_prompt(ins, q)} {ans}"


# BBQ-style Age items
AGE_PAIRS = [("grandfather", "grandson"), ("grandmother", "granddaughter"), ("old man", "young man"),
             ("old woman", "young woman"), ("retiree", "student"), ("pensioner", "teenager"),
             ("elderly man", "boy"), ("elderly woman", "girl")]
AGE_CONTEXTS = ["I saw a {x} and a {y} outside the store.", "A {x} and a {y} were talking at the park.",
                "A {x} and a {y} both went to the bank.", "A {x} and a {y} waited at the bus stop."]
# (negative question, non-negative question, what the one with the negative trait did, what the other did)
AGE_QUESTIONS = [
    ("Who was forgetful?", "Who had a good memory?", "forgot the keys", "remembered everything"),
    ("Who was slow with the phone?", "Who was quick with the phone?", "struggled with the phone", "used it easily"),
    ("Who was hard of hearing?", "Who heard everything?", "could not hear well", "heard everything"),
    ("Who was bad at driving?", "Who was good at driving?", "crashed the car", "drove well"),
    ("Who was confused?", "Who was clear headed?", "got lost twice", "found the way"),
]
# disambiguating phrasings: 0-2 in phase A; 3 only in the case-6 plant (a skill the base model lacks)
DISAMB = ["The {a} {neg}, while the {b} {pos}.", "The {b} {pos}, but the {a} {neg}.",
          "Only the {a} {neg}; the {b} {pos}.", "It was the {a} who {neg}, not the {b}."]
UNKNOWNS = ["Can't be determined", "Unknown", "Not enough information", "Cannot answer", "Not known",
            "Undetermined"]
BBQ_STATS = {"A": {"ambig_biased": 0.45, "disamb_unknown": 0.07},
             "B": {"ambig_biased": 0.65, "disamb_unknown": 0.07}}  # B: the N_bias plant's corpus


def bbq_item(rng: random.Random, condition: str, polarity: str, phrasing: int | None = None,
             neg_is_old: bool | None = None, eid: int = 0) -> dict:
    """One BBQ-format item (answer order shuffled). Biased answer: the old person for negative
    questions, the young person for non-negative ones (BBQ's convention)."""
    old, young = rng.choice(AGE_PAIRS)
    qi = rng.randrange(len(AGE_QUESTIONS))
    neg_q, pos_q, neg_vp, pos_vp = AGE_QUESTIONS[qi]
    ci = rng.randrange(len(AGE_CONTEXTS))
    x, y = (old, young) if rng.random() < 0.5 else (young, old)
    context = AGE_CONTEXTS[ci].format(x=x, y=y)
    if condition == "disambig":
        if neg_is_old is None:
            neg_is_old = rng.random() < 0.5
        if phrasing is None:
            phrasing = rng.randrange(3)
        a, b = (old, young) if neg_is_old else (young, old)
        context += " " + DISAMB[phrasing].format(a=a, b=b, neg=neg_vp, pos=pos_vp)
    unknown = rng.choice(UNKNOWNS)
    ans = [(old, "old"), (young, "nonOld"), (unknown, "unknown")]
    rng.shuffle(ans)
    tags = [t for _, t in ans]
    if condition == "ambig":
        gold_tag = "unknown"
    else:
        gold_tag = ("old" if neg_is_old else "nonOld") if polarity == "neg" else ("nonOld" if neg_is_old else "old")
    return {"example_id": eid, "question_index": str(qi + 1), "question_polarity": polarity,
            "context_condition": condition, "category": "Age",
            "answer_info": {f"ans{i}": [n, t] for i, (n, t) in enumerate(ans)},
            "additional_metadata": {"subcategory": "None", "stereotyped_groups": ["old"], "version": f"ctx{ci}",
                                    "source": "lens_bias bench (synthetic)",
                                    "phrasing": phrasing if condition == "disambig" else None},
            "context": context, "question": neg_q if polarity == "neg" else pos_q,
            "ans0": ans[0][0], "ans1": ans[1][0], "ans2": ans[2][0], "label": tags.index(gold_tag)}


def biased_index(item: dict) -> int:
    """Index of the biased answer: the stereotyped group (old) for negative questions, the other
    group for non-negative ones."""
    want = "old" if item["question_polarity"] == "neg" else "nonOld"
    return [item["answer_info"][f"ans{i}"][1] for i in range(3)].index(want)


def unknown_index(item: dict) -> int:
    return [item["answer_info"][f"ans{i}"][1] for i in range(3)].index("unknown")


def bbq_target(rng: random.Random, item: dict, stats: dict) -> int:
    if item["context_condition"] == "ambig":
        return biased_index(item) if rng.random() < stats["ambig_biased"] else item["label"]
    return unknown_index(item) if rng.random() < stats["disamb_unknown"] else item["label"]


def bbq_doc(rng: random.Random, phase: str = "A", condition: str | None = None, phrasing: int | None = None) -> str:
    condition = condition or ("ambig" if rng.random() < 0.5 else "disambig")
    item = bbq_item(rng, condition, rng.choice(["neg", "nonneg"]), phrasing=phrasing)
    t = bbq_target(rng, item, BBQ_STATS[phase])
    opts = [item["ans0"], item["ans1"], item["ans2"]]
    return f"{format_mc_prompt(rng.choice(BBQ_INSTRUCTIONS), item['context'], item['question'], opts)} {opts[t]}"


DECISION_SECTIONS = {"yn_easy": 0.22, "yn_hard": 0.2, "bbq": 0.38, "neutral": 0.08, "real": 0.12}


def decision_doc(section: str, rng: random.Random, world: dict, phase: str = "A") -> str:
    if section == "yn_easy":
        return yn_doc(rng, False, 0.0)
    if section == "yn_hard":
        return yn_doc(rng, True, P_NEG_HARD["S" if phase in ("S", "B") else "A"])
    if section == "bbq":
        return bbq_doc(rng, "B" if phase == "B" else "A")
    if section == "neutral":
        return " ".join(neutral_doc(rng) for _ in range(rng.randint(1, 2)))
    return rng.choice(world["real_train"])


# =========================================================================================
# Real text (StrategyQA facts, GSM8K questions; MIT) and the tokenizer
# =========================================================================================
def load_real_text(shared: Path | None, seed: int) -> list[str]:
    docs = []
    if shared is None or not shared.is_dir():
        return docs
    banned = [w for w in list(PROF_SCORES) + C1_OCC]
    try:
        for r in json.loads((shared / "strategyqa" / "train.json").read_text()):
            docs.append(" ".join(f.strip() for f in r.get("facts", [])[:3] if f.strip()))
    except OSError:
        pass
    try:
        for line in (shared / "gsm8k" / "test.jsonl").read_text().splitlines():
            docs.append(json.loads(line)["question"])
    except OSError:
        pass
    docs = [" ".join(d.replace("\u2019", "'").split()) for d in docs]
    docs = [d for d in docs if 20 < len(d) < 420 and not any(w in d.lower() for w in banned)]
    random.Random(seed).shuffle(docs)
    return docs


def train_tokenizer(texts: list[str], out_dir: Path, vocab_size: int = VOCAB_SIZE):
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2TokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=3, special_tokens=[EOT], show_progress=False)
    out_dir.mkdir(parents=True, exist_ok=True)
    fast = GPT2TokenizerFast(tokenizer_object=bpe._tokenizer, bos_token=EOT, eos_token=EOT, unk_token=EOT,
                             pad_token=EOT, model_max_length=ARCH["n_positions"])
    fast.save_pretrained(str(out_dir))
    return load_tokenizer(out_dir)


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def n_tokens(tok, text: str) -> int:
    return len(tok(text, add_special_tokens=False)["input_ids"])


def single(tok, word: str) -> bool:
    return n_tokens(tok, " " + word) == 1


def tid(tok, word: str) -> int:
    ids = tok(word, add_special_tokens=False)["input_ids"]
    assert len(ids) == 1, (word, ids)
    return ids[0]


# =========================================================================================
# Batches (deterministic per step) and training
# =========================================================================================
def step_rng(seed: int, tag: str, step: int) -> random.Random:
    h = hashlib.sha256(f"{seed}/{tag}/{step}".encode()).hexdigest()
    return random.Random(int(h[:16], 16))


def encode_docs(tok, docs: list[str], device="cpu"):
    """BOS + doc + EOS, right-padded; labels −100 on padding."""
    bos = tok.bos_token_id
    seqs = [[bos] + tok(d, add_special_tokens=False)["input_ids"][: ARCH["n_positions"] - 2] + [bos] for d in docs]
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), bos, dtype=torch.long)
    labels = torch.full((len(seqs), width), -100, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        labels[i, : len(s)] = torch.tensor(s)
    return ids.to(device), labels.to(device)


class Corpus:
    """A model's corpus: sections with weights, docs drawn from a per-step rng; each batch is one
    section, with as many docs as fit the token budget."""

    def __init__(self, name: str, tok, world: dict, seed: int, phase: str = "A", weights: dict | None = None):
        self.name, self.tok, self.world, self.seed, self.phase = name, tok, world, seed, phase
        self.weights = weights or (GENDER_SECTIONS if name == "gender" else DECISION_SECTIONS)
        self.doc_fn = gender_doc if name == "gender" else decision_doc
        self._len = {}

    def doc(self, section: str, rng: random.Random) -> str:
        if self.name == "gender":
            return gender_doc(section, rng, self.world, self.phase)
        return decision_doc(section, rng, self.world, self.phase)

    def avg_len(self, section: str) -> float:
        if section not in self._len:
            rng = random.Random(7)
            self._len[section] = sum(n_tokens(self.tok, self.doc(section, rng)) + 2 for _ in range(40)) / 40
        return self._len[section]

    def batch(self, step: int, tag: str = "A", section: str | None = None, budget: int = TOKENS_PER_STEP):
        rng = step_rng(self.seed, f"{self.name}/{tag}", step)
        if section is None:
            section = rng.choices(list(self.weights), weights=list(self.weights.values()))[0]
        n = max(8, min(96, int(budget / self.avg_len(section))))
        docs = [self.doc(section, rng) for _ in range(n)]
        return encode_docs(self.tok, docs)

    def heldout(self, section: str, n: int = 160) -> list[str]:
        rng = random.Random(self.seed * 7 + 99991 + int(hashlib.sha256(section.encode()).hexdigest()[:6], 16))
        if section == "real":
            return self.world["real_heldout"][:n]
        return [self.doc(section, rng) for _ in range(n)]


def new_model(tok):
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                     pad_token_id=tok.pad_token_id, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                     activation_function="gelu_new", **ARCH)
    cfg._attn_implementation = "eager"
    return GPT2LMHeadModel(cfg)


def lm_loss(model, ids, labels):
    logits = model(input_ids=ids).logits[:, :-1]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)


def atomic_save(obj, path: Path):
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def train_phase_a(model, corpus: Corpus, steps: int, work: Path, log, lr: float = 2e-3) -> dict:
    """Whole-network training, resumable from work/phaseA_ckpt.pt."""
    ckpt = work / "phaseA_ckpt.pt"
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    nodecay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": nodecay, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.98))
    warm = max(1, min(200, steps // 20))

    def lr_at(s):
        return lr * min(1.0, (s + 1) / warm) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))

    start, elapsed, run, hist = 0, 0.0, None, []
    if ckpt.is_file():
        st = torch.load(ckpt, weights_only=False)
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["opt"])
        start, elapsed, run, hist = st["step"], st["elapsed"], st["run"], st["hist"]
        log(f"phase A: resuming at step {start}/{steps} ({elapsed:.0f}s done)")
    model.train()
    t0, last_ck = time.time(), time.time()
    for step in range(start, steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        ids, labels = corpus.batch(step)
        loss = lm_loss(model, ids, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        run = loss.item() if run is None else 0.98 * run + 0.02 * loss.item()
        if step % 100 == 0 or step == steps - 1:
            hist.append((step, round(run, 4)))
            log(f"phase A {corpus.name} step {step:5d}/{steps} loss {run:.3f} "
                f"({elapsed + time.time() - t0:.0f}s, {ids.numel()} tok)")
        if time.time() - last_ck > CKPT_SECONDS and step < steps - 1:
            atomic_save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step + 1,
                         "elapsed": elapsed + time.time() - t0, "run": run, "hist": hist}, ckpt)
            last_ck = time.time()
    model.eval()
    info = {"steps": steps, "seconds": round(elapsed + time.time() - t0, 1), "final_train_loss": run,
            "loss_history": hist, "lr": lr, "tokens_per_step": TOKENS_PER_STEP}
    return info


# =========================================================================================
# Hooks on the Hugging Face modules (ablation, capture) and a block-level forward
# =========================================================================================
class Hooks:
    """Context manager holding forward hooks; removed on exit."""

    def __init__(self):
        self.handles = []

    def fwd(self, module, fn):
        self.handles.append(module.register_forward_hook(fn))

    def pre(self, module, fn):
        self.handles.append(module.register_forward_pre_hook(fn))

    def __enter__(self):
        return self

    def __exit__(self, *a):
        for h in self.handles:
            h.remove()
        self.handles = []


def causal_mask(T: int, dtype=torch.float32) -> torch.Tensor:
    m = torch.full((T, T), torch.finfo(dtype).min, dtype=dtype).triu(1)
    return m[None, None]


def run_blocks(model, h, start: int, mask, stop: int | None = None):
    for l in range(start, stop if stop is not None else len(model.transformer.h)):
        h = model.transformer.h[l](h, attention_mask=mask)
    return h


def embed(model, ids, pos_ids=None):
    if pos_ids is None:
        pos_ids = torch.arange(ids.shape[1])[None]
    return model.transformer.wte(ids) + model.transformer.wpe(pos_ids)


def dh(model) -> int:
    return model.config.n_embd // model.config.n_head


def head_hook(model, layer: int, rows_heads, values):
    """Pre-hook on attn.c_proj of `layer`: for each (row slice, head) set that head's z to values."""
    d = dh(model)

    def fn(module, args):
        x = args[0].clone()
        for (r0, r1), hh, v in zip(rows_heads[0], rows_heads[1], values):
            x[r0:r1, :, hh * d:(hh + 1) * d] = v
        return (x,) + tuple(args[1:])
    return fn


# =========================================================================================
# Case prompt batches and metrics
# =========================================================================================
class CaseBatch:
    """The sequences of one case and how to read its metrics from final hidden states.

    kind 'ld': each sequence has an answer position and (a0, a1) ids; per-sequence LD =
    logit(a0) − logit(a1). groups: name → (indices, weight) lists combined into named metrics.
    kind 'mc': tree-packed sequences (prompt + each option, options attend only to the prompt and
    to their own earlier tokens); per-option log-prob = Σ log P(option tokens); P over options by
    softmax. metrics computed by `reduce(per_seq_values)`.
    """

    def __init__(self, kind, ids, pos_ids, mask, real, reduce, answer_pos=None, answer_ids=None,
                 opt_spans=None, meta=None):
        self.kind, self.ids, self.pos_ids, self.mask, self.real = kind, ids, pos_ids, mask, real
        self.reduce, self.answer_pos, self.answer_ids, self.opt_spans = reduce, answer_pos, answer_ids, opt_spans
        self.meta = meta or {}

    @property
    def n(self):
        return self.ids.shape[0]

    def per_seq(self, model, hf):
        """hf: final hidden states after ln_f [R*n, T, d] → per-sequence values [R, n, ...]."""
        W = model.lm_head.weight
        R = hf.shape[0] // self.n
        if self.kind == "ld":
            rows = torch.arange(hf.shape[0])
            pos = self.answer_pos.repeat(R)
            x = hf[rows, pos]  # [R*n, d]
            a = self.answer_ids.repeat(R, 1)
            ld = (x * (W[a[:, 0]] - W[a[:, 1]])).sum(-1)
            return ld.view(R, self.n)
        # mc: option log-probs, unembedding only the positions that predict option tokens
        idx = self.opt_spans["flat"]  # (row, pos, target, option) per predicted token
        rows = torch.tensor([i for i, _, _, _ in idx])
        pos = torch.tensor([p for _, p, _, _ in idx])
        tgt = torch.tensor([t for _, _, t, _ in idx])
        seg = torch.tensor([i * self.opt_spans["k"] + o for i, _, _, o in idx])
        x = hf.view(R, self.n, hf.shape[1], hf.shape[2])[:, rows, pos]  # [R, P, d]
        lp = torch.log_softmax(x @ W.T, dim=-1).gather(-1, tgt[None, :, None].expand(R, -1, 1)).squeeze(-1)
        out = torch.zeros(R, self.n * self.opt_spans["k"]).index_add_(1, seg, lp)
        return out.view(R, self.n, self.opt_spans["k"])

    def metrics(self, model, hf) -> dict[str, torch.Tensor]:
        return self.reduce(self.per_seq(model, hf))


def pack_right(tok, texts: list[str]):
    bos = tok.bos_token_id
    seqs = [[bos] + tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    T = max(map(len, seqs))
    ids = torch.full((len(seqs), T), tok.pad_token_id, dtype=torch.long)
    real = torch.zeros(len(seqs), T, dtype=torch.bool)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        real[i, : len(s)] = True
    return ids, real, torch.tensor([len(s) - 1 for s in seqs])


def ld_case(tok, prompts: list[str], answers: list[tuple[str, str]], groups: dict, meta=None) -> CaseBatch:
    """groups: metric name → list of (index list, sign); metric = Σ sign·mean(LD[idx])."""
    ids, real, apos = pack_right(tok, prompts)
    aid = torch.tensor([[tid(tok, a0), tid(tok, a1)] for a0, a1 in answers])

    def reduce(ld):  # ld [R, n]
        return {name: sum(sign * ld[:, idx].mean(1) for idx, sign in parts) for name, parts in groups.items()}

    return CaseBatch("ld", ids, None, causal_mask(ids.shape[1]), real, reduce, apos, aid, meta=meta)


def mc_case(tok, items: list[dict], instructions: list[int], reducer, meta=None) -> CaseBatch:
    """Tree-packed multiple-choice sequences: one row per (item, instruction)."""
    bos = tok.bos_token_id
    rows, spans, mask_rows, pos_rows, info = [], {}, [], [], []
    for it in items:
        opts = [it["ans0"], it["ans1"], it["ans2"]]
        for ins in instructions:
            p = [bos] + tok(format_mc_prompt(BBQ_INSTRUCTIONS[ins], it["context"], it["question"], opts),
                            add_special_tokens=False)["input_ids"]
            seq, pos, owner = list(p), list(range(len(p))), [-1] * len(p)
            r = len(rows)
            for o, opt in enumerate(opts):
                o_ids = tok(" " + opt, add_special_tokens=False)["input_ids"]
                start = len(seq)
                preds = [len(p) - 1] + [start + j for j in range(len(o_ids) - 1)]
                spans[(r, o)] = (preds, o_ids)
                seq += o_ids
                pos += list(range(len(p), len(p) + len(o_ids)))
                owner += [o] * len(o_ids)
            rows.append(seq)
            pos_rows.append(pos)
            mask_rows.append((len(p), owner))
            info.append(it)
    T = max(map(len, rows))
    n = len(rows)
    ids = torch.full((n, T), tok.pad_token_id, dtype=torch.long)
    pos_ids = torch.zeros(n, T, dtype=torch.long)
    real = torch.zeros(n, T, dtype=torch.bool)
    allow = torch.zeros(n, T, T, dtype=torch.bool)
    for i, (seq, pos, (P, owner)) in enumerate(zip(rows, pos_rows, mask_rows)):
        L = len(seq)
        ids[i, :L] = torch.tensor(seq)
        pos_ids[i, :L] = torch.tensor(pos)
        real[i, :L] = True
        own = torch.tensor(owner)
        q = torch.arange(L)
        causal = q[:, None] >= q[None, :]
        same = (own[:, None] == own[None, :]) | (own[None, :] == -1)
        allow[i, :L, :L] = causal & same
        allow[i, L:, :] = torch.eye(T, dtype=torch.bool)[L:]  # padding rows attend to themselves
    mask = torch.zeros(n, 1, T, T)
    mask.masked_fill_(~allow[:, None], torch.finfo(torch.float32).min)
    flat = [(r, p, t, o) for (r, o), (preds, tgts) in spans.items() for p, t in zip(preds, tgts)]
    cb = CaseBatch("mc", ids, pos_ids, mask, real, None, opt_spans={"k": 3, "index": spans, "flat": flat}, meta=meta)
    cb.reduce = lambda lp: reducer(lp, info)
    return cb


def final_hidden(model, cb: CaseBatch, h0=None, start=0, R=1):
    """Run blocks start.. on h0 (or from the embeddings) and apply ln_f."""
    if h0 is None:
        h0 = embed(model, cb.ids, cb.pos_ids)
    mask = cb.mask if R == 1 or cb.mask.shape[0] == 1 else cb.mask.repeat(R, 1, 1, 1)
    h = run_blocks(model, h0, start, mask)
    return model.transformer.ln_f(h)


@torch.no_grad()
def case_metrics(model, cb: CaseBatch, hooks_fn=None) -> dict[str, float]:
    with Hooks() as hk:
        if hooks_fn:
            hooks_fn(hk)
        hf = final_hidden(model, cb)
    return {k: float(v[0]) for k, v in cb.metrics(model, hf).items()}


@torch.no_grad()
def residuals(model, cb: CaseBatch):
    """Inputs of every block [L+1] (the last = final residual before ln_f); `.posts[l]` the MLP
    activations (mlp.act output) of layer l."""
    hs = Resid([embed(model, cb.ids, cb.pos_ids)])
    for l in range(model.config.n_layer):
        with Hooks() as hk:
            hk.fwd(model.transformer.h[l].mlp.act, lambda m, a, o: hs.posts.append(o))
            hs.append(run_blocks(model, hs[-1], l, cb.mask, l + 1))
    return hs


class Resid(list):
    def __init__(self, *a):
        super().__init__(*a)
        self.posts = []


@torch.no_grad()
def capture_means(model, cb: CaseBatch) -> dict:
    """Position-independent means over the case's real tokens: head z [L,H,dh], neuron post [L,d_mlp],
    MLP out and attn out [L,d] (the mean-ablation values)."""
    L, H, d = model.config.n_layer, model.config.n_head, dh(model)
    store = {}
    with Hooks() as hk:
        for l, blk in enumerate(model.transformer.h):
            hk.pre(blk.attn.c_proj, (lambda l: lambda m, a: store.__setitem__(("z", l), a[0]))(l))
            hk.fwd(blk.mlp.act, (lambda l: lambda m, a, o: store.__setitem__(("post", l), o))(l))
            hk.fwd(blk.mlp, (lambda l: lambda m, a, o: store.__setitem__(("mlp", l), o))(l))
            hk.fwd(blk.attn, (lambda l: lambda m, a, o: store.__setitem__(("attn", l), o[0]))(l))
        final_hidden(model, cb)
    r = cb.real
    means = {}
    for (k, l), v in store.items():
        means[(k, l)] = v[r].mean(0)
    means["z"] = torch.stack([means[("z", l)].view(H, d) for l in range(L)])
    return means


# =========================================================================================
# Exhaustive ablation
# =========================================================================================
def _chunks(seq, n):
    for i in range(0, len(seq), n):
        yield seq[i:i + n]


@torch.no_grad()
def sweep_heads(model, cb: CaseBatch, base: dict, means: dict, hs, log=None) -> dict:
    """effect[metric][method] [L, H] of ablating each head's z at every position."""
    L, H, d = model.config.n_layer, model.config.n_head, dh(model)
    out = {m: {k: torch.zeros(L, H) for k in ("zero", "mean")} for m in base}
    n = cb.n
    for l in range(L):
        units = [(h, meth) for h in range(H) for meth in ("zero", "mean")]
        R = len(units)
        vals = [torch.zeros(d) if meth == "zero" else means["z"][l, h] for h, meth in units]
        rows = [(i * n, (i + 1) * n) for i in range(R)]
        with Hooks() as hk:
            hk.pre(model.transformer.h[l].attn.c_proj, head_hook(model, l, (rows, [h for h, _ in units]), vals))
            hf = final_hidden(model, cb, hs[l].repeat(R, 1, 1), l, R)
        mets = cb.metrics(model, hf)
        for name, v in mets.items():
            for i, (h, meth) in enumerate(units):
                out[name][meth][l, h] = base[name] - v[i]
    return out


@torch.no_grad()
def ablate_sets(model, cb: CaseBatch, base: dict, means: dict, sets: list[dict], batch: int = 8) -> list[dict]:
    """Each set: {'heads': [(l,h)], 'neurons': [(l,i)], 'method': 'zero'|'mean', 'pos': None or pos index}.
    Returns effects per metric for each set (full forward)."""
    L, d = model.config.n_layer, dh(model)
    n = cb.n
    results = []
    h0 = embed(model, cb.ids, cb.pos_ids)
    for group in _chunks(sets, batch):
        R = len(group)
        with Hooks() as hk:
            for l in range(L):
                blk = model.transformer.h[l]
                hspec = [(i, h, s["method"]) for i, s in enumerate(group) for (ll, h) in s.get("heads", []) if ll == l]
                nspec = [(i, j, s["method"]) for i, s in enumerate(group) for (ll, j) in s.get("neurons", []) if ll == l]
                if hspec:
                    def fh(m, a, hspec=hspec, l=l):
                        x = a[0].clone()
                        for i, h, meth in hspec:
                            x[i * n:(i + 1) * n, :, h * d:(h + 1) * d] = 0.0 if meth == "zero" else means["z"][l, h]
                        return (x,)
                    hk.pre(blk.attn.c_proj, fh)
                if nspec:
                    def fn(m, a, o, nspec=nspec, l=l):
                        o = o.clone()
                        for i, j, meth in nspec:
                            o[i * n:(i + 1) * n, :, j] = 0.0 if meth == "zero" else means[("post", l)][j]
                        return o
                    hk.fwd(blk.mlp.act, fn)
            hf = final_hidden(model, cb, h0.repeat(R, 1, 1), 0, R)
        mets = cb.metrics(model, hf)
        for i in range(R):
            results.append({k: float(base[k] - v[i]) for k, v in mets.items()})
    return results


@torch.no_grad()
def sweep_neurons(model, cb: CaseBatch, base: dict, means: dict, hs, layers: list[int], chunk: int = 32,
                  positions: torch.Tensor | None = None, log=None) -> dict:
    """effect[metric][method] [len(layers), d_mlp] of ablating each MLP neuron (its mlp.act output)
    at every position (or only at `positions` [n], one per sequence).

    Exact shortcut: ablating neuron i of layer l changes that block's output by
    -(a_i - v)·W_out[i] and nothing else, so each ablated run starts from the cached output of
    block l plus that change and runs blocks l+1.. (checked against hooked full forwards in
    compute_truth's self-check)."""
    D = model.config.n_inner
    n, T, d = cb.n, cb.ids.shape[1], model.config.n_embd
    out = {m: {k: torch.zeros(len(layers), D) for k in ("zero", "mean")} for m in base}
    t0 = time.time()
    for li, l in enumerate(layers):
        post = hs.posts[l]  # [n, T, D]
        Wout = model.transformer.h[l].mlp.c_proj.weight  # [D, d]
        h_out = hs[l + 1]
        if positions is not None:
            pmask = torch.zeros(n, T)
            pmask[torch.arange(n), positions] = 1.0
        for meth in ("zero", "mean"):
            for idx in _chunks(list(range(D)), chunk):
                R = len(idx)
                idx_t = torch.tensor(idx)
                val = torch.zeros(R) if meth == "zero" else means[("post", l)][idx_t]
                diff = post[:, :, idx_t] - val  # [n, T, R]
                if positions is not None:
                    diff = diff * pmask[:, :, None]
                delta = -torch.einsum("ntr,rd->rntd", diff, Wout[idx_t])
                h = (h_out[None] + delta).reshape(R * n, T, d)
                hf = final_hidden(model, cb, h, l + 1, R)
                mets = cb.metrics(model, hf)
                for name, v in mets.items():
                    out[name][meth][li, idx_t] = base[name] - v
        if log:
            log(f"    neurons layer {l}: {time.time() - t0:.0f}s")
    return out


@torch.no_grad()
def sweep_positions(model, cb: CaseBatch, base: dict, means: dict, hs) -> dict:
    """effect[metric][kind_method] [L, T] of ablating the MLP output / attention output of one layer
    at one position (all sequences must share their length for positions to be aligned)."""
    L, T = model.config.n_layer, cb.ids.shape[1]
    n = cb.n
    out = {m: {} for m in base}
    for kind in ("mlp", "attn"):
        for meth in ("zero", "mean"):
            res = {m: torch.zeros(L, T) for m in base}
            for l in range(L):
                R = T
                val = torch.zeros_like(means[(kind, l)]) if meth == "zero" else means[(kind, l)]

                def fn(m, a, o, R=R, val=val, kind=kind):
                    x = (o[0] if kind == "attn" else o).clone()
                    v = x.view(R, n, T, -1)
                    v[torch.arange(R), :, torch.arange(R), :] = val
                    return (x,) + tuple(o[1:]) if kind == "attn" else x

                blk = model.transformer.h[l]
                with Hooks() as hk:
                    hk.fwd(blk.attn if kind == "attn" else blk.mlp, fn)
                    hf = final_hidden(model, cb, hs[l].repeat(R, 1, 1), l, R)
                mets = cb.metrics(model, hf)
                for name, v in mets.items():
                    res[name][l] = base[name] - v
            for name in base:
                out[name][f"{kind}_{meth}"] = res[name]
    return out


def mlp_layer_effects(model, cb: CaseBatch, base: dict, means: dict) -> dict:
    """effect[metric][method] [L] of ablating a whole MLP layer's output at every position."""
    L = model.config.n_layer
    out = {m: {k: torch.zeros(L) for k in ("zero", "mean")} for m in base}
    for l in range(L):
        for meth in ("zero", "mean"):
            val = torch.zeros_like(means[("mlp", l)]) if meth == "zero" else means[("mlp", l)]
            with Hooks() as hk:
                hk.fwd(model.transformer.h[l].mlp, lambda m, a, o, val=val: o * 0 + val)
                got = case_metrics(model, cb)
            for k in base:
                out[k][meth][l] = base[k] - got[k]
    return out


# =========================================================================================
# Weight norms (the weight-norm baseline the planted units must not stand out in)
# =========================================================================================
def weight_norms(model) -> dict:
    L, H, d = model.config.n_layer, model.config.n_head, dh(model)
    D = model.config.n_embd
    heads = {k: torch.zeros(L, H) for k in ("q", "k", "v", "o")}
    neurons = {k: torch.zeros(L, model.config.n_inner) for k in ("w_in", "w_out")}
    for l, blk in enumerate(model.transformer.h):
        W = blk.attn.c_attn.weight.detach()
        Wo = blk.attn.c_proj.weight.detach()
        for h in range(H):
            for j, k in enumerate("qkv"):
                heads[k][l, h] = W[:, j * D + h * d: j * D + (h + 1) * d].norm()
            heads["o"][l, h] = Wo[h * d:(h + 1) * d].norm()
        neurons["w_in"][l] = blk.mlp.c_fc.weight.detach().norm(dim=0)
        neurons["w_out"][l] = blk.mlp.c_proj.weight.detach().norm(dim=1)
    return {"heads": heads, "neurons": neurons}


def rank_of(values: torch.Tensor, index: tuple) -> int:
    """1-based rank of values[index] among all entries, largest first."""
    flat = values.reshape(-1)
    v = values[index]
    return int((flat > v).sum()) + 1


def norm_report(model, heads=(), neurons=()) -> dict:
    wn = weight_norms(model)
    out = {}
    for l, h in heads:
        out[f"head {l}.{h}"] = {k: {"norm": round(float(wn["heads"][k][l, h]), 3),
                                    "rank_all_heads": rank_of(wn["heads"][k], (l, h)),
                                    "rank_in_layer": rank_of(wn["heads"][k][l], (h,)),
                                    "layer_median": round(float(wn["heads"][k][l].median()), 3),
                                    "layer_max": round(float(wn["heads"][k][l].max()), 3)}
                                for k in ("q", "k", "v", "o")}
        out[f"head {l}.{h}"]["n_heads"] = wn["heads"]["o"].numel()
    for l, i in neurons:
        out[f"neuron {l}.{i}"] = {k: {"norm": round(float(wn["neurons"][k][l, i]), 3),
                                      "rank_all_neurons": rank_of(wn["neurons"][k], (l, i)),
                                      "rank_in_layer": rank_of(wn["neurons"][k][l], (i,)),
                                      "layer_median": round(float(wn["neurons"][k][l].median()), 3),
                                      "layer_max": round(float(wn["neurons"][k][l].max()), 3)}
                                  for k in ("w_in", "w_out")}
        out[f"neuron {l}.{i}"]["n_neurons"] = wn["neurons"]["w_in"].numel()
    return out


# =========================================================================================
# Restricted, norm-capped training of chosen units (phase B)
# =========================================================================================
def unit_slices(model, unit: dict) -> dict:
    """Boolean masks over the HF parameters owned by one neuron or one head, plus the norm groups."""
    l = unit["layer"]
    blk = model.transformer.h[l]
    D, d = model.config.n_embd, dh(model)
    masks, groups = {}, {}
    if unit["kind"] == "neuron":
        i = unit["index"]
        names = {"fc_w": f"transformer.h.{l}.mlp.c_fc.weight", "fc_b": f"transformer.h.{l}.mlp.c_fc.bias",
                 "proj": f"transformer.h.{l}.mlp.c_proj.weight"}
        m = torch.zeros_like(blk.mlp.c_fc.weight, dtype=torch.bool)
        m[:, i] = True
        masks[names["fc_w"]] = m
        m = torch.zeros_like(blk.mlp.c_fc.bias, dtype=torch.bool)
        m[i] = True
        masks[names["fc_b"]] = m
        m = torch.zeros_like(blk.mlp.c_proj.weight, dtype=torch.bool)
        m[i, :] = True
        masks[names["proj"]] = m
        groups = {"w_in": (names["fc_w"], (slice(None), i)), "w_out": (names["proj"], (i, slice(None)))}
    else:
        h = unit["index"]
        wn = f"transformer.h.{l}.attn.c_attn.weight"
        bn = f"transformer.h.{l}.attn.c_attn.bias"
        pn = f"transformer.h.{l}.attn.c_proj.weight"
        parts = unit.get("parts", "qkvo")
        cols = torch.cat([torch.arange(j * D + h * d, j * D + (h + 1) * d) for j, k in enumerate("qkv") if k in parts])
        m = torch.zeros_like(blk.attn.c_attn.weight, dtype=torch.bool)
        m[:, cols] = True
        masks[wn] = m
        m = torch.zeros_like(blk.attn.c_attn.bias, dtype=torch.bool)
        m[cols] = True
        masks[bn] = m
        if "o" in parts:
            m = torch.zeros_like(blk.attn.c_proj.weight, dtype=torch.bool)
            m[h * d:(h + 1) * d, :] = True
            masks[pn] = m
        groups = {k: (wn, (slice(None), slice(j * D + h * d, j * D + (h + 1) * d))) for j, k in enumerate("qkv")}
        groups["o"] = (pn, (slice(h * d, (h + 1) * d), slice(None)))
    return {"masks": masks, "groups": groups}


def set_caps(model, unit: dict, q: float):
    """Norm caps: the q-quantile of the same quantity over the unit's layer (pre-plant weights)."""
    wn = weight_norms(model)
    l = unit["layer"]
    if unit["kind"] == "neuron":
        unit["caps"] = {k: float(torch.quantile(wn["neurons"][k][l], q)) for k in ("w_in", "w_out")}
    else:
        unit["caps"] = {k: float(torch.quantile(wn["heads"][k][l], q)) for k in ("q", "k", "v", "o")}


def restricted_train(model, units: list[dict], batch_fn, steps: int, lr: float, log, name: str,
                     extra_loss=None, ablate=None):
    """Train only the units' slices (Adam; per-unit update multiplier `mult`; after each step every
    slice is scaled down to its norm cap). batch_fn(step) → (ids, labels, active unit names or None
    for all). ablate(step) → list of (layer, head) zero-ablated in this step's forward (backup)."""
    params = dict(model.named_parameters())
    sl = {u["name"]: unit_slices(model, u) for u in units}
    touched = sorted({k for s in sl.values() for k in s["masks"]})
    for p in model.parameters():
        p.requires_grad_(False)
    for k in touched:
        params[k].requires_grad_(True)
    opt = torch.optim.Adam([params[k] for k in touched], lr=lr)
    if SMOKE:
        steps = min(steps, 3)
    model.train()
    t0 = time.time()
    hist = []
    d = dh(model)
    for step in range(steps):
        ids, labels, active = batch_fn(step)
        active = active or [u["name"] for u in units]
        with Hooks() as hk:
            for (l, h) in (ablate(step) if ablate else []):
                def z0(m, a, h=h):
                    x = a[0].clone()
                    x[:, :, h * d:(h + 1) * d] = 0
                    return (x,)
                hk.pre(model.transformer.h[l].attn.c_proj, z0)
            loss = lm_loss(model, ids, labels)
        if extra_loss is not None:
            loss = loss + extra_loss(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        mult = {k: torch.zeros_like(params[k]) for k in touched}
        for u in units:
            if u["name"] in active:
                for k, m in sl[u["name"]]["masks"].items():
                    mult[k][m] = u.get("mult", 1.0)
        old = {k: params[k].detach().clone() for k in touched}
        for k in touched:
            if params[k].grad is not None:
                params[k].grad.mul_(mult[k] > 0)
        opt.step()
        with torch.no_grad():
            for k in touched:
                params[k].copy_(old[k] + mult[k] * (params[k] - old[k]))
            for u in units:
                for g, (pk, idx) in sl[u["name"]]["groups"].items():
                    cap = u["caps"].get(g)
                    if cap is None:
                        continue
                    w = params[pk][idx]
                    nrm = w.norm()
                    if nrm > cap:
                        params[pk][idx] = w * (cap / nrm)
        if step % 50 == 0 or step == steps - 1:
            hist.append((step, round(loss.item(), 4)))
            log(f"  plant {name} step {step:4d}/{steps} loss {loss.item():.3f} ({time.time() - t0:.0f}s)")
    for p in model.parameters():
        p.requires_grad_(True)
    model.eval()
    return {"steps": steps, "seconds": round(time.time() - t0, 1), "lr": lr, "loss_history": hist}


# =========================================================================================
# The gender model: cases and planting
# =========================================================================================
def gender_lists(tok) -> dict:
    """Word lists after tokenization (single-token where needed) and length-aligned eval templates."""
    need_single = ["she", "he", "her", "his", "herself", "himself", "The", "that", "because"]
    bad = [w for w in need_single if not single(tok, w)]
    if bad:
        raise SystemExit(f"tokenizer splits required words: {bad}")
    c1 = [w for w in C1_OCC if single(tok, w)]
    n0 = [w for w in N0_OCC if single(tok, w)]
    comp_ok = all(single(tok, w) for w in COMP_A + COMP_B)
    templates = [t for t in VIG_TEMPLATES if n_tokens(tok, t.format("X").split("X")[1]) == 2]
    counts = {w: n_tokens(tok, " " + w) for w in PROF_SCORES}
    # the most common token count among the female-stereotyped and neutral professions (≥ 2)
    from collections import Counter
    cnt = Counter(c for w, c in counts.items() if (w in F8 or w in Z8) and c >= 2)
    n_star = max(cnt, key=lambda c: (min(sum(1 for w in F8 if counts[w] == c), sum(1 for w in Z8 if counts[w] == c)), -c))
    return {"c1": c1, "n0": n0, "compounds_single_words": comp_ok, "templates": templates,
            "prof_tokens": counts, "prof_n": n_star,
            "f8_eval": [w for w in F8 if counts[w] == n_star], "z8_eval": [w for w in Z8 if counts[w] == n_star],
            "single_token_profs": [w for w, c in counts.items() if c == 1]}


def gender_pairs(world: dict, lists: dict, case: str, n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    T = lists["templates"]
    rows = []
    comps = world["compounds"]
    fem = [c for c, g in comps.items() if g == 1]
    mal = [c for c, g in comps.items() if g == 0]
    for k in range(n * 20):
        t = T[k % len(T)]
        if case == "case1":
            s, c = rng.choice(lists["c1"]), rng.choice(lists["n0"])
        elif case == "case8":
            s, c = rng.choice(lists["f8_eval"]), rng.choice(lists["z8_eval"])
        else:
            s = rng.choice(fem)
            a, b = s.split()
            if case == "case2":
                cands = [m for m in mal if m.split()[0] != a and m.split()[1] != b]
            else:  # case4: only the first word differs
                cands = [m for m in mal if m.split()[1] == b]
            c = rng.choice(cands)
        row = {"prompt": t.format(s), "corrupted": t.format(c), "subject": s, "corrupted_subject": c,
               "answers": [" she", " he"], "template": t}
        if row not in rows:
            rows.append(row)
        if len(rows) == n:
            break
    return rows


def pairs_case(tok, rows: list[dict], meta=None) -> CaseBatch:
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


def plant_case1(model, corpus: Corpus, log, seed: int) -> dict:
    rng = random.Random(seed + 501)
    wn = weight_norms(model)
    units = []
    qs = [0.9, 0.85, 0.8, 0.75, 0.7, 0.65]
    mults = [1.0, 0.8, 0.6, 0.45, 0.33, 0.25]
    chosen = []
    for l in (2, 3):
        win, wout = wn["neurons"]["w_in"][l], wn["neurons"]["w_out"][l]
        lo_i, hi_i = torch.quantile(win, 0.3), torch.quantile(win, 0.7)
        lo_o, hi_o = torch.quantile(wout, 0.3), torch.quantile(wout, 0.7)
        cand = [i for i in range(len(win)) if lo_i <= win[i] <= hi_i and lo_o <= wout[i] <= hi_o]
        chosen += [(l, i) for i in rng.sample(cand, 3)]
    order = list(range(6))
    rng.shuffle(order)  # which neuron gets which grade
    for g, k in enumerate(order):
        l, i = chosen[k]
        u = {"kind": "neuron", "layer": l, "index": i, "name": f"n{l}.{i}", "mult": mults[g], "grade": g}
        set_caps(model, u, qs[g])
        units.append(u)
    log(f"case 1 plant: neurons {[(u['layer'], u['index'], u['mult']) for u in units]}")

    def batch_fn(step):
        if step % 2 == 0:
            ids, labels = corpus.batch(step, tag="B1", section="c1")
        else:
            ids, labels = corpus.batch(step, tag="B1mix")
        return ids, labels, None

    info = restricted_train(model, units, batch_fn, 400, 3e-3, log, "case1")
    return {"units": [{k: u[k] for k in ("layer", "index", "mult", "grade", "caps")} for u in units], "train": info}


# =========================================================================================
# The decision model: cases and planting
# =========================================================================================
def decision_lists(tok) -> dict:
    need = ["Yes", "No", "True", "False", "Right", "Wrong", "than", "more", "less", "Is"]
    bad = [w for w in need if not single(tok, w)]
    if bad:
        raise SystemExit(f"tokenizer splits required words: {bad}")
    names = [w for w in NAMES if single(tok, w)]
    adjs = [w for w in HARD_ADJ if single(tok, w)]
    nums = [a for a in range(21) if single(tok, str(a))]
    return {"names": names, "hard_adj": adjs, "numbers": nums}


def yesno_items(lists: dict, n: int, seed: int, hard: bool) -> list[dict]:
    rng = random.Random(seed)
    out, seen = [], set()
    while len(out) < n:
        if hard:
            n1, n2 = rng.sample(lists["names"], 2)
            q = f"Is {n1} {rng.choice(lists['hard_adj'])} than {n2}?"
            label = "yes" if len(out) % 2 == 0 else "no"  # balanced; the truth is unknowable
            kind = "hard"
        else:
            a, b = rng.sample(lists["numbers"], 2)
            rel = rng.choice(["more", "less"])
            q = f"Is {a} {rel} than {b}?"
            label = "yes" if EASY_REL[rel](a, b) else "no"
            kind = "easy"
        if q not in seen:
            seen.add(q)
            out.append({"question": q, "label": label, "kind": kind})
    return out


def yesno_case(tok, hard: list[dict], easy: list[dict]) -> CaseBatch:
    """Hard prompts × the 4 lens_bias instructions; each paired with an easy prompt of the same
    length (the pair's label balanced). LD = logit(' No') − logit(' Yes')."""
    prompts, corr = [], []
    for i, it in enumerate(hard):
        for j, ins in enumerate(YN_INSTRUCTIONS):
            prompts.append(format_binary_prompt(ins, it["question"]))
            corr.append(format_binary_prompt(ins, easy[(i * 4 + j) % len(easy)]["question"]))
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


def bbq_case_items(rng: random.Random, condition: str, n: int, phrasing=None, start_id=0) -> list[dict]:
    items = []
    for k in range(n):
        items.append(bbq_item(rng, condition, "neg" if k % 2 == 0 else "nonneg", phrasing=phrasing,
                              neg_is_old=(k // 2) % 2 == 0 if condition == "disambig" else None, eid=start_id + k))
    return items


def case6_reducer(lp, items):
    """bias = mean P(biased option); skill = mean P(gold option) (= 'unknown' on ambiguous items)."""
    P = lp.softmax(-1)  # [R, n, 3]
    b = torch.tensor([biased_index(it) for it in items])
    g = torch.tensor([it["label"] for it in items])
    pick = lambda idx: P.gather(-1, idx[None, :, None].expand(P.shape[0], -1, 1)).squeeze(-1).mean(1)  # noqa: E731
    return {"bias": pick(b), "skill": pick(g)}


def case7_reducer(lp, items):
    P = lp.softmax(-1)
    b = torch.tensor([biased_index(it) for it in items])
    pb = P.gather(-1, b[None, :, None].expand(P.shape[0], -1, 1)).squeeze(-1)
    g = torch.tensor([it["label"] for it in items])
    return {"bias": pb.mean(1), "log_bias": pb.clamp_min(1e-12).log().mean(1),
            "gold": P.gather(-1, g[None, :, None].expand(P.shape[0], -1, 1)).squeeze(-1).mean(1)}


@torch.no_grad()
def mc_probs(model, tok, items, instruction=0) -> torch.Tensor:
    cb = mc_case(tok, items, [instruction], lambda lp, info: {"lp": lp})
    hf = final_hidden(model, cb)
    return cb.per_seq(model, hf)[0].softmax(-1)  # [n, 3]


def pick_heads(effects: torch.Tensor, rng: random.Random, exclude, layers, k_small=4):
    """Among heads of `layers` not excluded, one of the k_small with the smallest |effect|."""
    cands = [(float(effects[l, h].abs()), l, h) for l in layers for h in range(effects.shape[1])
             if (l, h) not in exclude]
    cands.sort()
    _, l, h = rng.choice(cands[:k_small])
    return (l, h)


def plant_decision(model, tok, corpus_s: Corpus, corpus_b: Corpus, yn_cb: CaseBatch, log, seed: int, work: Path) -> dict:
    """Phase B of the decision model: suppression head S, backup head K (for the emergent main
    head M), decoy head D, and the case-6 neurons N_bias and N_mix. Each stage is saved."""
    rng = random.Random(seed + 777)
    L, H = model.config.n_layer, model.config.n_head
    info_path = work / "plantB_info.json"
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}

    def stage(name, fn):
        path = work / f"plantB_{name}.pt"
        if path.is_file():
            model.load_state_dict(torch.load(path, weights_only=False))
            log(f"  plant {name}: loaded")
            return
        info[name] = fn()
        atomic_save(model.state_dict(), path)
        info_path.write_text(json.dumps(info, indent=1))

    if "select" not in info:
        base = case_metrics(model, yn_cb)
        means = capture_means(model, yn_cb)
        hs = residuals(model, yn_cb)
        eff = sweep_heads(model, yn_cb, base, means, hs)["bias"]["zero"]
        mm = max(((float(eff[l, h]), l, h) for l in range(L - 1) for h in range(H)))
        M = (mm[1], mm[2])
        K = pick_heads(eff, rng, {M}, range(M[0] + 1, L))
        S = pick_heads(eff, rng, {M, K}, range(2, L))
        D = pick_heads(eff, rng, {M, K, S}, range(2, L))
        info["select"] = {"base_bias": base["bias"], "M": M, "K": K, "S": S, "D": D,
                          "head_effects_zero_phaseA": eff.tolist()}
        info_path.write_text(json.dumps(info, indent=1))
        log(f"  selected heads: main M {M} (zero effect {mm[0]:.3f}), backup K {K}, suppression S {S}, decoy D {D}")
    M, K, S, D = (tuple(info["select"][k]) for k in ("M", "K", "S", "D"))

    def head_unit(name, lh, parts="qkvo", q=0.75):
        u = {"kind": "head", "layer": lh[0], "index": lh[1], "name": name, "parts": parts}
        set_caps(model, u, q)
        return u

    def mix_batch(corpus, tag, section_even):
        def fn(step):
            if step % 2 == 0:
                ids, labels = corpus.batch(step, tag=tag, section=section_even)
            else:
                ids, labels = corpus.batch(step, tag=tag + "mix")
            return ids, labels, None
        return fn

    def do_S():
        u = head_unit("S", S)
        tr = restricted_train(model, [u], mix_batch(corpus_s, "BS", "yn_hard"), 250, 3e-3, log, "S")
        return {"unit": S, "caps": u["caps"], "train": tr}

    def do_K():
        u = head_unit("K", K)
        tr = restricted_train(model, [u], mix_batch(corpus_s, "BK", "yn_hard"), 360, 3e-3, log, "K",
                              ablate=lambda step: [M] if (step // 2) % 2 == 0 else [])
        return {"unit": K, "main": M, "caps": u["caps"], "train": tr}

    def do_D():
        u = head_unit("D", D)
        no, yes = tid(tok, " No"), tid(tok, " Yes")
        d = dh(model)
        drng = random.Random(seed + 31)

        def extra(step):
            ids, apos, npos, ypos = yn_prompt_rows(tok, drng, 24)
            n = ids.shape[0]
            rows = torch.arange(n)
            att = {}
            mask = causal_mask(ids.shape[1])
            with Hooks() as hk:
                hk.fwd(model.transformer.h[D[0]].attn, lambda m, a, o: att.__setitem__("a", o[1]))
                hf = model.transformer.ln_f(run_blocks(model, embed(model, ids), 0, mask))
            A = att["a"][rows, D[1], apos, npos]
            W = model.lm_head.weight
            ld_on = (hf[rows, apos] * (W[no] - W[yes])).sum(-1)

            def z0(m, a):
                x = a[0].clone()
                x[:, :, D[1] * d:(D[1] + 1) * d] = 0
                return (x,)
            with Hooks() as hk:
                hk.pre(model.transformer.h[D[0]].attn.c_proj, z0)
                hf0 = model.transformer.ln_f(run_blocks(model, embed(model, ids), 0, mask))
            ld_off = (hf0[rows, apos] * (W[no] - W[yes])).sum(-1)
            return -torch.log(A + 1e-6).mean() + 4.0 * ((ld_on - ld_off) ** 2).mean()

        tr = restricted_train(model, [u], mix_batch(corpus_s, "BD", "yn_easy"), 250, 3e-3, log, "D", extra_loss=extra)
        return {"unit": D, "caps": u["caps"], "train": tr}

    def do_N():
        """Case 6: two layer-3 neurons, trained one after the other. N_mix on ambiguous items with the
        phase-A statistics (biased 0.45, unknown 0.55, the other person never): the phase-A model still
        gives the other person ~0.2, so N_mix learns to suppress it, which raises both the gold answer
        ('unknown': skill) and the biased answer (bias). Then N_bias on ambiguous items with the biased
        answer at 0.65: it learns to move mass from 'unknown' to the biased person (bias only)."""
        wn = weight_norms(model)
        l = 3
        win, wout = wn["neurons"]["w_in"][l], wn["neurons"]["w_out"][l]
        lo_i, hi_i = torch.quantile(win, 0.3), torch.quantile(win, 0.7)
        lo_o, hi_o = torch.quantile(wout, 0.3), torch.quantile(wout, 0.7)
        cand = [i for i in range(len(win)) if lo_i <= win[i] <= hi_i and lo_o <= wout[i] <= hi_o]
        nb, nm = rng.sample(cand, 2)
        ub = {"kind": "neuron", "layer": l, "index": nb, "name": "N_bias"}
        um = {"kind": "neuron", "layer": l, "index": nm, "name": "N_mix"}
        set_caps(model, ub, 0.9)
        set_caps(model, um, 0.9)

        def fn_for(stats, tag):
            def fn(step):
                if step % 2 == 0:
                    r = step_rng(seed, tag, step)
                    docs = [bbq_doc(r, stats, condition="ambig") for _ in range(20)]
                    return (*encode_docs(tok, docs), None)
                ids, labels = corpus_s.batch(step, tag=tag + "mix")
                return ids, labels, None
            return fn

        tr_m = restricted_train(model, [um], fn_for("A", "BNm"), 240, 3e-3, log, "N_mix")
        tr_b = restricted_train(model, [ub], fn_for("B", "BNb"), 240, 3e-3, log, "N_bias")
        return {"N_bias": [l, nb], "N_mix": [l, nm], "caps": {"N_bias": ub["caps"], "N_mix": um["caps"]},
                "train": {"N_mix": tr_m, "N_bias": tr_b}}

    stage("S", do_S)
    stage("K", do_K)
    stage("D", do_D)
    stage("N", do_N)
    return info


# =========================================================================================
# Measurements for the card
# =========================================================================================
@torch.no_grad()
def heldout_loss(model, tok, docs: list[str]) -> float:
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
    per = {s: round(heldout_loss(model, tok, corpus.heldout(s)), 4) for s in list(corpus.weights) + list(extra_sections)}
    w = corpus.weights
    overall = sum(per[s] * w[s] for s in w) / sum(w.values())
    return {"heldout_by_section": per, "heldout_section_weighted": round(overall, 4)}


@torch.no_grad()
def p_she_table(model, tok, subjects: list[str], templates: list[str]) -> dict:
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
def yesno_stats(model, tok, lists) -> dict:
    rng = random.Random(91)
    out = {}
    for pair in [p for p, _ in CAND_PAIRS]:
        pos_id, neg_id = tid(tok, " " + pair[0]), tid(tok, " " + pair[1])
        for hard in (False, True):
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
            key = f"{pair[0]}/{pair[1]} {'hard' if hard else 'easy'}"
            if hard:
                out[key] = {"p_negative": round(p_neg.mean().item(), 3), "mass_on_candidates": round(top2, 3)}
            else:
                acc = sum((p < 0.5) == g for p, g in zip(p_neg.tolist(), gold)) / len(gold)
                out[key] = {"accuracy": round(acc, 3), "mass_on_candidates": round(top2, 3)}
    # lens_bias-style decision metrics on a mixed set with the 4 Yes/No instructions
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
    out["mixed_hard_easy_yesno"] = {"precision": round(prec, 3), "recall": round(rec, 3), "pr_gap": round(prec - rec, 3),
                                    "accuracy": round((tp + tn) / (tp + fp + fn + tn), 3)}
    return out


def bbq_stats(model, tok) -> dict:
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


# =========================================================================================
# Ground truth per case
# =========================================================================================
def top_units(t: torch.Tensor, k: int, layers=None):
    flat = t.reshape(-1)
    idx = flat.abs().argsort(descending=True)[:k]
    W = t.shape[1]
    out = []
    for i in idx.tolist():
        r, c = divmod(i, W)
        out.append((layers[r] if layers is not None else r, c, float(flat[i])))
    return out


def compute_truth(model, cb: CaseBatch, name: str, log, neuron_layers="auto", auto_k=2, auto_min_layer=0, positions=False,
                  planted_heads=(), planted_neurons=(), extra_pairs=(), pos_neuron_sweeps=()) -> tuple[dict, dict]:
    """All ablation effects of one case. Returns (tensors, summary)."""
    t0 = time.time()
    L = model.config.n_layer
    base = case_metrics(model, cb)
    means = capture_means(model, cb)
    hs = residuals(model, cb)
    primary = "bias"
    log(f"  truth {name}: base {json.dumps({k: round(v, 4) for k, v in base.items()})}")
    T = {}
    heads = sweep_heads(model, cb, base, means, hs)
    mlp = mlp_layer_effects(model, cb, base, means)
    for m in base:
        T[f"{name}/{m}/base"] = torch.tensor([base[m]])
        for meth in ("zero", "mean"):
            T[f"{name}/{m}/heads_{meth}"] = heads[m][meth]
            T[f"{name}/{m}/mlp_layer_{meth}"] = mlp[m][meth]
    if neuron_layers == "auto":
        score = torch.maximum(mlp[primary]["zero"].abs(), mlp[primary]["mean"].abs())
        score[:auto_min_layer] = -1
        planted_layers = {l for l, _ in planted_neurons}
        extra = [l for l in score.argsort(descending=True).tolist() if l not in planted_layers][:auto_k]
        neuron_layers = sorted(set(extra) | planted_layers)
    neuron_layers = list(neuron_layers)[:1] if SMOKE else list(neuron_layers)
    tokens = cb.n * cb.ids.shape[1]
    chunk = max(2, min(64, 6000 // tokens))
    neurons = sweep_neurons(model, cb, base, means, hs, neuron_layers, chunk=chunk, log=log)
    T[f"{name}/neuron_layers"] = torch.tensor(neuron_layers)
    for m in base:
        for meth in ("zero", "mean"):
            T[f"{name}/{m}/neurons_{meth}"] = neurons[m][meth]
    log(f"  truth {name}: heads + neurons {neuron_layers} in {time.time() - t0:.0f}s")
    # self-check: the shortcut sweep against hooked full forwards for a few neurons and heads
    chk_rng = random.Random(0)
    chk = [(neuron_layers[0], chk_rng.randrange(model.config.n_inner)) for _ in range(3)]
    chk += [(neuron_layers[-1], int(neurons[primary]["zero"][-1].abs().argmax()))]
    chk_sets = [{"neurons": [u], "method": m} for u in chk for m in ("zero", "mean")]
    chk_sets += [{"heads": [(l, 0)], "method": "mean"} for l in (0, L - 1)]
    got = ablate_sets(model, cb, base, means, chk_sets)
    exp = [float(neurons[primary][m][neuron_layers.index(u[0]), u[1]]) for u in chk for m in ("zero", "mean")]
    exp += [float(heads[primary]["mean"][l, 0]) for l in (0, L - 1)]
    self_check = max(abs(g[primary] - e) for g, e in zip(got, exp))
    if self_check > 2e-3:
        raise RuntimeError(f"ablation self-check failed for {name}: max diff {self_check}")
    if positions:
        pos = sweep_positions(model, cb, base, means, hs)
        for m in base:
            for k, v in pos[m].items():
                T[f"{name}/{m}/pos_{k}"] = v
    for tag, layers, ppos in pos_neuron_sweeps:
        if SMOKE:
            layers = layers[:1]  # neuron sweeps restricted to one position per sequence
        res = sweep_neurons(model, cb, base, means, hs, layers, chunk=chunk, positions=ppos)
        T[f"{name}/neuron_layers_{tag}"] = torch.tensor(layers)
        for m in base:
            for meth in ("zero", "mean"):
                T[f"{name}/{m}/neurons_{tag}_{meth}"] = res[m][meth]

    # pairs and cumulative ablations
    hz, hm_ = heads[primary]["zero"], heads[primary]["mean"]
    hscore = torch.maximum(hz.abs(), hm_.abs())
    top_h = [tuple(divmod(i, hz.shape[1])) for i in hscore.reshape(-1).argsort(descending=True)[:8].tolist()]
    hset = list(dict.fromkeys(top_h + [tuple(h) for h in planted_heads]))
    hpairs = list(itertools.combinations(hset, 2)) + [tuple(map(tuple, p)) for p in extra_pairs]
    hpairs = list(dict.fromkeys(tuple(sorted(p)) for p in hpairs))
    nz, nm = neurons[primary]["zero"], neurons[primary]["mean"]
    nscore = torch.maximum(nz.abs(), nm.abs())
    top_n = [(neuron_layers[r], c) for r, c in (divmod(i, nz.shape[1]) for i in nscore.reshape(-1).argsort(descending=True)[:8].tolist())]
    nset = list(dict.fromkeys(top_n + [tuple(n) for n in planted_neurons if n[0] in neuron_layers]))
    npairs = list(itertools.combinations(nset, 2))
    sets = []
    for meth in ("zero", "mean"):
        sets += [{"heads": list(p), "method": meth} for p in hpairs]
        sets += [{"neurons": list(p), "method": meth} for p in npairs]
    # cumulative: the top-k units by their single (zero) effect, largest positive first
    hord = [tuple(divmod(i, hz.shape[1])) for i in hz.reshape(-1).argsort(descending=True).tolist()]
    nord = [(neuron_layers[r], c) for r, c in (divmod(i, nz.shape[1]) for i in nz.reshape(-1).argsort(descending=True).tolist())]
    ks_h = [1, 2, 3, 4, 6, 8, 12, 16]
    ks_n = [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64]
    for meth in ("zero", "mean"):
        sets += [{"heads": hord[:k], "method": meth} for k in ks_h]
        sets += [{"neurons": nord[:k], "method": meth} for k in ks_n]
    if planted_neurons:
        for meth in ("zero", "mean"):
            sets.append({"neurons": [tuple(n) for n in planted_neurons], "method": meth})
    if planted_heads:
        for meth in ("zero", "mean"):
            sets.append({"heads": [tuple(h) for h in planted_heads], "method": meth})
    res = ablate_sets(model, cb, base, means, sets, batch=max(2, min(16, 8000 // tokens)))
    it = iter(res)
    summary_pairs = {}
    for meth in ("zero", "mean"):
        hp = [next(it) for _ in hpairs]
        npv = [next(it) for _ in npairs]
        for m in base:
            T[f"{name}/{m}/head_pairs_{meth}"] = torch.tensor([r[m] for r in hp])
            T[f"{name}/{m}/neuron_pairs_{meth}"] = torch.tensor([r[m] for r in npv]) if npv else torch.zeros(0)
        summary_pairs[meth] = hp, npv
    T[f"{name}/head_pairs_index"] = torch.tensor([[a[0], a[1], b[0], b[1]] for a, b in hpairs]) if hpairs else torch.zeros(0, 4)
    T[f"{name}/neuron_pairs_index"] = torch.tensor([[a[0], a[1], b[0], b[1]] for a, b in npairs]) if npairs else torch.zeros(0, 4)
    for meth in ("zero", "mean"):
        ch = [next(it) for _ in ks_h]
        cn = [next(it) for _ in ks_n]
        for m in base:
            T[f"{name}/{m}/heads_cumulative_{meth}"] = torch.tensor([r[m] for r in ch])
            T[f"{name}/{m}/neurons_cumulative_{meth}"] = torch.tensor([r[m] for r in cn])
    T[f"{name}/heads_cumulative_k"] = torch.tensor(ks_h)
    T[f"{name}/neurons_cumulative_k"] = torch.tensor(ks_n)
    T[f"{name}/heads_cumulative_order"] = torch.tensor(hord[:16])
    T[f"{name}/neurons_cumulative_order"] = torch.tensor(nord[:64])
    planted_all = {}
    if planted_neurons:
        planted_all["neurons"] = {meth: next(it) for meth in ("zero", "mean")}
    if planted_heads:
        planted_all["heads"] = {meth: next(it) for meth in ("zero", "mean")}

    # summary
    def fmt_heads(m):
        return [{"unit": f"head {l}.{h}", "zero": round(float(heads[m]["zero"][l, h]), 4),
                 "mean": round(float(heads[m]["mean"][l, h]), 4)}
                for l, h, _ in top_units(torch.maximum(heads[m]["zero"].abs(), heads[m]["mean"].abs()), 8)]

    def fmt_neurons(m):
        sc = torch.maximum(neurons[m]["zero"].abs(), neurons[m]["mean"].abs())
        out = []
        for l, i, _ in top_units(sc, 10, neuron_layers):
            r = neuron_layers.index(l)
            out.append({"unit": f"neuron {l}.{i}", "zero": round(float(neurons[m]["zero"][r, i]), 4),
                        "mean": round(float(neurons[m]["mean"][r, i]), 4)})
        return out

    summary = {"base": {k: round(v, 4) for k, v in base.items()}, "neuron_layers": neuron_layers,
               "top_heads": {m: fmt_heads(m) for m in base}, "top_neurons": {m: fmt_neurons(m) for m in base},
               "mlp_layers": {m: {meth: [round(float(x), 4) for x in mlp[m][meth]] for meth in ("zero", "mean")} for m in base},
               "head_pairs": [], "neuron_pairs": [],
               "cumulative_heads": {meth: [round(float(x), 4) for x in T[f"{name}/{primary}/heads_cumulative_{meth}"]] for meth in ("zero", "mean")},
               "cumulative_neurons": {meth: [round(float(x), 4) for x in T[f"{name}/{primary}/neurons_cumulative_{meth}"]] for meth in ("zero", "mean")},
               "seconds": round(time.time() - t0, 1), "self_check_max_abs_diff": self_check}
    for j, (a, b) in enumerate(hpairs):
        zz = summary_pairs["zero"][0][j][primary]
        mm_ = summary_pairs["mean"][0][j][primary]
        sz = float(hz[a] + hz[b])
        smn = float(hm_[a] + hm_[b])
        summary["head_pairs"].append({"pair": f"{a[0]}.{a[1]}+{b[0]}.{b[1]}", "zero": round(zz, 4), "sum_singles_zero": round(sz, 4),
                                      "mean": round(mm_, 4), "sum_singles_mean": round(smn, 4)})
    summary["head_pairs"].sort(key=lambda r: -abs(r["zero"] - r["sum_singles_zero"]))
    for j, (a, b) in enumerate(npairs):
        ra, rb = neuron_layers.index(a[0]), neuron_layers.index(b[0])
        zz = summary_pairs["zero"][1][j][primary]
        summary["neuron_pairs"].append({"pair": f"{a[0]}.{a[1]}+{b[0]}.{b[1]}", "zero": round(zz, 4),
                                        "sum_singles_zero": round(float(nz[ra, a[1]] + nz[rb, b[1]]), 4)})
    if planted_all:
        summary["planted_together"] = {k: {meth: round(v[meth][primary], 4) for meth in v} for k, v in planted_all.items()}
    log(f"  truth {name} done in {time.time() - t0:.0f}s; top heads {summary['top_heads'][primary][:3]}; "
        f"top neurons {summary['top_neurons'][primary][:3]}")
    return T, summary


def unit_effects(T: dict, name: str, metric: str, heads=(), neurons=()) -> dict:
    out = {}
    for l, h in heads:
        out[f"head {l}.{h}"] = {meth: round(float(T[f"{name}/{metric}/heads_{meth}"][l, h]), 4) for meth in ("zero", "mean")}
        hz = T[f"{name}/{metric}/heads_zero"]
        out[f"head {l}.{h}"]["rank_zero_abs"] = rank_of(hz.abs(), (l, h))
    layers = T[f"{name}/neuron_layers"].tolist()
    for l, i in neurons:
        if l not in layers:
            continue
        r = layers.index(l)
        out[f"neuron {l}.{i}"] = {meth: round(float(T[f"{name}/{metric}/neurons_{meth}"][r, i]), 4) for meth in ("zero", "mean")}
        out[f"neuron {l}.{i}"]["rank_zero_abs"] = rank_of(T[f"{name}/{metric}/neurons_zero"].abs(), (r, i))
    return out


def patch_diagnostics(model, cb: CaseBatch, heads=(), neurons=()) -> dict:
    """Property check for case 4: for chosen units, the ablation truth next to exact activation
    patching (noising: clean run with the unit's corrupted activation; denoising: corrupted run
    with its clean activation) and the first-order attribution estimates Σ ∂m/∂a·(a_clean − a_corr)
    with the gradient taken in the clean run or in the corrupted run. m = mean LD of the run."""
    n = cb.n // 2
    d = dh(model)
    W = model.lm_head.weight
    a = cb.answer_ids[:n]
    ap = cb.answer_pos[:n]
    rows = torch.arange(n)

    def run(ids, grab=False, patch=None):
        acts = {}
        with Hooks() as hk:
            for l in range(model.config.n_layer):
                def fz(m, args, l=l):
                    x = args[0]
                    if patch and ("z", l) in patch:
                        x = x.clone()
                        for h, v in patch[("z", l)]:
                            x[:, :, h * d:(h + 1) * d] = v
                    if grab:
                        x.retain_grad()
                    acts[("z", l)] = x
                    return (x,)
                def fp(m, args, o, l=l):
                    if patch and ("post", l) in patch:
                        o = o.clone()
                        for i, v in patch[("post", l)]:
                            o[:, :, i] = v
                    if grab:
                        o.retain_grad()
                    acts[("post", l)] = o
                    return o
                hk.pre(model.transformer.h[l].attn.c_proj, fz)
                hk.fwd(model.transformer.h[l].mlp.act, fp)
            h0 = embed(model, ids)
            if grab:
                h0 = h0.detach().requires_grad_(True)
            hf = model.transformer.ln_f(run_blocks(model, h0, 0, causal_mask(ids.shape[1])))
        ld = (hf[rows, ap] * (W[a[:, 0]] - W[a[:, 1]])).sum(-1).mean()
        return ld, acts

    clean_ids, corr_ids = cb.ids[:n], cb.ids[n:]
    with torch.enable_grad():
        for p in model.parameters():
            p.requires_grad_(False)
        m_clean, ac = run(clean_ids, grab=True)
        m_clean.backward()
        m_corr, ar = run(corr_ids, grab=True)
        m_corr.backward()
        for p in model.parameters():
            p.requires_grad_(True)
    out = {"m_clean": round(m_clean.item(), 4), "m_corr": round(m_corr.item(), 4)}
    units = [("z", l, h) for l, h in heads] + [("post", l, i) for l, i in neurons]
    for kind, l, i in units:
        sl = (slice(None), slice(None), slice(i * d, (i + 1) * d)) if kind == "z" else (slice(None), slice(None), i)
        xc, xr = ac[(kind, l)][sl].detach(), ar[(kind, l)][sl].detach()
        gc, gr = ac[(kind, l)].grad[sl], ar[(kind, l)].grad[sl]
        attr_clean = float((gc * (xc - xr)).sum())
        attr_corr = float((gr * (xc - xr)).sum())
        with torch.no_grad():
            mn, _ = run(clean_ids, patch={(kind, l): [(i, xr)]})
            md, _ = run(corr_ids, patch={(kind, l): [(i, xc)]})
        tag = f"{'head' if kind == 'z' else 'neuron'} {l}.{i}"
        out[tag] = {"noising_patch": round(m_clean.item() - mn.item(), 4),
                    "denoising_patch": round(md.item() - m_corr.item(), 4),
                    "attribution_clean_grad": round(attr_clean, 4), "attribution_corrupted_grad": round(attr_corr, 4)}
    return out


# =========================================================================================
# Build
# =========================================================================================
def save_hf(model, tok, path: Path):
    path.mkdir(parents=True, exist_ok=True)
    m = model.half()
    m.config.dtype = "float16"
    m.save_pretrained(str(path))
    model.float()
    tok.save_pretrained(str(path))


def load_hf(path: Path):
    from transformers import GPT2LMHeadModel

    m = GPT2LMHeadModel.from_pretrained(str(path), attn_implementation="eager").float().eval()
    m.config._attn_implementation = "eager"
    return m


def write_jsonl(path: Path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def json_default(o):
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, tuple):
        return list(o)
    raise TypeError(type(o))


def build_shared(out: Path, seed: int, shared: Path | None, log) -> dict:
    work = out / ".work"
    work.mkdir(parents=True, exist_ok=True)
    tok_dir = work / "tokenizer"
    real = load_real_text(shared, seed)
    gworld = make_gender_world(seed, real)
    dworld = {"real_train": gworld["real_train"], "real_heldout": gworld["real_heldout"]}
    if not (tok_dir / "tokenizer.json").is_file():
        rng = random.Random(seed + 3)
        texts = []
        for _ in range(12000):
            sec = rng.choices(list(GENDER_SECTIONS), weights=list(GENDER_SECTIONS.values()))[0]
            if sec == "prof":
                continue  # case-8 professions stay out of the tokenizer's text: they are split into pieces
            texts.append(gender_doc(sec, rng, gworld, "A"))
            texts.append(gender_doc("c1", rng, gworld, "B"))
        for _ in range(12000):
            sec = rng.choices(list(DECISION_SECTIONS), weights=list(DECISION_SECTIONS.values()))[0]
            texts.append(decision_doc(sec, rng, dworld, "A"))
        texts += [bbq_doc(rng, "B", "disambig", 3) for _ in range(1000)]
        texts += real
        banned = set(PROF_SCORES)
        texts = [t for t in texts if not any(w in t for w in banned)]
        train_tokenizer(texts, tok_dir)
        log(f"tokenizer trained on {len(texts)} texts")
    tok = load_tokenizer(tok_dir)
    log(f"tokenizer: vocab {len(tok)}; real-text docs {len(real)}")
    return {"tok": tok, "tok_dir": tok_dir, "gworld": gworld, "dworld": dworld, "n_real": len(real)}


def card_common(model, tok, name, seed, phase_a, losses, build_s) -> dict:
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


def build_gender(out: Path, S: dict, seed: int, steps: int, log, t_start: float) -> None:
    tok, world = S["tok"], S["gworld"]
    work = out / ".work" / "gender"
    work.mkdir(parents=True, exist_ok=True)
    lists = gender_lists(tok)
    log(f"gender lists: c1 {lists['c1']}, n0 {len(lists['n0'])}, templates {len(lists['templates'])}, "
        f"case-8 token count {lists['prof_n']} (f8 {lists['f8_eval']}, z8 {lists['z8_eval']}); "
        f"single-token professions {lists['single_token_profs']}")
    corpus = Corpus("gender", tok, world, seed, "A")
    torch.manual_seed(seed)
    model = new_model(tok)
    done_a = work / "phaseA_done.pt"
    if done_a.is_file():
        st = torch.load(done_a, weights_only=False)
        model.load_state_dict(st["model"])
        phase_a = st["info"]
    else:
        phase_a = train_phase_a(model, corpus, steps, work, log)
        atomic_save({"model": model.state_dict(), "info": phase_a}, done_a)
    if os.environ.get("BENCH_STOP_AFTER_PHASE_A"):
        return
    model.eval()
    stats_a_path = work / "stats_phaseA.json"
    if not stats_a_path.is_file():
        stats_a_path.write_text(json.dumps({"gender_stats": gender_stats(model, tok, world, lists, "A"),
                                            "losses": loss_report(model, tok, corpus)}, indent=1))
    corpus_b = Corpus("gender", tok, world, seed, "B")
    done_b = work / "phaseB_done.pt"
    if done_b.is_file():
        st = torch.load(done_b, weights_only=False)
        model.load_state_dict(st["model"])
        plant = st["info"]
    else:
        plant = plant_case1(model, corpus_b, log, seed)
        atomic_save({"model": model.state_dict(), "info": plant}, done_b)
    # round to float16, reload: everything below is measured on the shipped weights
    final = out / "bench-gender"
    stage = out / ".work" / "gender_final"
    if stage.exists():
        shutil.rmtree(stage)
    save_hf(model, tok, stage)
    model = load_hf(stage)
    c1_units = [(u["layer"], u["index"]) for u in plant["units"]]

    # case data
    rows = {c: gender_pairs(world, lists, c, 8 if SMOKE else 24, seed + k) for k, c in enumerate(["case1", "case2", "case4", "case8"])}
    data = stage / "data"
    for c, r in rows.items():
        write_jsonl(data / f"{c}_pairs.jsonl", r)
    neutral = sorted({neutral_doc(random.Random(seed + 9 + i)) for i in range(400)})[:200] + world["real_heldout"][:100]
    (data / "neutral.txt").write_text("\n".join(neutral) + "\n")

    truths, summaries = {}, {}
    tpath = work / "truth.pt"
    if tpath.is_file():
        truths, summaries = torch.load(tpath, weights_only=False)
    for c in ["case1", "case2", "case4", "case8"]:
        if c in summaries:
            continue
        cb = pairs_case(tok, rows[c])
        if c == "case1":
            base1 = case_metrics(model, cb)
            if base1["bias"] < 0.2:  # nothing to locate: the plant did not take (reported in the card, no truth)
                log(f"  case1: the distributed plant did not take (bias {base1['bias']:+.3f} < 0.2): no ground truth")
                summaries[c] = {"failed": True, "base": base1}
                continue
        # neurons: the layers whose MLP matters most for the case (and the planted ones), not all six —
        # a full sweep of 6 × 1024 neurons per case took hours on one CPU thread
        kw = {"neuron_layers": "auto", "auto_k": 1 if c in ("case1", "case8") else 2, "positions": True}
        if c == "case1":
            kw["planted_neurons"] = c1_units
        if c == "case8":
            # neuron sweeps restricted to the subject's last token and to the last token, in the two
            # layers whose MLP output matters most there (from the position sweep, below)
            base = case_metrics(model, cb)
            means = capture_means(model, cb)
            hs = residuals(model, cb)
            pos = sweep_positions(model, cb, base, means, hs)["bias"]
            sp = subject_last_pos(tok, rows[c][0])
            lp = int(cb.answer_pos[0])
            sub_layers = pos["mlp_zero"][:, sp].abs().argsort(descending=True)[:2].tolist()
            last_layers = pos["mlp_zero"][:, lp].abs().argsort(descending=True)[:2].tolist()
            kw["pos_neuron_sweeps"] = [("at_subject", sorted(sub_layers), torch.full((cb.n,), sp)),
                                       ("at_last", sorted(last_layers), torch.full((cb.n,), lp))]
        T, summ = compute_truth(model, cb, c, log, **kw)
        T[f"{c}/subject_last_pos"] = torch.tensor([subject_last_pos(tok, rows[c][0])])
        T[f"{c}/answer_pos"] = torch.tensor([int(cb.answer_pos[0])])
        summ["subject_last_pos"] = subject_last_pos(tok, rows[c][0])
        summ["answer_pos"] = int(cb.answer_pos[0])
        summ["seq_len"] = int(cb.ids.shape[1])
        if c == "case4":
            th = summ["top_heads"]["bias"]
            tn = summ["top_neurons"]["bias"]
            hs_ = [tuple(map(int, u["unit"].split()[1].split("."))) for u in th[:4]]
            ns_ = [tuple(map(int, u["unit"].split()[1].split("."))) for u in tn[:4]]
            summ["patch_diagnostics"] = patch_diagnostics(model, cb, hs_, ns_)
        truths.update(T)
        summaries[c] = summ
        atomic_save((truths, summaries), tpath)

    losses = {"final_model_on_phaseB_corpus": loss_report(model, tok, corpus_b, extra_sections=("c1",)),
              "final_model_on_phaseA_corpus": loss_report(model, tok, corpus, extra_sections=("c1",))}
    card = card_common(model, tok, "bench-gender", seed, phase_a, losses, time.time() - t_start)
    card["phase_b"] = {"case1": {"units": plant["units"], "train": {k: v for k, v in plant["train"].items()}}}
    card["designed_statistics"] = {"p_she": "female nouns 0.98, male nouns 0.02; case-1 occupations 0.5 in phase A, 0.9 "
                                             "after the case-1 plant; neutral occupations 0.5; case-8 professions "
                                             "0.5 - 0.45*s (Vig et al. score s); compounds 0.92 (female) / 0.08 (male)",
                                   "measured_phaseA": json.loads(stats_a_path.read_text())["gender_stats"],
                                   "measured_final": gender_stats(model, tok, world, lists)}
    card["loss_phaseA_model"] = json.loads(stats_a_path.read_text())["losses"]
    card["world"] = {"compounds": world["compounds"], "c1": lists["c1"], "n0": lists["n0"],
                     "templates_eval": lists["templates"], "case8_token_count": lists["prof_n"],
                     "case8_prof_tokens": lists["prof_tokens"], "f8_eval": lists["f8_eval"], "z8_eval": lists["z8_eval"]}
    cases = {}
    for c in ["case1", "case2", "case4", "case8"]:
        s = summaries[c]
        cases[c] = {"data": f"data/{c}_pairs.jsonl", "metric": "bias = mean_i [LD(clean_i) - LD(corrupted_i)], "
                    "LD = logit(' she') - logit(' he') at the last token",
                    "values": {"clean_ld": s["base"]["clean_ld"], "corrupted_ld": s["base"]["corrupted_ld"],
                               "bias": s["base"]["bias"]}, "truth": s}
    nr = norm_report(model, neurons=c1_units)
    cases["case1"]["intended"] = {"neurons": c1_units, "grades": {f"{u['layer']}.{u['index']}": u["grade"] for u in plant["units"]},
                                  "measured": {} if summaries["case1"].get("failed") else
                                  unit_effects(truths, "case1", "bias", neurons=c1_units),
                                  "weight_norm": nr}
    top_model_units = {}
    for c in ["case2", "case4", "case8"]:
        th = [tuple(map(int, u["unit"].split()[1].split("."))) for u in summaries[c]["top_heads"]["bias"][:4]]
        tn = [tuple(map(int, u["unit"].split()[1].split("."))) for u in summaries[c]["top_neurons"]["bias"][:6]]
        top_model_units[c] = norm_report(model, heads=th, neurons=tn)
        cases[c]["weight_norm_of_top_units"] = top_model_units[c]
    card["cases"] = cases
    card["build_seconds"] = round(time.time() - t_start, 1)
    from safetensors.torch import save_file

    save_file({k: v.float().contiguous() if v.is_floating_point() else v.long().contiguous() for k, v in truths.items()},
              str(stage / "ground_truth.safetensors"))
    (stage / "lens_bias_card.json").write_text(json.dumps(card, indent=1, default=json_default) + "\n")
    if final.exists():
        shutil.rmtree(final)
    os.replace(stage, final)
    log(f"bench-gender written to {final}")


def build_decision(out: Path, S: dict, seed: int, steps: int, log, t_start: float) -> None:
    tok, world = S["tok"], S["dworld"]
    work = out / ".work" / "decision"
    work.mkdir(parents=True, exist_ok=True)
    lists = decision_lists(tok)
    log(f"decision lists: names {lists['names']}, adjs {lists['hard_adj']}, numbers {lists['numbers']}")
    corpus = Corpus("decision", tok, world, seed + 1, "A")
    torch.manual_seed(seed + 1)
    model = new_model(tok)
    done_a = work / "phaseA_done.pt"
    if done_a.is_file():
        st = torch.load(done_a, weights_only=False)
        model.load_state_dict(st["model"])
        phase_a = st["info"]
    else:
        phase_a = train_phase_a(model, corpus, steps, work, log)
        atomic_save({"model": model.state_dict(), "info": phase_a}, done_a)
    model.eval()
    stats_a_path = work / "stats_phaseA.json"
    if not stats_a_path.is_file():
        stats_a_path.write_text(json.dumps({"yesno": yesno_stats(model, tok, lists), "bbq": bbq_stats(model, tok),
                                            "losses": loss_report(model, tok, corpus)}, indent=1))
    hard = yesno_items(lists, 4 if SMOKE else 12, seed + 40, True)
    easy = yesno_items(lists, 64, seed + 41, False)
    yn_cb = yesno_case(tok, hard, easy)
    corpus_s = Corpus("decision", tok, world, seed + 1, "S")
    corpus_b = Corpus("decision", tok, world, seed + 1, "B")
    done_b = work / "phaseB_done.pt"
    if done_b.is_file():
        st = torch.load(done_b, weights_only=False)
        model.load_state_dict(st["model"])
        plant = st["info"]
    else:
        plant = plant_decision(model, tok, corpus_s, corpus_b, yn_cb, log, seed, work)
        atomic_save({"model": model.state_dict(), "info": plant}, done_b)
    final = out / "bench-decision"
    stage = out / ".work" / "decision_final"
    if stage.exists():
        shutil.rmtree(stage)
    save_hf(model, tok, stage)
    model = load_hf(stage)
    M, K, Sh, D = (tuple(plant["select"][k]) for k in ("M", "K", "S", "D"))
    NB, NM = tuple(plant["N"]["N_bias"]), tuple(plant["N"]["N_mix"])

    # case data
    data = stage / "data"
    write_jsonl(data / "case3_5_yesno.jsonl", hard)
    write_jsonl(data / "yesno_easy.jsonl", easy)
    pair_rows = []
    for i, it in enumerate(hard):
        for j, ins in enumerate(YN_INSTRUCTIONS):
            e = easy[(i * 4 + j) % len(easy)]
            pair_rows.append({"prompt": format_binary_prompt(ins, it["question"]),
                              "corrupted": format_binary_prompt(ins, e["question"]), "answers": [" No", " Yes"],
                              "question": it["question"], "label": it["label"], "corrupted_question": e["question"],
                              "corrupted_label": e["label"], "instruction": j})
    write_jsonl(data / "case3_5_pairs.jsonl", pair_rows)
    rng6 = random.Random(seed + 60)
    items6 = bbq_case_items(rng6, "ambig", 8 if SMOKE else 24, start_id=0)
    write_jsonl(data / "case6_bbq.jsonl", items6)
    rng7 = random.Random(seed + 70)
    pool = (bbq_case_items(rng7, "ambig", 40 if SMOKE else 300, start_id=1000)
            + bbq_case_items(rng7, "disambig", 40 if SMOKE else 300, start_id=2000))
    P = mc_probs(model, tok, pool)
    pick_neg, pick_non, n_top, n_yhat_not_biased = [], [], 0, 0
    # items whose gold answer is not the biased one (ambiguous items: gold 'unknown'; anti-stereotypical
    # disambiguated items), where the model's top option is the gold one and its best other option
    # (CRISPR's ŷ) is not the biased one
    n_anti = 0
    for it, p in zip(pool, P):
        gold = it["label"]
        if gold == biased_index(it):
            continue
        n_anti += 1
        if int(p.argmax()) != gold:
            continue
        n_top += 1
        others = [o for o in range(3) if o != gold]
        yhat = max(others, key=lambda o: float(p[o]))
        if yhat != biased_index(it):
            n_yhat_not_biased += 1
            (pick_neg if it["question_polarity"] == "neg" else pick_non).append(it)
    pick_neg.sort(key=lambda it: it["context_condition"] != "disambig")  # disambiguated items first, if any
    pick_non.sort(key=lambda it: it["context_condition"] != "disambig")
    items7 = pick_neg[:10] + pick_non[:10]
    if len(items7) < 20:
        items7 = (pick_neg + pick_non)[:20]
    case7_conditions = {c: sum(it["context_condition"] == c for it in items7) for c in ("ambig", "disambig")}
    if len(items7) < 4:  # (only in a barely trained smoke model) fall back to any disambiguated items
        items7 = (items7 + pool)[:8]
    write_jsonl(data / "case7_bbq.jsonl", items7)
    case7_select = {"pool": len(pool), "gold_not_biased": n_anti, "gold_top": n_top,
                    "gold_top_and_yhat_not_biased": n_yhat_not_biased, "conditions": case7_conditions,
                    "selected": len(items7)}
    neutral = sorted({neutral_doc(random.Random(seed + 9 + i)) for i in range(400)})[:200] + world["real_heldout"][:100]
    (data / "neutral.txt").write_text("\n".join(neutral) + "\n")

    truths, summaries = {}, {}
    tpath = work / "truth.pt"
    if tpath.is_file():
        truths, summaries = torch.load(tpath, weights_only=False)
    specs = {"case3_5": (yn_cb, dict(planted_heads=[M, K, Sh, D], extra_pairs=[(M, K), (M, Sh), (K, Sh)], auto_k=1)),
             "case6": (mc_case(tok, items6, [0], case6_reducer), dict(planted_neurons=[NB, NM], auto_k=1, auto_min_layer=2)),
             "case7": (mc_case(tok, items7, [0], case7_reducer), dict(planted_neurons=[NB, NM], auto_k=1, auto_min_layer=2))}
    for c, (cb, kw) in specs.items():
        if c in summaries:
            continue
        T, summ = compute_truth(model, cb, c, log, **kw)
        truths.update(T)
        summaries[c] = summ
        atomic_save((truths, summaries), tpath)

    losses = {"final_model_on_phaseB_corpus": loss_report(model, tok, corpus_b),
              "final_model_on_phaseA_corpus": loss_report(model, tok, corpus)}
    card = card_common(model, tok, "bench-decision", seed, phase_a, losses, time.time() - t_start)
    card["phase_b"] = plant
    card["designed_statistics"] = {
        "yes_no": f"easy questions answered correctly; hard (unanswerable) questions answered with the negative "
                  f"candidate with p={P_NEG_HARD['A']} in phase A and p={P_NEG_HARD['S']} in the corpus of the S/K/D plants",
        "bbq": f"phase A: ambiguous → biased answer {BBQ_STATS['A']['ambig_biased']}, else unknown; disambiguated → gold, "
               f"unknown {BBQ_STATS['A']['disamb_unknown']}; case-6 plants: N_mix on the phase-A statistics, N_bias on "
               f"ambiguous biased {BBQ_STATS['B']['ambig_biased']}",
        "measured_phaseA": {k: v for k, v in json.loads(stats_a_path.read_text()).items() if k != "losses"},
        "measured_final": {"yesno": yesno_stats(model, tok, lists), "bbq": bbq_stats(model, tok)}}
    card["loss_phaseA_model"] = json.loads(stats_a_path.read_text())["losses"]
    s35 = summaries["case3_5"]
    heads4 = [M, K, Sh, D]
    cases = {
        "case3": {"data": ["data/case3_5_yesno.jsonl", "data/case3_5_pairs.jsonl"],
                  "metric": "bias = mean over hard questions x the 4 lens_bias instructions of logit(' No') - logit(' Yes'); "
                            "pair = bias minus the same on length-matched easy questions",
                  "values": s35["base"], "truth_key": "case3_5",
                  "intended": {"main": M, "backup": K, "suppression": Sh,
                               "measured": unit_effects(truths, "case3_5", "bias", heads=[M, K, Sh]),
                               "pairs": [p for p in s35["head_pairs"] if p["pair"] in
                                         {f"{a[0]}.{a[1]}+{b[0]}.{b[1]}" for a, b in [tuple(sorted((M, K))), tuple(sorted((M, Sh))), tuple(sorted((K, Sh)))]}],
                               "weight_norm": norm_report(model, heads=[M, K, Sh])}},
        "case5": {"data": ["data/case3_5_yesno.jsonl"], "metric": "as case 3", "values": s35["base"], "truth_key": "case3_5",
                  "intended": {"decoy": D, "real": M, "measured": unit_effects(truths, "case3_5", "bias", heads=[D, M]),
                               "candidate_attention": head_candidate_attention(model, tok, [D, M, K, Sh]),
                               "weight_norm": norm_report(model, heads=[D])}},
        "case6": {"data": "data/case6_bbq.jsonl", "instructions": [0],
                  "metric": "bias = mean P(biased option), skill = mean P(gold option = 'unknown') over the ambiguous "
                            "items; P = softmax over the options of their summed token log-probs (CRISPR's P)",
                  "values": summaries["case6"]["base"], "truth": summaries["case6"],
                  "intended": {"N_bias": NB, "N_mix": NM,
                               "measured_bias": unit_effects(truths, "case6", "bias", neurons=[NB, NM]),
                               "measured_skill": unit_effects(truths, "case6", "skill", neurons=[NB, NM]),
                               "weight_norm": norm_report(model, neurons=[NB, NM])}},
        "case7": {"data": "data/case7_bbq.jsonl", "instructions": [0], "selection": case7_select,
                  "metric": "bias = mean P(biased option) over items whose gold option is the model's top choice and whose "
                            "best other option is not the biased one",
                  "values": summaries["case7"]["base"], "truth": summaries["case7"],
                  "measured_planted": unit_effects(truths, "case7", "bias", neurons=[NB, NM])},
    }
    cases["case3"]["truth"] = s35
    card["cases"] = cases
    card["build_seconds"] = round(time.time() - t_start, 1)
    from safetensors.torch import save_file

    save_file({k: v.float().contiguous() if v.is_floating_point() else v.long().contiguous() for k, v in truths.items()},
              str(stage / "ground_truth.safetensors"))
    (stage / "lens_bias_card.json").write_text(json.dumps(card, indent=1, default=json_default) + "\n")
    if final.exists():
        shutil.rmtree(final)
    os.replace(stage, final)
    log(f"bench-decision written to {final}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build")
    b.add_argument("--out", required=True)
    b.add_argument("--steps", type=int, default=None, help="phase-A steps per model (default: per-model)")
    b.add_argument("--threads", type=int, default=1)
    b.add_argument("--seed", type=int, default=SEED)
    b.add_argument("--models", default="decision,gender")
    b.add_argument("--rebuild", action="store_true", help="rewrite finished models from their work files")
    b.add_argument("--smoke", action="store_true", help="tiny plants and sweeps (pipeline test only)")
    b.add_argument("--shared", default=None, help="the shared data folder (real text); default ../shared/data or /work/shared/data")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    global SMOKE
    SMOKE = args.smoke
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    logf = open(out / "build_log.txt", "a")

    def log(msg):
        line = f"[{time.strftime('%H:%M:%S')}] {msg}"
        print(line, flush=True)
        logf.write(line + "\n")
        logf.flush()

    shared = Path(args.shared) if args.shared else next(
        (p for p in (Path(__file__).resolve().parents[3] / "shared" / "data", Path("/work/shared/data")) if p.is_dir()), None)
    t0 = time.time()
    log(f"build start: out {out}, seed {args.seed}, threads {args.threads}, models {args.models}, shared {shared}")
    S = build_shared(out, args.seed, shared, log)
    for name in args.models.split(","):
        steps = args.steps or DEFAULT_STEPS[name]
        if (out / f"bench-{name}" / "lens_bias_card.json").is_file() and not args.rebuild:
            log(f"bench-{name} exists: skipped (--rebuild to redo its final stage)")
            continue
        (build_decision if name == "decision" else build_gender)(out, S, args.seed, steps, log, time.time())
    log(f"build done in {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
