"""Half precision: every method runs in bfloat16 and float16 and agrees with float32 within a derived
tolerance, on the organism, and finds the same planted components.

Every tolerance is core.precision.half_tolerance, never one machine's figure:

    tol = e_w + 8 · u · √R · s

- e_w: the same measure of the float32 organism whose weights are rounded to the dtype
  (core.precision.rounded_weights) minus float32's — what rounding the weights alone changes, computed in
  float32, so the same on every CPU. The organism's few large planted weights (c_fc biases of 83 and 40)
  make it most of the difference: patching in float16 0.0087 of 0.0111 (weights: 17.8·u; bfloat16 6.0·u).
- u: the dtype's unit roundoff, 2⁻⁸ bfloat16, 2⁻¹¹ float16 (core.precision.unit_roundoff).
- R: roundings in sequence: 2 residual updates per layer forward (R_F = 2L = 8 for the organism's 4
  layers), as many again backward for gradient methods (R_B = 4L = 16), 5 training steps of them for
  NASA (5·4L).
- s: the scale the measure rounds at, relative to what it is compared with (1 for relative measures).
- 8: margin over the computation's own roundings, (err − e_w) / (u·√R·s), measured at most 2.5 (CRISPR in
  float16; every other measure ≤ 1.7) on an AMD EPYC with AVX2 (no AVX-512, no AMX), the same figures
  under ONEDNN_MAX_CPU_ISA=AVX2 and ATEN_CPU_CAPABILITY=default (LSDM in float16 aside: 0.0044 vs 0.0028).

bfloat16 keeps float32's range with 8 bits of mantissa; float16 has 11 bits but overflows above
65504, so float16 models compute their activation functions in float32 (lens_bias.core.precision)
and NASA trains a float16 model on a float32 copy.
"""

import json
import os
import random

import pytest
import torch

import lens_bias as lb
from lens_bias.apps.demo import gender_pairs
from lens_bias.core import NonFiniteError, load_model
from lens_bias.core.precision import half_tolerance, rounded_weights
from lens_bias.locate import crispr_scores
from lens_bias.organism import data_path
from lens_bias.tasks import MC_INSTRUCTIONS, load_bbq
from lens_bias.tasks.capability import bias_values, text_loss
from lens_bias.tasks.gender import professions_prompts
from lens_bias.tasks.multiple_choice import (
    format_mc_prompt,
    item_options,
    option_logprobs,
)

DTYPES = ("bfloat16", "float16")
L = 4  # the organism's layers
R_F, R_B = 2 * L, 4 * L  # roundings in sequence: forward; forward and backward


def within(err: float, name: str, weights_error: float, rounds: int, scale: float = 1.0) -> bool:
    """err ≤ half_tolerance = e_w + 8·u·√R·s (module docstring); with LENS_BIAS_PRECISION_LOG=file, the
    figures go to that file (JSON lines: to compare CPUs and kernels)."""
    t = half_tolerance(getattr(torch, name), weights_error, rounds, scale)
    if os.environ.get("LENS_BIAS_PRECISION_LOG"):
        with open(os.environ["LENS_BIAS_PRECISION_LOG"], "a") as f:
            f.write(json.dumps({"dtype": name, "err": float(err), "e_w": float(weights_error), "rounds": rounds,
                                "scale": float(scale), "tol": t}) + "\n")
    return float(err) <= t


def rel(half, ref) -> float:
    return float((half.float() - ref.float()).abs().max() / ref.float().abs().max())


@pytest.fixture(scope="module", params=DTYPES)
def half(request):
    return request.param, load_model("organism", device="cpu", dtype=request.param)


@pytest.fixture(scope="module")
def rounded(half, organism):
    """The float32 organism with its weights rounded to the half dtype (e_w's model)."""
    return rounded_weights(organism, getattr(torch, half[0]))


@pytest.fixture(scope="module")
def data(organism, organism_card):
    items = lb.load_yes_no(data_path("yesno"))
    random.Random(0).shuffle(items)
    g = organism_card["planted"]["gender_neuron"]
    neutral = "\n".join(data_path("neutral").read_text().splitlines()[:40])
    return {"yesno": items, "bbq": list(load_bbq(data_path("bbq")))[:4], "neutral": neutral, "card": organism_card,
            "g": g, "ref": {}}


def cached(data, key, compute):
    """A float32 reference computed once for both half dtypes."""
    if key not in data["ref"]:
        data["ref"][key] = compute()
    return data["ref"][key]


def _said(model, card):
    pairs = gender_pairs(model, card)
    return pairs, pairs[[i for i, p in enumerate(pairs.prompts) if p.endswith("said that")]]


def test_model_is_in_half_precision(half):
    name, model = half
    assert {p.dtype for p in model.parameters()} == {getattr(torch, name)}


def test_attribution(half, organism, rounded, data):
    name, model = half

    def run(m):
        return lb.attribution_patching(m, _said(m, data["card"])[0], ["neuron", "head", "resid_pre"])

    ref, got, w = cached(data, "attribution", lambda: run(organism)), run(model), run(rounded)
    for site in ref:  # relative to the largest score (s = 1), forward + backward
        e_w = rel(w[site].values, ref[site].values)
        assert within(rel(got[site].values, ref[site].values), name, e_w, R_B), site
    g = data["g"]
    assert got["neuron"].argmax() == ref["neuron"].argmax() == (g["layer"], g["neuron"])


@pytest.mark.parametrize("fast", [False, True], ids=["hooked", "shortcut"])
def test_activation_patching_and_tracing(half, organism, rounded, data, fast):
    """Both paths of activation patching (the hooked one and the shortcut forward causal tracing uses too)
    in half precision agree with the float32 hooked run, relative to m(clean) − m(corrupted)."""
    name, model = half

    def run(m, fast=False):
        return lb.activation_patching(m, _said(m, data["card"])[1], "mlp_out", fast=fast, progress=False)

    ref, got, w = cached(data, "patching", lambda: run(organism)), run(model, fast), run(rounded)
    gap = abs(ref.clean - ref.corrupted)
    err = lambda x: float((x.values - ref.values).abs().max()) / gap  # noqa: E731
    # the patched metrics round at their own size: s = max|m| / gap (3.3 / 3.0), forward only
    assert within(err(got), name, err(w), R_F, float(ref.values.abs().max()) / gap)
    assert got.argmax() == ref.argmax() and got.argmax()[0] == data["g"]["layer"]
    if fast:
        traced = lb.causal_trace(model, _said(model, data["card"])[1], sites=("mlp_out",), samples=2, progress=False)
        assert bool(torch.isfinite(traced["mlp_out"].values).all())


def test_nas_and_ablation(half, organism, rounded, data):
    name, model = half
    items = data["yesno"][:12]
    h = data["card"]["planted"]["negative_head"]
    head = [(h["layer"], h["head"])]

    def run(m):
        ps = lb.binary_prompts(m, items)
        p_yes = {method: torch.tensor(lb.evaluate_binary(m, ps, ablate=lb.head_ablation_hooks(
            m, head, method, reference=ps) if method else None)["table"]["p_yes"].values) for method in (None, "zero", "mean")}
        return lb.negative_attention_scores(m, ps, progress=False), p_yes

    (ref, ref_p), (got, got_p), (w, w_p) = cached(data, "nas", lambda: run(organism)), run(model), run(rounded)
    assert within(rel(got.nas, ref.nas), name, rel(w.nas, ref.nas), R_F)  # relative to the largest score
    assert got.top_heads(1) == ref.top_heads(1) == head
    for method in ref_p:  # no ablation, zero and mean ablation of the negative head; P(yes) rounds at ≤ 1
        err = lambda p: float((p[method] - ref_p[method]).abs().max())  # noqa: E731
        assert within(err(got_p), name, err(w_p), R_F), method


def test_crispr_and_bbq(half, organism, rounded, data):
    name, model = half

    def run(m):
        return crispr_scores(m, data["bbq"], MC_INSTRUCTIONS[:1], progress=False)

    ref, got, w = cached(data, "crispr", lambda: run(organism)), run(model), run(rounded)
    # one forward and two backwards (for ŷ and y): R = 2L + 2·2L; B = A(ŷ) − λ·relu(A(y)) (λ = 1) subtracts
    # two attributions, each rounded at the scores' scale: s = 2
    assert within(rel(got.values, ref.values), name, rel(w.values, ref.values), 6 * L, 2.0)
    b = data["card"]["planted"]["bbq_neuron"]
    assert got.units(1) == ref.units(1) == [(b["layer"], b["neuron"])]
    prompts = [format_mc_prompt(MC_INSTRUCTIONS[0], it["context"], it["question"], item_options(it)) for it in data["bbq"]]
    options = [item_options(it) for it in data["bbq"]]
    a = cached(data, "option_logprobs", lambda: option_logprobs(organism, prompts, options)[0])
    e_w = rel(option_logprobs(rounded, prompts, options)[0], a)
    assert within(rel(option_logprobs(model, prompts, options)[0], a), name, e_w, R_F)
    assert lb.bbq_evaluate(model, data["bbq"])["accuracy"] == cached(
        data, "bbq", lambda: lb.bbq_evaluate(organism, data["bbq"]))["accuracy"]


def test_text_loss_lsdm_prune_export(half, organism, rounded, data, tmp_path):
    name, model = half
    ref_loss = cached(data, "text_loss", lambda: text_loss(organism, data["neutral"]))
    e_w = abs(text_loss(rounded, data["neutral"]) - ref_loss)
    assert within(abs(text_loss(model, data["neutral"]) - ref_loss), name, e_w, R_F, ref_loss)  # nats, s = the loss
    g = data["g"]
    F, M, N, T = g["occupations"], g["male_occupations"], g["neutral_occupations"], g["templates"]

    def after_lsdm(m):
        she_he = lambda o, t: professions_prompts(m, o, t, answers=(" she", " he"), corrupt_with=None)  # noqa: E731
        edit = lb.lsdm_edit(m, she_he(F[:6] + M[:4] + N[:4], T[:6]), data["neutral"], layers=[0], position="last",
                            progress=False)
        return bias_values(edit.model, she_he(F[6:], T[6:12])).mean().item()

    ref, got, w = cached(data, "lsdm", lambda: after_lsdm(organism)), after_lsdm(model), after_lsdm(rounded)
    # keys and targets forward, the edit, the held-out forward: R_B; s = the bias before the edit, 3.4
    assert within(abs(got - ref), name, abs(w - ref), R_B, 3.4) and abs(got) < 0.3
    pruned = lb.prune_neurons(model, [(g["layer"], g["neuron"])])
    assert pruned.model is not model and next(pruned.model.parameters()).dtype == getattr(torch, name)
    out = lb.export_model(pruned.model, tmp_path / "exported")  # reloads and checks the logits
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(out).dtype == getattr(torch, name)


def test_nasa(half, organism, rounded, data):
    name, model = half
    items = data["yesno"]

    def train(m):
        train, dev = (lb.binary_prompts(m, items[a:b]) for a, b in ((0, 40), (40, 60)))
        result = lb.nasa_train(m, [(2, 1)], train, dev, steps=5, eval_every=5, lr=1e-2, max_acc_drop=1.0,
                               progress=False)
        assert all(lb.mitigate.head_slices_unchanged(m, result.model, [(2, 1)]).values())
        return result.report["history"][-1]  # the NASA loss (CE + β·alignment) after 5 steps

    ref, got, w = cached(data, "nasa", lambda: train(organism)), train(model), train(rounded)
    err = lambda h: abs(h["loss"] - ref["loss"]) / ref["loss"]  # noqa: E731
    assert within(err(got), name, err(w), 5 * R_B)  # relative; 5 steps of forward + backward
    assert within(abs(got["ce"] - ref["ce"]), name, abs(w["ce"] - ref["ce"]), 5 * R_B, ref["ce"])


def test_float16_needs_float32_activations(organism, data):
    """Without the float32 activation functions, float16's GELU x³ overflows and CRISPR's gradients are
    NaN: the finite check says so (the weights are finite)."""
    from lens_bias.core.precision import Float32Activation

    model = load_model("organism", device="cpu", dtype="float16")
    unwrapped = 0
    for parent in list(model.original_model.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, Float32Activation):
                setattr(parent, child_name, child.act)
                unwrapped += 1
    assert unwrapped == model.cfg.n_layers
    with pytest.raises(NonFiniteError, match="overflowed float16"):
        crispr_scores(model, data["bbq"][:2], MC_INSTRUCTIONS[:1], progress=False)


def test_cli_with_dtype(tmp_path, capsys, data):
    import json

    from lens_bias.apps.cli import main

    yesno = tmp_path / "q.jsonl"
    yesno.write_text("".join(json.dumps(it) + "\n" for it in data["yesno"][:6]))
    (tmp_path / "n.txt").write_text(data["neutral"])
    assert main(["attribute", "--model", "organism", "--dtype", "bfloat16", "--device", "cpu", "--data", str(yesno),
                 "--method", "nas", "--out", str(tmp_path / "nas"), "--quiet"]) == 0
    assert "table, heatmaps and manifest" in capsys.readouterr().out
    assert main(["mitigate", "--method", "prune-neurons", "--units", "0:103", "--dtype", "float16", "--device", "cpu",
                 "--neutral", str(tmp_path / "n.txt"), "--out", str(tmp_path / "prune"), "--quiet"]) == 0
    assert (tmp_path / "prune" / "model" / "model.safetensors").is_file()


def test_demo_in_bfloat16(tmp_path, capsys):
    from lens_bias.apps.cli import main

    assert main(["demo", "--model", "organism", "--dtype", "bfloat16", "--device", "cpu", "--out", str(tmp_path / "demo")]) == 0
    report = capsys.readouterr().out
    assert report.count("✓") == 2 and "✗" not in report
