"""Every locate method, fast path and weight-editing mitigation on every decoder family the bridge
supports (core.families: GPT-2, Llama, Mistral, Qwen2, Gemma 2, Gemma 3, Phi-3, GPT-NeoX, OPT; random
weights, 2 layers, d_model 64, 2 KV heads where the family has grouped-query attention, the shipped
GPT-2 tokenizer), each against an independent computation: plain transformers, TransformerLens'
patching, hand-written hooks and autograd.

Tolerances: float32 throughout; a logit difference is within 64 float32 ulps of the logits' scale
(LOGIT_TOL × (1 + max |logit|)), which covers the reordered sums of two 2-layer forwards.
"""

import math
import warnings

import pytest
import torch
import transformer_lens.patching as tlp

from lens_bias.core import (
    LensBiasError,
    PromptSet,
    hf_state_dict,
    load_hf_weights,
    load_model,
    save_random_model,
    stale_split_qkv,
    sync_split_qkv,
)
from lens_bias.core.families import DECODER_FAMILIES, FAMILIES
from lens_bias.locate import (
    activation_patching,
    attribution_patching,
    causal_trace,
    crispr_scores,
    negative_attention_scores,
)
from lens_bias.locate import option_attributions
from lens_bias.locate.baselines import grad_x_activation, mean_activation, weight_norm
from lens_bias.locate.nas import EPS
from lens_bias.locate.patching import FastPathWarning, Layout
from lens_bias.mitigate import (
    export_model,
    head_lora_model,
    head_slices_unchanged,
    lsdm_edit,
    nasa_train,
    prune_heads,
    prune_neurons,
)
from lens_bias.organism import data_path
from lens_bias.tasks import MC_INSTRUCTIONS, binary_prompts, format_mc_prompt, item_options, load_bbq, load_yes_no
from lens_bias.tasks.multiple_choice import option_sequences
from lens_bias.tasks.records import take

LOGIT_TOL = 64 * torch.finfo(torch.float32).eps
GQA = {"llama", "mistral", "qwen2", "gemma2", "gemma3", "phi3"}
#: each family's MLP and attention output projections in plain transformers (written here, independently
#: of lens_bias.core.out_projection); GPT-2's Conv1D stores [in, out], nn.Linear [out, in]
OUT_PROJ = {"gpt2": ("transformer.h.{}.mlp.c_proj", "transformer.h.{}.attn.c_proj"),
            "neox": ("gpt_neox.layers.{}.mlp.dense_4h_to_h", "gpt_neox.layers.{}.attention.dense"),
            "opt": ("model.decoder.layers.{}.fc2", "model.decoder.layers.{}.self_attn.out_proj")}
OUT_PROJ.update({f: ("model.layers.{}.mlp.down_proj", "model.layers.{}.self_attn.o_proj")
                 for f in ("llama", "mistral", "qwen2", "gemma2", "gemma3", "phi3")})
#: the same first words, then the subject: the first difference is at position 4 (shared-prefix path)
PROMPTS = ["Answer: The nurse said that", "Answer: The pilot said that"]
CORRUPTED = ["Answer: The man said that", "Answer: The woman said that"]
IDS = torch.tensor([[50, 312, 77, 1024, 5, 901, 33], [7, 8, 9, 10, 11, 12, 13]])


def test_the_family_table_covers_the_issue():
    assert set(DECODER_FAMILIES) == {"gpt2", "llama", "mistral", "qwen2", "gemma2", "gemma3", "phi3", "neox", "opt"}
    assert FAMILIES["gemma3"].model == "Gemma3ForCausalLM" and set(OUT_PROJ) == set(DECODER_FAMILIES)


@pytest.fixture(scope="session", params=DECODER_FAMILIES)
def family(request):
    return request.param


#: sliding-window attention shorter than the prompts (8 tokens), so that its masks matter
SLIDING = {"mistral": {"sliding_window": 4}, "gemma2": {"sliding_window": 4}, "gemma3": {"sliding_window": 4}}


@pytest.fixture(scope="session")
def family_dir(family, tmp_path_factory, gpt2_tokenizer_dir):
    path = save_random_model(family, tmp_path_factory.mktemp(family), gpt2_tokenizer_dir, seed=1, n_kv_heads=2,
                             **SLIDING.get(family, {}))
    if family == "gemma2":
        # random weights give logits ≈ 0.7, far below Gemma 2's final soft cap (30), where it would change
        # nothing: scale the (tied) embedding so that the logits reach the cap
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(path)
        with torch.no_grad():
            hf.get_input_embeddings().weight.mul_(40)
        hf.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def model(family_dir):
    return load_model(family_dir, device="cpu")


@pytest.fixture(scope="session")
def hf(family_dir):
    """The same directory loaded by plain transformers (eager attention)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(family_dir, attn_implementation="eager").eval()


@pytest.fixture(scope="session")
def pairs(model):
    return PromptSet.build(model, PROMPTS, (" she", " he"), corrupted=CORRUPTED, subjects=["nurse", "pilot"])


def _ld(logits, ps):
    rows = torch.arange(len(ps))
    last = logits[rows, ps.answer_pos]
    return last[rows, ps.answer_ids[:, 0]] - last[rows, ps.answer_ids[:, 1]]


def _tol(model, ps):
    with torch.no_grad():
        return LOGIT_TOL * (1 + float(model(ps.tokens).abs().max()))


# ---- loading ----------------------------------------------------------------------------------------
def test_logits_equal_transformers(family, model, hf, pairs):
    padded = PromptSet.build(model, ["The nurse said that she", "A pilot said"], (" she", " he"))
    with torch.no_grad():
        ours = model(padded.tokens, attention_mask=padded.attention_mask)
        theirs = hf(input_ids=padded.tokens, attention_mask=padded.attention_mask).logits
    real = padded.attention_mask.bool()
    assert (ours - theirs)[real].abs().max() <= LOGIT_TOL * (1 + theirs.abs().max())
    assert not model.training
    cfg = hf.config
    if family in GQA:
        assert cfg.num_key_value_heads == 2 < cfg.num_attention_heads == 4
        assert model.cfg.n_key_value_heads == 2
    if family == "gemma2":  # the soft cap is active: without it the logits would differ
        assert theirs.abs().max() > 10 and cfg.final_logit_softcapping == 30
    if family in SLIDING:
        assert cfg.sliding_window == 4 < padded.tokens.shape[1]


# ---- activation patching: fast (shortcut, shared prefix) and hooked paths vs TL / hand hooks ------------
def _hand_patch(model, ps, hooks):
    with torch.no_grad():
        logits = model.run_with_hooks(ps.corrupted_tokens, attention_mask=ps.attention_mask, fwd_hooks=hooks)
    return _ld(logits, ps).mean()


def _setter(clean, pos=None):
    def hook(x, hook):
        x = x.clone()
        if pos is None:
            x[:] = clean
        else:
            x[:, pos] = clean[:, pos]
        return x
    return hook


def _hand_resid_mid(model, ps, cache, layer, pos):
    """resid_mid patched through the attention output: attn_out ← clean resid_mid − resid_pre (what the
    residual holds after the attention is then the clean one), independent of the bridge's resid_mid hook."""
    pre = {}

    def keep(x, hook):
        pre["x"] = x
        return x

    def attn(x, hook):
        x = x.clone()
        x[:, pos] = cache[f"blocks.{layer}.hook_resid_mid"][:, pos] - pre["x"][:, pos]
        return x

    return _hand_patch(model, ps, [(f"blocks.{layer}.hook_resid_pre", keep), (f"blocks.{layer}.hook_attn_out", attn)])


def _reference(case, model, ps):
    """TransformerLens' patching function, or a hand-written hooked forward per cell."""
    _, cache = model.run_with_cache(ps.tokens)
    metric = lambda logits: _ld(logits, ps).mean()  # noqa: E731
    tl = {"resid_pre": tlp.get_act_patch_resid_pre, "attn_out": tlp.get_act_patch_attn_out,
          "mlp_out": tlp.get_act_patch_mlp_out, "head/all": tlp.get_act_patch_attn_head_out_all_pos,
          "head/by_pos": tlp.get_act_patch_attn_head_out_by_pos}
    if case in tl:
        return torch.as_tensor(tl[case](model, ps.corrupted_tokens, cache, metric))
    L, P = model.cfg.n_layers, ps.tokens.shape[1]
    if case == "resid_mid":
        return torch.tensor([[_hand_resid_mid(model, ps, cache, l, p) for p in range(P)] for l in range(L)])
    if case == "resid_post":
        return torch.tensor([[_hand_patch(model, ps, [(f"blocks.{l}.hook_resid_post",
                                                       _setter(cache[f"blocks.{l}.hook_resid_post"], p))])
                              for p in range(P)] for l in range(L)])
    site = case.split("/")[0]  # attn_out/all, mlp_out/all: the whole output of one layer
    return torch.tensor([_hand_patch(model, ps, [(f"blocks.{l}.hook_{site}", _setter(cache[f"blocks.{l}.hook_{site}"]))])
                         for l in range(L)])


CASES = {"resid_pre": ("resid_pre", True), "resid_mid": ("resid_mid", True), "resid_post": ("resid_post", True),
         "attn_out": ("attn_out", True), "mlp_out": ("mlp_out", True), "attn_out/all": ("attn_out", False),
         "mlp_out/all": ("mlp_out", False), "head/all": ("head", False), "head/by_pos": ("head", True)}


@pytest.mark.parametrize("case", list(CASES))
def test_patching_fast_and_hooked_equal_the_reference(family, model, pairs, case):
    site, per_position = CASES[case]
    if family == "neox" and site == "resid_mid":  # parallel attention and MLP: nothing between them
        for fast in (True, False):
            with pytest.raises(LensBiasError, match="no resid_mid.*parallel"):
                activation_patching(model, pairs, site, fast=fast, progress=False)
        return
    ref = _reference(case, model, pairs)
    tol = _tol(model, pairs)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FastPathWarning)  # no family may fall back
        fast = activation_patching(model, pairs, site, per_position=per_position, batch_size=5, progress=False)
    assert fast.extra["fast"] and fast.extra["prefix"]  # the shortcut ran, reusing the shared prefix
    hooked = activation_patching(model, pairs, site, per_position=per_position, fast=False, progress=False)
    assert not hooked.extra["fast"]
    assert fast.values.shape == hooked.values.shape == ref.shape
    assert (fast.values - ref).abs().max() <= tol
    assert (hooked.values - ref).abs().max() <= tol
    assert ref.std() > 10 * tol  # the cells differ: a misplaced patch would show


def test_padded_prompts_fast_equals_hooked(model):
    """Right-padded prompts of different lengths sharing prefixes of different lengths."""
    ps = PromptSet.build(model, ["Continue: The nurse said that", "Mary said that"], (" she", " he"),
                         corrupted=["Continue: The man said that", "Anna said that"])
    assert not ps.same_length
    for site, per_position in (("head", False), ("mlp_out", True)):
        fast = activation_patching(model, ps, site, per_position=per_position, progress=False)
        hooked = activation_patching(model, ps, site, per_position=per_position, fast=False, progress=False)
        assert fast.extra["fast"] and (fast.extra["per_prompt"] - hooked.extra["per_prompt"]).abs().max() <= _tol(model, ps)


@pytest.mark.parametrize("plant", ["mlp_half without ln2", "head_linear flipped"])
def test_a_shortcut_that_does_not_fit_warns_once_and_falls_back(family, family_dir, pairs, monkeypatch, plant):
    """Planted: the shortcut's MLP half forgets the pre-MLP norm, or the layout claims the attention adds its
    heads' outputs linearly when a post-attention norm follows (Gemma 2/3). The self-checks catch what would
    be wrong: one FastPathWarning naming the architecture, over two calls, and the hooked path's values.
    What cannot be wrong stays fast (no MLP half in OPT/GPT-NeoX; a claimed norm only routes heads through hooks)."""
    import lens_bias.locate.patching as patching

    model = load_model(family_dir, device="cpu")  # a fresh model: each fallback is said once per model
    true = patching.layout(model)
    if plant == "mlp_half without ln2":
        site = "attn_out"
        monkeypatch.setattr(patching._Shortcut, "_mlp_half", lambda self, k, x: x + self.model.blocks[k].mlp(x))
        wrong = true.mlp_half
    else:
        site = "head"
        monkeypatch.setattr(patching, "layout", lambda m: Layout(true.parallel, true.mlp_half, not true.head_linear))
        wrong = not true.head_linear and (true.mlp_half or true.parallel)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        first = activation_patching(model, pairs, site, per_position=False, progress=False)
        activation_patching(model, pairs, site, per_position=False, progress=False)
    ours = [w for w in seen if issubclass(w.category, FastPathWarning)]
    assert len(ours) == wrong and first.extra["fast"] != wrong
    if wrong:
        assert FAMILIES[family].model in str(ours[0].message) and "\n" not in str(ours[0].message)
    monkeypatch.undo()
    ref = activation_patching(model, pairs, site, per_position=False, fast=False, progress=False)
    assert (first.values - ref.values).abs().max() <= _tol(model, pairs)


def test_an_unembedding_it_does_not_know_falls_back_to_the_model_logits(family, family_dir, pairs, monkeypatch):
    """Planted: the answer-only unembedding forgets the final soft cap. On Gemma 2 (logits at the cap) the
    check against the model's own logits catches it and patching uses the full logits; on Llama (a control)
    nothing changes."""
    import lens_bias.locate.patching as patching

    if family not in ("gemma2", "llama"):
        pytest.skip("the soft cap matters on Gemma 2 only; Llama is the control")

    model = load_model(family_dir, device="cpu")
    monkeypatch.setattr(patching, "soft_cap", lambda model, logits: logits)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        res = activation_patching(model, pairs, "head", per_position=False, progress=False)
    ours = [w for w in seen if issubclass(w.category, FastPathWarning)]
    assert len(ours) == (family == "gemma2") and res.extra["fast"] == (family != "gemma2")
    ref = _reference("head/all", model, pairs)
    assert (res.values - ref).abs().max() <= _tol(model, pairs)


# ---- attribution patching vs plain hooks + autograd ------------------------------------------------------
def _hand_attribution(model, ps, names):
    """Σ over prompts of ∂(mean LD)/∂a · (a_clean − a_corrupted) with the full logits, hooks keeping the live
    activations (retain_grad), and the corrupted activations from run_with_cache."""
    acts = {}

    def keep(x, hook, name):
        x.retain_grad()
        acts[name] = x
        return x

    hooks = [(n, (lambda n: lambda x, hook: keep(x, hook, n))(n)) for n in names]
    with torch.enable_grad():
        logits = model.run_with_hooks(ps.tokens, fwd_hooks=hooks)
        _ld(logits, ps).mean().backward()
    model.zero_grad(set_to_none=True)
    _, corr = model.run_with_cache(ps.corrupted_tokens, names_filter=lambda n: n in names)
    return {n: acts[n].grad * (acts[n].detach() - corr[n]) for n in names}


def test_attribution_equals_plain_autograd(model, pairs):
    L = model.cfg.n_layers
    sites = {"head": "attn.hook_z", "neuron": "mlp.hook_post", "resid_pre": "hook_resid_pre", "mlp_out": "hook_mlp_out"}
    ours = attribution_patching(model, pairs, list(sites))
    hand = _hand_attribution(model, pairs, [f"blocks.{l}.{h}" for l in range(L) for h in sites.values()])
    for site, h in sites.items():
        per_layer = []
        for l in range(L):
            x = hand[f"blocks.{l}.{h}"].sum(0)  # over prompts
            per_layer.append(x.sum((0, 2)) if site == "head" else x.sum(0) if site == "neuron" else x.sum(-1))
        ref = torch.stack(per_layer)
        assert ours[site].values.shape == ref.shape
        assert (ours[site].values - ref).abs().max() <= 1e-4 * (1 + ref.abs().max()), site
        assert ref.abs().max() > 0


# ---- causal tracing, NAS, CRISPR, baselines: finite, and one cell by hand --------------------------------
def test_causal_tracing_runs_and_a_cell_equals_hand_patching(model, pairs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random weights: the twins need not move the bias toward zero
        res = causal_trace(model, pairs, corruption="counterfactual", progress=False)
    t = int(pairs.subject_spans[0, 1]) - 1  # the subject's last token
    _, cache = model.run_with_cache(pairs.tokens)
    for site in ("mlp_out", "attn_out"):
        assert torch.isfinite(res[site].values).all() and res[site].extra["fast"]
        hand = _hand_patch(model, pairs, [(f"blocks.0.hook_{site}", _setter(cache[f"blocks.0.hook_{site}"], t))])
        assert abs(res[site].values[0, t] - hand) <= _tol(model, pairs)
        assert res[site].effect[0, t].item() == pytest.approx(res[site].values[0, t].item() - res[site].corrupted, abs=1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # nor the noise
        noisy = causal_trace(model, pairs, samples=2, progress=False)
    assert all(torch.isfinite(r.values).all() and r.extra["fast"] for r in noisy.values())


def test_nas_equals_hand_computation(model):
    ps = binary_prompts(model, load_yes_no(data_path("yesno"))[:3])
    res = negative_attention_scores(model, ps, progress=False)
    name = "blocks.1.attn.hook_pattern"
    _, cache = model.run_with_cache(ps.tokens, attention_mask=ps.attention_mask, names_filter=[name])
    for i, h in ((0, 1), (2, 3)):
        m, last = ps.metadata[i], int(ps.answer_pos[i])
        a_neg = cache[name][i, h, m["query_start"]:last + 1, m["neg_cand"]].double()
        a_pos = cache[name][i, h, m["query_start"]:last + 1, m["pos_cand"]].double()
        hand = float(((a_neg + a_pos) * torch.log((a_neg + EPS) / (a_pos + EPS))).sum())
        assert res.per_prompt[i, 1, h].item() == pytest.approx(hand, rel=1e-4, abs=1e-6)
    assert torch.isfinite(res.nas).all()


def _hand_option_attribution(model, prompt, options, target, layer, neuron):
    """A(o) = max over prompt tokens t of h_t · ∂P(o | x)/∂h_t for one neuron, P the softmax over the
    options' summed log-probabilities, each option's sequence run alone through plain hooks."""
    seqs, spans = option_sequences(model.tokenizer, [prompt], [options])
    logps, hs = [], []
    name = f"blocks.{layer}.mlp.hook_post"

    def keep(x, hook):
        x.retain_grad()
        hs.append(x)
        return x

    with torch.enable_grad():
        for seq, (start, n) in zip(seqs, spans):
            logits = model.run_with_hooks(torch.tensor([seq]), fwd_hooks=[(name, keep)])
            lp = logits[0].log_softmax(-1)
            logps.append(sum(lp[start - 1 + j, seq[start + j]] for j in range(n)))
        torch.stack(logps).softmax(0)[target].backward()
    model.zero_grad(set_to_none=True)
    start = spans[target][0]
    grad = sum(h.grad[0, :start, neuron] for h in hs)  # the prompt's tokens are shared by every option's sequence
    return float((hs[target][0, :start, neuron].detach() * grad).max())


def test_crispr_runs_and_an_attribution_equals_hand_autograd(model):
    items = take(load_bbq(data_path("bbq")), 0, 2)
    scores = crispr_scores(model, items, MC_INSTRUCTIONS[:1], progress=False)
    assert scores.values.shape == (model.cfg.n_layers, model.cfg.d_mlp) and torch.isfinite(scores.values).all()
    it = items[0]
    prompt = format_mc_prompt(MC_INSTRUCTIONS[0], it["context"], it["question"], item_options(it))
    ours = option_attributions(model, [prompt], [item_options(it)], [1])
    for layer, neuron in ((0, 7), (1, 100)):
        hand = _hand_option_attribution(model, prompt, item_options(it), 1, layer, neuron)
        assert ours[0, layer, neuron].item() == pytest.approx(hand, rel=1e-3, abs=1e-7)


def test_baselines_equal_hand_computation(family, model, hf, pairs):
    mod = dict(hf.named_modules())
    conv = family == "gpt2"  # Conv1D [in, out]
    for l in range(model.cfg.n_layers):
        w = mod[OUT_PROJ[family][0].format(l)].weight
        ref = w.norm(dim=1) if conv else w.norm(dim=0)
        assert torch.allclose(weight_norm(model, "neuron").values[l], ref, rtol=1e-5)
        wo = mod[OUT_PROJ[family][1].format(l)].weight
        wo = wo if conv else wo.T  # [heads · d_head, d_model]
        ref = wo.reshape(model.cfg.n_heads, -1).norm(dim=1)
        assert torch.allclose(weight_norm(model, "head").values[l], ref, rtol=1e-5)
    _, cache = model.run_with_cache(pairs.tokens, names_filter=["blocks.1.mlp.hook_post"])
    hand = cache["blocks.1.mlp.hook_post"].abs().mean((0, 1))
    assert torch.allclose(mean_activation(model, pairs, "neuron").values[1], hand, rtol=1e-5, atol=1e-7)
    gxa = grad_x_activation(model, pairs, "head").values
    acts = {}

    def keep(x, hook):
        x.retain_grad()
        acts["z"] = x
        return x

    with torch.enable_grad():
        _ld(model.run_with_hooks(pairs.tokens, fwd_hooks=[("blocks.0.attn.hook_z", keep)]), pairs).mean().backward()
    model.zero_grad(set_to_none=True)
    hand = (acts["z"].grad * acts["z"].detach()).sum((0, 1, 3))
    assert torch.allclose(gxa[0], hand, rtol=1e-4, atol=1e-7)


# ---- mitigations that edit weights: equal to zero ablation, export, reload in plain transformers ------------
def _reloaded(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, local_files_only=True).eval()


def _zero(index):
    def hook(x, hook):
        x = x.clone()
        x[index] = 0
        return x
    return hook


def test_pruning_equals_zero_ablation_and_exports(family, model, tmp_path):
    neurons, heads = [(0, 5), (1, 17)], [(1, 2)]
    edited = prune_heads(prune_neurons(model, neurons).model, heads).model
    hooks = [(f"blocks.{l}.mlp.hook_post", _zero((..., i))) for l, i in neurons]
    hooks += [(f"blocks.{l}.attn.hook_z", _zero((..., h, slice(None)))) for l, h in heads]
    with torch.no_grad():
        ablated, ours, orig = model.run_with_hooks(IDS, fwd_hooks=hooks), edited(IDS), model(IDS)
    tol = LOGIT_TOL * (1 + float(orig.abs().max()))
    assert (ours - ablated).abs().max() <= tol and (orig - ablated).abs().max() > 100 * tol
    out = export_model(edited, tmp_path / "pruned")
    reloaded = _reloaded(out)
    with torch.no_grad():
        assert (reloaded(IDS).logits - ours).abs().max() <= tol
    mlp = dict(reloaded.named_modules())[OUT_PROJ[family][0].format(1)].weight
    assert not (mlp[17] if family == "gpt2" else mlp[:, 17]).any()  # the neuron's W_out row, in HF's layout


def test_lsdm_edit_removes_the_bias_and_exports(model, pairs, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = lsdm_edit(model, pairs, "The cat sat on the mat.\nIt rained all day.", layers=[1], position="last",
                           progress=False)
    out = export_model(result.model, tmp_path / "lsdm")
    with torch.no_grad():
        before, after = _ld(model(pairs.tokens), pairs), _ld(_reloaded(out)(pairs.tokens).logits, pairs)
    assert before.abs().min() > 1e-3
    assert after.abs().mean() < 0.1 * before.abs().mean()  # measured by plain transformers on the export


def _train_a_little(peft_model, steps=3):
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=5e-2)
    peft_model.train()
    for _ in range(steps):
        loss = peft_model(input_ids=IDS, labels=IDS).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return peft_model.eval()


def test_head_lora_changes_only_its_heads_and_exports(family, model, tmp_path):
    """NASA's per-head LoRA, fused q/k/v included (GPT-2 c_attn, Phi-3 qkv_proj with grouped-query sizes,
    GPT-NeoX's interleaved query_key_value): merged back into a bridge, only the heads' slices changed,
    the bridge computes what the PEFT model computes, and the export reloads with the same logits."""
    heads = [(0, 1), (1, 2)]
    peft_model = _train_a_little(head_lora_model(model, heads))
    with torch.no_grad():
        want = peft_model(input_ids=IDS).logits
    merged = load_hf_weights(model, peft_model.merge_and_unload())
    unchanged = head_slices_unchanged(model, merged, heads)
    assert all(unchanged.values()), [k for k, v in unchanged.items() if not v]
    # independently, in TransformerLens' per-head weights ([head, ...]; k and v per KV head under GQA): exactly
    # the chosen heads' q and o slices changed, and the k and v of their KV groups
    group = model.cfg.n_heads // (getattr(model.cfg, "n_key_value_heads", None) or model.cfg.n_heads)
    for l in range(model.cfg.n_layers):
        for kind in ("W_Q", "W_K", "W_V", "W_O"):
            a, b = getattr(model.blocks[l].attn, kind), getattr(merged.blocks[l].attn, kind)
            changed = {i for i in range(a.shape[0]) if not torch.equal(a[i], b[i])}
            expected = {h if kind in ("W_Q", "W_O") else h // group for hl, h in heads if hl == l}
            assert changed == expected, (l, kind, changed, expected)
    tol = LOGIT_TOL * (1 + float(want.abs().max()))
    with torch.no_grad():
        assert (merged(IDS) - want).abs().max() <= tol
        assert (_reloaded(export_model(merged, tmp_path / "lora"))(IDS).logits - want).abs().max() <= tol


def test_nasa_trains_and_merges(model):
    items = load_yes_no(data_path("yesno"))
    train, dev = binary_prompts(model, items[5:9]), binary_prompts(model, items[3:5])  # both labels in each
    result = nasa_train(model, [(1, 0)], train, dev, steps=1, eval_every=1, progress=False)
    assert all(head_slices_unchanged(model, result.model, [(1, 0)]).values())
    assert all(math.isfinite(h["dev_accuracy"]) for h in result.report["history"])


def test_neox_attention_edits_through_the_split_copies_are_refused(family, family_dir, tmp_path):
    """GPT-NeoX's bridge computes with copies of the fused query_key_value: an edit on one side is refused at
    export (one line); after sync_split_qkv both agree and the export reproduces the edited logits."""
    if family != "neox":
        model = load_model(family_dir, device="cpu")
        with torch.no_grad():  # views of the fused weight (GPT-2, Phi-3) or no fused weight: never stale
            next(p for n, p in model.named_parameters() if "attn" in n or "attention" in n).add_(0.5)
        assert stale_split_qkv(model) == []
        return
    model = load_model(family_dir, device="cpu")
    with torch.no_grad():
        model.blocks[0].attn.q.original_component.weight[:4] += 0.5  # through the bridge
        edited = model(IDS)
    assert stale_split_qkv(model) == [0]
    with pytest.raises(LensBiasError, match=r"layer\(s\) \[0\].*split q/k/v copies differ") as err:
        export_model(model, tmp_path / "stale")
    assert "\n" not in str(err.value) and not (tmp_path / "stale").exists()
    fresh = load_model(family_dir, device="cpu")
    with torch.no_grad():
        qkv = hf_state_dict(fresh)["gpt_neox.layers.0.attention.query_key_value.weight"]
        qkv[:4] += 0.5  # the same rows in the fused weight: per head [q | k | v], so rows 0-3 are head 0's q 0-3
        assert sync_split_qkv(fresh) == [0] and stale_split_qkv(fresh) == []
        assert torch.equal(fresh(IDS), edited)
    out = export_model(fresh, tmp_path / "synced")
    with torch.no_grad():
        assert (_reloaded(out)(IDS).logits - edited).abs().max() <= LOGIT_TOL * (1 + float(edited.abs().max()))
