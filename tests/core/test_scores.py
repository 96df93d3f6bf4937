"""core/scores.py: ComponentScores' effect, normalisation, tidy table, top, argmax and units against
hand computations with numpy and pandas."""

import itertools
import math

import numpy as np
import pandas as pd
import pytest
import torch

from lens_bias.core import ComponentScores, LensBiasError

VALUES = torch.tensor([[0.5, -2.0, 1.5], [3.25, 0.25, -0.75]])  # [layer, pos]; no two |effects| tie


def patching(**kw) -> ComponentScores:
    return ComponentScores(VALUES.clone(), ("layer", "pos"), "resid_pre", "activation", clean=2.5, corrupted=0.5, **kw)


def test_effect_and_normalized_of_patching_and_attribution():
    s = patching()
    assert torch.equal(s.effect, VALUES - 0.5)  # patched metric − corrupted metric
    assert torch.allclose(s.normalized, (VALUES - 0.5) / 2.0)  # 0 = corrupted, 1 = clean
    a = ComponentScores(VALUES.clone(), ("layer", "head"), "head", "attribution", clean=2.5, corrupted=0.5)
    assert torch.equal(a.effect, VALUES)  # the estimate is the effect itself
    for clean in (0.5, float("nan")):
        with pytest.raises(LensBiasError, match="nothing to normalise by"):
            ComponentScores(VALUES, ("layer", "pos"), "resid_pre", "activation", clean=clean, corrupted=0.5).normalized


def expected_frame(values: np.ndarray, dims, corrupted, gap, layers=None, tokens=None) -> pd.DataFrame:
    """The tidy table built by hand: one row per index, C order."""
    rows = []
    for idx in itertools.product(*[range(n) for n in values.shape]):
        row = dict(zip(dims, idx))
        if layers is not None:
            row["layer"] = layers[idx[0]]
        if tokens is not None:
            row["token"] = tokens[row["pos"]] if row["pos"] < len(tokens) else ""
        v = float(values[idx])
        row.update(value=v, effect=v - corrupted, normalized=(v - corrupted) / gap)
        rows.append(row)
    return pd.DataFrame(rows)


def test_to_frame_is_one_row_per_component():
    s = patching(tokens=["<bos>", " The"], extra={"layers": [4, 9]})  # 3 positions, 2 tokens
    df = s.to_frame()
    want = expected_frame(VALUES.numpy(), ("layer", "pos"), 0.5, 2.0, layers=[4, 9], tokens=["<bos>", " The"])
    assert list(df.columns) == ["component", "method", "layer", "pos", "token", "value", "effect", "normalized"]
    assert (df["component"] == "resid_pre").all() and (df["method"] == "activation").all()
    pd.testing.assert_frame_equal(df[want.columns].reset_index(drop=True), want, check_dtype=False)
    three = ComponentScores(torch.arange(24.0).reshape(2, 3, 4), ("layer", "head", "pos"), "head", "attribution")
    got = three.to_frame()
    assert "normalized" not in got  # no clean/corrupted gap: nothing to normalise by
    pd.testing.assert_series_equal(got["value"], pd.Series(np.arange(24.0), name="value"))
    want_idx = [list(i) for i in itertools.product(range(2), range(3), range(4))]
    assert got[["layer", "head", "pos"]].values.tolist() == want_idx


def test_top_is_the_largest_absolute_effects():
    s = patching()
    eff = (VALUES - 0.5).reshape(-1).numpy()
    order = np.argsort(-np.abs(eff), kind="stable")[:3]
    top = s.top(3)
    assert top["effect"].tolist() == pytest.approx(eff[order].tolist())
    assert [tuple(r) for r in top[["layer", "pos"]].values] == [divmod(int(i), 3) for i in order]
    assert top["effect"].abs().is_monotonic_decreasing and len(s.top(100)) == VALUES.numel()


def test_argmax_and_units():
    s = patching(extra={"layers": [4, 9]})
    assert s.argmax() == (1, 0)  # the largest signed effect: 3.25 − 0.5 (coordinates into values)
    assert s.units(2) == [(9, 0), (4, 2)]  # largest signed effects, layers as model layers
    assert s.units(2, largest=False) == [(4, 1), (9, 2)]  # −2.5, −1.25
    assert patching().units(1) == [(1, 0)]
    for n in (0, 7):
        with pytest.raises(LensBiasError, match=f"n = {n} units"):
            s.units(n)
    heads = ComponentScores(torch.tensor([[0.1, 0.9], [0.4, -math.inf]]), ("layer", "head"), "head", "nas")
    assert heads.units(3) == [(0, 1), (1, 0), (0, 0)]
    assert heads.argmax() == (0, 1)  # signed: not the −inf of largest magnitude
