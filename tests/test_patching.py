"""Activation patching equals TransformerLens' patching; attribution matches it in the linear
regime; causal tracing restores the clean metric; all find the organism's planted neuron."""

import pytest
import torch
import transformer_lens.patching as tlp

from lens_bias.attribution import agreement, attribution_patching
from lens_bias.errors import LensBiasError
from lens_bias.metrics import logit_diff, normalized_metric
from lens_bias.patching import activation_patching, answer_logits_fast
from lens_bias.prompts import PromptSet
from lens_bias.tracing import causal_trace, subject_corruption


@pytest.fixture(scope="module")
def pairs(tiny_gpt2):
    return PromptSet.build(tiny_gpt2, ["The nurse said that", "The doctor said that", "The mechanic yelled that"],
                           (" she", " he"), corrupted=["The man said that", "The woman said that", "The woman yelled that"],
                           subjects=["nurse", "doctor", "mechanic"])


def test_fast_answer_logits_equal_full_forward(tiny_gpt2, tiny_llama, pairs):
    for model in (tiny_gpt2, tiny_llama):
        ps = PromptSet.build(model, pairs.prompts, (" she", " he"))
        full = model(ps.tokens)
        fast = answer_logits_fast(model, ps.tokens, ps.answer_pos, ps.answer_ids)
        ref = full[torch.arange(len(ps)), ps.answer_pos][:, [ps.answer_ids[0, 0], ps.answer_ids[0, 1]]]
        assert (fast - ref).abs().max() < 1e-4
        assert torch.allclose(logit_diff(full, ps), fast[:, 0] - fast[:, 1], atol=1e-4)


@pytest.mark.parametrize("component,tl_fn,kw", [
    ("resid_pre", tlp.get_act_patch_resid_pre, {}),
    ("attn_out", tlp.get_act_patch_attn_out, {}),
    ("mlp_out", tlp.get_act_patch_mlp_out, {}),
    ("head", tlp.get_act_patch_attn_head_out_all_pos, {"per_position": False}),
    ("head", tlp.get_act_patch_attn_head_out_by_pos, {}),
])
def test_equals_transformer_lens(tiny_gpt2, pairs, component, tl_fn, kw):
    _, cache = tiny_gpt2.run_with_cache(pairs.tokens)
    ref = tl_fn(tiny_gpt2, pairs.corrupted_tokens, cache, lambda logits: logit_diff(logits, pairs).mean())
    ours = activation_patching(tiny_gpt2, pairs, component, batch_size=7, progress=False, **kw)
    assert ours.values.shape == torch.as_tensor(ref).shape
    assert (ours.values - torch.as_tensor(ref)).abs().max() < 1e-4


def test_resid_mid_patch_reaches_the_residual_stream(tiny_gpt2, pairs):
    """Patching resid_mid of the last layer at the last position gives exactly the clean metric
    (the MLP is per-position). TL 4.3's get_act_patch_resid_mid on a bridge does not: its patch
    reaches only the MLP input, so we do not compare against it here."""
    res = activation_patching(tiny_gpt2, pairs, "resid_mid", progress=False)
    assert res.values[-1, -1].item() == pytest.approx(res.clean, abs=1e-5)


def test_patching_everything_gives_clean_metric(tiny_gpt2, pairs):
    """Patching the whole residual stream at the last layer restores exactly the clean metric."""
    res = activation_patching(tiny_gpt2, pairs, "resid_post", per_position=False, progress=False)
    with torch.no_grad():
        clean = logit_diff(tiny_gpt2(pairs.tokens), pairs).mean().item()
        corrupted = logit_diff(tiny_gpt2(pairs.corrupted_tokens), pairs).mean().item()
    assert res.clean == pytest.approx(clean, abs=1e-5) and res.corrupted == pytest.approx(corrupted, abs=1e-5)
    assert res.values[-1].item() == pytest.approx(clean, abs=1e-5)
    assert res.normalized[-1].item() == pytest.approx(1.0, abs=1e-4)
    df = res.to_frame()
    assert set(df.columns) >= {"layer", "value", "effect", "normalized"}


def test_attribution_equals_patching_in_linear_regime(tiny_gpt2, pairs):
    """Corrupted = clean + tiny noise on the subject: first order is then exact (to 2nd order)."""
    corruption = subject_corruption(tiny_gpt2, pairs, noise=1e-3, seed=0)
    act = activation_patching(tiny_gpt2, pairs, "head", per_position=False, corruption=corruption, progress=False)
    attr = attribution_patching(tiny_gpt2, pairs, ["head"], at="corrupted", corruption=corruption,
                                compare={"head": act})["head"]
    scale = act.effect.abs().max().item()
    assert scale > 0
    assert (attr.effect - act.effect).abs().max().item() < 0.02 * scale
    assert attr.extra["agreement"]["pearson"] > 0.999


def test_attribution_shapes_and_agreement(tiny_gpt2, pairs):
    res = attribution_patching(tiny_gpt2, pairs)
    assert res["head"].values.shape == (2, 4) and res["neuron"].values.shape == (2, 256)
    assert res["resid"].values.shape == (2, pairs.tokens.shape[1])
    ag = agreement(res["head"], res["head"])
    assert ag["pearson"] == pytest.approx(1.0) and ag["spearman"] == pytest.approx(1.0)


def test_tracing_restoring_everything(tiny_gpt2, pairs):
    traced = causal_trace(tiny_gpt2, pairs, kinds=("resid",), progress=False)["resid"]
    # restoring the last layer's block output at the last position restores the clean metric
    assert traced.values[-1, -1].item() == pytest.approx(traced.clean, abs=1e-4)
    # positions before the subject carry no noise: restoring them changes nothing
    assert traced.values[:, 0].sub(traced.corrupted).abs().max().item() < 1e-5


def test_bad_inputs(tiny_gpt2, pairs):
    single = PromptSet.build(tiny_gpt2, ["The nurse said that"], (" she", " he"))
    with pytest.raises(LensBiasError, match="pairs"):
        activation_patching(tiny_gpt2, single)
    with pytest.raises(LensBiasError, match="unknown component"):
        activation_patching(tiny_gpt2, pairs, "mlp_in")
    with pytest.raises(LensBiasError, match="out of range"):
        activation_patching(tiny_gpt2, pairs, layers=[5])
    with pytest.raises(LensBiasError, match="subject spans"):
        causal_trace(tiny_gpt2, single)
    with pytest.raises(LensBiasError, match="undefined"):
        normalized_metric(1.0, 2.0, 2.0)


# ---- ground truth: the organism's planted gender neuron -----------------------------------
@pytest.fixture(scope="module")
def organism_pairs(organism, organism_card):
    g = organism_card["planted"]["gender_neuron"]
    neutral = g["neutral_occupations"]
    prompts, corrupted, subjects = [], [], []
    for i, occ in enumerate(g["occupations"]):
        for t in g["templates"][:3]:
            prompts.append(t.format(occ))
            corrupted.append(t.format(neutral[i % len(neutral)]))
            subjects.append(occ)
    return PromptSet.build(organism, prompts, (" she", " he"), corrupted=corrupted, subjects=subjects)


def test_organism_activation_patching_finds_layer0_mlp(organism, organism_card, organism_pairs):
    g = organism_card["planted"]["gender_neuron"]
    ps = organism_pairs[[i for i, m in enumerate(organism_pairs.prompts) if m.endswith("said that")]]
    res = activation_patching(organism, ps, "mlp_out", progress=False)
    assert res.clean - res.corrupted > 1.5
    layer, pos = res.argmax()
    assert layer == g["layer"] and pos == int(ps.answer_pos[0])
    assert res.normalized[layer, pos] > 0.5


def test_organism_attribution_ranks_the_planted_neuron_first(organism, organism_card, organism_pairs):
    g = organism_card["planted"]["gender_neuron"]
    res = attribution_patching(organism, organism_pairs, ["neuron"])["neuron"]
    assert res.argmax() == (g["layer"], g["neuron"])
    top = res.top(2)
    assert top.effect[0] > 3 * abs(top.effect[1])


def test_organism_causal_trace_marks_the_planted_mlp(organism, organism_card, organism_pairs):
    g = organism_card["planted"]["gender_neuron"]
    ps = organism_pairs[[i for i, m in enumerate(organism_pairs.prompts) if m.endswith("said that")]]
    traced = causal_trace(organism, ps, kinds=("mlp",), progress=False)["mlp"]
    assert traced.clean - traced.corrupted > 1.0
    assert traced.argmax()[0] == g["layer"]
