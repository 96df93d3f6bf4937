"""The CLI is a thin layer: `lens-bias demo` runs offline and finds the organism's planted parts."""

import subprocess
import sys
from pathlib import Path

from lens_bias.apps.cli import main


def test_demo_finds_planted_components(tmp_path, capsys, browser):
    assert main(["demo", "--model", "organism", "--out", str(tmp_path / "out"), "--device", "cpu"]) == 0
    report = capsys.readouterr().out
    assert report.count("✓") == 2 and "✗" not in report
    for name in ("report.txt", "patching_mlp.html", "nas_heads.html", "nas_ranking.csv", "patching_mlp.csv",
                 "lsdm_before_after.csv", "lsdm_edit.safetensors", "organism-lsdm/model.safetensors"):
        assert (tmp_path / "out" / name).stat().st_size > 0
    import pandas as pd

    ranking = pd.read_csv(tmp_path / "out" / "nas_ranking.csv")
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "out" / "nas_ranking.parquet"), ranking)
    lsdm = pd.read_csv(tmp_path / "out" / "lsdm_before_after.csv").pivot(index="measure", columns="model", values="value")
    assert lsdm.loc["bias_unseen", "original"] > 1.5 and abs(lsdm.loc["bias_unseen", "lsdm"]) < 0.3
    assert "LSDM edit of MLP layer 0" in report and "exported to organism-lsdm/" in report
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]
    pages = sorted((tmp_path / "out").glob("*.html"))
    assert pages
    for page in pages:  # every figure renders in a real browser, offline (screenshots beside the pages)
        browser(page)


def test_cli_errors_are_clear(tmp_path):
    r = subprocess.run([sys.executable, "-m", "lens_bias.apps.cli", "info", "--model", str(tmp_path / "nothing")],
                       capture_output=True, text=True, env={"HF_HUB_OFFLINE": "1", "PATH": ""})
    assert r.returncode == 2 and "does not exist" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "lens_bias.apps.cli", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "demo" in r.stdout


def test_mitigate_then_export_an_edit(tmp_path, capsys):
    import pandas as pd
    import torch
    from transformers import AutoModelForCausalLM

    out = tmp_path / "prune"
    assert main(["mitigate", "--method", "prune-neurons", "--units", "0:103", "--out", str(out), "--quiet"]) == 0
    assert "pruned 1 neurons: [(0, 103)]" in capsys.readouterr().out
    table = pd.read_csv(out / "before_after.csv")
    assert set(table["model"]) == {"original", "mitigated"} and (out / "model" / "config.json").exists()
    # the edit file re-applied to the original model gives the exported model back
    assert main(["export", "--edit", str(out / "edit.safetensors"), "--out", str(tmp_path / "again")]) == 0
    ids = torch.tensor([[0, 31, 200, 7, 12]])
    a = AutoModelForCausalLM.from_pretrained(out / "model", local_files_only=True)(input_ids=ids).logits
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "again", local_files_only=True)(input_ids=ids).logits
    assert torch.equal(a, b)
    # with a data set the bias it carries is measured too: the planted negative head, pruned
    out2 = tmp_path / "head"
    yesno = str(Path(__file__).resolve().parents[2] / "data" / "organism_data" / "yesno.jsonl")
    assert main(["mitigate", "--method", "prune-heads", "--units", "2:1", "--data", yesno, "--out", str(out2),
                 "--no-export", "--quiet"]) == 0
    t = pd.read_csv(out2 / "before_after.csv").pivot(index="measure", columns="model", values="value")
    assert t.loc["yesno_pr_gap", "original"] > 0.3 and abs(t.loc["yesno_pr_gap", "mitigated"]) < 0.1
    # refusals are one clear line, exit code 2
    assert main(["mitigate", "--method", "prune-heads", "--out", str(tmp_path / "x")]) == 2
    assert "needs the components to prune" in capsys.readouterr().err
    assert main(["mitigate", "--method", "prune-heads", "--units", "2:9", "--out", str(tmp_path / "y")]) == 2
    assert "out of range" in capsys.readouterr().err
    assert main(["mitigate", "--method", "prune-neurons", "--units", "0:103", "--out", str(out)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert main(["mitigate", "--method", "prune-neurons", "--units", "0:1", "--neutral", str(tmp_path / "no.txt"),
                 "--out", str(tmp_path / "w")]) == 2
    assert "no.txt does not exist" in capsys.readouterr().err
    assert main(["mitigate", "--method", "prune-neurons", "--units", "0-1", "--out", str(tmp_path / "v")]) == 2
    assert "write LAYER:INDEX" in capsys.readouterr().err
    assert main(["export", "--edit", str(tmp_path / "none.safetensors"), "--out", str(tmp_path / "z")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_mitigate_lsdm_on_the_organism(tmp_path, capsys):
    import pandas as pd

    assert main(["mitigate", "--method", "lsdm", "--out", str(tmp_path / "lsdm"), "--no-export", "--quiet"]) == 0
    t = pd.read_csv(tmp_path / "lsdm" / "before_after.csv").pivot(index="measure", columns="model", values="value")
    assert t.loc["abs_bias_held_out", "mitigated"] < t.loc["abs_bias_held_out", "original"] / 3
    loss = t.loc["neutral_loss"]
    assert abs(loss["mitigated"] - loss["original"]) / loss["original"] < 0.01
    assert not (tmp_path / "lsdm" / "model").exists()


def test_mitigate_refuses_an_unexportable_model_before_writing(tmp_path, capsys, gpt2_tokenizer_dir):
    from lens_bias.core import save_random_model

    t5 = save_random_model("t5", tmp_path / "t5", gpt2_tokenizer_dir)  # an encoder-decoder: no causal-LM export
    out = tmp_path / "out"
    assert main(["mitigate", "--model", str(t5), "--method", "prune-heads", "--units", "0:1", "--out", str(out)]) == 2
    assert "not supported" in capsys.readouterr().err
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["t5"]
