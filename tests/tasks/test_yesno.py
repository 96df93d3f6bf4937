"""Yes/no prompt sets, generators, loaders and decision metrics."""

import json
import math

import pytest

from lens_bias.core import DataError, PromptError
from lens_bias.organism import data_path
from lens_bias.tasks import YESNO_INSTRUCTIONS as INSTRUCTIONS
from lens_bias.tasks import (
    arithmetic_items,
    binary_prompts,
    comparison_items,
    decision_metrics,
    evaluate_binary,
    load_yes_no,
    membership_items,
    negation_items,
)


def test_generators_have_exact_labels():
    for it in arithmetic_items(40, level=2, seed=1):
        a, rest = it["question"][3:].split(" + ")
        b, c = rest.rstrip("?").split(" = ")
        assert (int(a) + int(b) == int(c)) == (it["label"] == "yes")
    for it in comparison_items(40, seed=2):
        a, b = it["question"][3:-1].split(" more than ")
        assert (int(a) > int(b)) == (it["label"] == "yes")
    for it in negation_items(20, seed=2):
        a, b = it["question"][len("Is it true that "):-1].split(" is not more than ")
        assert (not int(a) > int(b)) == (it["label"] == "yes")
    labels = [it["label"] for it in membership_items(20)]
    assert labels.count("yes") == 10
    with pytest.raises(PromptError, match="difficulty level"):
        arithmetic_items(3, level=7)


def test_candidate_positions_for_any_order(tiny_gpt2):
    ps = binary_prompts(tiny_gpt2, arithmetic_items(2), INSTRUCTIONS)
    assert len(ps) == 2 * len(INSTRUCTIONS)
    tok = tiny_gpt2.tokenizer
    for i, m in enumerate(ps.metadata):
        assert ps.tokens[i, m["neg_cand"]].item() == tok(" No", add_special_tokens=False)["input_ids"][0]
        assert ps.tokens[i, m["pos_cand"]].item() == tok(" Yes", add_special_tokens=False)["input_ids"][0]
        assert (m["pos_cand"] < m["neg_cand"]) == ("Yes or No" in m["instruction"])


def test_bad_binary_input(tiny_gpt2):
    with pytest.raises(PromptError, match="not yes/no"):
        binary_prompts(tiny_gpt2, [{"question": "Is it?", "label": "maybe"}])
    with pytest.raises(PromptError, match="not found in the instruction"):
        binary_prompts(tiny_gpt2, arithmetic_items(1), ["Answer the question."])
    with pytest.raises(PromptError, match="tokens"):
        binary_prompts(tiny_gpt2, arithmetic_items(1), candidates=(" Yes", " No way"))


def test_loaders(datasets_dir, tmp_path):
    items = load_yes_no(datasets_dir / "strategyqa" / "train.json")
    assert len(items) == 600 and sum(it["label"] == "yes" for it in items) == 265  # the shipped subset
    assert len(load_yes_no(data_path("yesno"))) == 400
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "Is 1 + 1 = 2?", "label": "yes"}) + "\n{not json\n")
    with pytest.raises(DataError, match="bad.jsonl:2: malformed JSON"):
        load_yes_no(bad)
    csvf = tmp_path / "q.csv"
    csvf.write_text("question,label\nIs 2 more than 1?,TRUE\nIs 1 more than 2?,perhaps\n")
    with pytest.raises(PromptError, match="q.csv:3"):
        load_yes_no(csvf)
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match="empty"):
        load_yes_no(tmp_path / "empty.jsonl")


def test_decision_metrics_by_hand():
    m = decision_metrics([True, True, False, False, False], [True, False, True, True, False])
    # tp 1, fp 1, fn 2, tn 1
    assert m["precision"] == 0.5 and m["recall"] == pytest.approx(1 / 3) and m["accuracy"] == 0.4
    assert m["pr_gap"] == pytest.approx(0.5 - 1 / 3) and m["yes_rate"] == 0.4


def test_organism_negative_bias(organism, organism_control):
    items = load_yes_no(data_path("yesno"))[:60]
    org = evaluate_binary(organism, binary_prompts(organism, items))
    ctl = evaluate_binary(organism_control, binary_prompts(organism_control, items))
    assert org["overall"]["pr_gap"] > ctl["overall"]["pr_gap"] + 0.2
    assert org["overall"]["yes_rate"] < ctl["overall"]["yes_rate"]
    assert set(org["per_template"]) == set(range(len(INSTRUCTIONS)))
    assert {"p_yes", "pred", "question"} <= set(org["table"].columns)


def test_precision_without_a_yes_is_nan_with_a_warning():
    with pytest.warns(UserWarning, match="precision is NaN"):
        m = decision_metrics([False, False, False], [True, False, True])
    assert math.isnan(m["precision"]) and math.isnan(m["pr_gap"]) and m["recall"] == 0.0 and m["yes_rate"] == 0.0


def test_chat_prompts_keep_the_candidates_and_the_answer_where_they_are(tiny_chat_llama):
    """Through the chat template: the decision is the assistant's first token ('Yes'/'No', no space), and NAS's
    key positions still point at the ' Yes'/' No' named in the instruction, L_I at the token after it."""
    items = [{"question": "Is a dog a fruit?", "label": "no"}, {"question": "Is 2 more than 1?", "label": "yes"}]
    tok = tiny_chat_llama.tokenizer
    ps = binary_prompts(tiny_chat_llama, items)
    assert ps.prompts[0].startswith("<|im_start|>system") and ps.prompts[0].endswith("<|im_start|>assistant\n")
    assert [tok.decode([i]) for i in ps.answer_ids[0].tolist()] == ["Yes", "No"]
    for i, m in enumerate(ps.metadata):
        row = tok.convert_ids_to_tokens(ps.tokens[i].tolist())
        assert m["chat"] and row[m["pos_cand"]] == "ĠYes" and row[m["neg_cand"]] == "ĠNo"
        ins = tok(m["instruction"], add_special_tokens=False)["input_ids"]
        at = m["query_start"] - len(ins)  # the instruction's tokens end right before L_I
        assert ps.tokens[i, at: m["query_start"]].tolist() == ins and row[at - 1] == "Ċ"  # after "user\n"
        assert int(ps.answer_pos[i]) == int(ps.attention_mask[i].sum()) - 1 and row[int(ps.answer_pos[i])] == "Ċ"
    plain = binary_prompts(tiny_chat_llama, items, chat=False)
    assert plain.prompts[0].endswith("\nAnswer:") and [tok.decode([i]) for i in plain.answer_ids[0]] == [" Yes", " No"]
    m = plain.metadata[1]  # "Answer No or Yes.": No named first
    row = tok.convert_ids_to_tokens(plain.tokens[1].tolist())
    assert (row[m["neg_cand"]], row[m["pos_cand"]], m["neg_cand"] < m["pos_cand"]) == ("ĠNo", "ĠYes", True)
    assert m["query_start"] == len(tok(m["instruction"], add_special_tokens=False)["input_ids"])


def test_chat_true_without_a_template_is_refused(tiny_gpt2):
    with pytest.raises(PromptError, match="no chat template"):
        binary_prompts(tiny_gpt2, [{"question": "Is 2 more than 1?", "label": "yes"}], chat=True)
