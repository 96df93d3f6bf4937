"""How sure: intervals over the held-out prompts, resampling what was sampled.

The held-out prompts are not independent draws. Prompts of one profession (question, item) share it, and
in pair tasks the neutral twins are shared too: a few neutral professions are cycled over many stereotyped
ones, so prompts of different professions share a twin. Treating prompts (or professions) as independent
overstates how sure a number is. The bootstrap here resamples both random factors, crossed (Owen's
pigeonhole bootstrap, 2007): each replicate draws the professions with replacement and, independently, the
twins with replacement; a prompt counts (times its profession was drawn) × (times its twin was drawn).
A twin is the tokens that differ from its prompt (the neutral word), so one shared word is one draw, and a
single twin word for every prompt (WinoBias' 'person') is a fixed part of the design, not resampled.
Yes/no tasks resample questions, multiple-choice tasks items.

Every bias metric of the report is a weighted mean of per-row values under these weights (replicate 0 is
the data itself: all weights 1):
    pairs            m = Σ w_i v_i / Σ w_i,  v_i = logit(a₀) − logit(a₁) of prompt i
    yes/no           m = ½ (weighted mean over gold-yes rows + over gold-no rows), v_i = logit(No) − logit(Yes)
    multiple choice  m = Σ w_i v_i / Σ w_i over rows with a biased option, v_i = P(biased) − P(other)
Intervals are the 2.5 and 97.5 percentiles over the replicates.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ...core.prompts import PromptSet
from .tasks import ReportTask, group_of

N_BOOT = 1000


def _counts(ids: list, n_boot: int, gen: torch.Generator) -> Tensor:
    """[n_boot + 1, n_rows]: how often each row's cluster is drawn (row 0: once each)."""
    keys = list(dict.fromkeys(ids))
    index = torch.tensor([keys.index(i) for i in ids])
    G = len(keys)
    draws = torch.randint(0, G, (n_boot, G), generator=gen)
    c = torch.zeros(n_boot, G, dtype=torch.float64).scatter_add_(1, draws, torch.ones(n_boot, G, dtype=torch.float64))
    return torch.cat([torch.ones(1, G, dtype=torch.float64), c])[:, index]


def twin_keys(ps: PromptSet) -> list[tuple]:
    """Each prompt's twin as the tokens that differ from the prompt (the neutral word that replaced it)."""
    assert ps.corrupted_tokens is not None, "twin_keys needs a prompt set with twins"
    diff = ps.tokens != ps.corrupted_tokens
    return [tuple(ps.corrupted_tokens[i][diff[i]].tolist()) for i in range(len(ps))]


@dataclass
class Resampling:
    """Bootstrap weights [n_boot + 1, rows] of the test split's rows (row 0 = the data), and what the
    weighted mean needs (yes/no: each row's gold label)."""

    weights: Tensor
    kind: str
    gold: Tensor | None = None
    n_clusters: int = 0
    n_twins: int = 0

    def mean(self, values: Tensor) -> Tensor:
        """The bias metric of per-row values [..., rows] under every replicate: [..., n_boot + 1]."""
        v = values.double()
        ok = torch.isfinite(v)
        v = v.nan_to_num(0.0)
        if self.kind == "yesno":
            assert self.gold is not None  # resampling sets it for yes/no tasks
            parts = []
            for cls in (self.gold, ~self.gold):
                if not bool(cls.any()):
                    continue
                w = self.weights * cls
                parts.append(_wmean(v, ok, w))
            stacked = torch.stack(parts)
            return stacked.nanmean(0)  # a class no replicate row drew: the other's mean
        return _wmean(v, ok, self.weights)

    @property
    def n_boot(self) -> int:
        return self.weights.shape[0] - 1


def _wmean(v: Tensor, ok: Tensor, w: Tensor) -> Tensor:
    """Σ w v / Σ w over finite values: v [..., rows], w [B, rows] → [..., B] (NaN where no weight)."""
    num = torch.einsum("...r,br->...b", v * ok, w)
    den = torch.einsum("...r,br->...b", ok.double(), w)
    return num / den.where(den > 0, torch.tensor(float("nan"), dtype=den.dtype))


def resampling(task: ReportTask, n_boot: int = N_BOOT, seed: int = 0) -> Resampling:
    """The bootstrap of the task's test rows (module docstring): professions × twins, questions or items."""
    gen = torch.Generator().manual_seed(int(seed) + 4242)
    if task.kind == "multiple_choice":
        n = len(task.test)
        ids = [r % n for r in range(n * len(task.instructions))]
        return Resampling(_counts(ids, n_boot, gen), task.kind, n_clusters=n)
    ps: PromptSet = task.test  # pyright: ignore[reportAssignmentType] - pairs and yes/no tasks hold a PromptSet
    groups = [group_of(task.kind, m, i) for i, m in enumerate(ps.metadata or [{}] * len(ps))]
    w = _counts(groups, n_boot, gen)
    n_twins = 0
    if task.kind == "pairs":
        twins = twin_keys(ps)
        n_twins = len(set(twins))
        if n_twins > 1:
            w = w * _counts(twins, n_boot, gen)
    gold = None
    if task.kind == "yesno":
        gold = torch.tensor([m["label"] == "yes" for m in ps.metadata], dtype=torch.bool)
    return Resampling(w, task.kind, gold, n_clusters=len(set(groups)), n_twins=n_twins)


def interval(replicates: Tensor) -> tuple[float, float]:
    """The 2.5 and 97.5 percentiles of replicates [n_boot + 1] (row 0, the data, left out); NaNs dropped."""
    r = replicates[1:].double()
    r = r[torch.isfinite(r)]
    if len(r) < 2:
        return float("nan"), float("nan")
    q = torch.quantile(r, torch.tensor([0.025, 0.975], dtype=r.dtype))
    return float(q[0]), float(q[1])


__all__ = ["N_BOOT", "Resampling", "interval", "resampling", "twin_keys"]
