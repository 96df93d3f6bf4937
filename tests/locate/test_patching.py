"""Activation patching equals TransformerLens' patching (fast and hooked paths, GPT-2 and Llama),
patching a component with its own clean value gives the clean metric, and it finds the organism's
planted gender neuron's layer."""

import pytest
import torch
import transformer_lens.patching as tlp

from lens_bias.core import (
    LensBiasError,
    PromptSet,
    answer_logits_fast,
    logit_diff,
    normalized_metric,
)
from lens_bias.locate import (
    activation_patching,
    causal_trace,
    patch_with,
    subject_corruption,
)


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
    assert ours.extra["fast"]  # the shortcut forward passed its self-check
    assert ours.values.shape == torch.as_tensor(ref).shape
    assert (ours.values - torch.as_tensor(ref)).abs().max() < 1e-4
    hooked = activation_patching(tiny_gpt2, pairs, component, fast=False, progress=False, **kw)
    assert not hooked.extra["fast"] and (hooked.values - torch.as_tensor(ref)).abs().max() < 1e-4


def test_equals_transformer_lens_on_llama_with_gqa(tiny_llama, pairs):
    ps = PromptSet.build(tiny_llama, pairs.prompts, (" she", " he"), corrupted=pairs.corrupted_prompts)
    _, cache = tiny_llama.run_with_cache(ps.tokens)
    ref = tlp.get_act_patch_attn_head_out_by_pos(tiny_llama, ps.corrupted_tokens, cache,
                                                 lambda logits: logit_diff(logits, ps).mean())
    ours = activation_patching(tiny_llama, ps, "head", progress=False)
    assert ours.extra["fast"] and (ours.values - ref).abs().max() < 1e-4


def test_own_clean_value_gives_exactly_the_clean_metric(tiny_gpt2, pairs):
    """Corrupted = clean: every patch writes a component's own clean value, so every value is the clean metric."""
    same = PromptSet.build(tiny_gpt2, pairs.prompts, (" she", " he"), corrupted=pairs.prompts)
    with torch.no_grad():
        clean = logit_diff(tiny_gpt2(same.tokens), same).mean().item()
    for component, kw in (("head", {}), ("mlp_out", {"per_position": False}), ("resid_mid", {})):
        res = activation_patching(tiny_gpt2, same, component, progress=False, **kw)
        assert res.clean == pytest.approx(clean, abs=1e-5)
        assert (res.values - clean).abs().max().item() < 1e-5


def test_window_and_noise_corruption_fast_equals_hooked(tiny_gpt2, pairs):
    """Tracing-style runs (noise on the subject embeddings, a window of 3 layers) agree across paths."""
    corruption = subject_corruption(tiny_gpt2, pairs, noise=3.0, seed=1)
    for component in ("mlp_out", "head", "resid_pre"):
        kw = dict(window=3, corruption=corruption, progress=False, per_position=component != "head")
        fast = activation_patching(tiny_gpt2, pairs, component, **kw)
        hooked = activation_patching(tiny_gpt2, pairs, component, fast=False, **kw)
        assert fast.extra["fast"] and (fast.values - hooked.values).abs().max() < 1e-4


def test_results_are_labelled(tiny_gpt2, pairs):
    res = activation_patching(tiny_gpt2, pairs, "head", progress=False)
    df = res.to_frame()
    assert len(df) == 2 * pairs.tokens.shape[1] * 4
    assert list(df.columns[:5]) == ["component", "method", "layer", "pos", "head"]
    assert df.loc[df.pos == 2, "token"].iloc[0] == " nurse/ doctor/ mechanic"
    assert df.loc[df.pos == 0, "token"].iloc[0] == "<|endoftext|>"
    assert res.extra["per_prompt"].shape == (2, pairs.tokens.shape[1], 4, 3)


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


def test_bad_inputs(tiny_gpt2, pairs):
    single = PromptSet.build(tiny_gpt2, ["The nurse said that"], (" she", " he"))
    with pytest.raises(LensBiasError, match="pairs"):
        activation_patching(tiny_gpt2, single)
    with pytest.raises(LensBiasError, match="unknown patching site"):
        activation_patching(tiny_gpt2, pairs, "mlp_in")
    with pytest.raises(LensBiasError, match="out of range"):
        activation_patching(tiny_gpt2, pairs, layers=[5])
    with pytest.raises(LensBiasError, match="subject spans"):
        causal_trace(tiny_gpt2, single)
    with pytest.raises(LensBiasError, match="undefined"):
        normalized_metric(1.0, 2.0, 2.0)
    with pytest.raises(LensBiasError, match="do not exist"):
        patch_with(tiny_gpt2, pairs, {"blocks.0.hook_nonsense": torch.zeros(1)})
    with pytest.raises(LensBiasError, match="unknown metric"):
        activation_patching(tiny_gpt2, pairs, metric="accuracy")
    with pytest.raises(LensBiasError, match="window"):
        activation_patching(tiny_gpt2, pairs, window=0)
    with pytest.raises(LensBiasError, match="single tokens"):
        PromptSet.build(tiny_gpt2, ["The nurse said that"], (" she", " he said"))
    with pytest.raises(LensBiasError, match="empty prompt set"):
        PromptSet.build(tiny_gpt2, [], (" she", " he"))
    with pytest.raises(LensBiasError, match="different lengths"):
        PromptSet.build(tiny_gpt2, ["The nurse said that"], (" she", " he"), corrupted=["The adjunct professor said that"])


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


def test_heatmaps_label_tokens_and_hover(tiny_gpt2, pairs):
    from lens_bias.core import heatmap

    by_pos = activation_patching(tiny_gpt2, pairs, "mlp_out", progress=False)
    fig = heatmap(by_pos)
    trace = fig.data[0]
    assert list(trace.x)[2] == "2:  nurse/ doctor/ mechanic" and list(trace.y) == ["layer 0", "layer 1"]
    assert "normalised effect" in trace.text[1][4]
    heads = activation_patching(tiny_gpt2, pairs, "head", per_position=False, progress=False)
    fig = heatmap(heads, normalized=False)
    assert list(fig.data[0].x) == ["head 0", "head 1", "head 2", "head 3"]
    z = torch.tensor(fig.data[0].z)
    assert torch.allclose(z, heads.effect, atol=1e-6)


# ---- shared prefixes: positions before the first difference come from the corrupted run -----------
INSTRUCTION = "Read the sentence and continue it with one word. Do not guess from the job. Sentence: "


def _prefix_sets(model):
    """Pairs sharing a long instruction (first difference at position 22) and pairs differing at position 1."""
    long = PromptSet.build(model, [INSTRUCTION + f"The {w} said that" for w in ("nurse", "doctor", "mechanic")],
                           (" she", " he"),
                           corrupted=[INSTRUCTION + f"The {w} said that" for w in ("man", "woman", "man")])
    first = PromptSet.build(model, ["Mary said that", "John said that", "Doctors said that"], (" she", " he"),
                            corrupted=["Anna said that", "Peter said that", "Women said that"])
    return long, first


#: per-position TL patching as (patch setter, activation, axes), run on chosen positions only
TL_BY_POS = {"head": (tlp.layer_pos_head_vector_patch_setter, "z", ("layer", "pos", "head")),
             "resid_pre": (tlp.layer_pos_patch_setter, "resid_pre", ("layer", "pos")),
             "mlp_out": (tlp.layer_pos_patch_setter, "mlp_out", ("layer", "pos"))}


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("site,per_position", [("head", False), ("head", True), ("resid_pre", True), ("mlp_out", True)])
def test_shared_prefix_path_equals_transformer_lens(tiny_gpt2, tiny_llama, family, site, per_position):
    """The prefix path (keys/values of the shared positions from the corrupted run) equals TL's patching,
    on GPT-2 and Llama with GQA, for a long shared instruction and for a first difference at position 1.
    Per position, TL runs from the position before the first difference on (earlier patches are no-ops:
    there both sides give exactly the corrupted metric)."""
    import pandas as pd

    model = tiny_gpt2 if family == "gpt2" else tiny_llama
    L, H = model.cfg.n_layers, model.cfg.n_heads
    for ps, first in zip(_prefix_sets(model), (22, 1)):
        assert int((ps.tokens != ps.corrupted_tokens).int().argmax(1).min()) == first
        _, cache = model.run_with_cache(ps.tokens)
        metric = lambda logits: logit_diff(logits, ps).mean()  # noqa: E731
        ours = activation_patching(model, ps, site, per_position=per_position, batch_size=5, progress=False)
        assert ours.extra["fast"] and ours.extra["prefix"]  # the prefix path ran
        if not per_position:
            ref = tlp.get_act_patch_attn_head_out_all_pos(model, ps.corrupted_tokens, cache, metric)
            assert (ours.values - ref).abs().max() < 1e-4
            continue
        setter, act, axes = TL_BY_POS[site]
        positions = range(first - 1, ps.tokens.shape[1])
        cells = [(l, p, h) for l in range(L) for p in positions for h in range(H)] if site == "head" else \
            [(l, p) for l in range(L) for p in positions]
        ref = tlp.generic_activation_patch(model, ps.corrupted_tokens, cache, metric, patch_setter=setter,
                                           activation_name=act, index_df=pd.DataFrame(cells, columns=list(axes)))
        assert (ours.values[:, first - 1:].reshape(-1) - ref).abs().max() < 1e-4
        assert (ours.values[:, :first - 1] == ours.corrupted).all()


def _block_lengths(model):
    """A hook list recording the number of positions of every block call."""
    seen = []
    handles = [b.register_forward_pre_hook(lambda m, args, kw: seen.append(
        (args[0] if args else kw["hidden_states"]).shape[1]), with_kwargs=True) for b in model.blocks]
    return seen, handles


def test_shared_prefix_is_computed_once(tiny_gpt2):
    """Patched rows run only the positions from the first difference to the answer: apart from the clean
    and corrupted runs and the two self-checks (one call per layer each), no block sees the shared instruction."""
    long, _ = _prefix_sets(tiny_gpt2)
    P, first = long.tokens.shape[1], 22
    for site, per_position in (("head", False), ("resid_pre", True), ("mlp_out", False)):
        seen, handles = _block_lengths(tiny_gpt2)
        try:
            activation_patching(tiny_gpt2, long, site, per_position=per_position, progress=False)
        finally:
            for h in handles:
                h.remove()
        full = [n for n in seen if n > P - first]
        assert len(full) <= 4 * tiny_gpt2.cfg.n_layers and len(seen) > len(full)


def test_padded_prompts_fast_equals_hooked(tiny_gpt2, tiny_llama):
    """Right-padded prompts of different lengths, shared prefixes of different lengths: the fast path (rows
    cut at each prompt's answer) equals one hooked forward per row."""
    for model, sites in ((tiny_gpt2, (("head", True), ("resid_post", True))),
                         (tiny_llama, (("head", False), ("attn_out", False)))):
        ps = PromptSet.build(model, ["Continue with one word: The nurse said that", "Mary said that",
                                     "The doctor told me that"], (" she", " he"),
                             corrupted=["Continue with one word: The man said that", "Anna said that",
                                        "The woman told me that"])
        assert not ps.same_length
        for site, per_position in sites:
            fast = activation_patching(model, ps, site, per_position=per_position, progress=False)
            hooked = activation_patching(model, ps, site, per_position=per_position, fast=False, progress=False)
            assert fast.extra["fast"] and fast.extra["prefix"]
            assert (fast.extra["per_prompt"] - hooked.extra["per_prompt"]).abs().max() < 1e-4


def test_memory_budget_splits_prompts_without_changing_results(tiny_gpt2, pairs):
    """A small memory_mb processes the prompts in groups and rows in small chunks; the values are the same."""
    whole = activation_patching(tiny_gpt2, pairs, "head", progress=False)
    small = activation_patching(tiny_gpt2, pairs, "head", memory_mb=0.4, progress=False)
    assert (whole.extra["per_prompt"] - small.extra["per_prompt"]).abs().max() < 1e-5
    hooked = activation_patching(tiny_gpt2, pairs, "mlp_out", fast=False, memory_mb=0.4, progress=False)
    ref = activation_patching(tiny_gpt2, pairs, "mlp_out", fast=False, progress=False)
    assert (hooked.values - ref.values).abs().max() < 1e-5
    with pytest.raises(LensBiasError, match="memory_mb"):
        activation_patching(tiny_gpt2, pairs, "head", memory_mb=0.01, progress=False)


# ---- precision and broken models ------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_patching_and_tracing_close_to_float32(tiny_gpt2_dir, dtype):
    """bf16/fp16 models patch (fast and hooked paths) and trace; each result is within
    core.precision.half_tolerance of float32's: e_w (the float32 model with its weights rounded to the dtype
    minus float32) + 8·u·√R·s, R = 2 residual updates × 2 layers forward, s = the largest float32 value
    (tests/core/test_precision.py derives it)."""
    from lens_bias.core import load_model
    from lens_bias.core.precision import half_tolerance, rounded_weights

    m32, low = load_model(tiny_gpt2_dir, device="cpu"), load_model(tiny_gpt2_dir, device="cpu", dtype=dtype)
    w = rounded_weights(m32, getattr(torch, dtype))
    ps = PromptSet.build(m32, ["The nurse said that she was", "The doctor said that he was"], (" she", " he"),
                         corrupted=["The man said that she was", "The woman said that he was"],
                         subjects=["nurse", "doctor"])

    def close(got, ref, by_weights, scale):
        return float((got - ref).abs().max()) <= half_tolerance(getattr(torch, dtype), by_weights, 2 * m32.cfg.n_layers,
                                                                 scale)

    for site, kw in (("head", {"per_position": False}), ("head", {}), ("resid_pre", {}), ("mlp_out", {"fast": False})):
        ref, got, rw = (activation_patching(m, ps, site, progress=False, **kw) for m in (m32, low, w))
        assert got.extra["fast"] == kw.get("fast", True)
        scale = float(ref.values.abs().max())
        assert close(got.values, ref.values, (rw.values - ref.values).abs().max(), scale), site
        assert close(torch.tensor(got.clean), torch.tensor(ref.clean), abs(rw.clean - ref.clean), scale), site
    ref, got, rw = (causal_trace(m, ps, progress=False) for m in (m32, low, w))
    for site in ref:
        assert got[site].extra["fast"]
        assert close(got[site].values, ref[site].values, (rw[site].values - ref[site].values).abs().max(),
                     float(ref[site].values.abs().max())), site


def test_non_finite_outputs_are_an_error(tiny_gpt2_dir, pairs):
    """A model whose outputs are NaN gives a LensBiasError, not a table of NaN."""
    from lens_bias.core import load_model

    broken = load_model(tiny_gpt2_dir, device="cpu")
    with torch.no_grad():
        broken.blocks[1].mlp.out.original_component.weight[0, 0] = float("nan")
    for kw in ({}, {"fast": False}):
        with pytest.raises(LensBiasError, match=r"NaN or inf.*weight transformer\.h\.1\.mlp\.c_proj\.weight"):
            activation_patching(broken, pairs, "head", progress=False, **kw)
    with pytest.raises(LensBiasError, match=r"weight transformer\.h\.1\.mlp\.c_proj\.weight holds 1 non-finite"):
        causal_trace(broken, pairs, progress=False)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_resumed_forward_equals_the_full_hooked_forward(tiny_gpt2, tiny_llama, family):
    """Resumed (the report's ablations): a forward whose hooks act at layer l ≥ 1 entered at l from the recorded
    run gives the full hooked forward's answer logits and final residual — plain run_with_hooks as the reference,
    several hook sets stacked in one batch, GQA included; entering one layer too late misses the hooks."""
    from lens_bias.core.hooks import hook_name
    from lens_bias.locate.patching import Resumed

    model = tiny_gpt2 if family == "gpt2" else tiny_llama
    ps = PromptSet.build(model, ["The nurse said that", "The doctor yelled that", "The mechanic said that"],
                         (" she", " he"))
    run = Resumed(model, ps.tokens, ps.attention_mask, ps.answer_pos, ps.answer_ids)
    assert run.sc is not None, "the resumed path must fit this model"
    L, n = model.cfg.n_layers, len(ps)

    def zero(idx):  # not 0: a random tiny model barely notices one zeroed unit; a large value it does
        def hook(x, hook):
            x[..., idx] = 4.0
            return x
        return hook

    def stacked(configs):  # each config's hooks on its own copy of the prompts (as the report stacks them)
        def on(g, fn):
            def hook(x, hook):
                fn(x.narrow(0, g * n, n), hook)
                return x
            return hook
        return [(name, on(g, fn)) for g, hooks in enumerate(configs) for name, fn in hooks]

    rows = torch.arange(n).repeat(2)
    layer = L - 1
    configs = [[(hook_name("neuron", layer), zero(3))], [(hook_name("head", layer), zero(1))]]
    got = run.answer_logits(layer, rows, stacked(configs))
    with torch.no_grad():
        for g, hooks in enumerate(configs):
            logits = model.run_with_hooks(ps.tokens, attention_mask=ps.attention_mask, fwd_hooks=hooks)
            r = torch.arange(n)
            want = logits[r, ps.answer_pos][r[:, None], ps.answer_ids].float()
            assert (got[g * n:(g + 1) * n] - want).abs().max() < 1e-4
            base = model(ps.tokens, attention_mask=ps.attention_mask)[r, ps.answer_pos][r[:, None], ps.answer_ids]
            assert (want - base.float()).abs().max() > 1e-3, "the hook must change the answer for the test to bite"
    with torch.no_grad():
        final = run.final_resid(layer, torch.arange(n), configs[0])
        logits = model.unembed(model.ln_final(final))
        want = model.run_with_hooks(ps.tokens, attention_mask=ps.attention_mask, fwd_hooks=configs[0])
    assert (logits - want).abs().max() < 1e-4
    late = run.answer_logits(L - 1, torch.arange(n), [(hook_name("neuron", 0), zero(3))])  # hooks before the entry
    with torch.no_grad():
        first = model.run_with_hooks(ps.tokens, attention_mask=ps.attention_mask,
                                     fwd_hooks=[(hook_name("neuron", 0), zero(3))])
    r = torch.arange(n)
    assert (late - first[r, ps.answer_pos][r[:, None], ps.answer_ids]).abs().max() > 1e-3, \
        "a hook before the entry layer is (rightly) not run: entering late would miss it"


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_shared_first_tokens_once_per_hook_set_equal_full_forwards(tiny_gpt2, tiny_llama, family):
    """Prompts that begin alike ('The ...'): Resumed.answer_logits_many computes the shared tokens once per hook
    set (zero/mean-style hooks, the same at every position) and equals one full hooked forward per set."""
    from lens_bias.core.hooks import hook_name
    from lens_bias.locate.patching import Resumed

    model = tiny_gpt2 if family == "gpt2" else tiny_llama
    ps = PromptSet.build(model, ["The big nurse said that", "The big doctor yelled that", "The big mechanic said that"],
                         (" she", " he"))
    run = Resumed(model, ps.tokens, ps.attention_mask, ps.answer_pos, ps.answer_ids)
    assert run.s0 >= 2, "the prompts share their first tokens"

    def put(idx, v):
        def hook(x, hook):
            x[..., idx] = v
            return x
        return hook

    L, n = model.cfg.n_layers, len(ps)
    for layer in range(L):
        configs = [[(hook_name("neuron", layer), put(3, 4.0))], [(hook_name("head", L - 1), put(1, -3.0))], []]
        got = run.answer_logits_many(layer, configs)
        for g, hooks in enumerate(configs):
            with torch.no_grad():
                logits = model.run_with_hooks(ps.tokens, attention_mask=ps.attention_mask, fwd_hooks=hooks)
            r = torch.arange(n)
            want = logits[r, ps.answer_pos][r[:, None], ps.answer_ids].float()
            assert (got[g * n:(g + 1) * n] - want).abs().max() < 1e-4, (layer, g)
