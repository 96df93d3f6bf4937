"""Bootstrap intervals against what statistics says they must be: the normal-theory width of a mean's
interval, coverage of the true mean over repeated samples, a cluster bootstrap as wide as the clusters'
own interval, seeds' bands."""

import math
import warnings

import numpy as np
import pytest

from lens_bias.core.errors import LensBiasError
from lens_bias.core.stats import bootstrap, bootstrap_indices, mean_interval, over_seeds


def test_mean_interval_has_the_normal_theory_width():
    x = np.random.default_rng(1).normal(3.0, 2.0, size=400)
    iv = mean_interval(x, n_boot=2000)
    assert iv.estimate == pytest.approx(x.mean())
    half = 1.96 * x.std(ddof=1) / math.sqrt(len(x))  # ≈ 0.196
    assert (iv.high - iv.low) / 2 == pytest.approx(half, rel=0.12)
    assert iv.low < iv.estimate < iv.high and iv.excludes(0.0) and not iv.excludes(3.0)


def test_interval_covers_the_true_mean_about_95_percent_of_the_time():
    rng = np.random.default_rng(0)
    hits = 0
    for s in range(200):
        x = rng.exponential(1.0, size=60)  # skewed: the percentile interval still covers ≈ 93–95%
        iv = mean_interval(x, n_boot=400, seed=s)
        hits += iv.low <= 1.0 <= iv.high
    assert 0.88 <= hits / 200 <= 0.99


def test_cluster_bootstrap_is_as_wide_as_the_clusters_interval():
    rng = np.random.default_rng(2)
    centres = rng.normal(0, 1, size=30)
    x = np.repeat(centres, 10) + rng.normal(0, 0.01, size=300)  # ten near-copies of each cluster's value
    groups = np.repeat(np.arange(30), 10)
    plain = mean_interval(x, n_boot=1000)
    clustered = mean_interval(x, n_boot=1000, groups=groups)
    of_centres = mean_interval(centres, n_boot=1000)
    width = lambda iv: iv.high - iv.low  # noqa: E731
    assert width(clustered) == pytest.approx(width(of_centres), rel=0.2)
    assert width(clustered) > 2.5 * width(plain)  # rows are not independent: the plain interval is √10 too narrow
    assert "30 groups" in clustered.kind


def test_groups_draw_whole_clusters():
    idx = bootstrap_indices(6, n_boot=50, seed=0, groups=["a", "a", "b", "b", "c", "c"])
    for draw in idx:
        rows = set(draw.tolist())
        for pair in ({0, 1}, {2, 3}, {4, 5}):
            assert pair <= rows or not (pair & rows)


def test_paired_statistic_and_undefined_draws():
    rng = np.random.default_rng(3)
    a = rng.normal(0, 1, 200)
    b = a + 0.5 + rng.normal(0, 0.05, 200)  # b − a ≈ 0.5, tightly: a paired interval is narrow
    iv = bootstrap(lambda i: b[i].mean() - a[i].mean(), 200)
    assert iv.high - iv.low < 0.05 and iv.low < 0.5 < iv.high
    # a statistic undefined on many draws warns; undefined on the full sample gives NaN
    y = np.array([1.0] + [0.0] * 19)
    with pytest.warns(UserWarning, match="undefined"):
        bootstrap(lambda i: 1.0 if y[i].sum() else math.nan, 20, n_boot=200)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert math.isnan(bootstrap(lambda i: math.nan, 5).estimate)
    with pytest.raises(LensBiasError):
        bootstrap(lambda i: 0.0, 0)


def test_over_seeds_band():
    band = over_seeds([0.1 * k for k in range(11)])
    assert band.estimate == pytest.approx(0.5)
    assert band.low == pytest.approx(0.025) and band.high == pytest.approx(0.975)
    assert band.n == 11 and band.kind == "11 seeds"
    assert math.isnan(over_seeds([math.nan]).estimate)
