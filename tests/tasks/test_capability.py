"""Capability measures: cloze accuracy against hand-built expectations, comparison tables."""

import pytest
import torch

from lens_bias.core import PromptError
from lens_bias.tasks import cloze_accuracy, compare_models


def test_cloze_accuracy_multi_token_answers(tiny_gpt2):

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

    with pytest.raises(PromptError, match="longer than the model's context of 128"):
        cloze_accuracy(tiny_gpt2, [{"prompt": "word " * 200 + "The capital of France is", "answer": " Paris"}])


def test_compare_models_expands_dict_measures():

    calls = []

    def both(m):
        calls.append(m)
        return {"a": m * 2, "b": m + 1}

    t = compare_models({"x": 1, "y": 3}, {"s": both, "one": lambda m: -m})
    assert list(t["measure"]) == ["s_a", "s_b", "one", "s_a", "s_b", "one"]
    assert list(t["value"]) == [2.0, 2.0, -1.0, 6.0, 4.0, -3.0] and calls == [1, 3]  # one evaluation per model
