"""CRISPR pieces that are checked so far: BBQ loading and stereotype mapping, the permanent
pruning edit equals the zero-ablation hook, bad input. (Ground-truth ranking on the organism is
not yet asserted: see the open issue.)"""

import json

import pytest
import torch

from lens_bias.ablation import neuron_ablation_hooks
from lens_bias.bbq import biased_option, load_bbq, option_logprobs, unknown_option
from lens_bias.errors import DataError, LensBiasError
from lens_bias.neurons import prune_neurons, random_neurons, top_neurons
from lens_bias.patching import ComponentScores

IDS = torch.tensor([[50256, 464, 15849, 531, 326]])


@pytest.mark.parametrize("fixture", ["tiny_gpt2", "tiny_llama"])
def test_pruning_edit_equals_zero_ablation(request, fixture):
    model = request.getfixturevalue(fixture)
    neurons = [(0, 3), (1, 17)]
    with torch.no_grad():
        with model.hooks(fwd_hooks=neuron_ablation_hooks(model, neurons)):
            hooked = model(IDS)
        pruned = prune_neurons(model, neurons)
        edited = pruned(IDS)
        original = model(IDS)
    assert (edited - hooked).abs().max() < 1e-5
    assert (original - hooked).abs().max() > 1e-5  # the copy was edited, not the original


def test_bbq_loading_and_mapping(shared_data, tmp_path):
    items = load_bbq(shared_data / "bbq" / "Age.jsonl")
    assert len(items) == 3680
    first = items[0]  # ambiguous, negative: "Who was not comfortable using the phone?"
    assert first["answer_info"]["ans0"][1] == "old"
    assert biased_option(first) == 0 and unknown_option(first) == 2
    nonneg = dict(first, question_polarity="nonneg")
    assert biased_option(nonneg) == 1
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(first) + "\n{oops\n")
    with pytest.raises(DataError, match="bad.jsonl:2: malformed JSON"):
        load_bbq(bad)
    (tmp_path / "e.jsonl").write_text("\n")
    with pytest.raises(DataError, match="empty"):
        load_bbq(tmp_path / "e.jsonl")


def test_option_logprob_by_hand(tiny_gpt2):
    lp, n = option_logprobs(tiny_gpt2, ["The nurse said"], [["that", "he"]])
    with torch.no_grad():
        logits = tiny_gpt2(torch.tensor([[50256, 464, 15849, 531]])).log_softmax(-1)
    assert n.tolist() == [[1.0, 1.0]]
    assert lp[0, 0].item() == pytest.approx(logits[0, -1, 326].item(), abs=1e-4)
    with pytest.raises(LensBiasError, match="tokenises to nothing"):
        option_logprobs(tiny_gpt2, ["The nurse said"], [["", "he"]])


def test_neuron_counts(tiny_gpt2):
    scores = ComponentScores(torch.zeros(2, 256), ("layer", "neuron"), "neuron", "crispr")
    scores.values[1, 5] = 3.0
    assert top_neurons(scores, 1) == [(1, 5)]
    with pytest.raises(LensBiasError, match="513 neurons asked for"):
        top_neurons(scores, 513)
    with pytest.raises(LensBiasError, match="out of range"):
        prune_neurons(tiny_gpt2, [(0, 999)])
    assert len(set(random_neurons(tiny_gpt2, 10, seed=1))) == 10
