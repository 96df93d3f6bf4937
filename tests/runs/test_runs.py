"""Chunked, resumable, data-parallel runs: chunks combine to the unchunked result of every method,
a killed run resumes without redoing finished chunks, two gloo ranks equal one process, the CLI."""

import json
import os
import random
import signal
import subprocess
import sys
import time
import warnings

import pytest
import torch

from lens_bias.apps.cli import main
from lens_bias.core import ComponentScores, DataError, LensBiasError
from lens_bias.locate import (
    NASResult,
    activation_patching,
    attribution_patching,
    causal_trace,
    crispr_scores,
    negative_attention_scores,
)
from lens_bias.organism import data_path
from lens_bias.runs import attribute_dataset, load_run_data, read_manifest
from lens_bias.tasks import MC_INSTRUCTIONS as INSTRUCTIONS
from lens_bias.tasks import binary_prompts, load_bbq, load_yes_no

ATOL = 1e-5
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory, organism_card):
    """Stereotyped-occupation prompts → ' she' vs ' he', corrupted by a neutral occupation (20 × 2)."""
    g = organism_card["planted"]["gender_neuron"]
    rows = [{"prompt": t.format(occ), "corrupted": t.format(g["neutral_occupations"][i % 10]), "subject": occ,
             "answers": [" she", " he"]}
            for i, occ in enumerate(g["occupations"] + g["male_occupations"]) for t in g["templates"][:2]]
    return _write_jsonl(tmp_path_factory.mktemp("data") / "pairs.jsonl", rows)


@pytest.fixture(scope="module")
def yesno_file(tmp_path_factory):
    return _write_jsonl(tmp_path_factory.mktemp("data") / "yesno.jsonl", load_yes_no(data_path("yesno"))[:12])


@pytest.fixture(scope="module")
def bbq_file(tmp_path_factory):
    items = random.Random(0).sample(list(load_bbq(data_path("bbq"))), 6)
    return _write_jsonl(tmp_path_factory.mktemp("data") / "bbq.jsonl", items)


def _outputs_ok(out, n_chunks):
    m = read_manifest(out)
    assert m["complete"] and m["finished"] == list(range(n_chunks)) and m["n_chunks"] == n_chunks
    assert sorted(p.name for p in (out / "chunks").iterdir()) == [f"chunk-{i:05d}.pt" for i in range(n_chunks)]
    assert (out / "scores.csv").stat().st_size > 0 and (out / "scores.parquet").stat().st_size > 0
    assert list(out.glob("heatmap-*.html"))
    assert not [p for p in out.rglob(".*")], "temp files left behind"
    return m


def _same_scores(got: dict, ref: dict):
    assert set(got) == set(ref)
    for k in ref:
        assert got[k].dims == ref[k].dims and got[k].values.shape == ref[k].values.shape
        assert torch.allclose(got[k].values, ref[k].values, atol=ATOL), k
        assert got[k].clean == pytest.approx(ref[k].clean, abs=ATOL)
        if ref[k].corrupted == ref[k].corrupted:
            assert got[k].corrupted == pytest.approx(ref[k].corrupted, abs=ATOL)
        assert got[k].tokens == ref[k].tokens


# ---- chunks combine exactly ------------------------------------------------------------------
def test_patching_chunks_equal_unchunked(organism, pairs_file, organism_card, tmp_path):
    ps = load_run_data(organism, "patching", pairs_file)[:14]
    got = attribute_dataset(organism, "patching", ps, tmp_path, chunk_size=5, batch_size=37,
                            options={"components": ["mlp_out", "head"]}, progress=False)
    ref = {c: activation_patching(organism, ps, c, per_position=c != "head", progress=False)
           for c in ("mlp_out", "head")}
    _same_scores(got, ref)
    _outputs_ok(tmp_path, 3)
    g = organism_card["planted"]["gender_neuron"]
    assert got["mlp_out"].argmax()[0] == g["layer"]  # the planted neuron's MLP carries the effect


def test_attribution_chunks_equal_unchunked(organism, pairs_file, organism_card, tmp_path):
    ps = load_run_data(organism, "attribution", pairs_file)
    got = attribute_dataset(organism, "attribution", pairs_file, tmp_path, chunk_size=12, batch_size=5,
                            progress=False)
    _same_scores(got, attribution_patching(organism, ps))
    _outputs_ok(tmp_path, 4)
    g = organism_card["planted"]["gender_neuron"]
    assert got["neuron"].argmax() == (g["layer"], g["neuron"])


def test_tracing_chunks_equal_unchunked(organism, pairs_file, tmp_path):
    ps = load_run_data(organism, "tracing", pairs_file)[:10]
    opts = {"components": ["mlp_out"], "samples": 2, "std": "vocab"}
    got = attribute_dataset(organism, "tracing", ps, tmp_path, chunk_size=4, seed=3, options=opts, progress=False)
    ref = causal_trace(organism, ps, ("mlp_out",), samples=2, std="vocab", seed=3, progress=False)
    _same_scores(got, ref)
    assert got["mlp_out"].extra["embedding_std"] == ref["mlp_out"].extra["embedding_std"]
    _outputs_ok(tmp_path, 3)


def test_nas_chunks_equal_unchunked(organism, yesno_file, organism_card, tmp_path):
    got = attribute_dataset(organism, "nas", yesno_file, tmp_path, chunk_size=7, batch_size=3, progress=False)
    ref = negative_attention_scores(organism, binary_prompts(organism, load_yes_no(yesno_file)), progress=False)
    assert isinstance(got, NASResult)
    for name in ("nas", "att_neg", "att_pos", "per_prompt"):
        assert torch.allclose(getattr(got, name), getattr(ref, name), atol=ATOL), name
    assert got.metadata == ref.metadata
    h = organism_card["planted"]["negative_head"]
    assert got.top_heads(1) == [(h["layer"], h["head"])]
    _outputs_ok(tmp_path, 7)


def test_neurons_chunks_equal_unchunked(organism, bbq_file, organism_card, tmp_path):
    items = load_bbq(bbq_file)
    got = attribute_dataset(organism, "crispr", bbq_file, tmp_path, chunk_size=4, batch_size=3,
                            options={"instructions": 2}, progress=False)
    ref = crispr_scores(organism, items, INSTRUCTIONS[:2], batch_size=3, progress=False)
    assert isinstance(got, ComponentScores) and got.dims == ("layer", "neuron")
    assert torch.allclose(got.values, ref.values, atol=ATOL)
    b = organism_card["planted"]["bbq_neuron"]
    assert got.units(1) == [(b["layer"], b["neuron"])]
    _outputs_ok(tmp_path, 2)


# ---- resuming ------------------------------------------------------------------------------
def test_killed_run_resumes_without_redoing_chunks(organism, pairs_file, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "lens_bias.apps.cli", "attribute", "--model", "organism", "--data", str(pairs_file),
           "--method", "patching", "--components", "mlp_out", "--out", str(out), "--chunk-size", "4",
           "--device", "cpu", "--quiet"]
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    try:
        while not list((out / "chunks").glob("chunk-*.pt")) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.01)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finished = sorted((out / "chunks").glob("chunk-*.pt"))
    assert 1 <= len(finished) < 10, "the run was not killed part-way"
    for p in finished:  # every final name holds a whole chunk
        assert torch.load(p, weights_only=True)["start"] == 1
    before = {p.name: p.stat().st_mtime_ns for p in finished}

    got = attribute_dataset(organism, "patching", pairs_file, out, chunk_size=4,
                            options={"components": ["mlp_out"]}, progress=False)
    m = _outputs_ok(out, 10)
    assert m["starts"] == 2 and m["last_start"]["skipped"] == sorted(int(n[6:11]) for n in before)
    assert len(m["last_start"]["computed"]) == 10 - len(before)
    assert {n: (out / "chunks" / n).stat().st_mtime_ns for n in before} == before
    starts = [torch.load(p, weights_only=True)["start"] for p in sorted((out / "chunks").iterdir())]
    assert starts.count(1) == len(before) and starts.count(2) == 10 - len(before)
    ref = activation_patching(organism, load_run_data(organism, "patching", pairs_file), "mlp_out", progress=False)
    _same_scores(got, {"mlp_out": ref})


def test_other_arguments_on_the_same_folder_are_refused(organism, yesno_file, tmp_path):
    attribute_dataset(organism, "nas", yesno_file, tmp_path, chunk_size=16, progress=False)
    with pytest.raises(LensBiasError, match="chunk size: 16 there, 8 now"):
        attribute_dataset(organism, "nas", yesno_file, tmp_path, chunk_size=8, progress=False)
    with pytest.raises(LensBiasError, match="seed: 0 there, 1 now"):
        attribute_dataset(organism, "nas", yesno_file, tmp_path, chunk_size=16, seed=1, progress=False)
    other = _write_jsonl(tmp_path.parent / "other.jsonl", load_yes_no(yesno_file)[:5])
    with pytest.raises(LensBiasError, match="data:"):
        attribute_dataset(organism, "nas", other, tmp_path, chunk_size=16, progress=False)
    with pytest.raises(LensBiasError, match="method: 'nas' there"):
        attribute_dataset(organism, "crispr", data_path("bbq"), tmp_path, chunk_size=16, progress=False)
    assert read_manifest(tmp_path)["starts"] == 1  # refused runs leave the folder as it was


def test_jobs_sharing_a_folder_split_the_chunks(organism, yesno_file, tmp_path):
    """Without torch.distributed, rank/world_size split chunks between jobs; the last one combines."""
    kw = dict(chunk_size=10, world_size=2, progress=False)
    with pytest.warns(UserWarning, match="2 of 5 chunks are not finished"):
        assert attribute_dataset(organism, "nas", yesno_file, tmp_path, rank=0, **kw) is None
    assert read_manifest(tmp_path)["finished"] == [0, 2, 4]
    got = attribute_dataset(organism, "nas", yesno_file, tmp_path, rank=1, **kw)
    ref = negative_attention_scores(organism, binary_prompts(organism, load_yes_no(yesno_file)), progress=False)
    assert torch.allclose(got.nas, ref.nas, atol=ATOL)
    _outputs_ok(tmp_path, 5)


# ---- data-parallel ---------------------------------------------------------------------------
# torchrun runs this on each rank: the group is joined once (as the CLI does alone) for two CLI runs
WORKER = """
import sys
from lens_bias.apps.cli import main
from lens_bias.runs import distributed
common = ["--model", "organism", "--device", "cpu", "--quiet"]
with distributed("cpu") as (rank, world_size, device):
    assert world_size == 2
    a = main(["attribute", "--data", sys.argv[1], "--method", "nas", "--out", sys.argv[3] + "/nas",
              "--chunk-size", "10", *common])
    # one chunk for two ranks: rank 1 has none and still joins the all-reduce
    b = main(["attribute", "--data", sys.argv[2], "--method", "patching", "--components", "mlp_out", "--out",
              sys.argv[3] + "/patching", "--chunk-size", "100", *common])
sys.exit(a or b)
"""


def test_two_gloo_ranks_equal_one_process(organism, yesno_file, pairs_file, tmp_path):
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(worker),
                        str(yesno_file), str(pairs_file), str(tmp_path / "ddp")],
                       env=ENV, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("table, heatmaps and manifest") == 2  # rank 0 only reports
    import pandas as pd

    one = attribute_dataset(organism, "nas", yesno_file, tmp_path / "one", chunk_size=10, progress=False)
    two = pd.read_csv(tmp_path / "ddp" / "nas" / "scores.csv")
    pd.testing.assert_frame_equal(two, pd.read_csv(tmp_path / "one" / "scores.csv"), atol=1e-6, check_exact=False)
    assert two["nas"].iloc[0] == pytest.approx(float(one.nas.max()), abs=1e-6)
    m = _outputs_ok(tmp_path / "ddp" / "nas", 5)
    assert m["last_start"]["world_size"] == 2 and m["last_start"]["computed"] == [0, 1, 2, 3, 4]
    ref = activation_patching(organism, load_run_data(organism, "patching", pairs_file), "mlp_out", progress=False)
    got = pd.read_csv(tmp_path / "ddp" / "patching" / "scores.csv")
    assert torch.allclose(torch.tensor(got["value"].values, dtype=torch.float32), ref.values.reshape(-1), atol=ATOL)


# ---- CLI and data formats ----------------------------------------------------------------------
def test_cli_attribute_and_bad_input(organism, yesno_file, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["attribute", "--model", "organism", "--data", str(yesno_file), "--method", "nas", "--out", str(out),
            "--device", "cpu", "--quiet"]
    assert main(args) == 0
    assert "nas on 48 prompts" in capsys.readouterr().out  # 12 questions × 4 instructions
    assert main(args) == 0
    assert "0 computed now, 2 already done" in capsys.readouterr().out
    cases = [(["--data", str(tmp_path / "missing.jsonl")], "does not exist"),
             (["--chunk-size", "0"], "chunk_size must be ≥ 1"),
             (["--components", "head"], "unknown option(s) ['components'] for nas"),
             (["--chunk-size", "5"], "chunk size: 32 there, 5 now")]
    (tmp_path / "empty.jsonl").write_text("\n")
    cases.append((["--data", str(tmp_path / "empty.jsonl")], "is empty"))
    for extra, message in cases:
        assert main(args + extra) == 2, extra
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err
    with pytest.raises(SystemExit) as e:
        main(args + ["--method", "nope"])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        main(["attribute", "--help"])
    assert e.value.code == 0
    help_text = capsys.readouterr().out
    for word in ("Vig et al.", "Syed et al.", "ROME", "NASA", "CRISPR", "torchrun", ".jsonl", "BBQ JSONL"):
        assert word in help_text, word


def test_data_formats(organism, tmp_path):
    (tmp_path / "p.txt").write_text("nurse\nteacher\n\n")
    ps = load_run_data(organism, "patching", tmp_path / "p.txt", {"templates": ["The {} said that"]})
    assert ps.prompts == ["The nurse said that", "The teacher said that"]
    assert ps.corrupted_prompts == ["The man said that"] * 2 and ps.answers[0] == (" he", " she")
    traced = load_run_data(organism, "tracing", tmp_path / "p.txt")
    assert traced.corrupted_prompts is None and traced.subject_spans is not None
    (tmp_path / "v.json").write_text(json.dumps([["nurse", 0.0, -0.8], ["pilot", 0.0, 0.6]]))
    ps = load_run_data(organism, "attribution", tmp_path / "v.json", {"answers": [" she", " he"]})
    assert len(ps) == 2 * 17 and ps.metadata[0]["stereotypical"] == -0.8 and ps.answers[0] == (" she", " he")
    (tmp_path / "p.csv").write_text("prompt,corrupted,subject,answers\nThe nurse said that,The clerk said that,"
                                    "nurse, she| he\n")
    ps = load_run_data(organism, "patching", tmp_path / "p.csv")
    assert ps.answers == [(" she", " he")] and ps.corrupted_prompts == ["The clerk said that"]
    _write_jsonl(tmp_path / "n.jsonl", [{"prompt": "The nurse said that", "subject": "nurse"}])
    with pytest.raises(DataError, match="n.jsonl:1: no 'corrupted'"):
        load_run_data(organism, "patching", tmp_path / "n.jsonl")
    (tmp_path / "p.tsv").write_text("prompt\tcorrupted\n")
    with pytest.raises(DataError, match="unknown data format"):
        load_run_data(organism, "patching", tmp_path / "p.tsv")
    with pytest.raises(LensBiasError, match="unknown method"):
        attribute_dataset(organism, "lsdm", tmp_path / "p.csv", tmp_path / "o")
    with pytest.raises(LensBiasError, match="runs on multiple-choice items"):
        attribute_dataset(organism, "crispr", ps, tmp_path / "o")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_run_data(organism, "nas", data_path("yesno")).metadata[0]["neg_cand"] > 0
