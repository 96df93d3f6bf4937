"""CRISPR bias neurons: the pruning edit equals the zero-ablation hook, head attribution equals an
independent gradient, generic multiple-choice items, and on the organism the planted BBQ neuron
ranks first and pruning it (not random neurons) removes the planted bias on held-out templates.
BBQ loading, item checks, the biased option and the bias scores: tests/tasks/test_multiple_choice.py."""

import pytest
import torch

from lens_bias.core import ComponentScores, LensBiasError
from lens_bias.locate import crispr_scores
from lens_bias.mitigate import (
    crispr_report,
    neuron_ablation_hooks,
    prune_curve,
    prune_neurons,
    random_neurons,
)
from lens_bias.organism import data_path
from lens_bias.tasks import MC_INSTRUCTIONS as INSTRUCTIONS
from lens_bias.tasks import (
    bbq_evaluate,
    format_mc_prompt,
    load_bbq,
    option_logprobs,
    split_by_template,
)

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
    """Four options, no BBQ metadata: for one item, with order='aggregate_first', B = A(ŷ) − λ·max(A(y), 0)
    (the confusion weight cancels), ŷ = the most probable wrong option — rebuilt from option_logprobs and
    option_attributions (the paper's token order is checked against plain transformers below)."""
    from lens_bias.locate import option_attributions
    from lens_bias.tasks import format_mc_prompt, option_logprobs

    item = {"context": "Tom has a red ball.", "question": "What colour is the ball?",
            "options": ["red", "blue", "green", "black"], "label": 0}
    scores = crispr_scores(tiny_gpt2, [item], INSTRUCTIONS[:1], lam=0.5, order="aggregate_first", progress=False)
    prompt = format_mc_prompt(INSTRUCTIONS[0], item["context"], item["question"], item["options"])
    lp, _ = option_logprobs(tiny_gpt2, [prompt], [item["options"]])
    y_hat = int(lp[0, 1:].argmax()) + 1
    a_hat, a_gold = (option_attributions(tiny_gpt2, [prompt], [item["options"]], [t])[0] for t in (y_hat, 0))
    assert torch.allclose(scores.values, a_hat - 0.5 * a_gold.clamp(min=0), atol=1e-6)
    assert scores.values.abs().max() > 0


def test_head_attribution_equals_the_gradient_of_a_head_scale(tiny_gpt2):
    """A(head) = Σ_d z_d ∂P/∂z_d at a token = ∂P/∂s for z ← s·z at that token (s = 1): checked by
    an independent gradient through a per-position scale of one head's output."""
    from lens_bias.locate import option_attributions
    from lens_bias.tasks.multiple_choice import option_sequences, sequence_logprobs

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


def _independent_crispr(hf, tok, items, instructions, lam, order):
    """CRISPR's B from the paper, with plain transformers + autograd (no lens_bias code): every option
    sequence run on its own; P(o|x) = softmax over options of Σ log P(option tokens); ŷ = argmax over
    o ≠ y; c = P(ŷ); A_t(o) = h_t · Σ_seq ∂P(o|x)/∂h_t at the prompt's tokens (the prompt's activations
    are the same in every option's sequence); B(x) = max_t [A_t(ŷ) − λ relu(A_t(y))] (order 'token')
    or max_t A_t(ŷ) − λ relu(max_t A_t(y)); confusion-weighted mean over items; mean over instructions."""
    L = hf.config.n_layer
    per_ins = []
    for ins in instructions:
        total, weight = 0.0, 0.0
        for it in items:
            opts = [it["ans0"], it["ans1"], it["ans2"]]
            prompt = [tok.bos_token_id] + tok(format_mc_prompt(ins, it["context"], it["question"], opts),
                                              add_special_tokens=False)["input_ids"]
            acts, logps = [], []
            for o in opts:
                o_ids = tok(" " + o, add_special_tokens=False)["input_ids"]
                h = {}
                handles = [hf.transformer.h[l].mlp.act.register_forward_hook(
                    (lambda l: lambda m, i, out: h.__setitem__(l, out))(l)) for l in range(L)]
                logits = hf(torch.tensor([prompt + o_ids])).logits[0].log_softmax(-1)
                for hd in handles:
                    hd.remove()
                logps.append(sum(logits[len(prompt) - 1 + j, t] for j, t in enumerate(o_ids)))
                acts.append(h)
            probs = torch.stack(logps).softmax(-1)
            p = probs.detach().clone()
            p[it["label"]] = -1
            y_hat, y = int(p.argmax()), it["label"]
            n = len(prompt)

            def attribution(target):
                grads = torch.autograd.grad(probs[target], [a[l] for a in acts for l in range(L)], retain_graph=True)
                out = []
                for l in range(L):
                    g = sum(grads[s * L + l][0, :n] for s in range(len(opts)))
                    out.append(acts[0][l][0, :n].detach() * g)
                return torch.stack(out)  # [layer, token, d_mlp]

            a_hat, a_y = attribution(y_hat), attribution(y)
            if order == "token":
                b = (a_hat - lam * a_y.clamp(min=0)).amax(1)
            else:
                b = a_hat.amax(1) - lam * a_y.amax(1).clamp(min=0)
            c = probs[y_hat].item()
            total, weight = total + c * b, weight + c
        per_ins.append(total / weight)
    return torch.stack(per_ins).mean(0)


@pytest.mark.parametrize("order", ["token", "aggregate_first"])
def test_crispr_scores_equal_an_independent_computation(tiny_gpt2, tiny_gpt2_dir, order):
    from transformers import AutoTokenizer, GPT2LMHeadModel

    hf = GPT2LMHeadModel.from_pretrained(tiny_gpt2_dir).eval()
    tok = AutoTokenizer.from_pretrained(tiny_gpt2_dir)
    items = [{"context": "A grandfather and a grandson sat down.", "question": "Who forgot?",
              "ans0": "The grandfather", "ans1": "The grandson", "ans2": "Unknown", "label": 2},
             {"context": "Two friends met.", "question": "Who was rude?", "ans0": "Sam", "ans1": "Alex",
              "ans2": "Cannot tell", "label": 1},
             {"context": "", "question": "Which is a colour?", "ans0": "red", "ans1": "table", "ans2": "run",
              "label": 0}]
    ins = INSTRUCTIONS[:2]
    # make the first item's gold the model's own top choice under the first instruction (so ŷ must exclude it)
    lp, _ = option_logprobs(tiny_gpt2, [format_mc_prompt(ins[0], items[0]["context"], items[0]["question"],
                                                         [items[0][f"ans{k}"] for k in range(3)])],
                            [[items[0][f"ans{k}"] for k in range(3)]])
    items[0]["label"] = int(lp[0].argmax())
    ours = crispr_scores(tiny_gpt2, items, ins, lam=0.7, order=order, batch_size=2, progress=False)
    ref = _independent_crispr(hf, tok, items, ins, 0.7, order)
    assert ours.values.shape == ref.shape
    assert torch.allclose(ours.values, ref.float(), rtol=1e-4, atol=1e-8), (ours.values - ref).abs().max()


def test_the_order_of_aggregation_matters(tiny_gpt2):
    """Disentangling token by token is not the same as after the max (else the option would be moot)."""
    items = [{"context": "Two friends met.", "question": "Who was rude?", "ans0": "Sam", "ans1": "Alex",
              "ans2": "Cannot tell", "label": 1}]
    token = crispr_scores(tiny_gpt2, items, INSTRUCTIONS[:1], progress=False).values
    first = crispr_scores(tiny_gpt2, items, INSTRUCTIONS[:1], order="aggregate_first", progress=False).values
    assert (token - first).abs().max() > 1e-6
    # max_t (a_t − λ relu b_t) ≥ a_t* − λ relu b_t* ≥ max_t a_t − λ relu(max_t b_t), t* = argmax a
    assert (token >= first - 1e-7).all()
    with pytest.raises(LensBiasError, match="tokens='input'"):
        crispr_scores(tiny_gpt2, items, INSTRUCTIONS[:1], tokens="option", progress=False)
