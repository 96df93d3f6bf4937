"""Metrics against hand computations."""

import math

import pytest
import torch

from lens_bias.errors import LensBiasError
from lens_bias.metrics import answer_logits, logit_diff, normalized_metric, odds_ratio, prob_ratio, total_effect
from lens_bias.prompts import PromptSet


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


def test_cloze_accuracy_multi_token_answers(tiny_gpt2):
    from lens_bias.metrics import cloze_accuracy

    tok = tiny_gpt2.tokenizer
    prompt = "The capital of Kenya is"
    ids = [tok.bos_token_id] + tok(prompt, add_special_tokens=False)["input_ids"]
    for _ in range(2):  # the model's own greedy two-token continuation
        with torch.no_grad():
            ids.append(int(tiny_gpt2(torch.tensor([ids]))[0, -1].argmax()))
    greedy = tok.decode(ids[-2:])
    assert len(tok(greedy, add_special_tokens=False)["input_ids"]) == 2
    wrong = tok.decode([ids[-2], (ids[-1] + 1) % 50257])  # first token right, second wrong
    acc = cloze_accuracy(tiny_gpt2, [{"prompt": prompt, "answer": greedy, "kind": "a"},
                                     {"prompt": prompt, "answer": wrong, "kind": "b"}])
    assert acc == {"overall": 0.5, "a": 1.0, "b": 0.0}


def test_cloze_longer_than_the_context_is_refused(tiny_gpt2):
    from lens_bias.errors import PromptError
    from lens_bias.metrics import cloze_accuracy

    with pytest.raises(PromptError, match="longer than the model's context of 128"):
        cloze_accuracy(tiny_gpt2, [{"prompt": "word " * 200 + "The capital of France is", "answer": " Paris"}])


def test_compare_models_expands_dict_measures():
    from lens_bias.metrics import compare_models

    calls = []

    def both(m):
        calls.append(m)
        return {"a": m * 2, "b": m + 1}

    t = compare_models({"x": 1, "y": 3}, {"s": both, "one": lambda m: -m})
    assert list(t["measure"]) == ["s_a", "s_b", "one", "s_a", "s_b", "one"]
    assert list(t["value"]) == [2.0, 2.0, -1.0, 6.0, 4.0, -3.0] and calls == [1, 3]  # one evaluation per model
