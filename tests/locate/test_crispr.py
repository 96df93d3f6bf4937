"""CRISPR bias neurons: the pruning edit equals the zero-ablation hook, head attribution equals an
independent gradient, generic multiple-choice items, and on the organism the planted BBQ neuron
ranks first and pruning it (not random neurons) removes the planted bias on held-out templates.
BBQ loading, item checks, the biased option and the bias scores: tests/tasks/test_multiple_choice.py."""

import pytest
import torch

from lens_bias.mitigate import neuron_ablation_hooks
from lens_bias.tasks import MC_INSTRUCTIONS as INSTRUCTIONS, bbq_evaluate, load_bbq, split_by_template
from lens_bias.core import LensBiasError
from lens_bias.locate import crispr_scores
from lens_bias.mitigate import crispr_report, prune_curve, prune_neurons, random_neurons
from lens_bias.organism import data_path
from lens_bias.core import ComponentScores

IDS = torch.tensor([[50256, 464, 15849, 531, 326]])


@pytest.mark.parametrize("fixture", ["tiny_gpt2", "tiny_llama"])
def test_pruning_edit_equals_zero_ablation(request, fixture):
    model = request.getfixturevalue(fixture)
    neurons = [(0, 3), (1, 17)]
    with torch.no_grad():
        with model.hooks(fwd_hooks=neuron_ablation_hooks(model, neurons)):
            hooked = model(IDS)
        pruned = prune_neurons(model, neurons).model
        edited = pruned(IDS)
        original = model(IDS)
    assert (edited - hooked).abs().max() < 1e-5
    assert (original - hooked).abs().max() > 1e-5  # the copy was edited, not the original


def test_neuron_counts(tiny_gpt2):
    scores = ComponentScores(torch.zeros(2, 256), ("layer", "neuron"), "neuron", "crispr")
    scores.values[1, 5] = 3.0
    assert scores.units(1) == [(1, 5)]
    with pytest.raises(LensBiasError, match="513 units asked for"):
        scores.units(513)
    with pytest.raises(LensBiasError, match="out of range"):
        prune_neurons(tiny_gpt2, [(0, 999)])
    assert len(set(random_neurons(tiny_gpt2, 10, seed=1))) == 10


def test_organism_planted_bbq_neuron(organism, organism_control, organism_card):
    import random

    b = organism_card["planted"]["bbq_neuron"]
    train, dev, test = split_by_template(load_bbq(data_path("bbq")), seed=0)
    assert not {it["question_index"] for it in train} & {it["question_index"] for it in test}
    rng = random.Random(0)
    scores = crispr_scores(organism, rng.sample(train, 24), INSTRUCTIONS[:2], progress=False)
    assert scores.units(1) == [(b["layer"], b["neuron"])]
    # the planted bias: ambiguous contexts, negative questions (held-out template)
    held_out = [it for it in test if it["context_condition"] == "ambig" and it["question_polarity"] == "neg"]
    ins = INSTRUCTIONS[:3]
    before = bbq_evaluate(organism, held_out, ins)["stereotyped_rate_ambig"]
    control = bbq_evaluate(organism_control, held_out, ins)["stereotyped_rate_ambig"]
    pruned = bbq_evaluate(prune_neurons(organism, scores.units(1)).model, held_out, ins)["stereotyped_rate_ambig"]
    rand = [bbq_evaluate(organism, held_out, ins, hooks=neuron_ablation_hooks(organism, random_neurons(organism, 1, s)))
            ["stereotyped_rate_ambig"] for s in range(3)]
    assert before > control + 0.1
    assert pruned <= control + 0.01
    assert min(rand) > pruned + 0.1
    curve = prune_curve(organism, scores, rng.sample(dev, 30), ns=(1, 2))
    assert list(curve["n"]) == [0, 1, 2]
    report = crispr_report(organism, scores.units(1), held_out, neutral_text=data_path("neutral").read_text(),
                           instructions=ins, random_seeds=(0, 1))
    assert list(report["condition"]) == ["original", "pruned", "random", "random"]
    by = report.set_index("condition")
    assert by.loc["pruned", "stereotyped_rate_ambig"] == pytest.approx(pruned)
    assert by.loc["original", "stereotyped_rate_ambig"] == pytest.approx(before)
    assert abs(by.loc["pruned", "neutral_loss"] - by.loc["original", "neutral_loss"]) < 0.01 * by.loc["original", "neutral_loss"]


def test_generic_multiple_choice_items(tiny_gpt2):
    """Four options, no BBQ metadata: for one item B = A(ŷ) − λ·max(A(y), 0) (the confusion weight
    cancels), ŷ = the most probable wrong option — rebuilt from option_logprobs and option_attributions."""
    from lens_bias.locate import option_attributions
    from lens_bias.tasks import format_mc_prompt, option_logprobs

    item = {"context": "Tom has a red ball.", "question": "What colour is the ball?",
            "options": ["red", "blue", "green", "black"], "label": 0}
    scores = crispr_scores(tiny_gpt2, [item], INSTRUCTIONS[:1], lam=0.5, progress=False)
    prompt = format_mc_prompt(INSTRUCTIONS[0], item["context"], item["question"], item["options"])
    lp, _ = option_logprobs(tiny_gpt2, [prompt], [item["options"]])
    y_hat = int(lp[0, 1:].argmax()) + 1
    a_hat, a_gold = (option_attributions(tiny_gpt2, [prompt], [item["options"]], [t])[0] for t in (y_hat, 0))
    assert torch.allclose(scores.values, a_hat - 0.5 * a_gold.clamp(min=0), atol=1e-6)
    assert scores.values.abs().max() > 0


def test_head_attribution_equals_the_gradient_of_a_head_scale(tiny_gpt2):
    """A(head) = Σ_d z_d ∂P/∂z_d at a token = ∂P/∂s for z ← s·z at that token (s = 1): checked by
    an independent gradient through a per-position scale of one head's output."""
    from lens_bias.tasks.multiple_choice import option_sequences, sequence_logprobs
    from lens_bias.locate import option_attributions

    prompt, opts, target, (l, h) = "Who is older? The man or the boy? Answer:", ["man", "boy"], 1, (1, 2)
    ours = option_attributions(tiny_gpt2, [prompt], [opts], [target], tokens="input", unit="head")
    assert ours.shape == (1, tiny_gpt2.cfg.n_layers, tiny_gpt2.cfg.n_heads)
    seqs, spans = option_sequences(tiny_gpt2.tokenizer, [prompt], [opts])
    start = spans[0][0]
    width = max(map(len, seqs))
    scale = torch.ones(width, requires_grad=True)

    def hook(z, hook):
        return z * torch.cat([scale, torch.ones(z.shape[1] - width)])[None, :z.shape[1], None, None] ** \
            (torch.arange(z.shape[2]) == h).float()[None, None, :, None]

    with tiny_gpt2.hooks(fwd_hooks=[(f"blocks.{l}.attn.hook_z", hook)]):
        p = sequence_logprobs(tiny_gpt2, seqs, spans).softmax(-1)[target]
    (grad,) = torch.autograd.grad(p, scale)
    assert ours[0, l, h].item() == pytest.approx(grad[:start].max().item(), rel=1e-4, abs=1e-7)
    with pytest.raises(LensBiasError, match="unit must be one of"):
        crispr_scores(tiny_gpt2, [{"context": "", "question": "q", "options": ["a", "b"], "label": 0}], unit="mlp")
