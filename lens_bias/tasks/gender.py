"""Gender-bias data sets and their counterfactual prompt pairs: professions with Vig et al.'s
templates, WinoBias, Winogender, gender-word swaps. Loaders default to the copies shipped in
data/datasets and take a path to your own."""

from __future__ import annotations

import csv
import json
import re
import warnings
from pathlib import Path
from typing import Literal, Sequence

from ..core.errors import DataError, PromptError
from ..core.prompts import PromptSet, tokenizer_of
from .records import read_text_file, shipped_dataset

#: Templates of Vig et al. (2020), "Causal mediation analysis for interpreting neural NLP".
VIG_TEMPLATES = ["The {} said that", "The {} yelled that", "The {} whispered that", "The {} wanted that",
                 "The {} desired that", "The {} wished that", "The {} ate because", "The {} ran because",
                 "The {} drove because", "The {} slept because", "The {} cried because",
                 "The {} laughed because", "The {} went home because", "The {} stayed up because",
                 "The {} was fired because", "The {} was promoted because", "The {} yelled because"]


def load_professions(path: str | Path | None = None):
    """Vig et al.'s professions JSON ([name, definitional, stereotypical]; <0 female, >0 male) → DataFrame
    with columns name ('_' → ' '), definitional, stereotypical. Default: the shipped list."""
    import pandas as pd

    path = shipped_dataset("professions") if path is None else Path(path)
    try:
        rows = json.loads(read_text_file(path))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e})") from None
    out = []
    for i, r in enumerate(rows):
        if not (isinstance(r, list) and len(r) == 3 and isinstance(r[0], str)):
            raise DataError(f"{path}: entry {i} is not [name, definitional, stereotypical]: {r!r}")
        try:
            out.append({"name": r[0].replace("_", " "), "definitional": float(r[1]), "stereotypical": float(r[2])})
        except (TypeError, ValueError):
            raise DataError(f"{path}: entry {i} has non-numeric scores: {r!r}") from None
    if not out:
        raise DataError(f"{path}: no professions")
    return pd.DataFrame(out)


def _single_token(tok, word: str) -> bool:
    return len(tok(" " + word, add_special_tokens=False)["input_ids"]) == 1


def professions_prompts(
    model_or_tokenizer,
    professions,
    templates: Sequence[str] = VIG_TEMPLATES,
    answers: tuple[str, str] = (" he", " she"),
    corrupt_with: str | Sequence[str] | None = "man",
    single_token_only: bool = True,
) -> PromptSet:
    """'The {profession} said that' prompts with answers (' he', ' she') and counterfactual twins in
    which the profession is replaced by `corrupt_with` (a gendered word 'man'/'woman' or the
    neutral baseline 'person'; a list of words — e.g. neutral occupations — is cycled over the
    professions; None: no twins). `professions` is a DataFrame from
    load_professions or a list of words. Pairs whose clean and corrupted prompts tokenise to
    different lengths are dropped with a warning giving the count; with `single_token_only`
    professions that are not one token are skipped (warning with the count), so positions align.
    Metadata per prompt: profession, definitional, stereotypical, template."""
    tok = tokenizer_of(model_or_tokenizer)
    if hasattr(professions, "to_dict"):
        rows = professions.to_dict("records")
        rows = [{"profession": r.get("name", r.get("profession")), **{k: v for k, v in r.items() if k != "name"}}
                for r in rows]
    else:
        rows = [{"profession": p} for p in professions]
    if not rows:
        raise DataError("no professions given")
    if not templates or any(t.count("{}") != 1 for t in templates):
        raise DataError("templates must each contain exactly one '{}' for the profession")
    if single_token_only:
        kept = [r for r in rows if _single_token(tok, r["profession"])]
        if len(kept) < len(rows):
            warnings.warn(f"skipped {len(rows) - len(kept)} of {len(rows)} professions that are not single tokens")
        rows = kept
    if not rows:
        raise DataError("no professions left (are they single tokens for this tokenizer?)")
    if isinstance(corrupt_with, (list, tuple)) and not corrupt_with:
        raise DataError("corrupt_with is an empty list")
    prompts, corrupted, subjects, meta = [], [], [], []
    for k, r in enumerate(rows):
        other = corrupt_with if corrupt_with is None or isinstance(corrupt_with, str) else \
            corrupt_with[k % len(corrupt_with)]
        for t in templates:
            prompts.append(t.format(r["profession"]))
            subjects.append(r["profession"])
            meta.append({**r, "template": t})
            if other is not None:
                corrupted.append(t.format(other))
    return PromptSet.build(tok, prompts, answers, corrupted if corrupt_with is not None else None,
                           subjects=subjects, metadata=meta, on_length_mismatch="drop")


def stereotyped_professions(model_or_tokenizer, threshold: float = -0.4, source=None) -> tuple[list[str], list[str]]:
    """(female-stereotyped, neutral) single-token professions of Vig et al.'s list: stereotypical ≤ `threshold`
    (negative = female) and not definitionally female (definitional > −0.3), most stereotyped first; neutral:
    stereotypical = definitional = 0 — the twins of the professions bias."""
    tok = tokenizer_of(model_or_tokenizer)
    rows = [r for r in load_professions(source).to_dict("records") if _single_token(tok, r["name"])]
    female = [r["name"] for r in sorted(rows, key=lambda r: r["stereotypical"])
              if r["stereotypical"] <= threshold and r["definitional"] > -0.3]
    neutral = [r["name"] for r in rows if r["stereotypical"] == 0 and r["definitional"] == 0]
    if not female or not neutral:
        raise DataError("no single-token female-stereotyped and neutral professions for this tokenizer")
    return female, neutral


_BRACKET = re.compile(r"\[([^\]]+)\]")
PRONOUNS = {"he": "male", "him": "male", "his": "male", "she": "female", "her": "female", "hers": "female"}
SWAP = {"he": "she", "she": "he", "him": "her", "his": "her", "her": "his", "hers": "his"}


def load_winobias(directory: str | Path | None = None, split: Literal["dev", "test"] = "dev", type_: Literal[1, 2] = 1,
                  stereotype: Literal["pro", "anti"] = "pro"):
    """WinoBias sentences (Zhao et al. 2018) of `split` dev/test, type 1/2, stereotype pro/anti →
    DataFrame(sentence, entity, occupation, pronoun, gender, stereotype, type, line, prefix)."""
    import pandas as pd

    if split not in ("dev", "test") or type_ not in (1, 2) or stereotype not in ("pro", "anti"):
        raise DataError("WinoBias: split is dev/test, type 1/2, stereotype pro/anti")
    directory = shipped_dataset("winobias") if directory is None else Path(directory)
    path = directory / f"{stereotype}_stereotyped_type{type_}.txt.{split}"
    rows = []
    for n, line in enumerate(read_text_file(path).splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        text = line.split(" ", 1)[1] if line.split(" ", 1)[0].isdigit() else line
        found = list(_BRACKET.finditer(text))
        if len(found) < 2:
            raise DataError(f"{path}:{n}: expected two [bracketed] spans (entity, pronoun), found {len(found)}: {line!r}")
        marks = [m.group(1) for m in found]
        pronoun = marks[1].strip()
        if pronoun.lower() not in PRONOUNS:
            raise DataError(f"{path}:{n}: bracketed pronoun {pronoun!r} is not a gendered pronoun")
        entity = marks[0].strip()
        occupation = re.sub(r"^(the|a|an)\s+", "", entity, flags=re.IGNORECASE)
        rows.append({"sentence": _BRACKET.sub(r"\1", text), "entity": entity, "occupation": occupation,
                     "pronoun": pronoun,
                     "gender": PRONOUNS[pronoun.lower()], "stereotype": stereotype, "type": type_, "line": n,
                     "prefix": _BRACKET.sub(r"\1", text[: found[1].start()]).rstrip()})
    if not rows:
        raise DataError(f"{path}: no sentences")
    return pd.DataFrame(rows)


def winobias_prompts(model_or_tokenizer, frame) -> PromptSet:
    """Prompt = the sentence up to the bracketed pronoun; answers (its pronoun, the other gender's):
    the logit difference is then the preference for the sentence's (pro- or anti-stereotypical) pronoun."""
    tok = tokenizer_of(model_or_tokenizer)
    rows = [r for r in frame.to_dict("records") if r["pronoun"].lower() in SWAP and r["prefix"]]
    if not rows:
        raise DataError("no WinoBias rows with a pronoun to predict")
    answers = [(" " + r["pronoun"].lower(), " " + SWAP[r["pronoun"].lower()]) for r in rows]
    subjects = [r["occupation"] for r in rows]
    if not all(s in r["prefix"] for s, r in zip(subjects, rows)):
        subjects = None
    return PromptSet.build(tok, [r["prefix"] for r in rows], answers, metadata=rows, subjects=subjects)


def load_winogender(directory: str | Path | None = None):
    """Winogender sentences (Rudinger et al. 2018) joined with occupation statistics (% female, BLS).
    Default: the shipped copy."""
    import pandas as pd

    directory = shipped_dataset("winogender") if directory is None else Path(directory)
    stats = {}
    for n, row in enumerate(csv.DictReader(read_text_file(directory / "occupations-stats.tsv").splitlines(), delimiter="\t"), 2):
        try:
            stats[row["occupation"]] = float(row["bls_pct_female"])
        except (KeyError, ValueError):
            raise DataError(f"{directory / 'occupations-stats.tsv'}:{n}: malformed row {row!r}") from None
    rows = []
    for n, row in enumerate(csv.DictReader(read_text_file(directory / "all_sentences.tsv").splitlines(), delimiter="\t"), 2):
        try:
            occupation, participant, answer, gender, _ = row["sentid"].split(".")
        except (KeyError, ValueError):
            raise DataError(f"{directory / 'all_sentences.tsv'}:{n}: malformed sentid in {row!r}") from None
        rows.append({"sentence": row["sentence"], "occupation": occupation, "participant": participant,
                     "answer": int(answer), "gender": gender, "bls_pct_female": stats.get(occupation)})
    return pd.DataFrame(rows)


#: Winogender male pronoun → (female, male) answer words of the same case
WINOGENDER_ANSWERS = {"he": (" she", " he"), "him": (" her", " him"), "his": (" her", " his")}


def winogender_prompts(model_or_tokenizer, frame, answers: tuple[str, str] | None = None) -> PromptSet:
    """Each male Winogender sentence cut before its pronoun (one prompt per template and
    occupation); answers (female, male) of the pronoun's case — (' she', ' he'), (' her', ' him')
    or (' her', ' his') — or `answers` for all. Metadata keeps the occupation's % female (BLS)."""
    tok = tokenizer_of(model_or_tokenizer)
    rows, ans = [], []
    for r in frame[frame["gender"] == "male"].to_dict("records"):
        m = re.search(r"\b(he|him|his)\b", r["sentence"], flags=re.IGNORECASE)
        if m is None or m.start() == 0:
            continue
        rows.append({**r, "pronoun": m.group(1).lower(), "prefix": r["sentence"][: m.start()].rstrip()})
        ans.append(answers or WINOGENDER_ANSWERS[m.group(1).lower()])
    if not rows:
        raise DataError("no Winogender sentences with a male pronoun to predict")
    return PromptSet.build(tok, [r["prefix"] for r in rows], ans, metadata=rows,
                           subjects=[r["occupation"] for r in rows])


def load_swaps(path: str | Path | None = None) -> dict[str, str]:
    """Gender word pairs (WinoBias generalized_swaps.txt / extra_gendered_words.txt), both directions.
    Default: the shipped generalized_swaps.txt."""
    path = shipped_dataset("winobias") / "generalized_swaps.txt" if path is None else path
    pairs = {}
    for n, line in enumerate(read_text_file(path).splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 2:
            raise DataError(f"{path}:{n}: expected two words, got {line!r}")
        a, b = parts
        pairs.setdefault(a, b)
        pairs.setdefault(b, a)
    return pairs


def swap_gender(text: str, pairs: dict[str, str]) -> str:
    """Swap every gendered word (case kept for the first letter) — the counterfactual of a sentence."""
    def one(m):
        w = m.group(0)
        low = w.lower()
        if low not in pairs:
            return w
        out = pairs[low]
        return out[0].upper() + out[1:] if w[0].isupper() else out

    return re.sub(r"[A-Za-z]+", one, text)


def swapped_pairs(model_or_tokenizer, prompts: Sequence[str], answers, pairs: dict[str, str], **kw) -> PromptSet:
    """A PromptSet whose corrupted prompts are the gender-swapped prompts (length mismatches dropped)."""
    if not prompts:
        raise PromptError("no prompts to swap")
    corrupted = [swap_gender(p, pairs) for p in prompts]
    kw.setdefault("on_length_mismatch", "drop")
    return PromptSet.build(model_or_tokenizer, list(prompts), answers, corrupted, **kw)
