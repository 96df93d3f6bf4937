"""LSDM: causal tracing finds the planted site; the closed-form edit removes the planted gender
association on held-out prompts, hits the planted neuron's weights, keeps capability, exports."""

import json

import pytest
import torch

from lens_bias.core import LensBiasError, PromptSet, out_projection
from lens_bias.locate import trace_sites
from lens_bias.mitigate import export_model, lsdm_delta, lsdm_edit
from lens_bias.organism import data_path
from lens_bias.tasks import bias_values, cloze_accuracy, text_loss


def _prompts(model, occupations, templates, twins=None):
    """she/he prompts; with `twins` (neutral occupations) their counterfactual twins too."""
    corrupted = None if twins is None else [t.format(twins[i % len(twins)]) for i in range(len(occupations))
                                            for t in templates]
    return PromptSet.build(model, [t.format(o) for o in occupations for t in templates], (" she", " he"),
                           subjects=[o for o in occupations for _ in templates], corrupted=corrupted)


@pytest.fixture(scope="module")
def setup(organism, organism_card):
    g = organism_card["planted"]["gender_neuron"]
    F, M, N, T = g["occupations"], g["male_occupations"], g["neutral_occupations"], g["templates"]
    train = _prompts(organism, F[:6] + M[:4] + N[:4], T[:6])
    neutral = data_path("neutral").read_text()
    mitigation = lsdm_edit(organism, train, neutral, layers=[g["layer"]], position="last", progress=False)
    edited, result = mitigation.model, mitigation.report
    return {"g": g, "F": F, "M": M, "N": N, "T": T, "train": train, "neutral": neutral,
            "edited": edited, "result": result}


def test_lsdm_delta_solves_the_normal_equations():
    g = torch.Generator().manual_seed(0)
    H, R, H0 = torch.randn(12, 6, generator=g), torch.randn(12, 4, generator=g), torch.randn(40, 6, generator=g)
    lam, ridge = 2.0, 1e-2
    delta = lsdm_delta(H, R, H0, lam=lam, ridge=ridge).double()
    H, R, H0 = H.double(), R.double(), H0.double()
    A = H.T @ H / 12 + lam * H0.T @ H0 / 40
    scale = A.diagonal().mean()
    # gradient of (1/n)‖HΔ − R‖² + λ(1/n0)‖H0Δ‖² + ε·s‖Δ‖² vanishes at the solution
    grad = 2 * H.T @ (H @ delta - R) / 12 + 2 * lam * H0.T @ (H0 @ delta) / 40 + 2 * ridge * scale * delta
    assert grad.abs().max() < 1e-10
    # and with no preservation and no ridge it interpolates the targets when it can
    exact = lsdm_delta(H[:4], R[:4], torch.zeros(1, 6), lam=0.0, ridge=1e-12)
    assert torch.allclose(H[:4] @ exact, R[:4], atol=1e-6)


def test_tracing_finds_the_planted_site(organism, setup):
    g = setup["g"]
    sites = trace_sites(organism, _prompts(organism, setup["F"][:5], setup["T"][:2], twins=setup["N"]))
    top = sites.iloc[0]
    assert (int(top["layer"]), top["position"]) == (g["layer"], "last")


def test_lsdm_removes_the_planted_bias_on_held_out_prompts(organism, organism_control, setup):
    F, T, edited = setup["F"], setup["T"], setup["edited"]
    held_out = _prompts(organism, F[6:], T[6:12])  # occupations and templates the edit never saw
    before, after = bias_values(organism, held_out).mean().item(), bias_values(edited, held_out).mean().item()
    control = bias_values(organism_control, held_out).mean().item()
    assert before > 1.5  # the planted bias
    assert abs(after) < 0.25 and abs(after - control) < 0.3
    r = setup["result"]
    assert r["bias_before"] > 0.5 and abs(r["bias_after"]) < 0.05 and r["abs_bias_after"] < r["abs_bias_before"] / 5
    # the original model is untouched
    assert bias_values(organism, held_out).mean().item() == pytest.approx(before)


def test_lsdm_edit_lands_on_the_planted_neuron(organism, setup):
    g = setup["g"]
    rows = (out_projection(setup["edited"], g["layer"], "mlp") - out_projection(organism, g["layer"], "mlp")).detach().norm(dim=1)
    top2 = rows.topk(2)
    assert int(top2.indices[0]) == g["neuron"] and top2.values[0] > 3 * top2.values[1]


def test_lsdm_keeps_capability(organism, setup):
    neutral, edited = setup["neutral"], setup["edited"]
    before, after = text_loss(organism, neutral), text_loss(edited, neutral)
    assert abs(after - before) / before < 0.01
    cloze = [json.loads(line) for line in data_path("cloze").read_text().splitlines()]
    assert cloze_accuracy(edited, cloze)["overall"] >= cloze_accuracy(organism, cloze)["overall"] - 0.03


def test_lsdm_export_round_trip(setup, tmp_path):
    from transformers import AutoModelForCausalLM

    out = export_model(setup["edited"], tmp_path / "lsdm")
    hf = AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    ps = setup["train"]
    with torch.no_grad():
        ours = setup["edited"](ps.tokens, attention_mask=ps.attention_mask)
        theirs = hf(input_ids=ps.tokens, attention_mask=ps.attention_mask).logits
    assert (ours - theirs).abs().max().item() <= 1e-4


def test_mirror_target_flips_the_association(organism, setup):
    train = setup["train"][list(range(0, 36))]  # female occupations only
    r = lsdm_edit(organism, train, setup["neutral"], layers=[0], position="last", target="mirror", progress=False).report
    assert r["bias_before"] > 1.0 and r["bias_after"] == pytest.approx(-r["bias_before"], abs=0.2)


def test_lsdm_bad_input(organism, setup):
    train = setup["train"]
    with pytest.raises(LensBiasError, match="out of range"):
        lsdm_edit(organism, train, setup["neutral"], layers=[99], position="last", progress=False)
    with pytest.raises(LensBiasError, match="unknown edit position"):
        lsdm_edit(organism, train, setup["neutral"], layers=[0], position="middle", progress=False)
    with pytest.raises(LensBiasError, match="unknown target"):
        lsdm_edit(organism, train, setup["neutral"], layers=[0], position="last", target="neutral", progress=False)
    no_spans = PromptSet.build(organism, ["The nurse said that"], (" she", " he"))
    with pytest.raises(LensBiasError, match="subject spans"):
        lsdm_edit(organism, no_spans, setup["neutral"], layers=[0], position="subject", progress=False)
    with pytest.raises(LensBiasError, match="empty"):
        lsdm_edit(organism, train, "   \n", layers=[0], position="last", progress=False)


def test_lsdm_on_real_data_sets(tiny_gpt2, datasets_dir):
    """The whole pipeline on the real data (GPT-2 tokenizer, random weights): edit on Vig et al.'s
    professions, report professions, WinoBias and Winogender before/after."""
    from lens_bias.tasks import (
        bias_table,
        load_professions,
        load_winobias,
        load_winogender,
        professions_prompts,
        winobias_prompts,
        winogender_prompts,
    )

    profs = load_professions(datasets_dir / "professions" / "professions.json")
    with pytest.warns(UserWarning, match="not single tokens"):
        edit = professions_prompts(tiny_gpt2, profs.iloc[:40], templates=["The {} said that"], corrupt_with=None)
        held = professions_prompts(tiny_gpt2, profs.iloc[40:80], templates=["The {} yelled that"], corrupt_with=None)
    mitigation = lsdm_edit(tiny_gpt2, edit, data_path("neutral").read_text(), layers=[0], position="subject",
                           progress=False)
    edited = mitigation.model
    # random weights carry no shared gender direction, so this checks the pipeline, not the effect
    # (the organism tests above check the effect): only layer 0's W_out changed
    assert list(mitigation.edit.changes) == ["transformer.h.0.mlp.c_proj.weight"]
    sets = {"professions (held out)": held,
            "winobias": winobias_prompts(tiny_gpt2, load_winobias(datasets_dir / "winobias")),
            "winogender": winogender_prompts(tiny_gpt2, load_winogender(datasets_dir / "winogender"))}
    table = bias_table({"original": tiny_gpt2, "lsdm": edited}, sets)
    assert len(table) == 6 and table["n"].min() > 10 and table["mean_abs_ld"].notna().all()
    wb, ps = table[(table.model == "original") & (table.set == "winobias")].iloc[0], sets["winobias"]
    with torch.no_grad():  # independently: each prompt alone, its last token, the two answer logits
        lds = [(lambda row: (row[ps.answer_ids[i, 0]] - row[ps.answer_ids[i, 1]]).item())(
            tiny_gpt2(ps.tokens[i:i + 1, : int(ps.answer_pos[i]) + 1])[0, -1]) for i in range(len(ps))]
    assert wb["mean_ld"] == pytest.approx(sum(lds) / len(lds), abs=1e-4)
    assert wb["mean_abs_ld"] == pytest.approx(sum(map(abs, lds)) / len(lds), abs=1e-4)


def test_a_site_that_cannot_carry_the_bias_is_refused(tiny_gpt2):
    ps = PromptSet.build(tiny_gpt2, ["The nurse said that"], (" she", " he"), subjects=["nurse"])
    # the last layer's MLP at the subject token reaches no later attention: no effect on the answer
    with pytest.raises(LensBiasError, match="does not depend on layer 1's MLP output"):
        lsdm_edit(tiny_gpt2, ps, "Some neutral text here.", layers=[1], position="subject", progress=False)
