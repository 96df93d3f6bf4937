"""PromptSet: tokenisation, answer ids, pairs, spans, and clear errors on bad input."""

import pytest
import torch

from lens_bias.core import PromptError, PromptSet, answer_token_id


def test_build_tokens_answers_spans(tiny_gpt2):
    ps = PromptSet.build(tiny_gpt2, ["The nurse said that", "The mechanic said that"], (" he", " she"),
                         corrupted=["The man said that", "The woman said that"], subjects=["nurse", "mechanic"])
    # real GPT-2 ids: "The nurse said that" → [464, 15849, 531, 326], BOS 50256 prepended
    assert ps.tokens[0].tolist() == [50256, 464, 15849, 531, 326]
    assert ps.corrupted_tokens[0].tolist() == [50256, 464, 582, 531, 326]
    assert ps.answer_ids.tolist() == [[339, 673], [339, 673]]
    assert ps.answer_pos.tolist() == [4, 4]
    assert ps.subject_spans[0].tolist() == [2, 3]
    assert ps.same_length and ps.has_pairs and len(ps) == 2


def test_multi_token_subject_span_and_right_padding(tiny_gpt2):
    tok = tiny_gpt2.tokenizer
    ps = PromptSet.build(tiny_gpt2, ["The nurse said that", "The flight attendant said that"], (" he", " she"),
                         subjects=["nurse", "flight attendant"])
    n_subj = len(tok(" flight attendant", add_special_tokens=False)["input_ids"])
    assert n_subj == 2
    assert ps.subject_spans[1].tolist() == [2, 2 + n_subj]
    assert ps.answer_pos.tolist() == [4, 4 + n_subj - 1]
    assert ps.attention_mask[0].tolist()[-(n_subj - 1):] == [0] * (n_subj - 1)
    assert not ps.same_length
    left = PromptSet.build(tiny_gpt2, ["The nurse said that", "The flight attendant said that"], (" he", " she"),
                           subjects=["nurse", "flight attendant"], padding_side="left")
    width = left.tokens.shape[1]
    assert left.answer_pos.tolist() == [width - 1, width - 1]
    assert left.tokens[0, -4:].tolist() == [464, 15849, 531, 326]
    assert left.subject_spans[0].tolist() == [width - 3, width - 2]


def test_answer_of_two_tokens_is_refused(tiny_gpt2):
    with pytest.raises(PromptError, match="2 tokens") as err:
        PromptSet.build(tiny_gpt2, ["The nurse said that"], (" he", " hello there"))
    assert "The nurse said that" in str(err.value)
    with pytest.raises(PromptError, match="tokenises to nothing"):
        answer_token_id(tiny_gpt2, "")


def test_mismatched_pair_lengths(tiny_gpt2):
    clean = ["The nurse said that", "The man said that"]
    corrupted = ["The flight attendant said that", "The woman said that"]
    with pytest.raises(PromptError, match="different lengths"):
        PromptSet.build(tiny_gpt2, clean, (" he", " she"), corrupted=corrupted)
    with pytest.warns(UserWarning, match="dropped 1 of 2"):
        ps = PromptSet.build(tiny_gpt2, clean, (" he", " she"), corrupted=corrupted, on_length_mismatch="drop")
    assert ps.prompts == ["The man said that"] and ps.corrupted_prompts == ["The woman said that"]


def test_empty_and_malformed_inputs(tiny_gpt2):
    with pytest.raises(PromptError, match="empty prompt set"):
        PromptSet.build(tiny_gpt2, [], (" he", " she"))
    with pytest.raises(PromptError, match="prompt 2: empty or not a string"):
        PromptSet.build(tiny_gpt2, ["The nurse said that", "  "], (" he", " she"))
    with pytest.raises(PromptError, match="1 corrupted entries for 2 prompts"):
        PromptSet.build(tiny_gpt2, ["a b", "c d"], (" he", " she"), corrupted=["e f"])
    with pytest.raises(PromptError, match="prompt 1: subject 'doctor' not found"):
        PromptSet.build(tiny_gpt2, ["The nurse said that"], (" he", " she"), subjects=["doctor"])
    with pytest.raises(PromptError, match="padding_side"):
        PromptSet.build(tiny_gpt2, ["The nurse said that"], (" he", " she"), padding_side="middle")


def test_selection_batches_swap_frame(tiny_gpt2):
    prompts = [f"The {w} said that" for w in ["nurse", "doctor", "teacher", "lawyer", "pilot"]]
    ps = PromptSet.build(tiny_gpt2, prompts, (" he", " she"), corrupted=["The man said that"] * 5,
                         metadata=[{"i": i} for i in range(5)])
    sub = ps[[4, 0]]
    assert sub.prompts == [prompts[4], prompts[0]] and sub.metadata == [{"i": 4}, {"i": 0}]
    assert torch.equal(sub.tokens, ps.tokens[[4, 0]])
    assert [len(b) for b in ps.batches(2)] == [2, 2, 1]
    assert ps[torch.tensor([True, False, True, False, False])].prompts == [prompts[0], prompts[2]]
    sw = ps.swapped()
    assert torch.equal(sw.tokens, ps.corrupted_tokens) and sw.prompts[0] == "The man said that"
    df = ps.to_frame()
    assert list(df.columns[:3]) == ["prompt", "answers", "corrupted"] and len(df) == 5
    with pytest.raises(PromptError, match="batch_size"):
        next(ps.batches(0))
    with pytest.raises(PromptError, match="empty selection"):
        ps[[]]


def test_prompt_longer_than_the_context_is_refused(tiny_gpt2):
    from lens_bias.tasks import option_logprobs

    long = "The nurse said that " * 40  # 160 tokens; the tiny model's context is 128
    with pytest.raises(PromptError, match="longer than the model's context of 128"):
        PromptSet.build(tiny_gpt2, [long], (" he", " she"))
    with pytest.raises(PromptError, match="longer than the model's context of 128"):
        option_logprobs(tiny_gpt2, [long], [["yes", "no"]])
