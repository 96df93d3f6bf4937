"""Causal tracing (ROME/LSDM): seeded subject noise, restoring states, the organism's planted MLP."""

import pytest
import torch

from lens_bias.core import LensBiasError
from lens_bias.core import PromptSet
from lens_bias.locate import causal_trace, embedding_std, subject_noise


@pytest.fixture(scope="module")
def pairs(tiny_gpt2):
    return PromptSet.build(tiny_gpt2, ["The nurse said that", "The doctor said that", "The mechanic said that"],
                           (" she", " he"), subjects=["nurse", "doctor", "mechanic"])


def test_noise_is_seeded_and_on_the_subject_only(tiny_gpt2, pairs):
    a, b = subject_noise(tiny_gpt2, pairs, seed=3), subject_noise(tiny_gpt2, pairs, seed=3)
    assert torch.equal(a, b) and not torch.equal(a, subject_noise(tiny_gpt2, pairs, seed=4))
    assert a[:, [0, 1, 3, 4]].abs().max() == 0 and a[:, 2].abs().min() > 0
    subj = tiny_gpt2.W_E[pairs.tokens[:, 2]].std().item()  # ROME: std of the subjects' embeddings
    assert embedding_std(tiny_gpt2, pairs) == pytest.approx(subj)
    assert a[:, 2].std().item() == pytest.approx(3 * subj, rel=0.1)


def test_restoring_states(tiny_gpt2, pairs):
    traced = causal_trace(tiny_gpt2, pairs, samples=2, window=2, progress=False)
    resid = traced["resid_post"]
    assert resid.values.shape == (2, 5) and resid.extra["samples"] == 2
    # the last layer's block output at the answer position carries everything: the clean metric
    assert resid.values[-1, -1].item() == pytest.approx(resid.clean, abs=1e-4)
    # positions before the subject carry no noise: restoring them changes nothing
    assert (resid.values[:, :2] - resid.corrupted).abs().max().item() < 1e-5
    # restoring the subject's embedding-level state (layer-0 input is not traced; layer-0 output) helps
    assert traced["mlp_out"].extra["window"] == 2 and traced["resid_post"].extra["window"] == 1


def test_bad_inputs(tiny_gpt2, pairs):
    no_subject = PromptSet.build(tiny_gpt2, ["The nurse said that"], (" she", " he"))
    with pytest.raises(LensBiasError, match="subject spans"):
        causal_trace(tiny_gpt2, no_subject)
    with pytest.raises(LensBiasError, match="unknown causal tracing site"):
        causal_trace(tiny_gpt2, pairs, sites=("mlps",))
    ragged = PromptSet.build(tiny_gpt2, ["The nurse said that", "The nurse said that so"], (" she", " he"),
                             subjects=["nurse", "nurse"])
    with pytest.raises(LensBiasError, match="same"):
        causal_trace(tiny_gpt2, ragged)
    with pytest.raises(LensBiasError, match="std must be"):
        causal_trace(tiny_gpt2, pairs, std="huge")


def test_organism_causal_trace_marks_the_planted_mlp(organism, organism_card):
    g = organism_card["planted"]["gender_neuron"]
    ps = PromptSet.build(organism, [f"The {o} said that" for o in g["occupations"]], (" she", " he"),
                         subjects=g["occupations"])
    # the organism's occupation embeddings are small (std ≈ 0.06 vs 0.24 over the vocabulary), so
    # ROME's subject-scaled noise hardly corrupts them: scale by the vocabulary's std here
    traced = causal_trace(organism, ps, sites=("mlp_out", "attn_out"), std="vocab", samples=3, progress=False)
    mlp = traced["mlp_out"]
    assert mlp.clean - mlp.corrupted > 0.5
    assert mlp.argmax() == (g["layer"], int(ps.answer_pos[0]))  # the card: fires at the prompt's last token
    assert mlp.normalized[g["layer"], -1] > 0.8
