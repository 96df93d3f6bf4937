"""The benchmark's scores against hand computations: carriers, recall@k, AUC."""

import itertools

import pytest
import torch

from lens_bias.bench import auc, carriers, recall_at_k
from lens_bias.core.errors import LensBiasError


def test_carriers_are_the_fewest_units_reaching_the_share():
    eff = torch.tensor([[0.5, -2.0, 0.1], [3.0, 1.0, 0.4]])  # positive total 5.0; 80% = 4.0
    # largest first: 3.0 (3.0), 1.0 (4.0 ≥ 4.0 → stop at 2 units) — but at least 3
    assert carriers(eff).tolist() == [[True, False, False], [True, True, False]]
    eff = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, -9.0])  # 80% of 5 needs 4 units
    assert carriers(eff).tolist() == [True, True, True, True, False, False]
    with pytest.raises(LensBiasError, match="no unit has a positive effect"):
        carriers(torch.tensor([-1.0, 0.0]))


def test_recall_at_k():
    pos = torch.tensor([True, True, False, False, False])
    assert recall_at_k(torch.tensor([5.0, 1.0, 4.0, 0.0, -1.0]), pos) == 0.5  # top-2 = units 0, 2
    assert recall_at_k(torch.tensor([0.0, 1.0, 0.5, float("nan"), -1.0]), pos) == 0.5  # NaN ranks last
    assert recall_at_k(torch.tensor([2.0, 3.0, 1.0, 0.0, 0.0]), pos) == 1.0


def test_auc_equals_the_pairwise_count():
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        s = torch.randint(0, 5, (12,), generator=g).float()  # many ties
        pos = torch.rand(12, generator=g) < 0.4
        if pos.all() or not pos.any():
            continue
        pairs = list(itertools.product(s[pos].tolist(), s[~pos].tolist()))
        want = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in pairs) / len(pairs)
        assert auc(s, pos) == pytest.approx(want)
        assert auc(-s, pos) == pytest.approx(1 - want)  # a flipped sign is caught
