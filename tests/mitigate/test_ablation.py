"""Head and neuron ablation hooks equal hand-made weight edits and hand-computed means."""


import pytest
import torch

from lens_bias.core import LensBiasError, PromptSet, load_model
from lens_bias.mitigate import (
    ablate,
    combine_hooks,
    head_ablation_hooks,
    neuron_ablation_hooks,
)

IDS = torch.tensor([[50256, 464, 15849, 531, 326], [50256, 464, 6253, 531, 326]])


def test_zero_head_equals_zeroed_W_O_slice(tiny_gpt2_dir):
    model = load_model(tiny_gpt2_dir, device="cpu")
    with torch.no_grad(), ablate(model, heads=[(1, 2)]):
        hooked = model(IDS)
    edited = load_model(tiny_gpt2_dir, device="cpu")
    d_head = edited.cfg.d_head
    with torch.no_grad():  # GPT-2 c_proj (Conv1D [d_model_in, d_model_out]): head 2's input rows
        edited.original_model.transformer.h[1].attn.c_proj.weight[2 * d_head:3 * d_head] = 0
        ref = edited(IDS)
        plain = model(IDS)
    assert (hooked - ref).abs().max() < 1e-5
    assert (hooked - plain).abs().max() > 1e-4  # the ablation did something


def test_zero_neuron_equals_zeroed_W_out_row(tiny_gpt2_dir):
    model = load_model(tiny_gpt2_dir, device="cpu")
    with torch.no_grad(), ablate(model, neurons=[(0, 7), (1, 100)]):
        hooked = model(IDS)
    edited = load_model(tiny_gpt2_dir, device="cpu")
    with torch.no_grad():
        edited.original_model.transformer.h[0].mlp.c_proj.weight[7] = 0
        edited.original_model.transformer.h[1].mlp.c_proj.weight[100] = 0
        ref = edited(IDS)
    assert (hooked - ref).abs().max() < 1e-5


def test_mean_ablation_uses_the_reference_mean(tiny_gpt2):
    ref = PromptSet.build(tiny_gpt2, ["The nurse said that", "A dog ran"], (" she", " he"))
    _, cache = tiny_gpt2.run_with_cache(ref.tokens, attention_mask=ref.attention_mask)
    acts = cache["blocks.0.mlp.hook_post"][..., 5]
    mask = ref.attention_mask.bool()
    expected = acts[mask].mean()
    seen = {}
    hooks = neuron_ablation_hooks(tiny_gpt2, [(0, 5)], "mean", ref)

    def look(x, hook):
        seen["x"] = x[..., 5].clone()
        return x

    hooks.append(("blocks.0.mlp.hook_post", look))
    with torch.no_grad(), tiny_gpt2.hooks(fwd_hooks=hooks):
        tiny_gpt2(IDS)
    assert torch.allclose(seen["x"], expected.expand_as(seen["x"]), atol=1e-6)


def test_resample_is_seeded_and_composition(tiny_gpt2):
    ref = PromptSet.build(tiny_gpt2, ["The nurse said that", "The cat sat there"], (" she", " he"))
    out = []
    for _ in range(2):
        with torch.no_grad(), tiny_gpt2.hooks(fwd_hooks=head_ablation_hooks(tiny_gpt2, [(0, 1)], "resample", ref, seed=3)):
            out.append(tiny_gpt2(IDS))
    assert torch.equal(out[0], out[1])
    both = combine_hooks(head_ablation_hooks(tiny_gpt2, [(0, 1)]), neuron_ablation_hooks(tiny_gpt2, [(1, 3)]))
    with torch.no_grad():
        with tiny_gpt2.hooks(fwd_hooks=both):
            combined = tiny_gpt2(IDS)
        with ablate(tiny_gpt2, heads=[(0, 1)]), ablate(tiny_gpt2, neurons=[(1, 3)]):
            nested = tiny_gpt2(IDS)
        plain = tiny_gpt2(IDS)
    assert torch.allclose(combined, nested, atol=1e-6)
    assert not torch.allclose(plain, nested, atol=1e-5)  # hooks were removed on exit


def test_bad_input(tiny_gpt2):
    with pytest.raises(LensBiasError, match="head \\(0, 9\\): index 9 out of range"):
        head_ablation_hooks(tiny_gpt2, [(0, 9)])
    with pytest.raises(LensBiasError, match="layer 4 out of range"):
        neuron_ablation_hooks(tiny_gpt2, [(4, 0)])
    with pytest.raises(LensBiasError, match="reference set"):
        head_ablation_hooks(tiny_gpt2, [(0, 0)], "mean")
    with pytest.raises(LensBiasError, match="unknown ablation method"):
        head_ablation_hooks(tiny_gpt2, [(0, 0)], "shuffle")


@pytest.mark.parametrize("fixture", ["tiny_gpt2", "tiny_llama"])
def test_prune_heads_equals_zero_ablation_and_exports(fixture, request, tmp_path):
    from transformers import AutoModelForCausalLM

    from lens_bias.mitigate import export_model, prune_heads

    model = request.getfixturevalue(fixture)
    heads = [(0, 1), (1, 3)]
    pruned = prune_heads(model, heads).model
    with torch.no_grad():
        with ablate(model, heads=heads):
            hooked = model(IDS)
        plain = model(IDS)
        ours = pruned(IDS)
    assert (ours - hooked).abs().max() < 1e-5 and (ours - plain).abs().max() > 1e-4
    out = export_model(pruned, tmp_path / "pruned")
    with torch.no_grad():
        theirs = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)(input_ids=IDS).logits
    assert (theirs - ours).abs().max() < 1e-4
    with pytest.raises(LensBiasError, match="out of range"):
        prune_heads(model, [(0, 4)])


def test_random_heads(tiny_gpt2):
    from lens_bias.mitigate import random_heads

    heads = random_heads(tiny_gpt2, 5, seed=3, exclude=[(0, 0)])
    assert len(set(heads)) == 5 and (0, 0) not in heads and heads == random_heads(tiny_gpt2, 5, seed=3, exclude=[(0, 0)])
    with pytest.raises(LensBiasError, match="only 7 are available"):
        random_heads(tiny_gpt2, 8, exclude=[(0, 0)])
