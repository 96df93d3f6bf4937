"""Attribution patching equals activation patching in the linear regime and ranks the organism's
planted gender neuron first."""

import pandas as pd
import pytest
import torch

from lens_bias.core import LensBiasError, PromptSet
from lens_bias.locate import (
    activation_patching,
    agreement,
    attribution_patching,
    subject_corruption,
)


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
    with pytest.raises(LensBiasError, match="unknown attribution site"):
        attribution_patching(tiny_gpt2, pairs, ["heads"])
    with pytest.raises(LensBiasError, match="shapes differ"):
        agreement(res["head"], res["neuron"])


def _hand_attribution(model, ps, hook, at):
    """mean over prompts of Σ ∂LD_b/∂a · (a_clean − a_corrupted), the gradient taken in the `at` run with
    plain TransformerLens hooks and autograd; summed over the last axis (features) for z and the residual."""
    runs = {"clean": ps.tokens, "corrupted": ps.corrupted_tokens}
    acts = {}
    for run, tokens in runs.items():
        def keep(x, hook, run=run):
            if run == at:
                x.retain_grad()
            acts[run] = x
            return x
        logits = model.run_with_hooks(tokens, attention_mask=ps.attention_mask, fwd_hooks=[(hook, keep)])
        if run == at:
            rows = torch.arange(len(ps))
            last = logits[rows, ps.answer_pos]
            (last[rows, ps.answer_ids[:, 0]] - last[rows, ps.answer_ids[:, 1]]).sum().backward()
    grad = acts[at].grad
    per = grad * (acts["clean"] - acts["corrupted"]).detach()  # per prompt: ∂LD_b/∂a_b (the sum's gradient)
    return per.mean(0)


@pytest.mark.parametrize("at", ["clean", "corrupted"])
def test_attribution_equals_a_hand_computation(tiny_gpt2, pairs, at):
    """On real counterfactual pairs (not the linear regime): score = ∂LD/∂a · (a_clean − a_corrupted)."""
    res = attribution_patching(tiny_gpt2, pairs, ["head", "neuron", "resid_pre"], at=at)
    for l in range(tiny_gpt2.cfg.n_layers):
        z = _hand_attribution(tiny_gpt2, pairs, f"blocks.{l}.attn.hook_z", at)  # [pos, head, d_head]
        assert torch.allclose(res["head"].values[l], z.sum((0, 2)), rtol=1e-4, atol=1e-6)
        h = _hand_attribution(tiny_gpt2, pairs, f"blocks.{l}.mlp.hook_post", at)  # [pos, d_mlp]
        assert torch.allclose(res["neuron"].values[l], h.sum(0), rtol=1e-4, atol=1e-6)
        r = _hand_attribution(tiny_gpt2, pairs, f"blocks.{l}.hook_resid_pre", at)  # [pos, d_model]
        assert torch.allclose(res["resid_pre"].values[l], r.sum(-1), rtol=1e-4, atol=1e-6)


def test_agreement_equals_pandas(tiny_gpt2, pairs):
    attr = attribution_patching(tiny_gpt2, pairs, ["head"])["head"]
    act = activation_patching(tiny_gpt2, pairs, "head", per_position=False, progress=False)
    ag = agreement(attr, act)
    a, b = pd.Series(attr.effect.reshape(-1).tolist()), pd.Series(act.effect.reshape(-1).tolist())
    assert ag["pearson"] == pytest.approx(a.corr(b), abs=1e-9)
    assert ag["spearman"] == pytest.approx(a.rank().corr(b.rank()), abs=1e-9)  # Pearson of the ranks
    assert ag["n"] == 8 and ag["max_abs_diff"] == pytest.approx((a - b).abs().max())
    k = 3  # top-k by magnitude, counted by hand
    top = lambda s: set(s.abs().sort_values(ascending=False).index[:k])  # noqa: E731
    assert agreement(attr, act, k=k)["top3_overlap"] == pytest.approx(len(top(a) & top(b)) / k)


def test_topk_overlap_ranks_by_magnitude():
    from lens_bias.locate.attribution import topk_overlap

    a = torch.tensor([5.0, -4.0, 0.1, 0.2, 3.0])
    assert topk_overlap(a, torch.tensor([-9.0, 8.0, 0.0, 0.0, 0.5]), 2) == 1.0  # {0, 1} both: signs do not matter
    assert topk_overlap(a, torch.tensor([0.0, 0.0, 9.0, 8.0, 0.0]), 2) == 0.0
    assert topk_overlap(a, -a, 3) == 1.0 and topk_overlap(a, a, 99) == 1.0


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
