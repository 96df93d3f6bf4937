"""Run folders a user can trust: chunks of prompts of different lengths combine to the unchunked result,
a chunk changed on disk or copied over another is computed again, two instances on one folder share
the work, a run that fails on bad input leaves nothing that blocks the corrected rerun, a user's files
are never overwritten without --overwrite."""

import json
import os
import subprocess
import sys
import warnings

import pandas as pd
import pytest
import torch

from lens_bias.apps.cli import main
from lens_bias.core import LensBiasError
from lens_bias.locate import (
    activation_patching,
    attribution_patching,
    negative_attention_scores,
)
from lens_bias.organism import data_path
from lens_bias.runs import attribute_dataset, load_run_data, read_manifest
from lens_bias.tasks import binary_prompts, load_yes_no

ATOL = 1e-5
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _pair(occ, other, tail=""):
    return {"prompt": f"The {occ} said that{tail}", "corrupted": f"The {other} said that{tail}", "subject": occ,
            "answers": [" she", " he"]}


@pytest.fixture(scope="module")
def mixed_file(tmp_path_factory, organism_card):
    """Pairs of 5, 6 and 8 tokens in blocks, so chunks of 4 have different widths."""
    g = organism_card["planted"]["gender_neuron"]
    occ, neutral = g["occupations"], g["neutral_occupations"]
    rows = [_pair(occ[i % len(occ)], neutral[i % len(neutral)], tail) for tail in ("", " she", " he said that")
            for i in range(4)]
    return _jsonl(tmp_path_factory.mktemp("mixed") / "mixed.jsonl", rows)


def _last(capsys):
    return capsys.readouterr().out


def test_two_prompts_of_different_lengths_in_chunks_of_one(organism, tmp_path, capsys):
    """The issue's case: --chunk-size 1 on prompts of 5 and 6 tokens failed with 'size of tensor a (5) must
    match (6)' after every chunk was computed; now the run equals the unchunked one."""
    data = _jsonl(tmp_path / "two.jsonl", [_pair("nurse", "clerk"), _pair("nurse", "clerk", " she")])
    ps = load_run_data(organism, "patching", data)
    assert ps.attention_mask.sum(1).tolist() == [5, 6]
    for method in ("patching", "attribution"):
        out = tmp_path / method
        args = ["attribute", "--model", "organism", "--device", "cpu", "--data", str(data), "--method", method,
                "--chunk-size", "1", "--out", str(out), "--quiet"]
        assert main(args + (["--components", "mlp_out"] if method == "patching" else [])) == 0
        got = pd.read_csv(out / "scores.csv")
        if method == "patching":
            ref = activation_patching(organism, ps, "mlp_out", progress=False).values.reshape(-1)
        else:
            ref = attribution_patching(organism, ps)["resid_pre"].values.reshape(-1)
            got = got[got["component"] == "resid_pre"]
        assert torch.allclose(torch.tensor(got["value"].values, dtype=torch.float32), ref, atol=ATOL), method
        assert len(got) == 4 * 6  # every position of the longest prompt


def test_chunks_of_different_widths_equal_unchunked(organism, mixed_file, tmp_path):
    ps = load_run_data(organism, "patching", mixed_file)
    assert sorted(set(ps.attention_mask.sum(1).tolist())) == [5, 6, 8]
    got = attribute_dataset(organism, "patching", mixed_file, tmp_path / "p", chunk_size=4,
                            options={"components": ["mlp_out"]}, progress=False)
    for site in ("mlp_out",):
        ref = activation_patching(organism, ps, site, progress=False)
        assert got[site].values.shape == ref.values.shape == (4, 8)
        assert torch.allclose(got[site].values, ref.values, atol=ATOL), site
        assert got[site].tokens == ref.tokens
    att = attribute_dataset(organism, "attribution", mixed_file, tmp_path / "a", chunk_size=4, progress=False)
    ref = attribution_patching(organism, ps)
    for site in ref:
        assert torch.allclose(att[site].values, ref[site].values, atol=ATOL), site


@pytest.fixture(scope="module")
def yesno_file(tmp_path_factory):
    return _jsonl(tmp_path_factory.mktemp("yn") / "yesno.jsonl", load_yes_no(data_path("yesno"))[:12])


def test_changed_or_copied_chunks_are_recomputed(organism, yesno_file, tmp_path, capsys):
    out = tmp_path / "nas"
    args = ["attribute", "--model", "organism", "--device", "cpu", "--data", str(yesno_file), "--method", "nas",
            "--chunk-size", "4", "--out", str(out), "--quiet"]
    assert main(args) == 0
    first = pd.read_csv(out / "scores.csv")
    m = read_manifest(out)
    assert set(m["chunks"]) == {str(i) for i in range(12)} and all(len(e["sha256"]) == 64 for e in m["chunks"].values())
    # 8 bytes changed inside a finished chunk: before, "0 computed now, 12 already done" and wrong scores
    chunk = out / "chunks" / "chunk-00003.pt"
    raw = bytearray(chunk.read_bytes())
    mid = len(raw) // 2
    raw[mid: mid + 8] = bytes(8)
    chunk.write_bytes(bytes(raw))
    with pytest.warns(UserWarning, match="chunk-00003.pt does not match the checksum"):
        assert main(args) == 0
    assert "(1 computed now, 11 already done)" in _last(capsys)
    pd.testing.assert_frame_equal(pd.read_csv(out / "scores.csv"), first)
    # one chunk copied over another
    (out / "chunks" / "chunk-00006.pt").write_bytes((out / "chunks" / "chunk-00005.pt").read_bytes())
    with pytest.warns(UserWarning, match="chunk-00006.pt does not match"):
        assert main(args) == 0
    assert "(1 computed now, 11 already done)" in _last(capsys)
    pd.testing.assert_frame_equal(pd.read_csv(out / "scores.csv"), first)
    # the index inside is checked too (a copy with its manifest entry copied alike)
    from lens_bias.runs.store import chunk_entry, load_chunk

    m = read_manifest(out)
    with pytest.warns(UserWarning, match="holds chunk 5, not chunk 6"):
        assert load_chunk(out / "chunks" / "chunk-00005.pt", m["key"], chunk_entry(m, 5), 6) is None


SHARED = """
import pathlib, sys, time
from lens_bias.apps.cli import main
go = pathlib.Path(sys.argv[1])
while not go.exists():
    time.sleep(0.01)
sys.exit(main(sys.argv[2:]))
"""


def test_two_instances_on_one_folder_share_the_work(organism, mixed_file, tmp_path):
    """Before: one died with FileNotFoundError on the other's temp manifest, or both did every chunk."""
    out, go = tmp_path / "shared", tmp_path / "go"
    args = ["attribute", "--model", "organism", "--device", "cpu", "--data", str(mixed_file), "--method",
            "patching", "--components", "mlp_out", "--chunk-size", "1", "--out", str(out), "--quiet"]
    procs = [subprocess.Popen([sys.executable, "-c", SHARED, str(go), *args], env=ENV, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    go.touch()  # both start together (imports done)
    results = [p.communicate(timeout=600) for p in procs]
    for p, (stdout, stderr) in zip(procs, results):
        assert p.returncode == 0, stderr[-2000:]
        assert "Traceback" not in stderr
    m = read_manifest(out)
    runs = {h["pid"]: set(h["computed"]) for h in m["history"]}
    assert set(runs) == {p.pid for p in procs}
    a, b = runs.values()
    assert not a & b, f"chunks computed twice: {sorted(a & b)}"
    assert a | b == set(range(12)) and m["complete"]
    ps = load_run_data(organism, "patching", mixed_file)
    ref = activation_patching(organism, ps, "mlp_out", progress=False)
    got = pd.read_csv(out / "scores.csv")
    got = got[got["component"] == "mlp_out"]
    assert torch.allclose(torch.tensor(got["value"].values, dtype=torch.float32), ref.values.reshape(-1), atol=ATOL)
    assert not [p for p in out.rglob(".*")], "lock or temp files left behind"


def test_failed_run_leaves_nothing_that_blocks_the_rerun(organism, organism_card, tmp_path, capsys):
    """Before: a run failing on bad input left a manifest, and the corrected rerun was refused."""
    out = tmp_path / "out"
    bad = _jsonl(tmp_path / "bad.jsonl", [_pair("nurse", "clerk"), _pair("nurse", "clerk", " she")])
    common = ["--model", "organism", "--device", "cpu", "--out", str(out), "--quiet"]
    # tracing needs equal lengths: refused before anything is written
    assert main(["attribute", "--data", str(bad), "--method", "tracing", *common]) == 2
    assert "same number of tokens" in capsys.readouterr().err and not out.exists()
    # an option the method refuses only when it runs its first chunk
    bbq = _jsonl(tmp_path / "b.jsonl", [json.loads(line) for line in
                                         data_path("bbq").read_text().splitlines()[:2]])
    assert main(["attribute", "--data", str(bbq), "--method", "crispr", "--instructions", "11", *common]) == 2
    assert "instructions must be 1..10" in capsys.readouterr().err and not out.exists()
    # a folder that held a run with no finished chunk does not bind the corrected run
    out.mkdir()
    (out / "manifest.json").write_text(json.dumps({"format": 2, "args": {"method": "crispr"}, "key": "x",
                                                   "chunks": {}, "starts": 1}))
    good = _jsonl(tmp_path / "good.jsonl", [_pair("nurse", "clerk", " she"), _pair("nurse", "clerk", " she")])
    assert main(["attribute", "--data", str(good), "--method", "tracing", "--components", "mlp_out", *common]) == 0
    assert read_manifest(out)["args"]["method"] == "tracing" and read_manifest(out)["complete"]
    # but finished chunks of other arguments are kept: refused, unless --overwrite
    assert main(["attribute", "--data", str(good), "--method", "patching", "--components", "mlp_out", *common]) == 2
    assert "holds a run with other arguments (method: 'tracing' there, 'patching' now" in capsys.readouterr().err
    assert main(["attribute", "--data", str(good), "--method", "patching", "--components", "mlp_out",
                 "--overwrite", *common]) == 0
    m = read_manifest(out)
    assert m["args"]["method"] == "patching" and m["starts"] == 1 and m["finished"] == [0]
    assert not (out / "heatmap-resid_post.html").exists()  # the old run's outputs went with it


def test_users_folder_needs_overwrite(organism, yesno_file, tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "scores.csv").write_text("my own scores\n")
    (mine / "report.txt").write_text("my report\n")
    args = ["attribute", "--model", "organism", "--device", "cpu", "--data", str(yesno_file), "--method", "nas",
            "--out", str(mine), "--quiet"]
    assert main(args) == 2
    assert "holds files but no lens-bias run" in capsys.readouterr().err
    assert (mine / "scores.csv").read_text() == "my own scores\n" and sorted(os.listdir(mine)) == ["report.txt",
                                                                                                   "scores.csv"]
    assert main(args + ["--overwrite"]) == 0
    assert (mine / "report.txt").read_text() == "my report\n"  # only the run's own files are written
    assert pd.read_csv(mine / "scores.csv")["nas"].notna().all()


def test_failed_demo_leaves_the_folder_as_it_was(tmp_path, monkeypatch):
    from lens_bias.apps import demo

    def boom(*a, **k):
        raise LensBiasError("planted failure")

    monkeypatch.setattr(demo, "attribution_patching", boom)
    with pytest.raises(LensBiasError, match="planted failure"):
        demo.run_demo(tmp_path / "out", device="cpu", model="organism")
    assert os.listdir(tmp_path) == []  # no half-written out/, no temp folder


def test_nas_run_is_unchanged_by_the_checks(organism, yesno_file, tmp_path):
    """The checksums and locks change nothing in the result (NAS chunks equal one call)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = attribute_dataset(organism, "nas", yesno_file, tmp_path, chunk_size=5, progress=False)
    ref = negative_attention_scores(organism, binary_prompts(organism, load_yes_no(yesno_file)), progress=False)
    assert torch.allclose(got.nas, ref.nas, atol=ATOL)
