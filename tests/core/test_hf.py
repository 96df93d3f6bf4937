"""core/hf.py: the bridge's weights under Hugging Face names, a plain Hugging Face copy with the same
logits, clones whose edits reach their own forward only, and output projections whose rows are the
units a hook ablation zeroes (GPT-2's Conv1D stores [in, out], Llama's nn.Linear [out, in])."""

import pytest
import torch
from torch.testing import assert_close

from lens_bias.core import (
    LensBiasError,
    clone_model,
    hf_state_dict,
    out_projection,
    to_hf_model,
)
from lens_bias.core.hf import logit_tolerance
from lens_bias.core.hooks import hook_name

IDS = torch.tensor([[464, 15849, 531, 326, 50, 60, 7], [7, 8, 9, 10, 11, 12, 13]])
TOL = logit_tolerance(torch.float32, torch.zeros(1), n_layers=2)  # float32 logits of a small model (1e-4)


@pytest.fixture(params=["gpt2", "llama"])
def family_model(request, tiny_gpt2, tiny_gpt2_dir, tiny_llama, tiny_llama_dir):
    if request.param == "gpt2":
        return "gpt2", tiny_gpt2, tiny_gpt2_dir
    return "llama", tiny_llama, tiny_llama_dir


def plain_hf(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()


def logits(model, **hooks):
    with torch.no_grad():
        if hooks:
            return model.run_with_hooks(IDS, fwd_hooks=list(hooks.values())).float()
        return model(IDS).float()


def zero_units(site: str, layer: int, units):
    """A TransformerLens hook zeroing `units` (heads of hook_z, neurons of hook_post) at every position."""
    def fn(x, hook):
        x = x.clone()
        x[:, :, list(units)] = 0
        return x
    return hook_name(site, layer), fn


def test_hf_state_dict_names_values_and_shared_storage(family_model):
    family, model, path = family_model
    sd, ref = hf_state_dict(model), plain_hf(path).state_dict()
    assert set(sd) == set(ref)
    for k in ref:
        assert torch.equal(sd[k], ref[k]), k
    live = {p.data_ptr() for p in model.parameters()}
    assert all(v.data_ptr() in live for k, v in sd.items() if k.endswith("mlp.c_proj.weight") or "down_proj" in k)


def test_to_hf_model_is_a_plain_copy_with_the_same_logits(family_model):
    family, model, path = family_model
    hf = to_hf_model(model)
    assert type(hf).__name__ == type(plain_hf(path)).__name__ and not hasattr(hf, "original_model")
    with torch.no_grad():
        theirs = hf(input_ids=IDS).logits.float()
        disk = plain_hf(path)(input_ids=IDS).logits.float()
    ours = logits(model)
    assert (ours - theirs).abs().max() <= TOL and (disk - theirs).abs().max() <= TOL
    with torch.no_grad():
        next(hf.parameters()).add_(1.0)  # an edit of the copy …
    assert torch.equal(logits(model), ours)  # … does not reach the bridge


def v_weight_of_head0(clone, family: str, d_model: int, d_head: int):
    """The slice of the clone's fused (GPT-2 c_attn) or split (Llama v_proj) value weights that makes
    head 0's values (Llama: KV head 0, shared by query heads 0 and 1 under GQA)."""
    sd = hf_state_dict(clone)
    if family == "gpt2":
        lo = 2 * d_model  # c_attn's columns are [q | k | v]
        return [(sd["transformer.h.0.attn.c_attn.weight"], (slice(None), slice(lo, lo + d_head))),
                (sd["transformer.h.0.attn.c_attn.bias"], slice(lo, lo + d_head))]
    return [(sd["model.layers.0.self_attn.v_proj.weight"], slice(0, d_head))]


def test_clone_edit_reaches_the_clone_only(family_model):
    """Zeroing head 0's value weights in the clone equals zeroing head 0's z by a hook on the
    original (GPT-2: an edit of the fused c_attn, which copy.deepcopy would cut from the forward);
    the original's logits do not move."""
    family, model, _ = family_model
    before = logits(model)
    clone = clone_model(model)
    assert torch.equal(logits(clone), before)
    with torch.no_grad():
        for w, where in v_weight_of_head0(clone, family, model.cfg.d_model, model.cfg.d_head):
            w[where] = 0
    heads = [0] if family == "gpt2" else [0, 1]
    want = logits(model, z=zero_units("head", 0, heads))
    assert (want - before).abs().max() > 1e-3  # the ablation matters
    assert (logits(clone) - want).abs().max() <= TOL
    assert torch.equal(logits(model), before)


def test_out_projection_rows_are_the_hook_units(family_model):
    """Rows of out_projection(…, 'mlp') are neurons (hook_post), rows h·d_head … of 'attn' are head h
    (hook_z): zeroing them in a clone equals zeroing the units by a hook on the original."""
    family, model, _ = family_model
    cfg, layer = model.cfg, 1
    clone = clone_model(model)
    w_mlp = out_projection(clone, layer, "mlp")
    w_attn = out_projection(clone, layer, "attn")
    assert w_mlp.shape == (cfg.d_mlp, cfg.d_model) and w_attn.shape == (cfg.n_heads * cfg.d_head, cfg.d_model)
    keep = w_mlp.detach().clone()
    with torch.no_grad():
        w_mlp[[5, 77]] = 0
    assert (logits(clone) - logits(model, n=zero_units("neuron", layer, [5, 77]))).abs().max() <= TOL
    with torch.no_grad():
        w_mlp.copy_(keep)
        w_attn[2 * cfg.d_head:3 * cfg.d_head] = 0
    want = logits(model, z=zero_units("head", layer, [2]))
    assert (want - logits(model)).abs().max() > 1e-3
    assert (logits(clone) - want).abs().max() <= TOL


def test_out_projection_refuses_an_unknown_module(tiny_gpt2):
    with pytest.raises(LensBiasError, match="which must be 'mlp' or 'attn'"):
        out_projection(tiny_gpt2, 0, "ffn")


def test_clone_keeps_device_dtype_and_source(tiny_llama):
    clone = clone_model(tiny_llama)
    p, q = next(clone.parameters()), next(tiny_llama.parameters())
    assert (p.device, p.dtype) == (q.device, q.dtype) and clone is not tiny_llama and p.data_ptr() != q.data_ptr()
    assert clone.lens_bias_source == tiny_llama.lens_bias_source and not clone.training
    assert_close(logits(clone), logits(tiny_llama), rtol=0, atol=0)
