"""Intervals for reported figures: the percentile bootstrap over prompts or items (optionally by cluster:
every prompt of a resampled question or profession comes along), and the spread of a control over seeds.

    iv = bootstrap(lambda idx: values[idx].mean(), len(values))          # 95% percentile interval
    iv = bootstrap(lambda idx: a[idx].mean() - b[idx].mean(), n)         # paired: both on the same draws
    band = over_seeds([gap_seed0, gap_seed1, ...])                       # mean, 2.5–97.5% of the seeds

A statistic that is undefined on some draws (NaN: e.g. a recall with no positive item drawn) leaves those
draws out, with a warning when they are more than 10%; undefined on the full sample, the interval is NaN.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import numpy as np

from .errors import LensBiasError


@dataclass(frozen=True)
class Interval:
    """An estimate with a [low, high] interval; `kind` says what it is over ('bootstrap over 40 prompts',
    'seeds')."""

    estimate: float
    low: float
    high: float
    kind: str = "bootstrap"
    n: int = 0

    def __str__(self) -> str:
        return f"{self.estimate:+.3f} [{self.low:+.3f}, {self.high:+.3f}]"

    def excludes(self, value: float = 0.0) -> bool:
        """True when `value` lies outside [low, high] (False for a NaN interval)."""
        return bool(self.low > value or self.high < value)

    def as_dict(self, prefix: str = "") -> dict:
        return {f"{prefix}{k}": v for k, v in asdict(self).items()}


def bootstrap_indices(n: int, n_boot: int = 1000, seed: int = 0, groups: Sequence | None = None) -> np.ndarray:
    """[n_boot, n'] row indices of bootstrap draws: rows with replacement, or with `groups` (one label
    per row), whole groups with replacement (every row of a drawn group comes along; n' varies, so a
    list of arrays is returned as an object array)."""
    if n < 1:
        raise LensBiasError("nothing to bootstrap: no rows")
    rng = np.random.default_rng(seed)
    if groups is None:
        return rng.integers(0, n, size=(n_boot, n))
    groups = list(groups)
    if len(groups) != n:
        raise LensBiasError(f"{len(groups)} group labels for {n} rows")
    labels = sorted(set(groups), key=str)
    members = [np.flatnonzero(np.array([g == lab for g in groups])) for lab in labels]
    draws = rng.integers(0, len(labels), size=(n_boot, len(labels)))
    out = np.empty(n_boot, dtype=object)
    for b in range(n_boot):
        out[b] = np.concatenate([members[k] for k in draws[b]])
    return out


def bootstrap(stat: Callable[[np.ndarray], float], n: int, *, n_boot: int = 1000, seed: int = 0,
              level: float = 0.95, groups: Sequence | None = None, what: str = "prompts") -> Interval:
    """`stat(all rows)` with the percentile interval of `stat(draw)` over `n_boot` bootstrap draws of the
    n rows (or of `groups`, a label per row: a cluster bootstrap)."""
    if not 0 < level < 1:
        raise LensBiasError(f"level must be in (0, 1), got {level}")
    estimate = float(stat(np.arange(n)))
    kind = f"bootstrap over {n} {what}" if groups is None else f"bootstrap over {len(set(groups))} groups of {what}"
    if not math.isfinite(estimate):
        return Interval(math.nan, math.nan, math.nan, kind, n)
    values = np.array([float(stat(idx)) for idx in bootstrap_indices(n, n_boot, seed, groups)])
    ok = values[np.isfinite(values)]
    if len(ok) < 0.9 * len(values):
        warnings.warn(f"the statistic is undefined on {len(values) - len(ok)} of {len(values)} bootstrap draws; "
                      "the interval is over the rest", stacklevel=2)
    if not len(ok):
        return Interval(estimate, math.nan, math.nan, kind, n)
    a = (1 - level) / 2
    return Interval(estimate, float(np.quantile(ok, a)), float(np.quantile(ok, 1 - a)), kind, n)


def mean_interval(values: Sequence[float], **kw) -> Interval:
    """The mean of `values` with its bootstrap interval (`bootstrap`'s options)."""
    v = np.asarray(values, dtype=float)
    return bootstrap(lambda idx: v[idx].mean(), len(v), **kw)


def over_seeds(values: Sequence[float], level: float = 0.95) -> Interval:
    """A control repeated over seeds: the mean and the central `level` range of the seeds' values (the band a
    selected unit's figure is compared with)."""
    v = np.asarray([x for x in values if math.isfinite(x)], dtype=float)
    if not len(v):
        return Interval(math.nan, math.nan, math.nan, "seeds", 0)
    a = (1 - level) / 2
    return Interval(float(v.mean()), float(np.quantile(v, a)), float(np.quantile(v, 1 - a)), f"{len(v)} seeds", len(v))
