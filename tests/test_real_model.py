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


def test_real_model_tables_script(tmp_path, gpt2_tokenizer_dir, datasets_dir):
    import importlib.util

    from lens_bias.core import save_random_model

    model_dir = save_random_model("gpt2", tmp_path / "m", gpt2_tokenizer_dir, n_ctx=512)
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "real_model_tables.py"
    spec = importlib.util.spec_from_file_location("real_model_tables", script)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "tables"
    assert mod.main(["--model", str(model_dir), "--limit", "8", "--out", str(out),
                     "--data", str(datasets_dir), "--lsdm-site", "1:last"]) == 0
    nas = pd.read_csv(out / "nas.csv")
    assert nas["condition"].iloc[0] == "original" and len(nas) == 5
    crispr = pd.read_csv(out / "crispr.csv")
    assert list(crispr["condition"]) == ["original", "pruned", "random", "random", "random"]
    bias = pd.read_csv(out / "lsdm_bias.csv")
    assert set(bias["set"]) == {"professions (held out)", "winobias (type 1, pro)", "winogender"}


def test_real_model_bfloat16_export(real_model, tmp_path):
    """issue 22: `mitigate --dtype bfloat16 --method prune-neurons --units 3:100` on SmolLM2 said 'logits
    differ … by 1.96 (> 0.355)': the reload ran sdpa attention, the bridge eager. Now the export reloads
    with the bridge's attention (exactly equal here) and the tolerance is 4·u·√(2L)·max|logit|."""
    from lens_bias.core import load_model
    from lens_bias.mitigate import export_model, prune_neurons, verify_export

    model = load_model(real_model.lens_bias_source, device="cpu", dtype="bfloat16")
    pruned = prune_neurons(model, [(3, 100)]).model
    assert verify_export(pruned, export_model(pruned, tmp_path / "m", verify=False)) <= 1e-6
