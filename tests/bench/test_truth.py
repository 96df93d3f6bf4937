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


# --- the sampled-truth estimators (real-model neurons) -------------------------------------------------
def test_weighted_scores_equal_the_plain_ones_when_every_unit_is_known():
    from lens_bias.bench import truth as T

    g = torch.Generator().manual_seed(1)
    eff, s = torch.randn(200, generator=g), torch.randn(200, generator=g)
    pos = T.carriers(eff)
    wpos, k = T.weighted_carriers(eff, torch.ones(200))
    assert torch.equal(wpos, pos) and k == int(pos.sum())
    assert T.weighted_recall(s, torch.arange(200), wpos, torch.ones(200), k) == pytest.approx(T.recall_at_k(s, pos))
    assert T.weighted_auc(s, wpos, torch.ones(200)) == pytest.approx(T.auc(s, pos))
    s_tied = s.round()  # ties count ½ in both
    assert T.weighted_auc(s_tied, wpos, torch.ones(200)) == pytest.approx(T.auc(s_tied, pos))


def test_weighted_estimates_from_a_uniform_sample_are_unbiased():
    """A population of 3 fully known 'layers' of 50 units plus 20 'layers' known through a uniform sample of 100
    units (each standing for 10): averaged over many samples, the estimated recall and AUC of a fixed noisy
    ranking match the values computed on the whole population."""
    from lens_bias.bench import truth as T

    g = torch.Generator().manual_seed(2)
    n_full, n_out, n_sample = 150, 1000, 100
    eff = torch.randn(n_full + n_out, generator=g).clamp(min=0) ** 3  # heavy-tailed, many near zero
    score = eff + 0.5 * torch.randn(n_full + n_out, generator=g)
    true_pos = T.carriers(eff)
    true_rec, true_auc = T.recall_at_k(score, true_pos), T.auc(score, true_pos)
    recs, aucs = [], []
    for seed in range(300):
        pick = n_full + torch.randperm(n_out, generator=torch.Generator().manual_seed(seed))[:n_sample]
        known = torch.cat([torch.arange(n_full), pick])
        w = torch.cat([torch.ones(n_full), torch.full((n_sample,), n_out / n_sample)])
        pos, k = T.weighted_carriers(eff[known], w)
        recs.append(T.weighted_recall(score, known, pos, w, k))
        aucs.append(T.weighted_auc(score[known], pos, w))
    assert sum(recs) / len(recs) == pytest.approx(true_rec, abs=0.05)
    assert sum(aucs) / len(aucs) == pytest.approx(true_auc, abs=0.03)
    # a ranking with the sign flipped is caught by the estimate too
    pos, _ = T.weighted_carriers(eff[known], w)
    assert T.weighted_auc(-score[known], pos, w) == pytest.approx(1 - T.weighted_auc(score[known], pos, w))
