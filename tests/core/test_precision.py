"""Half precision: every method runs in bfloat16 and float16 and agrees with float32 within a stated
tolerance, on the organism, and finds the same planted components.

Tolerances (about twice what was measured; "rel" = max |half − float32| / max |float32|):

| method | measure | bfloat16 | float16 |
|---|---|---|---|
| attribution patching | neuron, head, resid scores, rel | 0.06 | 0.03 |
| activation patching, causal tracing | values, / \\|clean − corrupted\\| | 0.08 | 0.03 |
| NAS | per head, rel | 0.02 | 0.005 |
| CRISPR | neuron scores, rel | 0.2 | 0.02 |
| evaluate_binary (+ zero/mean ablation) | P(yes), abs | 0.04 | 0.01 |
| bbq_evaluate | option log-probs, rel | 0.06 | 0.01 |
| text_loss | nats/token, abs | 0.005 | 0.002 |
| LSDM | held-out bias after the edit, abs (before: 3.4) | 0.2 | 0.05 |
| NASA | training loss after 5 steps, rel | 0.05 | 0.005 |
| pruning + export | reloaded logits (export's own check) | 1% of max logit | 1% of max logit |

bfloat16 keeps float32's range with 8 bits of mantissa; float16 has 11 bits but overflows above
65504, so float16 models compute their activation functions in float32 (lens_bias.core.precision)
and NASA trains a float16 model on a float32 copy.
"""

import random

import pytest
import torch

import lens_bias as lb
from lens_bias.apps.demo import gender_pairs
from lens_bias.core import NonFiniteError, load_model
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
TOL = {
    "attribution": {"bfloat16": 0.06, "float16": 0.03},
    "patching": {"bfloat16": 0.08, "float16": 0.03},
    "nas": {"bfloat16": 0.02, "float16": 0.005},
    "crispr": {"bfloat16": 0.2, "float16": 0.02},
    "p_yes": {"bfloat16": 0.04, "float16": 0.01},
    "option_logprobs": {"bfloat16": 0.06, "float16": 0.01},
    "text_loss": {"bfloat16": 0.005, "float16": 0.002},
    "lsdm": {"bfloat16": 0.2, "float16": 0.05},
    "nasa": {"bfloat16": 0.05, "float16": 0.005},
}
def rel(half, ref) -> float:
    return float((half.float() - ref.float()).abs().max() / ref.float().abs().max())


@pytest.fixture(scope="module", params=DTYPES)
def half(request):
    return request.param, load_model("organism", device="cpu", dtype=request.param)


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


def test_attribution(half, organism, data):
    name, model = half
    ref = cached(data, "attribution", lambda: lb.attribution_patching(organism, _said(organism, data["card"])[0],
                                                                       ["neuron", "head", "resid_pre"]))
    got = lb.attribution_patching(model, _said(model, data["card"])[0], ["neuron", "head", "resid_pre"])
    for site in ref:
        assert rel(got[site].values, ref[site].values) < TOL["attribution"][name], site
    g = data["g"]
    assert got["neuron"].argmax() == ref["neuron"].argmax() == (g["layer"], g["neuron"])


@pytest.mark.parametrize("fast", [False, True], ids=["hooked", "shortcut"])
def test_activation_patching_and_tracing(half, organism, data, fast):
    """Both paths of activation patching (the hooked one and the shortcut forward causal tracing uses too)
    in half precision agree with the float32 hooked run, relative to m(clean) − m(corrupted)."""
    name, model = half
    ref = cached(data, "patching", lambda: lb.activation_patching(organism, _said(organism, data["card"])[1], "mlp_out",
                                                                   fast=False, progress=False))
    got = lb.activation_patching(model, _said(model, data["card"])[1], "mlp_out", fast=fast, progress=False)
    gap = abs(ref.clean - ref.corrupted)
    assert float((got.values - ref.values).abs().max()) / gap < TOL["patching"][name]
    assert got.argmax() == ref.argmax() and got.argmax()[0] == data["g"]["layer"]
    if fast:
        traced = lb.causal_trace(model, _said(model, data["card"])[1], sites=("mlp_out",), samples=2, progress=False)
        assert bool(torch.isfinite(traced["mlp_out"].values).all())


def test_nas_and_ablation(half, organism, data):
    name, model = half
    items = data["yesno"][:12]
    h = data["card"]["planted"]["negative_head"]
    head = [(h["layer"], h["head"])]

    def run(m):
        ps = lb.binary_prompts(m, items)
        p_yes = {method: torch.tensor(lb.evaluate_binary(m, ps, ablate=lb.head_ablation_hooks(
            m, head, method, reference=ps) if method else None)["table"]["p_yes"].values) for method in (None, "zero", "mean")}
        return lb.negative_attention_scores(m, ps, progress=False), p_yes

    (ref, ref_p), (got, got_p) = cached(data, "nas", lambda: run(organism)), run(model)
    assert rel(got.nas, ref.nas) < TOL["nas"][name]
    assert got.top_heads(1) == ref.top_heads(1) == head
    for method in ref_p:  # no ablation, zero and mean ablation of the negative head
        assert float((got_p[method] - ref_p[method]).abs().max()) < TOL["p_yes"][name], method


def test_crispr_and_bbq(half, organism, data):
    name, model = half
    ref = cached(data, "crispr", lambda: crispr_scores(organism, data["bbq"], MC_INSTRUCTIONS[:1], progress=False))
    got = crispr_scores(model, data["bbq"], MC_INSTRUCTIONS[:1], progress=False)
    assert rel(got.values, ref.values) < TOL["crispr"][name]
    b = data["card"]["planted"]["bbq_neuron"]
    assert got.units(1) == ref.units(1) == [(b["layer"], b["neuron"])]
    prompts = [format_mc_prompt(MC_INSTRUCTIONS[0], it["context"], it["question"], item_options(it)) for it in data["bbq"]]
    options = [item_options(it) for it in data["bbq"]]
    a = cached(data, "option_logprobs", lambda: option_logprobs(organism, prompts, options)[0])
    assert rel(option_logprobs(model, prompts, options)[0], a) < TOL["option_logprobs"][name]
    assert lb.bbq_evaluate(model, data["bbq"])["accuracy"] == cached(
        data, "bbq", lambda: lb.bbq_evaluate(organism, data["bbq"]))["accuracy"]


def test_text_loss_lsdm_prune_export(half, organism, data, tmp_path):
    name, model = half
    ref_loss = cached(data, "text_loss", lambda: text_loss(organism, data["neutral"]))
    assert abs(text_loss(model, data["neutral"]) - ref_loss) < TOL["text_loss"][name]
    g = data["g"]
    F, M, N, T = g["occupations"], g["male_occupations"], g["neutral_occupations"], g["templates"]

    def after_lsdm(m):
        she_he = lambda o, t: professions_prompts(m, o, t, answers=(" she", " he"), corrupt_with=None)  # noqa: E731
        edit = lb.lsdm_edit(m, she_he(F[:6] + M[:4] + N[:4], T[:6]), data["neutral"], layers=[0], position="last",
                            progress=False)
        return bias_values(edit.model, she_he(F[6:], T[6:12])).mean().item()

    ref, got = cached(data, "lsdm", lambda: after_lsdm(organism)), after_lsdm(model)
    assert abs(got - ref) < TOL["lsdm"][name] and abs(got) < 0.3  # from 3.4
    pruned = lb.prune_neurons(model, [(g["layer"], g["neuron"])])
    assert pruned.model is not model and next(pruned.model.parameters()).dtype == getattr(torch, name)
    out = lb.export_model(pruned.model, tmp_path / "exported")  # reloads and checks the logits
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(out).dtype == getattr(torch, name)


def test_nasa(half, organism, data):
    name, model = half
    items = data["yesno"]

    def train(m):
        train, dev = (lb.binary_prompts(m, items[a:b]) for a, b in ((0, 40), (40, 60)))
        result = lb.nasa_train(m, [(2, 1)], train, dev, steps=5, eval_every=5, lr=1e-2, max_acc_drop=1.0,
                               progress=False)
        assert all(lb.mitigate.head_slices_unchanged(m, result.model, [(2, 1)]).values())
        return result.report["history"][-1]  # the NASA loss (CE + β·alignment) after 5 steps

    ref, got = cached(data, "nasa", lambda: train(organism)), train(model)
    assert abs(got["loss"] - ref["loss"]) / ref["loss"] < TOL["nasa"][name]
    assert abs(got["ce"] - ref["ce"]) < 0.05


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

    assert main(["demo", "--dtype", "bfloat16", "--device", "cpu", "--out", str(tmp_path / "demo")]) == 0
    report = capsys.readouterr().out
    assert report.count("✓") == 2 and "✗" not in report
