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


def test_line_losses_equal_transformers_per_line(tiny_gpt2):
    """Per line: Σ −log P(token | prefix) over the tokens after BOS, as plain transformers' loss × count;
    text_loss is their ratio of sums (lines of different lengths: padding must not count)."""
    from lens_bias.core.hf import to_hf_model
    from lens_bias.tasks import line_losses, text_loss

    lines = ["The big bird came to the river.", "A cat sat.", "Rain fell on the old town in the morning."]
    per = line_losses(tiny_gpt2, lines, batch_size=2)
    hf = to_hf_model(tiny_gpt2)
    tok = tiny_gpt2.tokenizer
    for row, line in zip(per, lines):
        ids = torch.tensor([[tok.bos_token_id] + tok(line, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            mean = hf(input_ids=ids, labels=ids).loss.item()
        assert row[1].item() == ids.shape[1] - 1
        assert row[0].item() == pytest.approx(mean * (ids.shape[1] - 1), rel=1e-5)
    assert text_loss(tiny_gpt2, lines) == pytest.approx((per[:, 0].sum() / per[:, 1].sum()).item(), rel=1e-6)


def test_cloze_hits_keep_the_items_order(tiny_gpt2):
    from lens_bias.tasks import cloze_hits

    tok = tiny_gpt2.tokenizer
    prompt = "The capital of Kenya is"
    ids = [tok.bos_token_id] + tok(prompt, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        top = int(tiny_gpt2(torch.tensor([ids]))[0, -1].argmax())
    right, wrong = tok.decode([top]), tok.decode([(top + 1) % 50257])
    items = [{"prompt": prompt, "answer": a} for a in (wrong, right, wrong, right)]
    assert cloze_hits(tiny_gpt2, items, batch_size=3) == [False, True, False, True]
