"""core/hooks.py: every site names the activation its table says — checked against plain Hugging Face
module hooks on the same weights —, `trace` keeps, patches and stops like TransformerLens'
run_with_hooks / run_with_cache, and `run_until` returns the final residual stream."""

import pytest
import torch
from torch.testing import assert_close

from lens_bias.core import LensBiasError
from lens_bias.core.hooks import (
    SITES,
    hook_name,
    last_resid,
    run_until,
    site_kind,
    trace,
)

IDS = torch.tensor([[464, 15849, 531, 326, 50, 60, 7], [7, 8, 9, 10, 11, 12, 13]])
#: the activation layout of each site kind, in (batch, pos, d_model, heads, d_head, d_mlp) terms
LAYOUT = {"pos": lambda b, p, cfg: (b, p, cfg.d_model), "head": lambda b, p, cfg: (b, p, cfg.n_heads, cfg.d_head),
          "neuron": lambda b, p, cfg: (b, p, cfg.d_mlp), "pattern": lambda b, p, cfg: (b, cfg.n_heads, p, p)}


def hf_modules(hf, family: str, layer: int) -> dict:
    """The plain Hugging Face modules around each site of `layer`."""
    if family == "gpt2":
        blk = hf.transformer.h[layer]
        return {"block": blk, "attn": blk.attn, "o": blk.attn.c_proj, "ln2": blk.ln_2, "mlp": blk.mlp,
                "down": blk.mlp.c_proj, "embed": hf.transformer.wte}
    blk = hf.model.layers[layer]
    return {"block": blk, "attn": blk.self_attn, "o": blk.self_attn.o_proj, "ln2": blk.post_attention_layernorm,
            "mlp": blk.mlp, "down": blk.mlp.down_proj, "embed": hf.model.embed_tokens}


def first(x):
    return x[0] if isinstance(x, tuple) else x


def hf_sites(path, family: str, layer: int, cfg) -> dict:
    """Every site of `layer`, read with plain PyTorch hooks on a Hugging Face model loaded from `path`."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
    mods, got, handles = hf_modules(hf, family, layer), {}, []

    def keep(name, fn):
        return lambda *a, **k: got.__setitem__(name, fn(*a, **k))

    handles.append(mods["block"].register_forward_pre_hook(
        keep("resid_pre", lambda m, a, kw: a[0] if a else kw["hidden_states"]), with_kwargs=True))
    handles.append(mods["ln2"].register_forward_pre_hook(keep("resid_mid", lambda m, a: a[0])))
    handles.append(mods["block"].register_forward_hook(keep("resid_post", lambda m, a, o: first(o))))
    handles.append(mods["attn"].register_forward_hook(keep("attn_out", lambda m, a, o: first(o))))
    handles.append(mods["mlp"].register_forward_hook(keep("mlp_out", lambda m, a, o: o)))
    handles.append(mods["down"].register_forward_pre_hook(keep("neuron", lambda m, a: a[0])))
    handles.append(mods["mlp"].register_forward_hook(keep("mlp_value", lambda m, a, o: o)))  # no post-MLP norm here
    handles.append(mods["o"].register_forward_pre_hook(
        keep("head", lambda m, a: a[0].reshape(*a[0].shape[:2], cfg.n_heads, cfg.d_head))))
    handles.append(mods["embed"].register_forward_hook(keep("embed", lambda m, a, o: o)))
    with torch.no_grad():
        out = hf(input_ids=IDS, output_attentions=True)
    for h in handles:
        h.remove()
    got["pattern"] = out.attentions[layer]
    return got


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_every_site_is_the_activation_its_table_names(family, tiny_gpt2, tiny_gpt2_dir, tiny_llama, tiny_llama_dir):
    model, path = (tiny_gpt2, tiny_gpt2_dir) if family == "gpt2" else (tiny_llama, tiny_llama_dir)
    layer = model.cfg.n_layers - 1
    names = {s: hook_name(s, None if s == "embed" else layer) for s in SITES}
    with torch.no_grad(), trace(model, names.values(), detach=True) as acts:
        model(IDS)
    want = hf_sites(path, family, layer, model.cfg)
    assert set(want) == set(SITES)
    for site, name in names.items():
        assert acts[name].shape == LAYOUT[site_kind(site)](*IDS.shape, model.cfg), site
        assert_close(acts[name], want[site], msg=lambda m: f"{family} {site}: {m}")


def test_hook_name_and_site_kind():
    assert hook_name("head", 3) == "blocks.3.attn.hook_z" and hook_name("embed") == "hook_embed"
    assert [site_kind(s) for s in ("resid_mid", "head", "neuron", "pattern")] == ["pos", "head", "neuron", "pattern"]
    with pytest.raises(LensBiasError, match="unknown site 'z'"):
        hook_name("z", 0)
    with pytest.raises(LensBiasError, match="needs a layer"):
        hook_name("mlp_out")


def test_trace_keeps_what_run_with_cache_caches(tiny_gpt2):
    names = [hook_name("head", 0), hook_name("resid_post", 1)]
    with torch.no_grad():
        _, cache = tiny_gpt2.run_with_cache(IDS, names_filter=names)
        with trace(tiny_gpt2, names) as acts:
            tiny_gpt2(IDS)
    assert set(acts) == set(names)
    for n in names:
        assert torch.equal(acts[n], cache[n])


def test_trace_runs_fwd_hooks_first_and_keeps_the_patched_values(tiny_gpt2):
    """A patch through fwd_hooks (head 0 of layer 0 zeroed) is what trace records, at the patched
    hook and downstream — as run_with_hooks computes it."""
    z0, out = hook_name("head", 0), hook_name("resid_post", 1)

    def zero_head0(z, hook):
        z = z.clone()
        z[:, :, 0] = 0
        return z

    saved = {}
    with torch.no_grad():
        tiny_gpt2.run_with_hooks(IDS, fwd_hooks=[(z0, zero_head0), (out, lambda x, hook: saved.__setitem__("x", x))])
        with trace(tiny_gpt2, [z0, out], fwd_hooks=[(z0, zero_head0)]) as acts:
            tiny_gpt2(IDS)
        clean = run_until(tiny_gpt2, IDS, out)[out]
    assert (acts[z0][:, :, 0] == 0).all() and acts[z0][:, :, 1:].abs().sum() > 0
    assert torch.equal(acts[out], saved["x"])
    assert (acts[out] - clean).abs().max() > 1e-4  # the patch changed the downstream value


def test_trace_stop_at_ends_the_forward(tiny_gpt2):
    stop, later = hook_name("resid_post", 0), hook_name("resid_pre", 1)
    calls = []
    with torch.no_grad():
        full = run_until(tiny_gpt2, IDS, later, keep=[stop])
        with trace(tiny_gpt2, stop_at=stop, fwd_hooks=[(later, lambda x, hook: calls.append(1))]) as acts:
            tiny_gpt2(IDS)
    assert calls == [] and list(acts) == [stop]
    assert torch.equal(acts[stop], full[stop])


def test_trace_detach_stores_a_cache_otherwise_live_tensors(tiny_gpt2):
    name = hook_name("mlp_out", 0)
    with trace(tiny_gpt2, [name]) as live:
        tiny_gpt2(IDS)
    with trace(tiny_gpt2, [name], detach=True) as cached:
        tiny_gpt2(IDS)
    assert live[name].grad_fn is not None  # gradients flow through the live activation
    assert cached[name].grad_fn is None and torch.equal(cached[name], live[name].detach())
    live[name].sum().backward()
    w = tiny_gpt2.blocks[0].mlp.out.original_component.weight
    assert w.grad is not None and w.grad.abs().sum() > 0
    tiny_gpt2.zero_grad(set_to_none=True)


def test_run_until_defaults_to_the_final_residual_stream(tiny_gpt2):
    mask = torch.ones_like(IDS)
    mask[1, :2] = 0
    with torch.no_grad():
        _, cache = tiny_gpt2.run_with_cache(IDS, attention_mask=mask)
        acts = run_until(tiny_gpt2, IDS, attention_mask=mask, keep=[hook_name("neuron", 0)])
    final = last_resid(tiny_gpt2)
    assert final == f"blocks.{tiny_gpt2.cfg.n_layers - 1}.hook_resid_post"
    assert set(acts) == {final, hook_name("neuron", 0)}
    for name in (final, hook_name("neuron", 0)):
        assert torch.equal(acts[name], cache[name])
    with torch.no_grad():
        unmasked = run_until(tiny_gpt2, IDS)[final]
    assert (unmasked[1] - acts[final][1]).abs().max() > 1e-4  # the mask was applied
