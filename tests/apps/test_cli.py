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


def test_real_model_demo_runs_to_its_report(tmp_path, capsys, tiny_llama_dir):
    """Any model but the organism takes the real-model demo's path (the real run: tests/real/test_real_demo.py);
    here on a random Llama, to the end: the report in plain words and its files (the report once failed on the
    numpy integers of its own table)."""
    out = tmp_path / "out"
    assert main(["demo", "--model", str(tiny_llama_dir), "--out", str(out), "--device", "cpu", "--quiet"]) == 0
    report = capsys.readouterr().out
    for part in ("The bias:", "Where:", "Proof, on the held-out prompts:", "Mitigation:", "Capability:", "Export:"):
        assert part in report
    for name in ("report.txt", "heads.csv", "ablation_proof.csv", "before_after.csv", "prune_edit.safetensors",
                 "model-pruned/model.safetensors"):
        assert (out / name).stat().st_size > 0


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


def test_a_new_mitigation_is_one_registry_entry(tmp_path, capsys, monkeypatch):
    """A toy mitigation (halve the W_out rows of --units) added as one entry of MITIGATIONS: `lens-bias
    mitigate` lists it (choices, help), runs it and writes its outputs — the exported weights checked
    against the original ones read by transformers, its own measure in the before/after table."""
    import pandas as pd
    import pytest
    import torch
    from transformers import AutoModelForCausalLM

    from lens_bias.core import clone_model, out_projection, shipped_model_dir
    from lens_bias.mitigate import MITIGATIONS, Mitigation, MitigationMethod, MitigationRun

    def halve(model, request, data):
        edited = clone_model(model)
        with torch.no_grad():
            for l, i in request.units:
                out_projection(edited, l, "mlp")[i] *= 0.5
        (l, i) = request.units[0]
        return MitigationRun(Mitigation.of(model, edited, "halve-neurons", units=request.units),
                             {"w_out_norm": lambda m: float(out_projection(m, l, "mlp")[i].detach().norm())},
                             [f"halved {len(request.units)} neurons"])

    toy = MitigationMethod("halve-neurons", "halve the W_out rows of --units LAYER:NEURON,... (a toy)", "neuron",
                           "evaluation", halve)
    monkeypatch.setitem(MITIGATIONS, toy.name, toy)
    with pytest.raises(SystemExit):
        main(["mitigate", "--help"])
    shown = capsys.readouterr().out
    assert "{prune-neurons,prune-heads,lsdm,nasa,halve-neurons}" in shown
    assert "  halve-neurons  halve the W_out rows of --units LAYER:NEURON,... (a toy); with --data" in shown
    out = tmp_path / "toy"
    assert main(["mitigate", "--method", "halve-neurons", "--units", "0:103,1:7", "--out", str(out), "--quiet"]) == 0
    report = capsys.readouterr().out
    assert "mitigate: halve-neurons on" in report and "halved 2 neurons" in report and "edit: 2 weights changed" in report
    t = pd.read_csv(out / "before_after.csv").pivot(index="measure", columns="model", values="value")
    assert set(t.index) == {"neutral_loss", "w_out_norm"}
    assert t.loc["w_out_norm", "mitigated"] == pytest.approx(t.loc["w_out_norm", "original"] / 2, rel=1e-6)
    assert sorted(p.name for p in out.iterdir()) == ["before_after.csv", "edit.safetensors", "model", "report.json",
                                                     "report.txt"]
    want = AutoModelForCausalLM.from_pretrained(shipped_model_dir("organism"), local_files_only=True).state_dict()
    for l, i in ((0, 103), (1, 7)):  # GPT-2's Conv1D c_proj: [d_mlp, d_model], row i is neuron i's output
        want[f"transformer.h.{l}.mlp.c_proj.weight"][i] *= 0.5
    got = AutoModelForCausalLM.from_pretrained(out / "model", local_files_only=True).state_dict()
    assert all(torch.equal(got[k], w) for k, w in want.items() if "attn.bias" not in k)


def test_the_old_pipeline_names_still_work_and_name_the_registry():
    import pytest

    from lens_bias.apps import pipeline
    from lens_bias.mitigate import MITIGATIONS

    with pytest.warns(DeprecationWarning, match=r"lens_bias\.mitigate\.MITIGATIONS"):
        assert pipeline.METHODS == ("prune-neurons", "prune-heads", "lsdm", "nasa") == tuple(MITIGATIONS)
    with pytest.warns(DeprecationWarning, match=r"lens_bias\.mitigate\.MitigationMethod"):
        assert set(pipeline.MitigationMethod.__args__) == set(MITIGATIONS)
