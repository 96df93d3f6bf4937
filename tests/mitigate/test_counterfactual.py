"""Counterfactual-data fine-tuning of chosen components: on the organism, training the MLP that holds the
planted gender neuron on she/he twins removes the bias on held-out occupations and templates; only the
chosen weights move (a GPT-2 Conv1D and a Llama nn.Linear layout); the loss it minimises equals plain
transformers' cross-entropy on the same texts."""

import warnings

import pytest
import torch

from lens_bias.core.hf import hf_state_dict, to_hf_model
from lens_bias.core.prompts import encode_lines, pad, pad_id_of
from lens_bias.mitigate import counterfactual_finetune, counterfactual_texts, swap_pronouns
from lens_bias.organism import load_card
from lens_bias.tasks import bias_values, professions_prompts


@pytest.fixture(scope="module")
def organism_sets(organism):
    g = load_card(organism)["planted"]["gender_neuron"]
    occ, templates = g["occupations"], g["templates"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train = professions_prompts(organism, occ[:5], templates[:6], answers=(" she", " he"), corrupt_with=None)
        held = professions_prompts(organism, occ[5:], templates[6:], answers=(" she", " he"), corrupt_with=None)
    return train, held, g


def _changed(a, b) -> dict[str, torch.Tensor]:
    sa, sb = hf_state_dict(a), hf_state_dict(b)
    return {k: (sa[k] != sb[k]) for k in sa if not torch.equal(sa[k], sb[k])}


def test_training_the_planted_layer_removes_the_bias_on_held_out_prompts(organism, organism_sets):
    train, held, g = organism_sets
    before = bias_values(organism, held).abs().mean().item()
    assert before > 1.0  # the planted bias: ≈ 2.2 nats she − he
    res = counterfactual_finetune(organism, [g["layer"]], counterfactual_texts(train), site="mlp", progress=False)
    after = bias_values(res.model, held).abs().mean().item()
    assert after < 0.35 * before, (before, after)
    losses = [h["loss"] for h in res.report["history"]]
    assert losses[-1] < losses[0]
    changed = _changed(organism, res.model)
    assert list(changed) == [f"transformer.h.{g['layer']}.mlp.c_proj.weight"]
    assert bias_values(organism, held).abs().mean().item() == pytest.approx(before)  # the original is untouched


def test_a_head_moves_only_its_own_rows_of_W_O(tiny_llama, organism, organism_sets):
    texts = ["The nurse said that she", "The pilot said that he"]
    for model, key in ((tiny_llama, "model.layers.1.self_attn.o_proj.weight"),
                       (organism, "transformer.h.1.attn.c_proj.weight")):
        res = counterfactual_finetune(model, [(1, 2)], texts, site="head", steps=3, lr=1e-2, progress=False)
        changed = _changed(model, res.model)
        assert list(changed) == [key]
        d_head = model.cfg.d_head
        moved = changed[key] if key.endswith("c_proj.weight") else changed[key].T  # [in, out] as out_projection
        rows = moved.any(1).nonzero().flatten().tolist()
        assert rows and set(rows) <= set(range(2 * d_head, 3 * d_head)), rows


def test_the_loss_is_transformers_cross_entropy(tiny_llama):
    texts = ["The nurse said that she", "The doctor said that he went home"]
    res = counterfactual_finetune(tiny_llama, [0], texts, site="mlp", steps=1, batch_size=4, lr=1e-9, progress=False)
    # one step over all four texts (two and their swaps): the loss before the update is the original's
    data = texts + [swap_pronouns(t) for t in texts]
    assert swap_pronouns(texts[1]) == "The doctor said that she went home"
    hf = to_hf_model(tiny_llama)
    ids, mask = pad(encode_lines(tiny_llama, data), pad_id_of(tiny_llama.tokenizer))
    labels = ids.masked_fill(mask == 0, -100)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, labels=labels).loss.item()
    assert res.report["history"][0]["loss"] == pytest.approx(ref, rel=1e-4)


def test_bad_units_are_one_line_errors(organism):
    from lens_bias.core.errors import LensBiasError

    with pytest.raises(LensBiasError, match="out of range"):
        counterfactual_finetune(organism, [9], ["The nurse said that she"], site="mlp", progress=False)
    with pytest.raises(LensBiasError, match="site must be"):
        counterfactual_finetune(organism, [0], ["The nurse said that she"], site="neuron", progress=False)
    with pytest.raises(LensBiasError, match="no texts"):
        counterfactual_finetune(organism, [0], [" "], site="mlp", progress=False)
