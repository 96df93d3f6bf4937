"""Real pretrained models: where one is available (LENS_BIAS_REAL_MODEL=dir or hub name), load it and
check a known real bias; the real-model tables script runs end to end (here on a random-weight
GPT-2 with the shipped data sets, so that it cannot rot unseen)."""

import os
from pathlib import Path

import pandas as pd
import pytest
import torch


def _real_model_source():
    return os.environ.get("LENS_BIAS_REAL_MODEL") or None


@pytest.fixture(scope="module")
def real_model():
    source = _real_model_source()
    if source is None:
        pytest.skip("no pretrained model offline: set LENS_BIAS_REAL_MODEL to a Hugging Face directory "
                    "(or a hub name, with network) to run the real-model tests")
    from lens_bias.core import load_model

    return load_model(source)


def test_real_model_logits_equal_transformers(real_model):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(real_model.lens_bias_source, attn_implementation="eager").eval()
    ids = real_model.tokenizer(["The nurse said that"], return_tensors="pt").input_ids
    with torch.no_grad():
        assert (real_model(ids) - hf(input_ids=ids).logits).abs().max() <= 1e-3


def test_real_model_gender_bias_follows_stereotypes(real_model, datasets_dir):
    """Vig et al. 2020: a pretrained LM's she−he preference after 'The {profession} said that' rises
    with the profession's female stereotype (their stereotypical score: negative = female)."""
    import warnings

    from lens_bias.tasks import bias_values, load_professions, professions_prompts

    profs = load_professions(datasets_dir / "professions" / "professions.json")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ps = professions_prompts(real_model, profs, ["The {} said that"], answers=(" she", " he"), corrupt_with=None)
    ld = pd.Series(bias_values(real_model, ps).tolist())
    stereo = pd.Series([m["stereotypical"] for m in ps.metadata])
    assert len(ps) >= 20
    assert ld.rank().corr((-stereo).rank()) > 0.2  # Spearman


def _paper_claims():
    import importlib.util

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "paper_claims.py"
    spec = importlib.util.spec_from_file_location("paper_claims", script)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_paper_claims_on_the_organism(tmp_path, datasets_dir):
    """The four sections run end to end on the organism (small budgets, ~1 min), find its planted units where a
    section locates one, and resume from the stage cache: a rerun computes nothing and writes the same tables;
    a stage whose stored value was changed is computed again."""
    import json

    from lens_bias.organism import load_card

    card = load_card("organism")["planted"]
    out = tmp_path / "claims"
    args = ["--model", "organism", "--budget", "quick", "--out", str(out), "--data", str(datasets_dir),
            "--no-progress"]
    assert _paper_claims().main(args) == 0
    summary = pd.read_csv(out / "summary.csv")
    assert len(summary) == 4 and set(summary["verdict"]) <= {"holds", "partly", "does not hold"}
    for key in ("features", "lsdm", "nasa", "crispr"):
        assert (out / key / "table.csv").is_file() and (out / key / "figures.html").stat().st_size > 10_000
    g, h = card["gender_neuron"], card["negative_head"]
    found = pd.read_csv(out / "features" / "found.csv").iloc[0]
    assert json.loads(found["mlp_top1"])[0] == g["layer"]  # the planted gender neuron's layer
    heads = pd.read_csv(out / "nasa" / "heads.csv")
    top = heads[(heads.selection == "nas") & (heads["rank"] == 0)]
    assert set(zip(top.layer, top["head"])) == {(h["layer"], h["head"])}  # NAS ranks the planted head first
    text = (out / "claims.md").read_text()
    assert "## Feature-based analysis" in text and "| paper | claim |" in text
    tables = {p: p.read_text() for p in sorted(out.glob("*/*.csv"))} | {out / "summary.csv": (out / "summary.csv").read_text()}

    log = json.loads((out / "timings.json").read_text())["stages"]
    stage = next(out / "stages" / s["section"] / f"{s['stage']}.json" for s in log if s["stage"] == "eval-original")
    rec = json.loads(stage.read_text())
    rec["value"]["cloze"][0] = 1.0 - rec["value"]["cloze"][0]  # an edited value no longer matches its checksum
    stage.write_text(json.dumps(rec))
    with pytest.warns(UserWarning, match="does not match its checksum"):
        assert _paper_claims().main(args) == 0
    log = json.loads((out / "timings.json").read_text())["stages"]
    assert [s["stage"] for s in log if not s["cached"]] == ["eval-original"]
    assert {p: p.read_text() for p in tables} == tables  # the same figures, recomputed or read back


def test_real_model_bfloat16_export(real_model, tmp_path):
    """issue 22: `mitigate --dtype bfloat16 --method prune-neurons --units 3:100` on SmolLM2 said 'logits
    differ … by 1.96 (> 0.355)': the reload ran sdpa attention, the bridge eager. Now the export reloads
    with the bridge's attention (exactly equal here) and the tolerance is 4·u·√(2L)·max|logit|."""
    from lens_bias.core import load_model
    from lens_bias.mitigate import export_model, prune_neurons, verify_export

    model = load_model(real_model.lens_bias_source, device="cpu", dtype="bfloat16")
    pruned = prune_neurons(model, [(3, 100)]).model
    assert verify_export(pruned, export_model(pruned, tmp_path / "m", verify=False)) <= 1e-6
