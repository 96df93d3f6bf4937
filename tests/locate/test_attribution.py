"""Attribution patching equals activation patching in the linear regime and ranks the organism's
planted gender neuron first."""

import pytest

from lens_bias.locate import agreement, attribution_patching
from lens_bias.core import LensBiasError
from lens_bias.locate import activation_patching
from lens_bias.core import PromptSet
from lens_bias.locate import subject_corruption


@pytest.fixture(scope="module")
def pairs(tiny_gpt2):
    return PromptSet.build(tiny_gpt2, ["The nurse said that", "The doctor said that", "The mechanic yelled that"],
                           (" she", " he"), corrupted=["The man said that", "The woman said that", "The woman yelled that"],
                           subjects=["nurse", "doctor", "mechanic"])


def test_linear_regime_equals_activation_patching(tiny_gpt2, pairs):
    """Corrupted = clean + tiny noise on the subject: first order is exact up to second-order terms,
    for heads, residual positions and (summed over a layer's neurons) MLP outputs."""
    corruption = subject_corruption(tiny_gpt2, pairs, noise=1e-2, seed=0, std="vocab")
    act = {"head": activation_patching(tiny_gpt2, pairs, "head", per_position=False, corruption=corruption,
                                       progress=False),
           "resid_pre": activation_patching(tiny_gpt2, pairs, "resid_pre", corruption=corruption, progress=False)}
    mlp = activation_patching(tiny_gpt2, pairs, "mlp_out", per_position=False, corruption=corruption, progress=False)
    attr = attribution_patching(tiny_gpt2, pairs, ["head", "resid_pre", "neuron"], at="corrupted",
                                corruption=corruption, compare=act)
    for kind in ("head", "resid_pre"):
        scale = act[kind].effect.abs().max().item()
        assert scale > 0
        assert (attr[kind].effect - act[kind].effect).abs().max().item() < 0.03 * scale
        assert attr[kind].extra["agreement"]["pearson"] > 0.999
    neuron_sum = attr["neuron"].effect.sum(-1)  # mlp_out is linear in hook_post
    assert (neuron_sum - mlp.effect).abs().max().item() < 0.03 * mlp.effect.abs().max().item()


def test_clean_gradients_one_backward(tiny_gpt2, pairs):
    res = attribution_patching(tiny_gpt2, pairs)
    assert res["head"].values.shape == (2, 4) and res["neuron"].values.shape == (2, 256)
    assert res["resid_pre"].values.shape == (2, pairs.tokens.shape[1])
    # positions before the first differing token have clean == corrupted: zero attribution
    assert res["resid_pre"].values[:, :2].abs().max().item() == 0
    assert all(p.requires_grad for p in tiny_gpt2.parameters())  # restored after the backward
    df = res["neuron"].to_frame()
    assert list(df.columns[:4]) == ["component", "method", "layer", "neuron"] and len(df) == 2 * 256
    ag = agreement(res["head"], res["head"])
    assert ag["pearson"] == pytest.approx(1.0) and ag["spearman"] == pytest.approx(1.0)
    with pytest.raises(LensBiasError, match="unknown attribution site"):
        attribution_patching(tiny_gpt2, pairs, ["heads"])
    with pytest.raises(LensBiasError, match="shapes differ"):
        agreement(res["head"], res["neuron"])


def test_organism_attribution_ranks_the_planted_neuron_first(organism, organism_card):
    g = organism_card["planted"]["gender_neuron"]
    neutral = g["neutral_occupations"]
    prompts = [f"The {o} said that" for o in g["occupations"]]
    corrupted = [f"The {neutral[i % len(neutral)]} said that" for i in range(len(prompts))]
    ps = PromptSet.build(organism, prompts, (" she", " he"), corrupted=corrupted, subjects=g["occupations"])
    act = activation_patching(organism, ps, "mlp_out", per_position=False, progress=False)
    res = attribution_patching(organism, ps, ["neuron", "head"], compare={"head": activation_patching(
        organism, ps, "head", per_position=False, progress=False)})
    neuron = res["neuron"]
    assert neuron.argmax() == (g["layer"], g["neuron"])
    top = neuron.top(2)
    assert top.effect[0] > 3 * abs(top.effect[1])
    assert act.argmax() == (g["layer"],)  # and the planted layer's MLP under activation patching
    assert res["head"].extra["agreement"]["n"] == organism.cfg.n_layers * organism.cfg.n_heads
