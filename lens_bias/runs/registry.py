"""The locate methods batch runs, the CLI and reports know, and the data each one runs on.

Adding a method: write lens_bias/locate/<name>.py ending with its `RUN = LocateMethod(...)` spec
(lens_bias.core.methods), and add one entry below. The CLI's `attribute --method` choices, its
help, the option checks and `attribute_dataset` all come from here.
"""

from __future__ import annotations

from pathlib import Path

from ..core.errors import DataError, LensBiasError, PromptError
from ..core.methods import LocateMethod
from ..core.models import HookedModel
from ..core.prompts import PromptSet, resolve_chat
from ..locate import attribution, baselines, crispr, nas, patching, tracing
from ..tasks.gender import VIG_TEMPLATES, load_professions, professions_prompts
from ..tasks.multiple_choice import check_contexts, load_bbq
from ..tasks.pairs import load_prompt_pairs
from ..tasks.records import located, read_text_file
from ..tasks.yesno import binary_prompts, load_yes_no

#: name → spec, one entry per method
REGISTRY: dict[str, LocateMethod] = {m.name: m for m in (
    patching.RUN,
    attribution.RUN,
    tracing.RUN,
    nas.RUN,
    crispr.RUN,
    baselines.RUN,
)}


def get_method(name: str) -> LocateMethod:
    """The spec of a registered locate method; a clear error naming the registered ones."""
    if name not in REGISTRY:
        raise LensBiasError(f"unknown method {name!r}; choose one of {', '.join(REGISTRY)}")
    return REGISTRY[name]


def method_options(method: LocateMethod, options: dict | None) -> dict:
    """The method's options with defaults filled in (so omitting a default is the same run);
    unknown options and components it does not take are refused."""
    options = {k: v for k, v in (options or {}).items() if v is not None}
    unknown = sorted(set(options) - set(method.options))
    if unknown:
        raise LensBiasError(f"unknown option(s) {unknown} for {method.name}; it takes {sorted(method.options) or 'none'}")
    out = {**method.options, **options}
    for k, v in out.items():
        if isinstance(v, tuple):
            out[k] = list(v)
    if method.sites:
        comps = out.get("components") or []
        bad = [c for c in comps if c not in method.sites]
        if bad or not comps:
            raise LensBiasError(f"unknown {method.name} component(s) {bad or comps}; choose from "
                                f"{', '.join(method.sites)}")
    return out


def load_run_data(model: HookedModel, method: str | LocateMethod, path: str | Path, options: dict | None = None):
    """The data a method runs on, from a file (formats in the CLI's `attribute --help`): a PromptSet
    (pairs, subject prompts, yes/no) or multiple-choice items."""
    spec = method if isinstance(method, LocateMethod) else get_method(method)
    opts = method_options(spec, options)
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path} is a directory; --data wants a file")
    if spec.data == "yesno":
        try:
            return binary_prompts(model, load_yes_no(path))
        except PromptError as e:
            raise located(path, e) from None
    if spec.data == "multiple_choice":
        items = load_bbq(path)
        try:
            chat = resolve_chat(model, opts.get("chat"))
            check_contexts(model, items, crispr.instructions_of(opts) if spec is crispr.RUN else None,
                           model.tokenizer if chat else None)
        except PromptError as e:
            raise located(path, e) from None
        return items
    subject = spec.data == "subject_prompts"
    twins = not subject or opts.get("corruption") == "counterfactual"
    answers = tuple(opts.get("answers") or (" he", " she"))
    if path.suffix in (".json", ".txt"):
        templates = opts.get("templates") or (VIG_TEMPLATES[:1] if subject else VIG_TEMPLATES)
        if path.suffix == ".json":
            professions = load_professions(path)
        else:
            professions = [w.strip() for w in read_text_file(path).splitlines() if w.strip()]
        return professions_prompts(model, professions, templates, answers,
                                   corrupt_with=opts.get("corrupt_with", "man") if twins else None)
    if path.suffix in (".jsonl", ".csv"):
        return load_prompt_pairs(model, path, answers=answers, need="corrupted" if twins else "subject")
    raise DataError(f"{path}: unknown data format {path.suffix!r} for {spec.name}; use .json (professions), .txt "
                    "(one profession a line), .jsonl or .csv (prompt, corrupted, subject, answers)")


def expects_prompt_set(method: LocateMethod) -> bool:
    """True when the method runs on a PromptSet (everything but multiple-choice items)."""
    return method.data != "multiple_choice"


__all__ = ["REGISTRY", "PromptSet", "expects_prompt_set", "get_method", "load_run_data", "method_options"]
