"""How a mitigation plugs into `lens-bias mitigate`: one `MitigationMethod` spec per method.

A method's module (prune.py, lsdm/, nasa/) ends with its spec; `lens_bias.mitigate.registry` lists the
specs — adding a mitigation is its code, its spec and one entry there. The pipeline
(lens_bias.apps.pipeline) checks the request, reads --data as the spec's data kind says, runs the
method, evaluates the model before and after, saves the edit and exports; the CLI's `--method`
choices and help come from the specs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

from ..core.models import HookedModel
from ..core.prompts import PromptSet
from .edits import Mitigation

#: what --data is for a mitigation: `evaluation`, optional BBQ or yes/no data measured before and after
#: (the run gets None); `occupations`, professions to edit on and judge by (the run gets Occupations);
#: `yesno`, yes/no questions to train on and judge by (the run gets Questions)
MitigationData = Literal["evaluation", "occupations", "yesno"]
#: what --units names: MLP neurons or attention heads, as (layer, index) pairs
UnitKind = Literal["neuron", "head"]
#: a model → a number (one row of the before/after table)
Measure = Callable[[HookedModel], float | dict[str, float]]  # a dict: several rows (compare_models)


@dataclass(frozen=True)
class MitigationRequest:
    """What the user asked for: the (layer, index) pairs of --units (may be empty), --data as given (a
    path or None), the neutral text of the capability check (LSDM preserves it) and the options."""

    units: list[tuple[int, int]] = field(default_factory=list)
    data: str | Path | None = None
    neutral_text: str = ""
    seed: int = 0
    top_k: int = 1
    steps: int = 100
    progress: bool = True


@dataclass(frozen=True)
class Occupations:
    """--data of kind 'occupations': words and templates (with {} for the word) to edit on and judge
    by, and the counterfactual occupation(s) of the site choice (causal tracing)."""

    words: list[str]
    templates: list[str]
    twins: str | list[str] = "person"


@dataclass(frozen=True)
class Questions:
    """--data of kind 'yesno': the file, its items and their prompts (item-major: one prompt per item ×
    instruction)."""

    source: Path
    items: list[dict]
    prompts: PromptSet


@dataclass(frozen=True)
class MitigationRun:
    """What a mitigation's run gives back: the Mitigation (model, edit, report), the measures that judge
    it beside the pipeline's own (name → a function of a model), and its lines of the report."""

    result: Mitigation
    measures: dict[str, Measure] = field(default_factory=dict)
    lines: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class MitigationMethod:
    """A mitigation as `lens-bias mitigate` sees it.

    run(model, request, data) → MitigationRun, `data` what the pipeline read from --data for the
    spec's `data` kind (MitigationData); check(model, request) refuses a bad request before any work.
    `units` is what --units names (None: the method takes no units); `summary` (one line) and `help`
    (its data, defaults, splits) are its entry in the CLI's help.
    """

    name: str
    summary: str
    units: UnitKind | None
    data: MitigationData
    run: Callable[[HookedModel, MitigationRequest, Any], MitigationRun]
    check: Callable[[HookedModel, MitigationRequest], None] | None = None
    help: str = ""


__all__ = ["Measure", "MitigationData", "MitigationMethod", "MitigationRequest", "MitigationRun", "Occupations",
           "Questions", "UnitKind"]
