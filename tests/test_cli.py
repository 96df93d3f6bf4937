"""The CLI is a thin layer: `lens-bias demo` runs offline and finds the organism's planted parts."""

import subprocess
import sys

from lens_bias.cli import main


def test_demo_finds_planted_components(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "out"), "--device", "cpu"]) == 0
    report = capsys.readouterr().out
    assert report.count("✓") == 2 and "✗" not in report
    for name in ("report.txt", "patching_mlp.html", "nas_heads.html", "nas_ranking.csv", "patching_mlp.csv",
                 "lsdm_before_after.csv", "lsdm_edit.safetensors", "organism-lsdm/model.safetensors"):
        assert (tmp_path / "out" / name).stat().st_size > 0
    import pandas as pd

    lsdm = pd.read_csv(tmp_path / "out" / "lsdm_before_after.csv").pivot(index="measure", columns="model", values="value")
    assert lsdm.loc["bias_unseen", "original"] > 1.5 and abs(lsdm.loc["bias_unseen", "lsdm"]) < 0.3
    assert "LSDM edit of MLP layer 0" in report and "exported to organism-lsdm/" in report
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]


def test_cli_errors_are_clear(tmp_path):
    r = subprocess.run([sys.executable, "-m", "lens_bias.cli", "info", "--model", str(tmp_path / "nothing")],
                       capture_output=True, text=True, env={"HF_HUB_OFFLINE": "1", "PATH": ""})
    assert r.returncode == 2 and "does not exist" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "lens_bias.cli", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "demo" in r.stdout
