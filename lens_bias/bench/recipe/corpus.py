"""The benchmark models' corpora: real text (StrategyQA facts, GSM8K questions; MIT), the text the
tokenizer is trained on, and `Corpus`, whose batches are a function of (seed, tag, step) so a
resumed training sees the same data."""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

from ...organism.recipe.train import lm_batch
from .config import ARCH, TOKENS_PER_STEP
from .docs import (
    C1_OCC,
    DECISION_SECTIONS,
    GENDER_SECTIONS,
    PROF_SCORES,
    bbq_doc,
    decision_doc,
    gender_doc,
    make_gender_world,
)
from .tokens import n_tokens


def load_real_text(shared: Path | None, seed: int) -> list[str]:
    """Real sentences (StrategyQA facts, GSM8K questions) without the case words, shuffled."""
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


def make_worlds(seed: int, real: list[str]) -> tuple[dict, dict]:
    """The gender world and the decision world (which shares only the real text)."""
    gworld = make_gender_world(seed, real)
    return gworld, {"real_train": gworld["real_train"], "real_heldout": gworld["real_heldout"]}


def tokenizer_texts(seed: int, gworld: dict, dworld: dict, real: list[str]) -> list[str]:
    """The tokenizer's training text: both corpora (the case-6 plant's phrasing included) and the
    real text, without the case-8 professions (so they are split into pieces)."""
    rng = random.Random(seed + 3)
    texts = []
    for _ in range(12000):
        sec = rng.choices(list(GENDER_SECTIONS), weights=list(GENDER_SECTIONS.values()))[0]
        if sec == "prof":
            continue
        texts.append(gender_doc(sec, rng, gworld, "A"))
        texts.append(gender_doc("c1", rng, gworld, "B"))
    for _ in range(12000):
        sec = rng.choices(list(DECISION_SECTIONS), weights=list(DECISION_SECTIONS.values()))[0]
        texts.append(decision_doc(sec, rng, dworld, "A"))
    texts += [bbq_doc(rng, "B", "disambig", 3) for _ in range(1000)]
    texts += real
    banned = set(PROF_SCORES)
    return [t for t in texts if not any(w in t for w in banned)]


def encode_docs(tok, docs: list[str], device="cpu"):
    """(ids, labels): BOS + doc + EOS, right-padded, labels −100 on padding; at most n_positions tokens."""
    return lm_batch(tok, docs, device, max_doc_tokens=ARCH["n_positions"] - 2)


def step_rng(seed: int, tag: str, step: int) -> random.Random:
    """The random stream of one training step (the same after a resume)."""
    h = hashlib.sha256(f"{seed}/{tag}/{step}".encode()).hexdigest()
    return random.Random(int(h[:16], 16))


class Corpus:
    """A model's corpus: sections with weights, docs drawn from a per-step rng; each batch is one
    section, with as many docs as fit the token budget."""

    def __init__(self, name: str, tok, world: dict, seed: int, phase: str = "A", weights: dict | None = None):
        self.name, self.tok, self.world, self.seed, self.phase = name, tok, world, seed, phase
        self.weights = weights or (GENDER_SECTIONS if name == "gender" else DECISION_SECTIONS)
        self._len = {}

    def doc(self, section: str, rng: random.Random) -> str:
        if self.name == "gender":
            return gender_doc(section, rng, self.world, self.phase)
        return decision_doc(section, rng, self.world, self.phase)

    def avg_len(self, section: str) -> float:
        """Mean tokens per document of a section (BOS and EOS included), from 40 fixed samples."""
        if section not in self._len:
            rng = random.Random(7)
            self._len[section] = sum(n_tokens(self.tok, self.doc(section, rng)) + 2 for _ in range(40)) / 40
        return self._len[section]

    def batch(self, step: int, tag: str = "A", section: str | None = None, budget: int = TOKENS_PER_STEP):
        """(ids, labels) of step `step`: one section (drawn by weight unless given), ≈ `budget` tokens."""
        rng = step_rng(self.seed, f"{self.name}/{tag}", step)
        if section is None:
            section = rng.choices(list(self.weights), weights=list(self.weights.values()))[0]
        n = max(8, min(96, int(budget / self.avg_len(section))))
        docs = [self.doc(section, rng) for _ in range(n)]
        return encode_docs(self.tok, docs)

    def heldout(self, section: str, n: int = 160) -> list[str]:
        """n held-out documents of a section (a stream no training step draws from)."""
        rng = random.Random(self.seed * 7 + 99991 + int(hashlib.sha256(section.encode()).hexdigest()[:6], 16))
        if section == "real":
            return self.world["real_heldout"][:n]
        return [self.doc(section, rng) for _ in range(n)]
