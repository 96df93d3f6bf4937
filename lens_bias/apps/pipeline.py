"""One mitigation end to end — apply, evaluate before/after, save the edit, export — as `lens-bias
mitigate` and `lens-bias export` run it. Each step is a public function of its own module; this
only strings them together and writes the files (atomically)."""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Literal

from ..core.checks import check_seed, check_weights_finite
from ..core.errors import DataError, LensBiasError, PromptError
from ..core.files import check_output_dir, move_into, renamed_error, write_csv, write_text
from ..core.models import HookedModel
from ..core.prompts import resolve_chat
from ..locate.nas import negative_attention_scores
from ..mitigate.edits import apply_edit, load_edit, save_edit
from ..mitigate.export import check_exportable, export_model
from ..mitigate.lsdm import lsdm_edit
from ..mitigate.nasa import nasa_train
from ..mitigate.prune import prune_heads, prune_neurons
from ..organism import data_path, organism_card
from ..tasks.capability import bias_values, compare_models, default_neutral_text, text_loss
from ..tasks.gender import VIG_TEMPLATES, load_professions, professions_prompts
from ..tasks.multiple_choice import bbq_evaluate, check_contexts, load_bbq
from ..tasks.records import located, read_dataset, read_text_file, shipped_dataset
from ..tasks.yesno import binary_prompts, evaluate_binary, load_yes_no

MitigationMethod = Literal["prune-neurons", "prune-heads", "lsdm", "nasa"]
METHODS = ("prune-neurons", "prune-heads", "lsdm", "nasa")
#: what `mitigate` writes into its folder (with --overwrite, the folder's other files stay)
OUTPUTS = ("before_after.csv", "edit.safetensors", "model", "report.txt", "report.json")


def parse_units(text: str | None, what: str = "unit") -> list[tuple[int, int]]:
    """'0:103,2:1' → [(0, 103), (2, 1)] — (layer, neuron) or (layer, head) pairs."""
    if not text:
        return []
    out = []
    for part in text.split(","):
        try:
            l, i = part.strip().split(":")
            out.append((int(l), int(i)))
        except ValueError:
            raise LensBiasError(f"cannot read {what} {part.strip()!r}: write LAYER:INDEX, e.g. 0:103") from None
        if out[-1] in out[:-1]:
            raise LensBiasError(f"--units names {out[-1][0]}:{out[-1][1]} twice; give each {what} once")
    return out


def _occupation_prompts(model, data, seed):
    """Edit/evaluation prompt sets for LSDM: from a professions file (Vig et al. JSON or one word per
    line) with Vig's templates, or, for the organism, its card's occupations and templates. The edit
    prompts carry counterfactual twins for the site choice (causal tracing): the organism's neutral
    occupations, or Vig et al.'s neutral 'person'."""
    twins = "person"
    card = organism_card(model) if data is None else None
    if card is not None:
        g = card["planted"]["gender_neuron"]
        words, templates = g["occupations"] + g["male_occupations"] + g["neutral_occupations"], g["templates"]
        twins = g["neutral_occupations"]
    else:
        path = Path(data) if data is not None else shipped_dataset("professions")
        words = (list(load_professions(path)["name"]) if path.suffix == ".json"
                 else [w.strip() for w in read_text_file(path).splitlines() if w.strip()])
        templates = list(VIG_TEMPLATES)
        tok = model.tokenizer
        words = [w for w in words if len(tok(" " + w, add_special_tokens=False)["input_ids"]) == 1]
        if len(words) < 2:
            raise DataError(f"{path}: fewer than 2 occupations are single tokens for this tokenizer")

    def she_he(occupations, templates, corrupt_with=None):
        return professions_prompts(model, occupations, templates, answers=(" she", " he"), corrupt_with=corrupt_with)

    rng = random.Random(seed)
    words, templates = words[:], templates[:]
    rng.shuffle(words)
    rng.shuffle(templates)
    cut_w, cut_t = max(1, int(0.7 * len(words))), max(1, len(templates) // 2)
    edit = she_he(words[:cut_w], templates[:cut_t], twins)
    held_out = she_he(words[cut_w:] or words, templates[cut_t:] or templates)
    return edit, held_out


def _task_measures(model, data) -> dict:
    """Bias and accuracy measures for a data file: BBQ (context, question, ans0..2: bias scores,
    accuracy) or yes/no questions (precision − recall gap, accuracy), told apart by its fields."""
    columns = set(read_dataset(data).column_names)
    if {"context", "ans0", "ans1", "ans2"} <= columns:
        items = load_bbq(data)
        try:
            check_contexts(model, items, template=model.tokenizer if resolve_chat(model) else None)
        except PromptError as e:
            raise located(data, e) from None
        keys = ("accuracy", "accuracy_ambig", "accuracy_disambig", "bias_ambig", "bias_disambig",
                "stereotyped_rate_ambig")
        return {"bbq": lambda m: {k: v for k, v in bbq_evaluate(m, items).items() if k in keys}}
    ps = _yes_no_prompts(model, data)
    return {"yesno": lambda m: _binary_measures(m, ps)}


def _yes_no_prompts(model, data, items=None):
    """binary_prompts of a yes/no file (or its `items`), an error naming the file's line."""
    try:
        return binary_prompts(model, load_yes_no(data) if items is None else items)
    except PromptError as e:
        raise located(data, e) from None


def _binary_measures(model, ps) -> dict:
    return {k: v for k, v in evaluate_binary(model, ps)["overall"].items() if k in ("pr_gap", "accuracy", "yes_rate")}


def mitigate(model: HookedModel, method: MitigationMethod, out: str | os.PathLike, *, units=None, data=None, neutral=None,
             top_k: int = 1, steps: int = 100, seed: int = 0, export: bool = True, overwrite: bool = False,
             progress: bool = True) -> str:
    """Apply `method` ('prune-neurons', 'prune-heads' with `units`, evaluated on `data` — BBQ or
    yes/no — when given; 'lsdm' on occupations; 'nasa' on yes/no data with `units` heads or the
    top-k NAS heads), write before_after.csv, edit.safetensors,
    the exported model (out/model) and report.txt; return the report."""
    if method not in METHODS:
        raise LensBiasError(f"unknown mitigation {method!r}; choose one of {METHODS}")
    check_seed(seed)
    # everything that can be refused is refused before any work
    out = check_output_dir(out, overwrite)
    if export:
        check_exportable(model)
    n_heads = model.cfg.n_layers * model.cfg.n_heads
    if method == "nasa" and not units and (isinstance(top_k, bool) or not isinstance(top_k, int)
                                           or not 1 <= top_k <= n_heads):
        raise LensBiasError(f"--top-k must be a number of heads from 1 to {n_heads} (the model's heads), got {top_k}")
    if method == "nasa" and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise LensBiasError(f"--steps must be ≥ 1, got {steps}")
    check_weights_finite(model, "mitigate")
    neutral_text = read_text_file(neutral) if neutral else default_neutral_text(model)
    units = list(units or [])
    measures = {"neutral_loss": lambda m: text_loss(m, neutral_text)}
    lines = [f"lens-bias mitigate: {method} on {getattr(model, 'lens_bias_source', 'model')}"]
    if method in ("prune-neurons", "prune-heads"):
        if not units:
            raise LensBiasError(f"{method} needs the components to prune (--units LAYER:INDEX,...)")
        result = (prune_neurons if method == "prune-neurons" else prune_heads)(model, units)
        lines.append(f"pruned {len(units)} {'neurons' if method == 'prune-neurons' else 'heads'}: {units}")
        if data is not None:
            measures.update(_task_measures(model, data))
    elif method == "lsdm":
        edit_set, held_out = _occupation_prompts(model, data, seed)
        result = lsdm_edit(model, edit_set, neutral_text, progress=progress)
        res = result.report
        measures["bias_held_out"] = lambda m: bias_values(m, held_out).mean().item()
        measures["abs_bias_held_out"] = lambda m: bias_values(m, held_out).abs().mean().item()
        lines.append(f"LSDM edit of MLP layer(s) {res['layers']} at the {res['position']} token, ‖Δ‖ = "
                     f"{sum(v ** 2 for v in res['delta_norms'].values()) ** 0.5:.3f}; edit prompts LD "
                     f"{res['bias_before']:+.3f} → {res['bias_after']:+.3f}")
    else:
        source = data or data_path("yesno")
        items = load_yes_no(source)
        n = len(items)
        if n < 10:
            raise DataError(f"{source}: nasa needs at least 10 yes/no items, got {n}")
        every = _yes_no_prompts(model, source, items)  # bad items named by line, before the shuffle
        order = list(range(n))
        random.Random(seed).shuffle(order)
        per = len(every) // n  # prompts per item (one per instruction), item-major
        a, b = int(0.6 * n), int(0.8 * n)
        train, dev, test = (every[[j * per + t for j in part for t in range(per)]]
                            for part in (order[:a], order[a:b], order[b:]))
        heads = units or negative_attention_scores(model, train, progress=progress).top_heads(top_k)
        result = nasa_train(model, heads, train, dev, steps=steps, seed=seed, progress=progress)
        measures["test"] = lambda m: _binary_measures(m, test)
        lines.append(f"NASA on heads {heads}: LoRA trained {result.report['best_step']} steps (best dev gap)")
    edited = result.model
    table = compare_models({"original": model, "mitigated": edited}, measures)
    # everything goes to a temporary sibling that replaces `out` whole at the end
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        write_csv(tmp / "before_after.csv", table)
        wide = table.pivot(index="measure", columns="model", values="value")
        for name, row in wide.iterrows():
            lines.append(f"  {name}: {row['original']:.4f} → {row['mitigated']:.4f}")
        edit = result.edit
        save_edit(edit, tmp / "edit.safetensors")
        lines.append(f"edit: {len(edit.changes)} weights changed, ‖Δ‖ = {edit.norm:.3f} → edit.safetensors")
        if export:
            export_model(edited, tmp / "model")
            lines.append("exported (transformers reloads it with the same logits) → model/")
        report = "\n".join(lines)
        write_text(tmp / "report.txt", report + "\n")
        write_text(tmp / "report.json", json.dumps({"method": method, "table": table.to_dict("records")}, indent=2))
        stale = [out / name for name in OUTPUTS if not (tmp / name).exists()]  # an earlier run's, e.g. its model/
        move_into(tmp, out)  # the user's other files in `out` stay
        for path in stale:
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        named = renamed_error(e, tmp, out)  # a file too large is named where it was to go
        if named is not e:
            raise named from None
        raise
    return report


def export_edit(model: HookedModel, edit_file: str | os.PathLike, out: str | os.PathLike, *, overwrite: bool = False):
    """Re-apply a saved edit to its original model and export the result as a Hugging Face directory."""
    check_output_dir(out, overwrite)  # before the work
    check_exportable(model)
    return export_model(apply_edit(model, load_edit(edit_file)), out, overwrite=overwrite)
