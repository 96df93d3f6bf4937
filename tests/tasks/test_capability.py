"""Capability measures: cloze accuracy against hand-built expectations, comparison tables."""

import pytest
import torch

from lens_bias.core import PromptError
from lens_bias.tasks import cloze_accuracy, compare_models, text_loss


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


def test_text_loss_is_the_mean_next_token_cross_entropy(tiny_gpt2, tiny_gpt2_dir):
    """text_loss = Σ over lines of −log P(next token), BOS first (GPT-2's convention), / the number of predicted
    tokens: plain transformers, one line at a time, against lines of different lengths batched two by two."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    lines = ["The cat sat on the mat and looked at the door for a long time.", "Rain fell.",
             "A short line here.", "Numbers like 12 and 345 are tokens too, and so is punctuation!", "Yes."]
    hf = AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir).eval()
    tok = AutoTokenizer.from_pretrained(tiny_gpt2_dir)
    total, count = 0.0, 0
    for line in lines:
        ids = torch.tensor([[tok.bos_token_id] + tok(line).input_ids])
        with torch.no_grad():
            logits = hf(input_ids=ids).logits[0, :-1]
        total += float(torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum"))
        count += ids.shape[1] - 1
    assert text_loss(tiny_gpt2, "\n".join(lines), batch_size=2) == pytest.approx(total / count, abs=1e-5)
    assert text_loss(tiny_gpt2, lines, batch_size=32) == pytest.approx(total / count, abs=1e-5)
