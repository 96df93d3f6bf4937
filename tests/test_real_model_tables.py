"""benchmarks/real_model_tables.py (the real-model tables of the issues: NAS, CRISPR, LSDM) runs end to end — here
on a random-weight GPT-2 with the shipped data sets, so that it cannot rot unseen. The real model's own tests are
the real-model tier, tests/real."""

from pathlib import Path

import pandas as pd


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
