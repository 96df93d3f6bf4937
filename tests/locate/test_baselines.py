"""Baselines against hand computations, and the example method runs through the registry untouched."""

import pytest
import torch

from lens_bias.core import PromptSet
from lens_bias.locate.baselines import grad_x_activation, mean_activation, weight_norm
from lens_bias.runs import REGISTRY, attribute_dataset


@pytest.fixture(scope="module")
def pairs(tiny_gpt2):
    return PromptSet.build(tiny_gpt2, ["The nurse said that", "The mechanic yelled that"], (" she", " he"),
                           corrupted=["The man said that", "The woman yelled that"])


def test_weight_norm_is_the_output_row_norm(tiny_gpt2):
    hf = tiny_gpt2.original_model.transformer
    n = weight_norm(tiny_gpt2, "neuron").values
    assert torch.allclose(n[1], hf.h[1].mlp.c_proj.weight.norm(dim=1), atol=1e-6)  # Conv1D: [d_mlp, d_model]
    h = weight_norm(tiny_gpt2, "head").values
    d = tiny_gpt2.cfg.d_head
    assert h[0, 2].item() == pytest.approx(hf.h[0].attn.c_proj.weight[2 * d:3 * d].norm().item(), rel=1e-5)


def test_mean_activation_and_grad_x_activation_by_hand(tiny_gpt2, pairs):
    name = "blocks.1.mlp.hook_post"
    _, cache = tiny_gpt2.run_with_cache(pairs.tokens, attention_mask=pairs.attention_mask, names_filter=[name])
    mask = pairs.attention_mask.bool()
    assert torch.allclose(mean_activation(tiny_gpt2, pairs, "neuron").values[1], cache[name][mask].abs().mean(0),
                          atol=1e-6)
    acts = {}

    def keep(x, hook):
        x.retain_grad()
        acts["h"] = x
        return x

    logits = tiny_gpt2.run_with_hooks(pairs.tokens, attention_mask=pairs.attention_mask, fwd_hooks=[(name, keep)])
    rows = torch.arange(len(pairs))
    last = logits[rows, pairs.answer_pos]
    (last[rows, pairs.answer_ids[:, 0]] - last[rows, pairs.answer_ids[:, 1]]).sum().backward()
    by_hand = (acts["h"].grad * acts["h"]).detach().sum(1).mean(0)  # Σ_pos, mean over prompts
    assert torch.allclose(grad_x_activation(tiny_gpt2, pairs, "neuron").values[1], by_hand, rtol=1e-4, atol=1e-7)


def test_registered_and_runs_in_chunks(tiny_gpt2, pairs, tmp_path):
    assert "baselines" in REGISTRY
    res = attribute_dataset(tiny_gpt2, "baselines", pairs, tmp_path, chunk_size=1, progress=False)
    whole = grad_x_activation(tiny_gpt2, pairs, "neuron").values
    assert torch.allclose(res["grad_x_activation:neuron"].values, whole, rtol=1e-4, atol=1e-7)
    assert (tmp_path / "scores.csv").exists()
