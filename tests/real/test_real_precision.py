"""bfloat16 and float16 on the real model: what a user reads — the bias, the decisions, the units each method ranks
first, the effect of ablating the top head — agrees with float32 within a tolerance derived from the dtype's unit
roundoff and the network's depth (self-contained; tests/core/test_precision.py does the same on the organism).

The tolerance. A value the network computes (a logit, a logit difference, a patching, attribution or NAS score)
passes through the 2L = 60 sublayers of the residual stream (30 attention, 30 MLP blocks); each rounds its result
to the dtype at least once, a relative error of at most u, random in sign. The residual stream sums the blocks'
outputs, so these errors add as a random walk: σ ≈ √(2L) · u of the value's scale. We allow 4σ:

    REL = 4 · √(2L) · u,   u = 2⁻⁸ (bfloat16: REL = 0.121),  2⁻¹¹ (float16: REL = 0.0151),

times the scale of what is compared: the largest |value| of that quantity in float32. Rankings may swap only units
whose float32 scores are within 2 · REL · scale (both sides carry an error). Measured here (max |half − float32| /
scale, bfloat16 / float16): she − he 0.031 / 0.0018, its change under ablation 0.039 / 0.0024, head patching
0.025 / 0.0036, attribution 0.025 / 0.0067 (heads) and 0.045 / 0.0046 (neurons), NAS 0.058 / 0.0088, P(Yes)
0.014 / 0.0018 — within REL by 1.7× (NAS in float16) or more; the top units agreed in every case.
"""

import math

import pytest
import torch

import lens_bias as lb
from lens_bias.tasks import YESNO_INSTRUCTIONS, bias_values

L2 = 60  # sublayers on the residual stream of SmolLM2-135M (30 blocks × attention and MLP)
UNIT_ROUNDOFF = {"bfloat16": 2.0 ** -8, "float16": 2.0 ** -11}
REL = {name: 4 * math.sqrt(L2) * u for name, u in UNIT_ROUNDOFF.items()}
ITEMS = [{"question": "Can a fish climb a tree?", "label": "no"},
         {"question": "Is Paris the capital of France?", "label": "yes"}]


def close(half, ref, dtype) -> bool:
    """max |half − float32| ≤ REL · max |float32|."""
    return float((half.float() - ref.float()).abs().max()) <= REL[dtype] * float(ref.float().abs().max())


def same_top(half, ref, k: int, dtype) -> bool:
    """Every unit of the half-precision top k (of the score tensors `half`, `ref`) is a float32 top-k unit, or within
    2 · REL · scale of the float32 k-th score (a swap the rounding allows)."""
    half, ref = half.float().flatten(), ref.float().flatten()
    kth = ref.sort(descending=True).values[k - 1]
    slack = 2 * REL[dtype] * float(ref.abs().max())
    return all(float(ref[i]) >= float(kth) - slack for i in half.argsort(descending=True)[:k])


@pytest.fixture(scope="module", params=["bfloat16", "float16"])
def half(request, real_model):
    model = real_model(request.param)
    assert {p.dtype for p in model.parameters()} == {getattr(torch, request.param)}
    return request.param, model


@pytest.fixture(scope="module")
def yes_no(real):
    return lb.binary_prompts(real, ITEMS, YESNO_INSTRUCTIONS[:1])  # chat template; 2 prompts


@pytest.fixture(scope="module")
def ref(real, professions, yes_no):
    """The float32 results, once for both dtypes."""
    ld = bias_values(real, professions)
    patching = lb.activation_patching(real, professions, "head", per_position=False, layers=[11, 26], progress=False)
    with real.hooks(fwd_hooks=lb.head_ablation_hooks(real, patching.units(1))):
        ablated = bias_values(real, professions)
    return {"ld": ld, "ablated": ablated, "patching": patching,
            "attribution": lb.attribution_patching(real, professions, ["head", "neuron"]),
            "nas": lb.negative_attention_scores(real, yes_no, progress=False),
            "p_yes": torch.tensor(lb.evaluate_binary(real, yes_no)["table"]["p_yes"].tolist())}


def test_bias_decisions_and_ablation(half, ref, professions, yes_no):
    """The she − he bias of each profession prompt, P(Yes) of each yes/no prompt (chat template), and how much
    zero-ablating float32's top patching head (L11H3) moves the bias."""
    name, model = half
    ld = bias_values(model, professions)
    assert close(ld, ref["ld"], name)
    p_yes = torch.tensor(lb.evaluate_binary(model, yes_no)["table"]["p_yes"].tolist())
    assert float((p_yes - ref["p_yes"]).abs().max()) <= REL[name]  # a probability: its scale is 1
    with model.hooks(fwd_hooks=lb.head_ablation_hooks(model, ref["patching"].units(1))):
        drop = bias_values(model, professions) - ld
    ref_drop = ref["ablated"] - ref["ld"]
    assert float((drop - ref_drop).abs().max()) <= REL[name] * float(ref["ld"].abs().max())
    assert float(ref_drop.mean()) < -0.1  # the head carries part of the bias: ablating it lowers it


def test_located_units(half, ref, professions, yes_no):
    """Head patching (at the layers of float32's top heads: 11 and 26), attribution of heads and neurons, and NAS:
    their values and their top units."""
    name, model = half
    ap = lb.activation_patching(model, professions, "head", per_position=False, layers=[11, 26], progress=False)
    assert close(ap.values, ref["patching"].values, name) and same_top(ap.effect, ref["patching"].effect, 2, name)
    attr = lb.attribution_patching(model, professions, ["head", "neuron"])
    for site in ("head", "neuron"):
        assert close(attr[site].values, ref["attribution"][site].values, name), site
        assert same_top(attr[site].values, ref["attribution"][site].values, 5, name), site
    nas = lb.negative_attention_scores(model, yes_no, progress=False)
    assert close(nas.nas, ref["nas"].nas, name) and same_top(nas.nas, ref["nas"].nas, 5, name)


@pytest.mark.parametrize("dtype", ["bfloat16"])  # the dtype of issue 22; float16 shares every line (and its cost)
def test_half_precision_prune_exports_and_reloads(real_model, real_dir, dtype, tmp_path):
    """issue 22: a bfloat16 export of SmolLM2 was refused ('logits differ … by 1.96'): the reload ran sdpa attention,
    the bridge eager. Pruning a head and a neuron in half precision exports a directory whose weights are the
    original half-precision weights with exactly those o_proj / down_proj columns zeroed (bit for bit, built here
    from the converted folder), and plain transformers (eager) reloads it with the pruned model's logits within
    core.precision.logit_tolerance = 4·u·√(2·30)·max|logit| (another order of rounding, nothing more)."""
    from transformers import AutoModelForCausalLM

    from lens_bias.core.precision import logit_tolerance

    model, torch_dtype = real_model(dtype), getattr(torch, dtype)
    pruned = lb.prune_heads(model, [(26, 2)])
    lb.prune_neurons(pruned.model, [(3, 100)], inplace=True)
    out = lb.export_model(pruned.model, tmp_path / "pruned", verify=False)
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch_dtype, attn_implementation="eager").eval()
    want = AutoModelForCausalLM.from_pretrained(real_dir, dtype=torch_dtype).state_dict()
    dh = model.cfg.d_head
    want["model.layers.26.self_attn.o_proj.weight"][:, 2 * dh:3 * dh] = 0
    want["model.layers.3.mlp.down_proj.weight"][:, 100] = 0
    got = reloaded.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    tokens = model.to_tokens(["The nurse said that she", "The capital of France is"])
    with torch.no_grad():
        ours, theirs = pruned.model(tokens), reloaded(tokens).logits
    assert float((ours.float() - theirs.float()).abs().max()) <= logit_tolerance(torch_dtype, ours, model.cfg.n_layers)
