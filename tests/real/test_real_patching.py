"""Activation patching on the real model equals TransformerLens' own `transformer_lens.patching` (heads under
grouped-query attention — 9 query heads share 3 key/value heads —, residual stream and MLP outputs, all positions
and by position), attribution patching equals plain transformers' autograd, and attribution agrees with patching
on which heads carry the she/he bias (on the demo's 16 prompt pairs, over all 270 heads: test_real_demo.py)."""

import pandas as pd
import pytest
import torch
import transformer_lens.patching as tlp
from real_reference import layers, logit_diff, record_inputs

import lens_bias as lb
from lens_bias.core import logit_diff as lb_logit_diff

# Both sides run the same float32 network on the bridge (TL's functions patch through its hooks): differences are
# summation order only, ~1e-6 on metrics of size ~1 (float32 unit roundoff 6e-8 over 30 layers of sums of ≤ 1536
# terms). 1e-4 is the project's stated patching tolerance (README: "Results equal transformer_lens.patching's").
ATOL = 1e-4


#: layer 0, and the layers of the top heads of these 4 pairs (activation patching of all 270 heads: L11H3 restores
#: 66% of the gap, L26H2 64%; all 270 heads are patched and compared with attribution in test_real_demo.py)
LAYERS = [0, 11, 26]


@pytest.fixture(scope="module")
def heads(real, professions):
    """Activation patching of every head (all positions) of LAYERS on the real model: 27 heads × 4 pairs."""
    return lb.activation_patching(real, professions, "head", per_position=False, layers=LAYERS, progress=False)


@pytest.fixture(scope="module")
def clean_cache(real, professions):
    _, cache = real.run_with_cache(professions.tokens)
    return cache


def _tl_metric(ps):
    return lambda logits: lb_logit_diff(logits, ps).mean()


def test_heads_equal_transformer_lens(real, professions, heads, clean_cache):
    """All-position head patching (the fast path with the shared-prefix KV cache, GQA) equals TL's
    generic_activation_patch, head by head."""
    assert heads.extra["fast"] and heads.extra["prefix"]
    cells = [(l, h) for l in LAYERS for h in range(real.cfg.n_heads)]
    ref = tlp.generic_activation_patch(real, professions.corrupted_tokens, clean_cache, _tl_metric(professions),
                                       patch_setter=tlp.layer_head_vector_patch_setter, activation_name="z",
                                       index_df=pd.DataFrame(cells, columns=["layer", "head"]))
    assert (heads.values.reshape(-1) - ref).abs().max() <= ATOL
    # the comparison covers a real effect: the top head restores a sizeable share of the bias
    assert heads.units(1) == [(11, 3)] and heads.normalized.max() > 0.5 and heads.clean - heads.corrupted > 0.3


def test_heads_by_position_equal_transformer_lens(real, professions, heads, clean_cache):
    """Per-position head patching at the top head's layer (11) equals TL's layer_pos_head_vector_patch_setter at the
    profession's position and at the answer position."""
    layer = heads.units(1)[0][0]
    ours = lb.activation_patching(real, professions, "head", layers=[layer], progress=False)
    last = int(professions.answer_pos[0])
    cells = [(layer, p, h) for p in (1, last) for h in range(real.cfg.n_heads)]
    ref = tlp.generic_activation_patch(real, professions.corrupted_tokens, clean_cache, _tl_metric(professions),
                                       patch_setter=tlp.layer_pos_head_vector_patch_setter, activation_name="z",
                                       index_df=pd.DataFrame(cells, columns=["layer", "pos", "head"]))
    got = torch.stack([ours.values[0, p, h] for _, p, h in cells])
    assert ours.extra["fast"] and (got - ref).abs().max() <= ATOL
    assert (ours.values[0, 0] == ours.corrupted).all()  # before the first difference nothing changes


@pytest.mark.parametrize("site", ["resid_pre", "mlp_out"])
def test_resid_and_mlp_by_position_equal_transformer_lens(real, professions, clean_cache, site):
    """Residual stream and MLP outputs by position, at layer 0 and layer 26, equal TL's."""
    chosen = [0, 26]
    ours = lb.activation_patching(real, professions, site, layers=chosen, progress=False)
    cells = [(l, p) for l in chosen for p in range(professions.tokens.shape[1])]
    ref = tlp.generic_activation_patch(real, professions.corrupted_tokens, clean_cache, _tl_metric(professions),
                                       patch_setter=tlp.layer_pos_patch_setter, activation_name=site,
                                       index_df=pd.DataFrame(cells, columns=["layer", "pos"]))
    assert ours.extra["fast"] and (ours.values.reshape(-1) - ref).abs().max() <= ATOL
    assert ours.values.max() > ours.corrupted + 0.1  # something was restored


def test_attribution_equals_autograd(real, real_hf, professions):
    """Attribution scores of heads and neurons equal Σ ∂LD/∂a · (a_clean − a_corr) from plain transformers'
    autograd (gradient in the clean run, LD the mean over prompts of logit(' she') − logit(' he'))."""
    ps = professions
    rows = torch.arange(len(ps))

    def mean_ld(logits):
        a = logits[rows, ps.answer_pos][rows[:, None], ps.answer_ids]
        return (a[:, 0] - a[:, 1]).mean()

    mods = {(kind, l): (blk.self_attn.o_proj if kind == "head" else blk.mlp.down_proj)
            for l, blk in enumerate(layers(real_hf)) for kind in ("head", "neuron")}
    clean, grads = record_inputs(real_hf, mods, ps.tokens, grad_of=mean_ld)
    corrupted, _ = record_inputs(real_hf, mods, ps.corrupted_tokens)
    ours = lb.attribution_patching(real, ps, ["head", "neuron"])
    L, H = real.cfg.n_layers, real.cfg.n_heads
    for kind in ("head", "neuron"):
        ref = torch.stack([(grads[(kind, l)] * (clean[(kind, l)] - corrupted[(kind, l)]) * len(ps)).mean(0).sum(0)
                           for l in range(L)])  # [layer, n_heads·d_head] or [layer, d_mlp]
        if kind == "head":
            ref = ref.view(L, H, -1).sum(-1)
        got = ours[kind].values
        # float32 gradients through 30 layers, two implementations: relative to the scores' scale
        assert (got - ref).abs().max() <= 1e-4 * ref.abs().max(), kind
    assert ours["head"].clean == pytest.approx(float(logit_diff(real_hf, ps.tokens, ps.answer_pos, ps.answer_ids).mean()),
                                               abs=ATOL)
