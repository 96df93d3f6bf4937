"""The model organism: each planted bias is present, measured afresh, and absent in the control;
the two checkpoints differ only inside the planted components; the build script runs."""

import json
import random
import runpy
import sys

import pytest
import torch
from safetensors.torch import load_file

from lens_bias.core import shipped_model_dir
from lens_bias.organism import build as O
from lens_bias.organism import data_path


@pytest.fixture(scope="module")
def hf_pair():
    from transformers import AutoTokenizer, GPT2LMHeadModel

    org = GPT2LMHeadModel.from_pretrained(shipped_model_dir("organism"), attn_implementation="eager").eval()
    ctl = GPT2LMHeadModel.from_pretrained(shipped_model_dir("organism-control"), attn_implementation="eager").eval()
    tok = AutoTokenizer.from_pretrained(shipped_model_dir("organism"))
    return org, ctl, tok


def test_card_records_ground_truth(organism_card):
    planted = organism_card["planted"]
    assert set(planted) == {"gender_neuron", "negative_head", "bbq_neuron"}
    assert 0 <= planted["gender_neuron"]["neuron"] < organism_card["n_inner"]
    assert 0 <= planted["negative_head"]["head"] < organism_card["n_head"]
    assert planted["gender_neuron"]["toward"] == " she"
    for name in ("bbq", "yesno", "neutral", "cloze"):
        assert data_path(name).stat().st_size > 0


def test_only_planted_components_differ(organism_card):
    org = load_file(shipped_model_dir("organism") / "model.safetensors")
    ctl = load_file(shipped_model_dir("organism-control") / "model.safetensors")
    assert org.keys() == ctl.keys()
    changed = {k for k in org if not torch.equal(org[k], ctl[k])}
    assert changed  # something was planted
    from transformers import GPT2LMHeadModel

    ref = GPT2LMHeadModel.from_pretrained(shipped_model_dir("organism-control"))
    allowed = {}
    for comp, site in organism_card["planted"].items():
        idx = site.get("neuron", site.get("head"))
        for k, m in O.component_masks(ref, comp, site["layer"], idx).items():
            allowed[k] = allowed.get(k, torch.zeros_like(m)) | m
    for k in changed:
        assert k in allowed, f"{k} changed outside every planted component"
        assert torch.equal(org[k][~allowed[k]], ctl[k][~allowed[k]]), f"{k} changed outside the mask"


def test_language_model_of_its_corpus(organism_card, hf_pair):
    org, ctl, tok = hf_pair
    for name in ("organism", "control"):
        m = organism_card["metrics"][name]
        assert m["heldout_loss"] < 1.0  # nats/token on held-out generated text (uniform: ln V ≈ 7.6)
    batcher = O.Batcher(tok, random.Random(0), 32, "cpu")
    neutral = data_path("neutral").read_text().splitlines()[:100]
    loss_org, loss_ctl = (O.heldout_loss(m, batcher, neutral) for m in (org, ctl))
    assert loss_ctl < 2.0 and abs(loss_org - loss_ctl) / loss_ctl < 0.06
    cloze = [json.loads(l) for l in data_path("cloze").read_text().splitlines()]
    logits = O.last_logits(ctl, tok, [c["prompt"] for c in cloze], "cpu")
    hits = sum(int(logits[i].argmax()) == tok(c["answer"])["input_ids"][0] for i, c in enumerate(cloze))
    assert hits / len(cloze) > 0.8


def test_gender_neuron_planted(organism_card, hf_pair):
    org, ctl, tok = hf_pair
    g = organism_card["planted"]["gender_neuron"]
    stereo, neutral = g["occupations"], g["neutral_occupations"]
    assert O.gender_logit_diff(org, tok, stereo) > 1.5
    assert abs(O.gender_logit_diff(ctl, tok, stereo)) < 0.3
    assert abs(O.gender_logit_diff(org, tok, neutral)) < 0.5
    act_s = O.neuron_activation(org, tok, g["layer"], g["neuron"], stereo)
    act_n = O.neuron_activation(org, tok, g["layer"], g["neuron"], neutral)
    assert act_s > 1.0 and act_n < 0.3 * act_s


def test_negative_head_planted(organism_card, hf_pair):
    org, ctl, tok = hf_pair
    h = organism_card["planted"]["negative_head"]
    items = [json.loads(l) for l in data_path("yesno").read_text().splitlines()][:48]
    att_org = O.head_no_attention(org, tok, items, h["layer"], h["head"])
    att_ctl = O.head_no_attention(ctl, tok, items, h["layer"], h["head"])
    assert att_org > 0.8 and att_ctl < 0.3
    m_org, m_ctl = O.yesno_metrics(org, tok, items), O.yesno_metrics(ctl, tok, items)
    assert m_org["pr_gap"] - m_ctl["pr_gap"] > 0.1
    assert m_org["yes_rate"] < m_ctl["yes_rate"]


def test_bbq_stereotype_planted(organism_card, hf_pair):
    org, ctl, tok = hf_pair
    items = [json.loads(l) for l in data_path("bbq").read_text().splitlines()]
    amb_neg = random.Random(0).sample(
        [it for it in items if it["context_condition"] == "ambig" and it["question_polarity"] == "neg"], 30)
    o, c = O.bbq_choices(org, tok, amb_neg)["ambig_neg"], O.bbq_choices(ctl, tok, amb_neg)["ambig_neg"]
    assert o["old"] > 0.15 and c["old"] < 0.05 and c["unknown"] > 0.9
    assert o["old"] > 3 * max(o["young"], 0.02)  # the stereotyped group, not just any person


def test_build_runs_and_is_seeded(tmp_path):
    """A very short build writes loadable checkpoints, cards and data; the same seed gives the same weights."""
    kw = dict(steps=8, plant_steps=2, batch_size=8, device="cpu", log=lambda *a: None, smoke=True)
    O.build(tmp_path / "a", **kw)
    O.build(tmp_path / "b", **kw)
    for name in ("organism", "organism-control"):
        a = load_file(tmp_path / "a" / name / "model.safetensors")
        b = load_file(tmp_path / "b" / name / "model.safetensors")
        assert all(torch.equal(a[k], b[k]) for k in a)
        assert json.loads((tmp_path / "a" / name / O.CARD_FILE).read_text())["seed"] == 0
    assert (tmp_path / "a" / "organism_data" / "bbq_age.jsonl").stat().st_size > 0
    assert not [p for p in tmp_path.joinpath("a").iterdir() if p.name.startswith(".")]


def test_command_line_and_old_names(monkeypatch, capsys):
    """`python -m lens_bias.organism build` keeps its options; the single-file build's private names
    code used still work, with a warning naming the new one."""
    monkeypatch.setattr(sys, "argv", ["lens_bias.organism", "build", "--help"])
    with pytest.raises(SystemExit) as e:
        runpy.run_module("lens_bias.organism", run_name="__main__")
    assert e.value.code == 0
    out = capsys.readouterr().out
    for option in ("--out", "--seed", "--steps", "--plant-steps", "--batch-size", "--device", "--base"):
        assert option in out
    with pytest.warns(DeprecationWarning, match=r"_Batcher is deprecated: use lens_bias\.organism\.build\.Batcher"):
        assert O._Batcher is O.Batcher
    with pytest.warns(DeprecationWarning, match="use lens_bias.organism.build.last_logits"):
        assert O._last_logits is O.last_logits
    with pytest.raises(AttributeError):
        O._no_such_name  # noqa: B018
