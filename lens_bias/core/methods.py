"""How a locate method plugs into batch runs and reports: one `LocateMethod` spec per method.

A method's module (lens_bias/locate/*.py) ends with its spec; `lens_bias.runs.registry` lists the
specs — adding a method is its file plus one entry there. A run cuts the data into chunks and
asks the spec for each chunk's *sums* (so chunks combine exactly, in any order, on any number of
processes), then for the result from the summed chunks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Literal

import torch
from torch import Tensor

from .scores import ComponentScores

#: what a method runs on: clean/corrupted pairs, prompts with a subject span (tracing), yes/no
#: prompts naming both candidates, multiple-choice items (BBQ)
DataKind = Literal["pairs", "subject_prompts", "yesno", "multiple_choice"]


@dataclass
class ChunkSums:
    """One chunk's contribution: float64 sums that add across chunks, the item count, metadata the
    result needs (the same for every chunk) and per-prompt rows kept in order (may be empty)."""

    sums: dict[str, Tensor]
    count: int
    meta: dict = field(default_factory=dict)
    rows: dict[str, Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class LocateMethod:
    """A locate method as batch runs and reports see it.

    run(model, data, lo, hi, options, batch_size, state) → ChunkSums of items lo..hi;
    finalize(model, data, total: ChunkSums, options) → the method's result (ComponentScores or a
    dict of them, one per site); prepare(model, data, options, seed) → state shared by all chunks.
    `options` maps each option to its default (all of them go into a run's manifest); `sites` lists
    the values its 'components' option takes. `units(result)` → scores by unit kind ('head':
    [layer, head], 'neuron': [layer, neuron]), what reports and benchmarks compare; None: unit_scores.
    """

    name: str
    summary: str
    data: DataKind
    options: dict[str, Any]
    run: Callable[..., ChunkSums]
    finalize: Callable[..., Any]
    prepare: Callable[..., Any] | None = None
    sites: tuple[str, ...] = ()
    units: Callable[[Any], dict[str, Tensor]] | None = None


def add_scores(results: dict[str, ComponentScores], n: int, into: ChunkSums | None = None) -> ChunkSums:
    """The sums of per-site ComponentScores (each a mean over n prompts) — n × mean, or the per-prompt
    sum where the result keeps per-prompt values — added to `into`."""
    out = into or ChunkSums({}, 0)
    for key, res in results.items():
        pp = res.extra.get("per_prompt")
        vals = pp.double().sum(-1) if pp is not None else res.values.double() * n
        for name, v in ((f"{key}/values", vals), (f"{key}/clean", torch.tensor(res.clean * n, dtype=torch.float64)),
                        (f"{key}/corrupted", torch.tensor(res.corrupted * n, dtype=torch.float64))):
            out.sums[name] = out.sums[name] + v if name in out.sums else v
        keep = {k: v for k, v in res.extra.items() if k not in ("per_prompt", "fast", "agreement")}
        out.meta[key] = {"dims": list(res.dims), "component": res.component, "method": res.method, "extra": keep}
    out.count += n
    return out


def scores_from_sums(total: ChunkSums, tokens: list[str] | None, n: int | None = None) -> dict[str, ComponentScores]:
    """Per-site ComponentScores (means = sum / n, n = the item count by default) from summed chunks."""
    n = total.count if n is None else n
    out = {}
    for key, m in total.meta.items():
        extra = {**m["extra"], "n_prompts": total.count}
        if "layers" in extra:
            extra["layers"] = list(extra["layers"])
        out[key] = ComponentScores((total.sums[f"{key}/values"] / n).float(), tuple(m["dims"]), m["component"],
                                   m["method"], float(total.sums[f"{key}/clean"] / n),
                                   float(total.sums[f"{key}/corrupted"] / n), tokens, extra)
    return out


#: a unit kind → the dims of its [layer, unit] scores
UNIT_DIMS = {"head": ("layer", "head"), "neuron": ("layer", "neuron")}


def unit_scores(result: ComponentScores | dict[str, ComponentScores]) -> dict[str, Tensor]:
    """A method's result as scores by unit kind: every ComponentScores whose dims are [layer, head] or
    [layer, neuron], its effect (patched − corrupted for patching and tracing, the score otherwise)."""
    parts = result.values() if isinstance(result, dict) else [result]
    out = {}
    for res in parts:
        kind = next((k for k, dims in UNIT_DIMS.items() if tuple(res.dims) == dims), None)
        if kind is not None:
            out.setdefault(kind, res.effect)
    return out
