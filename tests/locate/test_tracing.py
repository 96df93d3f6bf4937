"""Causal tracing (ROME/LSDM): seeded subject noise, restoring states against a hand-built corrupted run,
the total effect, the organism's planted MLP, and LSDM's site choice."""

import warnings

import pytest
import torch

from lens_bias.core import LensBiasError, PromptSet, logit_diff
from lens_bias.locate import causal_trace, embedding_std, subject_noise, trace_sites


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


@pytest.mark.parametrize("layer,pos", [(0, 2), (1, 2), (0, 3), (1, 4)])
def test_indirect_effect_equals_a_hand_built_corrupted_run(tiny_gpt2, pairs, layer, pos):
    """IE(l, t) from a corrupted run built by hand: N(0, (3σ)²) noise (σ = std of the subjects' embeddings),
    seeded per row as documented, added to hook_embed at the subject token — position 2 of
    [BOS, The, nurse, said, that] — and the clean block output restored at (l, t)."""
    seed, i = 5, 1
    traced = causal_trace(tiny_gpt2, pairs, sites=("resid_post",), samples=1, seed=seed, progress=False)["resid_post"]
    sigma = tiny_gpt2.W_E[pairs.tokens[:, 2]].std().item()
    eps = torch.randn(1, tiny_gpt2.cfg.d_model, generator=torch.Generator().manual_seed(seed * 1_000_003 + i)) * 3 * sigma
    tokens, one = pairs.tokens[i:i + 1], pairs[i]
    name = f"blocks.{layer}.hook_resid_post"
    _, clean = tiny_gpt2.run_with_cache(tokens, names_filter=[name])

    def noisy(x, hook):
        x = x.clone()
        x[0, 2] += eps[0]
        return x

    def restore(x, hook):
        x = x.clone()
        x[0, pos] = clean[name][0, pos]
        return x

    with torch.no_grad():
        corrupted = logit_diff(tiny_gpt2.run_with_hooks(tokens, fwd_hooks=[("hook_embed", noisy)]), one).item()
        restored = logit_diff(tiny_gpt2.run_with_hooks(tokens, fwd_hooks=[("hook_embed", noisy), (name, restore)]),
                              one).item()
    per_prompt = traced.extra["per_prompt"]  # [layer, pos, prompt]
    assert per_prompt[layer, pos, i].item() == pytest.approx(restored, abs=1e-4)
    assert traced.corrupted == pytest.approx(float(traced.extra["per_prompt"][-1, 0].mean()), abs=1e-4)
    assert per_prompt[0, 0, i].item() == pytest.approx(corrupted, abs=1e-4)  # BOS restored: nothing changes


def test_total_effect_reported_and_a_useless_corruption_warned(tiny_gpt2, pairs):
    traced = causal_trace(tiny_gpt2, pairs, sites=("mlp_out",), samples=2, progress=False)["mlp_out"]
    assert traced.extra["total_effect"] == pytest.approx(traced.clean - traced.corrupted)
    with pytest.warns(UserWarning, match="does not move the bias toward zero"):
        zero = causal_trace(tiny_gpt2, pairs, sites=("mlp_out",), noise=0.0, progress=False)["mlp_out"]
    assert zero.extra["total_effect"] == pytest.approx(0.0, abs=1e-6)
    assert zero.effect.abs().max().item() < 1e-5


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
    occ, neutral = g["occupations"], g["neutral_occupations"]
    ps = PromptSet.build(organism, [f"The {o} said that" for o in occ], (" she", " he"), subjects=occ,
                         corrupted=[f"The {neutral[i % len(neutral)]} said that" for i in range(len(occ))])
    # counterfactual twins (a neutral occupation) take the bias away
    cf = causal_trace(organism, ps, sites=("mlp_out",), corruption="counterfactual", progress=False)["mlp_out"]
    assert cf.extra["total_effect_fraction"] > 0.9
    assert cf.argmax() == (g["layer"], int(ps.answer_pos[0]))  # the card: fires at the prompt's last token
    assert cf.normalized[g["layer"], -1] > 0.8
    # the organism's occupation embeddings are small (std ≈ 0.06 vs 0.24 over the vocabulary), so
    # ROME's subject-scaled noise does not corrupt them: it is warned about; vocabulary-scaled noise does
    with pytest.warns(UserWarning, match="does not move the bias toward zero"):
        causal_trace(organism, ps, sites=("mlp_out",), progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        traced = causal_trace(organism, ps, sites=("mlp_out", "attn_out"), std="vocab", samples=3, progress=False)
    mlp = traced["mlp_out"]
    assert mlp.clean - mlp.corrupted > 0.3
    assert mlp.argmax() == (g["layer"], int(ps.answer_pos[0]))


def test_lsdm_site_choice_needs_a_real_total_effect(organism, organism_card):
    g = organism_card["planted"]["gender_neuron"]
    occ = g["occupations"][:5]
    twins = PromptSet.build(organism, [f"The {o} said that" for o in occ], (" she", " he"), subjects=occ,
                            corrupted=[f"The {o} said that" for o in g["neutral_occupations"][:5]])
    sites = trace_sites(organism, twins)
    assert tuple(sites.iloc[0][["layer", "position"]]) == (g["layer"], "last")
    assert sites["effect"].iloc[0] > 5 * sites["effect"].iloc[1]
    # no twins and noise that takes nothing away (zero noise): no site is chosen
    alone = PromptSet.build(organism, [f"The {o} said that" for o in occ], (" she", " he"), subjects=occ)
    with pytest.raises(LensBiasError, match="takes .* of the bias away"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trace_sites(organism, alone, noise=0.0)
