"""One mitigation end to end — apply, evaluate before/after, save the edit, export — as `lens-bias
mitigate` and `lens-bias export` run it. Each step is a public function of its own module; this
only strings them together and writes the files (atomically)."""

from __future__ import annotations

import json
import os
import shutil
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Callable, Literal

from ..core.checks import check_seed, check_weights_finite
from ..core.errors import DataError, LensBiasError, PromptError
from ..core.files import atomic_dir, check_output_dir, write_csv, write_text
from ..core.models import HookedModel, resolve_model
from ..core.prompts import resolve_chat
from ..mitigate.edits import Mitigation, apply_edit, load_edit, save_edit
from ..mitigate.export import check_exportable, export_model
from ..mitigate import methods
from ..mitigate.methods import Measure, MitigationData, MitigationRequest, Occupations, Questions
from ..mitigate.registry import MITIGATIONS, get_mitigation
from ..organism import data_path, organism_card
from ..tasks.capability import compare_models, default_neutral_text, text_loss
from ..tasks.gender import VIG_TEMPLATES, load_professions
from ..tasks.multiple_choice import bbq_evaluate, check_contexts, load_bbq
from ..tasks.records import located, read_dataset, read_text_file, shipped_dataset
from ..tasks.yesno import binary_prompts, load_yes_no, yes_no_measures

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


# ---------------------------------------------------------------------------------------
# --data, read as the mitigation's data kind says: (what its run gets, measures of the data)
# ---------------------------------------------------------------------------------------
def _evaluation_data(model: HookedModel, data) -> tuple[None, dict[str, Measure]]:
    """Bias and accuracy measures of a data file, when one is given: BBQ (context, question, ans0..2: bias
    scores, accuracy) or yes/no questions (precision − recall gap, accuracy), told apart by its fields."""
    if data is None:
        return None, {}
    columns = set(read_dataset(data).column_names)
    if {"context", "ans0", "ans1", "ans2"} <= columns:
        items = load_bbq(data)
        try:
            check_contexts(model, items, template=model.tokenizer if resolve_chat(model) else None)
        except PromptError as e:
            raise located(data, e) from None
        keys = ("accuracy", "accuracy_ambig", "accuracy_disambig", "bias_ambig", "bias_disambig",
                "stereotyped_rate_ambig")
        return None, {"bbq": lambda m: {k: v for k, v in bbq_evaluate(m, items).items() if k in keys}}
    ps = _yes_no_prompts(model, data)
    return None, {"yesno": lambda m: yes_no_measures(m, ps)}


def _occupations(model: HookedModel, data) -> tuple[Occupations, dict]:
    """Occupations and templates: from a professions file (Vig et al. JSON or one word per line) with
    Vig's templates, twins Vig et al.'s neutral 'person'; or, for the organism, its card's occupations,
    templates and neutral occupations."""
    card = organism_card(model) if data is None else None
    if card is not None:
        g = card["planted"]["gender_neuron"]
        words = g["occupations"] + g["male_occupations"] + g["neutral_occupations"]
        return Occupations(words, g["templates"], g["neutral_occupations"]), {}
    path = Path(data) if data is not None else shipped_dataset("professions")
    words = (list(load_professions(path)["name"]) if path.suffix == ".json"
             else [w.strip() for w in read_text_file(path).splitlines() if w.strip()])
    tok = model.tokenizer
    words = [w for w in words if len(tok(" " + w, add_special_tokens=False)["input_ids"]) == 1]
    if len(words) < 2:
        raise DataError(f"{path}: fewer than 2 occupations are single tokens for this tokenizer")
    return Occupations(words, list(VIG_TEMPLATES)), {}


def _questions(model: HookedModel, data) -> tuple[Questions, dict]:
    """Yes/no questions (default: the organism's) and their prompts, a bad item named by its line."""
    source = data or data_path("yesno")
    items = load_yes_no(source)
    return Questions(Path(source), items, _yes_no_prompts(model, source, items)), {}


def _yes_no_prompts(model, data, items=None):
    """binary_prompts of a yes/no file (or its `items`), an error naming the file's line."""
    try:
        return binary_prompts(model, load_yes_no(data) if items is None else items)
    except PromptError as e:
        raise located(data, e) from None


#: data kind → (its reader, its line in the CLI's help)
DATA_KINDS: dict[MitigationData, tuple[Callable, str]] = {
    "evaluation": (_evaluation_data, "with --data (BBQ JSONL, or yes/no questions): bias and accuracy before/after "
                                     "too"),
    "occupations": (_occupations, "--data: professions (Vig et al. .json, or .txt one a line); default: the shipped "
                                  "Vig et al. list (the organism: its card's occupations and templates)"),
    "yesno": (_questions, "--data: yes/no JSONL/JSON/CSV (default: the organism's)"),
}


# ---------------------------------------------------------------------------------------
# The pipeline: check → read → run → evaluate → write
# ---------------------------------------------------------------------------------------
def mitigate(model: HookedModel | str | os.PathLike, method: str, out: str | os.PathLike, *, units=None, data=None,
             neutral=None, top_k: int = 1, steps: int = 100, seed: int = 0, export: bool = True,
             overwrite: bool = False, progress: bool = True, device=None, dtype=None) -> str:
    """Apply the mitigation `method` (a name in lens_bias.mitigate.MITIGATIONS: 'prune-neurons',
    'prune-heads' with `units`, evaluated on `data` — BBQ or yes/no — when given; 'lsdm' on occupations;
    'nasa' on yes/no data with `units` heads or the top-k NAS heads), write before_after.csv,
    edit.safetensors, the exported model (out/model) and report.txt; return the report. `model`: a hooked
    model, or a name/path for load_model(device, dtype)."""
    spec = get_mitigation(method)
    check_seed(seed)
    # everything that can be refused is refused before any work
    out = check_output_dir(out, overwrite)
    model, _ = resolve_model(model, device=device, dtype=dtype)
    if export:
        check_exportable(model)
    request = MitigationRequest(list(units or []), data, seed=seed, top_k=top_k, steps=steps, progress=progress)
    if spec.check is not None:
        spec.check(model, request)
    check_weights_finite(model, "mitigate")
    request = replace(request, neutral_text=read_text_file(neutral) if neutral else default_neutral_text(model))
    inputs, data_measures = DATA_KINDS[spec.data][0](model, data)
    run = spec.run(model, request, inputs)
    measures = {"neutral_loss": lambda m: text_loss(m, request.neutral_text), **data_measures, **run.measures}
    table = compare_models({"original": model, "mitigated": run.result.model}, measures)
    lines = [f"lens-bias mitigate: {method} on {getattr(model, 'lens_bias_source', 'model')}", *run.lines]
    return _write(out, spec, table, lines, run.result, export)


def _write(out: Path, spec: methods.MitigationMethod, table, lines: list[str], result: Mitigation, export: bool) -> str:
    """The before/after table, the edit, the exported model and the report, into a temporary sibling that
    replaces `out`'s files of an earlier run at the end (the user's other files in `out` stay)."""
    with atomic_dir(out, merge=True) as tmp:
        write_csv(tmp / "before_after.csv", table)
        wide = table.pivot(index="measure", columns="model", values="value")
        for name, row in wide.iterrows():
            lines.append(f"  {name}: {row['original']:.4f} → {row['mitigated']:.4f}")
        edit = result.edit
        save_edit(edit, tmp / "edit.safetensors")
        lines.append(f"edit: {len(edit.changes)} weights changed, ‖Δ‖ = {edit.norm:.3f} → edit.safetensors")
        if export:
            export_model(result.model, tmp / "model")
            lines.append("exported (transformers reloads it with the same logits) → model/")
        report = "\n".join(lines)
        write_text(tmp / "report.txt", report + "\n")
        summary = {"method": spec.name, "table": table.to_dict("records")}
        write_text(tmp / "report.json", json.dumps(summary, indent=2))
        stale = [out / name for name in OUTPUTS if not (tmp / name).exists()]  # an earlier run's, e.g. its model/
    for path in stale:
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    return report


def export_edit(model: HookedModel, edit_file: str | os.PathLike, out: str | os.PathLike, *, overwrite: bool = False):
    """Re-apply a saved edit to its original model and export the result as a Hugging Face directory."""
    check_output_dir(out, overwrite)  # before the work
    check_exportable(model)
    return export_model(apply_edit(model, load_edit(edit_file)), out, overwrite=overwrite)


def __getattr__(name: str):
    """Deprecated names: METHODS and MitigationMethod (the Literal of the built-in names)."""
    if name == "METHODS":
        warnings.warn("lens_bias.apps.pipeline.METHODS is deprecated: use lens_bias.mitigate.MITIGATIONS (name → spec)",
                      DeprecationWarning, stacklevel=2)
        return tuple(MITIGATIONS)
    if name == "MitigationMethod":
        warnings.warn("lens_bias.apps.pipeline.MitigationMethod (a Literal of names) is deprecated: the names are the "
                      "keys of lens_bias.mitigate.MITIGATIONS, whose values are lens_bias.mitigate.MitigationMethod specs",
                      DeprecationWarning, stacklevel=2)
        return Literal["prune-neurons", "prune-heads", "lsdm", "nasa"]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
