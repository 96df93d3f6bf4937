"""Metrics against hand computations."""

import math

import pytest
import torch

from lens_bias.core import (
    LensBiasError,
    PromptSet,
    answer_logits,
    logit_diff,
    normalized_metric,
    odds_ratio,
    prob_ratio,
    total_effect,
)


@pytest.fixture(scope="module")
def ps(gpt2_tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gpt2_tokenizer_dir)
    return PromptSet.build(tok, ["The nurse said that", "The man ate"], (" she", " he"))


def test_hand_computed(ps):
    she, he = ps.answer_ids[0].tolist()
    logits = torch.zeros(2, ps.tokens.shape[1], 50257)
    # prompt 0 answers at its last token (pos 4), prompt 1 (shorter, right-padded) at pos 3
    logits[0, 4, she], logits[0, 4, he] = 2.0, 0.5
    logits[1, 3, she], logits[1, 3, he] = -1.0, 1.0
    logits[1, 4, she] = 99.0  # padding position: must be ignored
    assert ps.answer_pos.tolist() == [4, 3]
    assert logit_diff(logits, ps).tolist() == pytest.approx([1.5, -2.0])
    assert prob_ratio(logits, ps).tolist() == pytest.approx([math.exp(1.5), math.exp(-2.0)])
    # gathered answer logits give the same numbers
    assert logit_diff(answer_logits(logits, ps)).tolist() == pytest.approx([1.5, -2.0])
    p = logits[0, 4].softmax(-1)
    odds = (p[she] / (1 - p[she])) / (p[he] / (1 - p[he]))
    assert odds_ratio(logits, ps)[0].item() == pytest.approx(odds.item(), rel=1e-4)
    assert total_effect(torch.tensor(2.0), torch.tensor(3.0)).item() == pytest.approx(0.5)
    assert normalized_metric(torch.tensor([1.0, 3.0, 2.0]), 3.0, 1.0).tolist() == [0.0, 1.0, 0.5]


def test_bad_shapes(ps):
    with pytest.raises(LensBiasError, match="do not fit"):
        logit_diff(torch.zeros(3, 5, 10), ps)
    with pytest.raises(LensBiasError, match="need the PromptSet"):
        logit_diff(torch.zeros(2, 5, 10))
    with pytest.raises(LensBiasError, match="full logits"):
        odds_ratio(torch.zeros(2, 2), ps)
    with pytest.raises(LensBiasError, match="undefined"):
        normalized_metric(1.0, 2.0, 2.0)
