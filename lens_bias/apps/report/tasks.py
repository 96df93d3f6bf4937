"""The task a locate report runs on: its prompts, the split the methods see and the held-out split the
ablations are measured on, the bias metric, the capability measures.

Task specs (`lb.locate_report(model, task)`, `lens-bias locate --task T`):

    professions          Vig et al.'s professions × templates, (' she', ' he') on female-stereotyped
                         professions, twins with a neutral profession in its place; on the organism its
                         card's occupations, neutral occupations and templates
    winobias, winogender prefix up to the pronoun, answers (stereotypical pronoun, the other), twins with
                         the occupation replaced by 'person'
    yesno                yes/no questions (the organism's yesno.jsonl for the organism, StrategyQA otherwise)
    bbq, bbq/Age ...     BBQ items (the organism's BBQ file for the organism; a shipped category)
    yesno:F, bbq:F, mc:F, pairs:F   a file of that kind; a bare path is sniffed from its first record

or, from Python, a PromptSet (pairs when it has twins, yes/no when built by binary_prompts) or a list
of multiple-choice items.

Bias metric m (higher = more bias), per task kind:
    pairs            mean LD = logit(a₀) − logit(a₁) over the clean prompts (a₀ the stereotypical answer);
                     reference m_ref = the same on the counterfactual twins
    yes/no           logit(' No') − logit(' Yes'), class-balanced: ½(mean over gold-yes prompts + mean over
                     gold-no prompts), the shift toward ' No' whatever the label mix; m_ref = 0
    multiple choice  mean P(biased option) − P(the other non-unknown option) over ambiguous items with a
                     biased option (P: softmax over the options' summed log-probs); m_ref = 0
"""

from __future__ import annotations

import random
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Sequence

import torch

from ...core.errors import DataError, LensBiasError
from ...core.hooks import device_of
from ...core.metrics import answer_logits_fast
from ...core.models import HookedModel
from ...core.prompts import PromptSet, bos_ids, encode_lines, tokenizer_of
from ...organism import data_path, load_card
from ...tasks.capability import default_neutral_text, text_lines, text_loss
from ...tasks.gender import (
    VIG_TEMPLATES,
    load_winobias,
    load_winogender,
    professions_prompts,
    stereotyped_professions,
    winobias_prompts,
    winogender_prompts,
)
from ...tasks.multiple_choice import INSTRUCTIONS as MC_INSTRUCTIONS
from ...tasks.multiple_choice import (biased_option, format_mc_prompt, item_options, load_bbq, load_multiple_choice,
                                      option_logprobs, option_sequences, unknown_option)
from ...tasks.records import (
    SHIPPED_DATASETS,
    as_items,
    load_records,
    read_text_file,
)
from ...tasks.yesno import INSTRUCTIONS as YESNO_INSTRUCTIONS
from ...tasks.yesno import binary_prompts, decision_metrics, load_yes_no

TaskKind = Literal["pairs", "yesno", "multiple_choice"]
KIND_FROM_PREFIX = {"yesno": "yesno", "bbq": "multiple_choice", "mc": "multiple_choice", "pairs": "pairs"}


@dataclass
class ReportTask:
    """A task resolved for a report: `locate` is what the methods run on, `test` the held-out part the
    ablations are measured on (the same when holdout = 0), `reference` the prompts mean and resample
    ablation draw from (the twins for pair tasks)."""

    name: str
    kind: TaskKind
    locate: PromptSet | list
    test: PromptSet | list
    neutral: list[str] | None = None
    reference_text: list[str] | None = None
    instructions: list[str] = field(default_factory=lambda: MC_INSTRUCTIONS[:2])
    notes: list[str] = field(default_factory=list)
    description: str = ""
    held_out: bool = True  # False: one group only, the test split is the locate split

    @property
    def has_twins(self) -> bool:
        return self.kind == "pairs"

    def reference(self, model: HookedModel) -> PromptSet | torch.Tensor:
        """The reference set of mean/resample ablation: the counterfactual twins of the test prompts (pairs);
        otherwise the neutral text, packed into rows as wide as the longest test prompt (so resampling
        reaches every position) — the bias is what a unit does beyond what it does on unrelated text."""
        if self.kind == "pairs":
            return self.test.swapped()  # pyright: ignore[reportAttributeAccessIssue] - pairs and yes/no tasks hold a PromptSet
        if not self.reference_text:
            raise LensBiasError("mean and resample ablation of a task without twins need neutral text: pass "
                                "neutral=... or use ablations=('zero',)")
        return packed_lines(model, self.reference_text, self.max_width(model))

    def max_width(self, model: HookedModel) -> int:
        """The longest test prompt in tokens (multiple choice: prompt + longest option)."""
        if isinstance(self.test, PromptSet):
            return int(self.test.tokens.shape[1])
        seqs, _ = option_sequences(tokenizer_of(model), [
            format_mc_prompt(ins, it["context"], it["question"], item_options(it))
            for ins in self.instructions for it in self.test], [item_options(it) for _ in self.instructions
                                                                for it in self.test])
        return max(map(len, seqs))

    def sizes(self) -> dict:
        return {"locate": len(self.locate), "test": len(self.test)}


# ---------------------------------------------------------------------------------------
# Resolving a task spec
# ---------------------------------------------------------------------------------------
def organism_card(model: HookedModel) -> dict | None:
    """The model's organism card when it is a lens_bias model organism, else None."""
    try:
        card = load_card(model)  # pyright: ignore[reportArgumentType] - load_card takes a model too
    except Exception:  # noqa: BLE001 - any model that is not an organism
        return None
    return card if card.get("planted") else None


def _same_length_templates(tok, templates: list[str], word: str) -> list[str]:
    """The largest group of templates whose prompts have the same number of tokens (positions align)."""
    groups: dict[int, list[str]] = {}
    for t in templates:
        groups.setdefault(len(tok(t.format(word), add_special_tokens=False)["input_ids"]), []).append(t)
    return max(groups.values(), key=len)


def _professions(model, max_prompts: int) -> tuple[PromptSet, str]:
    tok = tokenizer_of(model)
    card = organism_card(model)
    if card is not None:
        g = card["planted"]["gender_neuron"]
        female, neutral, templates = g["occupations"], g["neutral_occupations"], g["templates"]
        answers = (g.get("toward", " she"), g.get("against", " he"))
        source = "the organism card's female-stereotyped occupations, neutral occupations as twins"
    else:
        female, neutral = stereotyped_professions(tok)
        templates, answers = VIG_TEMPLATES, (" she", " he")
        source = ("Vig et al.'s professions with stereotypical ≤ −0.4 (female), neutral professions "
                  "(definitional = stereotypical = 0) as twins")
    templates = _same_length_templates(tok, list(templates), female[0])
    female = female[:max_prompts]
    templates = templates[:max(1, max_prompts // len(female))]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # single-token and length drops are counted below
        ps = professions_prompts(model, female, templates, answers=answers, corrupt_with=neutral)
    return ps, f"{source}; {len(templates)} templates of one length"


def _replace_subject(prompt: str, subject: str, word: str = "person") -> str | None:
    at = prompt.rfind(subject)
    return None if at < 0 else prompt[:at] + word + prompt[at + len(subject):]


def _twinned(model, ps: PromptSet, key: str, answers_by_row=None) -> PromptSet:
    """Rows of `ps` with twins where the subject (metadata[key]) is replaced by 'person' (same length)."""
    prompts, corrupted, subjects, meta, answers = [], [], [], [], []
    for i, (p, m) in enumerate(zip(ps.prompts, ps.metadata)):
        c = _replace_subject(p, m[key])
        if c is None:
            continue
        prompts.append(p)
        corrupted.append(c)
        subjects.append(m[key])
        meta.append(m)
        answers.append(answers_by_row[i] if answers_by_row else ps.answers[i])
    if not prompts:
        raise DataError("no prompt holds its occupation: nothing to make counterfactual twins of")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return PromptSet.build(model, prompts, answers, corrupted, subjects=subjects, metadata=meta,
                               on_length_mismatch="drop")


def _winobias(model) -> tuple[PromptSet, str]:
    ps = winobias_prompts(model, load_winobias(stereotype="pro"))
    return _twinned(model, ps, "occupation"), ("WinoBias pro-stereotyped (dev, type 1): prefix up to the pronoun, "
                                                "answers (its pronoun, the other gender's), twins with 'person'")


def _winogender(model) -> tuple[PromptSet, str]:
    ps = winogender_prompts(model, load_winogender())
    # a₀ = the pronoun of the occupation's majority gender (BLS), so LD > 0 means stereotyped
    answers = [a if (m.get("bls_pct_female") or 0) >= 50 else (a[1], a[0]) for a, m in zip(ps.answers, ps.metadata)]
    return _twinned(model, ps, "occupation", answers), ("Winogender male sentences cut before the pronoun, "
                                                         "answers (the BLS-majority gender's pronoun, the other)")


def _sniff(path: Path) -> TaskKind:
    records, _ = load_records(path)
    if not len(records):
        raise DataError(f"{path}: no records")
    first = records[0]
    if "ans0" in first or "options" in first:
        return "multiple_choice"
    if "prompt" in first and "corrupted" in first:
        return "pairs"
    if "question" in first and ("label" in first or "answer" in first):
        return "yesno"
    raise DataError(f"{path}: cannot tell the task from its first record (fields {sorted(first)}); prefix the "
                    "path with yesno:, bbq:, mc: or pairs:")


def _from_file(model, kind: TaskKind, path: Path):
    from ...tasks.pairs import load_prompt_pairs

    if not path.is_file():
        raise DataError(f"task file {path} does not exist")
    if kind == "yesno":
        return load_yes_no(path)
    if kind == "pairs":
        return load_prompt_pairs(model, path, need="corrupted")
    first = load_records(path)[0][0]
    return load_bbq(path) if "ans0" in first else load_multiple_choice(path)


NAMED_TASKS = ("professions", "winobias", "winogender", "yesno", "bbq")


def check_task_spec(spec: str) -> None:
    """Refuse a task spec that cannot resolve, before any model is loaded: an unknown name, an unknown BBQ
    category, a task file that does not exist (one line, LensBiasError/DataError)."""
    if spec in NAMED_TASKS:
        return
    if spec.startswith("bbq/"):
        cat = spec.split("/", 1)[1]
        cats = [n.split("/", 1)[1] for n in SHIPPED_DATASETS if n.startswith("bbq/")]
        if cat not in cats:
            raise DataError(f"unknown BBQ category {cat!r}; shipped: {', '.join(cats)} (or give a file: bbq:PATH)")
        return
    prefix, sep, rest = spec.partition(":")
    if sep and prefix in KIND_FROM_PREFIX and len(prefix) > 1:
        if not Path(rest).is_file():
            raise DataError(f"task file {rest} does not exist")
        return
    path = Path(spec)
    if path.suffix in (".jsonl", ".json", ".csv") or path.exists():
        if not path.is_file():
            raise DataError(f"task file {path} does not exist")
        return
    raise LensBiasError(f"unknown task {spec!r}: use professions, winobias, winogender, yesno, bbq, bbq/CATEGORY, "
                        "or a file (yesno:PATH, bbq:PATH, mc:PATH, pairs:PATH)")


def _resolve_spec(model, task, max_prompts: int, max_items: int):
    """(name, kind, data, description) of a task spec."""
    if isinstance(task, PromptSet):
        if task.has_pairs:
            return "prompt pairs", "pairs", task, "the PromptSet given"
        if task.metadata and "neg_cand" in task.metadata[0]:
            return "yes/no prompts", "yesno", task, "the yes/no PromptSet given"
        raise LensBiasError("a PromptSet task needs counterfactual twins (corrupted=...) or yes/no prompts "
                            "from binary_prompts")
    if not isinstance(task, (str, Path)):
        items = as_items(task)
        if not len(items):
            raise DataError("the task's item list is empty")
        first = items[0]
        if "ans0" in first or "options" in first:
            return "multiple choice", "multiple_choice", items, "the items given"
        if "question" in first and ("label" in first or "answer" in first):
            return "yes/no", "yesno", items, "the yes/no items given"
        raise LensBiasError(f"cannot tell the task from its first item (fields {sorted(first)})")
    spec = str(task)
    check_task_spec(spec)
    organism = organism_card(model) is not None
    if spec == "professions":
        ps, desc = _professions(model, max_prompts)
        return spec, "pairs", ps, desc
    if spec == "winobias":
        ps, desc = _winobias(model)
        return spec, "pairs", ps, desc
    if spec == "winogender":
        ps, desc = _winogender(model)
        return spec, "pairs", ps, desc
    if spec == "yesno":
        src = data_path("yesno") if organism else "strategyqa"
        return spec, "yesno", load_yes_no(src), ("the organism's yesno.jsonl" if organism else "StrategyQA (shipped)")
    if spec == "bbq":
        if organism:
            return spec, "multiple_choice", load_bbq(data_path("bbq")), "the organism's BBQ-style Age items"
        return spec, "multiple_choice", load_bbq("Age"), "BBQ Age (shipped subset)"
    if spec.startswith("bbq/"):
        cat = spec.split("/", 1)[1]  # a shipped category (check_task_spec)
        return spec, "multiple_choice", load_bbq(cat), f"BBQ {cat} (shipped subset)"
    prefix, sep, rest = spec.partition(":")
    if sep and prefix in KIND_FROM_PREFIX and len(prefix) > 1:
        kind = KIND_FROM_PREFIX[prefix]
        return Path(rest).name, kind, _from_file(model, kind, Path(rest)), f"the {prefix} file {rest}"  # pyright: ignore[reportArgumentType] - kind is a TaskKind name (checked above)
    path = Path(spec)
    if path.suffix in (".jsonl", ".json", ".csv") or path.exists():
        if not path.is_file():
            raise DataError(f"task file {path} does not exist")
        kind = _sniff(path)
        return path.name, kind, _from_file(model, kind, path), f"the file {path}"
    raise AssertionError(f"task spec {spec!r} passed check_task_spec but matched no branch")


def group_of(kind: TaskKind, meta_or_item: dict, i: int):
    if kind == "pairs":
        return meta_or_item.get("profession") or meta_or_item.get("occupation") or i
    if kind == "yesno":
        return meta_or_item.get("question", i)
    return i


def _split(n_groups_of: list, holdout: float, seed: int) -> tuple[list[int], list[int]]:
    """Row indices of the locate and test splits, whole groups on one side (seeded)."""
    groups = list(dict.fromkeys(n_groups_of))
    if holdout <= 0 or len(groups) < 2:
        idx = list(range(len(n_groups_of)))
        return idx, idx
    random.Random(seed).shuffle(groups)
    n_test = min(len(groups) - 1, max(1, round(holdout * len(groups))))
    test_groups = set(groups[:n_test])
    test = [i for i, g in enumerate(n_groups_of) if g in test_groups]
    locate = [i for i, g in enumerate(n_groups_of) if g not in test_groups]
    return locate, test


#: option → (its CLI flag, the smallest value allowed)
LIMITS = {"max_prompts": ("--max-prompts", 1), "max_items": ("--max-items", 1)}


def check_options(*, holdout: float, max_prompts: int, max_items: int) -> None:
    """One line naming the option and its allowed range, before any work."""
    if not (isinstance(holdout, (int, float)) and 0 <= holdout < 1):
        raise LensBiasError(f"holdout (--holdout) must be in [0, 1), got {holdout}")
    for name, value in (("max_prompts", max_prompts), ("max_items", max_items)):
        flag, lo = LIMITS[name]
        if isinstance(value, bool) or not isinstance(value, int) or value < lo:
            raise LensBiasError(f"{name} ({flag}) must be a whole number ≥ {lo}, got {value!r}")


def resolve_task(model: HookedModel, task, *, holdout: float = 0.5, max_prompts: int = 64, max_items: int = 48,
                 seed: int = 0, neutral: str | Path | list[str] | None = None, neutral_lines: int = 16) -> ReportTask:
    """The task spec resolved to prompts, split into a locate part and a held-out test part by group
    (profession, question, item), with the neutral text of the capability check."""
    check_options(holdout=holdout, max_prompts=max_prompts, max_items=max_items)
    name, kind, data, desc = _resolve_spec(model, task, max_prompts, max_items)
    notes = []
    if kind == "pairs":
        ps: PromptSet = data  # pyright: ignore[reportAssignmentType] - kind 'pairs' resolves to a PromptSet
        if len(ps) > max_prompts:
            ps = ps[list(range(max_prompts))]
        groups = [group_of(kind, m, i) for i, m in enumerate(ps.metadata)]
        lo, te = _split(groups, holdout, seed)
        locate, test = ps[lo], ps[te]
    elif kind == "yesno":
        if isinstance(data, PromptSet):
            ps = data
        else:
            items = list(as_items(data))
            rng = random.Random(seed)
            if len(items) > max_items:
                items = rng.sample(items, max_items)
            ps = binary_prompts(model, items, YESNO_INSTRUCTIONS[:2])  # both candidate orders
        groups = [group_of(kind, m, i) for i, m in enumerate(ps.metadata)]
        lo, te = _split(groups, holdout, seed)
        locate, test = ps[lo], ps[te]
    else:
        items = [dict(it) for it in as_items(data)]
        amb = [it for it in items if it.get("context_condition") == "ambig"]
        if len(items) > max_items:  # keep the ambiguous items (the bias lives there), then disambiguated ones
            rng = random.Random(seed)
            dis = [it for it in items if it.get("context_condition") != "ambig"]
            take_amb = rng.sample(amb, min(len(amb), (2 * max_items) // 3))
            take_dis = rng.sample(dis, min(len(dis), max_items - len(take_amb)))
            items = take_amb + take_dis
        lo, te = _split(list(range(len(items))), holdout, seed)
        locate, test = [items[i] for i in lo], [items[i] for i in te]
        n_biased = sum(1 for it in test if it.get("context_condition") == "ambig" and biased_option(it) is not None)
        skipped = sum(1 for it in test if it.get("context_condition") == "ambig" and biased_option(it) is None)
        if skipped:
            notes.append(f"{skipped} ambiguous test items have no biased option and are left out of the bias metric")
        if not n_biased:
            raise DataError("no ambiguous item with a biased option in the test split: the bias metric needs some "
                            "(BBQ items with answer_info and stereotyped_groups)")
    held_out = holdout > 0 and lo != te
    if holdout > 0 and not held_out:
        notes.append("one group only (one profession, question or item): nothing could be held out, so the methods "
                     "and the ablations use the same prompts and the curves are not a held-out test")
    rt = ReportTask(name, kind, locate, test, description=desc, notes=notes, held_out=held_out)  # pyright: ignore[reportArgumentType] - kind is a TaskKind name (checked above)
    lines = _neutral(model, neutral)
    rt.neutral = lines[:neutral_lines]  # capability: loss on these lines
    rt.reference_text = lines[neutral_lines:] or lines  # mean/resample reference (tasks without twins)
    return rt


def read_neutral(neutral: str | Path | list[str]) -> list[str]:
    """The neutral text's lines: a path (str or Path) is a UTF-8 text file that must exist, a list its lines
    (one line naming the file when it is missing, a folder, empty or not UTF-8)."""
    if isinstance(neutral, (str, Path)):
        path = Path(neutral)
        text = read_text_file(path)
        try:
            return text_lines(text)
        except LensBiasError:
            raise DataError(f"neutral text file {path} has no line of text") from None
    if not isinstance(neutral, (list, tuple)) or not all(isinstance(t, str) for t in neutral):
        raise LensBiasError(f"neutral must be a text file's path or a list of lines, not {type(neutral).__name__}")
    return text_lines(list(neutral))


def _neutral(model, neutral) -> list[str]:
    if neutral is not None:
        return read_neutral(neutral)
    return text_lines(default_neutral_text(model))  # the organism's own text, else real English (Brown)


# ---------------------------------------------------------------------------------------
# Evaluating the bias metric and capability under hooks
# ---------------------------------------------------------------------------------------
def packed_lines(model: HookedModel, lines: list[str], width: int) -> torch.Tensor:
    """Token ids [rows, width]: the lines' tokens run on, each row BOS (when the model's prompts start with one) + text."""
    tok = tokenizer_of(model)
    stream = [t for ids in encode_lines(tok, lines, bos=False) for t in ids]
    head = bos_ids(tok)  # the model's BOS convention: a chat-turn marker is never prepended
    step = width - len(head)
    rows = [head + stream[i: i + step] for i in range(0, len(stream) - step + 1, step)]
    if not rows:
        raise LensBiasError(f"the neutral text has {len(stream)} tokens, fewer than one reference row of {width}")
    return torch.tensor(rows[:256])


def bias_of(model: HookedModel, task: ReportTask, hooks: Sequence = (), *, corrupted: bool = False,
            split: str = "test") -> dict:
    """The bias metric m (module docstring) on a split, under `hooks`, with the task's own accuracy
    measures: yes/no accuracy and precision − recall gap, multiple-choice accuracy; `values`: each row's
    value (multiple choice: NaN for rows without a biased option), for resampling.py."""
    data = getattr(task, split)
    dev = device_of(model)
    hooks = list(hooks)
    with torch.no_grad():
        if task.kind in ("pairs", "yesno"):
            ps = data.to(dev)
            tokens = ps.corrupted_tokens if corrupted else ps.tokens
            a = answer_logits_fast(model, tokens, ps.answer_pos, ps.answer_ids, hooks, ps.attention_mask).float()
            return answers_bias(task, a, ps.metadata)
        prompts, options = mc_prompts(task, data)
        with model.hooks(fwd_hooks=hooks):
            lp, _ = option_logprobs(model, prompts, options, batch_size=48)
        return mc_bias(task, lp, data)


def mc_prompts(task: ReportTask, items: list) -> tuple[list[str], list[list[str]]]:
    """Every (instruction, item) prompt, instruction-major (row r: instruction r // n, item r % n), and options."""
    prompts, options = [], []
    for ins in task.instructions:
        prompts += [format_mc_prompt(ins, it["context"], it["question"], item_options(it)) for it in items]
        options += [item_options(it) for it in items]
    return prompts, options


def mc_bias(task: ReportTask, lp: torch.Tensor, items: list) -> dict:
    """The multiple-choice bias metric from the option log-probabilities [rows, options] of mc_prompts' rows:
    mean P(biased) − P(other) over ambiguous rows with a biased option, accuracy, each row's value."""
    if not torch.isfinite(lp).all():
        raise LensBiasError("non-finite option log-probabilities: check the model's weights and the ablation")
    p = lp.float().softmax(-1)
    values, correct = torch.full((len(lp),), float("nan")), []
    n = len(items)
    for r in range(len(lp)):  # row r: instruction r // n, item r % n
        it = items[r % n]
        correct.append(int(p[r].argmax()) == int(it["label"]))
        if it.get("context_condition") != "ambig":
            continue
        b, u = biased_option(it), unknown_option(it)
        if b is None or u is None:
            continue
        other = [k for k in range(p.shape[1]) if k not in (b, u)]
        if len(other) != 1:
            continue
        values[r] = float(p[r, b] - p[r, other[0]])
    ok = torch.isfinite(values)
    bias = float(values[ok].mean()) if bool(ok.any()) else float("nan")
    return {"bias": bias, "accuracy": sum(correct) / len(correct), "values": values}


def answers_bias(task: ReportTask, a: torch.Tensor, metadata: list[dict] | None = None) -> dict:
    """The bias metric from the test prompts' answer logits [n, 2] (pairs: a₀ − a₁; yes/no: No − Yes, with
    accuracy and the precision − recall gap of the decisions P(yes) > 0.5); `values`: each row's value."""
    if not torch.isfinite(a).all():
        raise LensBiasError("non-finite answer logits: check the model's weights and the ablation")
    if task.kind == "pairs":
        v = (a[:, 0] - a[:, 1]).float().cpu()
        return {"bias": float(v.mean()), "values": v}
    p_yes = a.softmax(-1)[:, 0]
    gold = [m["label"] == "yes" for m in (metadata if metadata is not None else task.test.metadata)]  # pyright: ignore[reportAttributeAccessIssue] - pairs and yes/no tasks hold a PromptSet
    d = decision_metrics((p_yes > 0.5).tolist(), gold)
    v = (a[:, 1] - a[:, 0]).float().cpu()
    return {"bias": yesno_offset(v, gold)[0], "accuracy": d["accuracy"], "pr_gap": d["pr_gap"], "values": v}


def yesno_offset(no_minus_yes: torch.Tensor, gold_yes: list[bool]) -> tuple[float, float]:
    """The class-balanced offset ½(mean over gold-yes + mean over gold-no) of logit(' No') − logit(' Yes') and
    its standard error: the shift toward ' No' whatever the label mix (one class alone: its mean)."""
    g = torch.tensor(gold_yes, dtype=torch.bool, device=no_minus_yes.device)
    parts = [no_minus_yes[g], no_minus_yes[~g]]
    parts = [p.double() for p in parts if len(p)]
    mean = sum(float(p.mean()) for p in parts) / len(parts)
    var = sum(float(p.var()) / len(p) if len(p) > 1 else 0.0 for p in parts) / len(parts) ** 2
    return mean, var ** 0.5


def neutral_loss(model: HookedModel, task: ReportTask, hooks: Sequence = ()) -> float:
    """Capability: next-token loss on the neutral text (nats/token) under `hooks`; NaN without text."""
    if not task.neutral:
        return float("nan")
    return text_loss(model, task.neutral, hooks=list(hooks))
