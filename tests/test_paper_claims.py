"""benchmarks/paper_claims.py (the four papers' claims on any model) runs end to end on the organism, so that it
cannot rot unseen; the real model's own tests are the real-model tier, tests/real."""

from pathlib import Path

import pandas as pd
import pytest


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
