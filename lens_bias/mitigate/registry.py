"""The mitigations `lens-bias mitigate` and the pipeline know.

Adding one: write its code and end it with its `MitigationMethod(...)` spec (lens_bias.mitigate.methods),
and add one entry below. The CLI's `mitigate --method` choices and help, and the pipeline
(lens_bias.apps.pipeline.mitigate), come from here.
"""

from __future__ import annotations

from ..core.errors import LensBiasError
from . import lsdm, nasa, prune
from .methods import MitigationMethod

#: name → spec, one entry per mitigation
MITIGATIONS: dict[str, MitigationMethod] = {m.name: m for m in (
    prune.RUN_NEURONS,
    prune.RUN_HEADS,
    lsdm.main.RUN,
    nasa.train.RUN,
)}


def get_mitigation(name: str) -> MitigationMethod:
    """The spec of a registered mitigation; a clear error naming the registered ones."""
    if name not in MITIGATIONS:
        raise LensBiasError(f"unknown mitigation {name!r}; choose one of {tuple(MITIGATIONS)}")
    return MITIGATIONS[name]


__all__ = ["MITIGATIONS", "get_mitigation"]
