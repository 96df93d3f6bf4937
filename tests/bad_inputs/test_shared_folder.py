"""One run folder, two runs: a folder belongs to one run's arguments. Two processes started at the same
moment into one --out with different methods: one finishes (its table written), the other is refused
with one line — never both "done" with one run's chunks lost (issue 22: 2 of 7 trials did that).

Real processes, started together at a file barrier, many trials (LENS_BIAS_RACE_TRIALS, default 6);
each worker loads the organism once and runs `lens-bias attribute` (the CLI's main) once per trial."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest

import lens_bias as lb

CLAIM = ".lens-bias.run-"  # lens_bias.runs.store.CLAIM: a run's claim on its folder

TRIALS = int(os.environ.get("LENS_BIAS_RACE_TRIALS", "6"))
WORDS = ["nurse", "secretary", "dancer", "baker", "librarian", "teacher", "doctor", "lawyer", "writer", "singer",
         "painter", "chef"]

WORKER = textwrap.dedent("""
    import contextlib, io, json, sys, time
    from pathlib import Path
    from lens_bias.apps import cli
    from lens_bias.core import models
    from lens_bias.runs import dataset

    base, method, trials, name, other = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5]
    model = models.load_model("organism", device="cpu")
    dataset.load_model = lambda *a, **k: model  # the model loaded once, not once per trial
    for k in range(trials):
        (base / f"ready-{k}-{name}").touch()
        while not (base / f"ready-{k}-{other}").exists():
            time.sleep(0.0005)
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()) as out:
            code = cli.main(["attribute", "--model", "organism", "--device", "cpu", "--data", str(base / "p.jsonl"),
                             "--method", method, "--chunk-size", "4", "--out", str(base / f"o{k}"), "--quiet"])
        lines = [l for l in err.getvalue().splitlines() if l.startswith("lens-bias: error")]
        print(json.dumps({"trial": k, "code": code, "error": lines, "stdout": out.getvalue()}), flush=True)
""")


def _pairs(path: Path) -> Path:
    rows = [{"prompt": f"The {w} said that", "corrupted": "The clerk said that", "answers": [" she", " he"]}
            for w in WORDS]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_two_methods_into_one_folder_at_once(tmp_path):
    _pairs(tmp_path / "p.jsonl")
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    procs = {m: subprocess.Popen([sys.executable, "-c", WORKER, str(tmp_path), m, str(TRIALS), m, other],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for m, other in (("patching", "attribution"), ("attribution", "patching"))}
    results = {}
    for m, p in procs.items():
        out, err = p.communicate(timeout=1200)
        assert p.returncode == 0, err[-2000:]
        results[m] = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    print({m: [(r["code"], (r["error"] or [""])[0][-70:]) for r in rs] for m, rs in results.items()})
    for k in range(TRIALS):
        runs = {m: results[m][k] for m in results}
        done = [m for m, r in runs.items() if r["code"] == 0]
        assert len(done) == 1, runs  # never both "done" (one run's work lost), never both refused
        winner, loser = done[0], next(m for m in runs if m not in done)
        assert "other jobs' chunks are still missing" not in runs[winner]["stdout"], runs
        assert runs[loser]["code"] == 2 and len(runs[loser]["error"]) == 1, runs
        assert "another lens-bias run with other arguments" in runs[loser]["error"][0] or \
            "holds a run with other arguments" in runs[loser]["error"][0], runs
        folder = tmp_path / f"o{k}"
        assert lb.runs.read_manifest(folder)["args"]["method"] == winner
        table = pd.read_csv(folder / "scores.csv")
        want = "activation" if winner == "patching" else "attribution"
        assert all(m.startswith(want) for m in table["method"]), set(table["method"])
        assert not list(folder.glob(f"{CLAIM}*"))  # every claim released


def test_a_live_claim_refuses_other_arguments_and_a_dead_one_does_not(tmp_path, organism):
    """Deterministic: a claim held by another run (here another open file: flock locks are per open file)
    refuses a run with other arguments, naming the folder; once released (the process ended, or died:
    the kernel drops its lock), the folder is free again and the stale claim file is dropped."""
    from lens_bias.apps.demo import gender_pairs
    from lens_bias.core.files import SharedLock
    from lens_bias.organism import load_card
    from lens_bias.runs.store import CLAIM as claim

    assert claim == CLAIM

    pairs = gender_pairs(organism, load_card("organism"))[:4]
    out = tmp_path / "o"
    out.mkdir()
    other = SharedLock(out / f"{CLAIM}0123456789abcdef").acquire()
    with pytest.raises(lb.LensBiasError, match=r"o is in use by another lens-bias run with other arguments, running now"):
        lb.attribute_dataset(organism, "attribution", pairs, out, progress=False)
    assert sorted(p.name for p in out.iterdir()) == [f"{CLAIM}0123456789abcdef"]  # nothing of the refused run
    os.close(other.fd)  # the other process ends without releasing (killed): its claim file stays, unheld
    result = lb.attribute_dataset(organism, "attribution", pairs, out, progress=False)
    assert result["neuron"].values.shape[0] == organism.cfg.n_layers
    assert not list(out.glob(f"{CLAIM}*")) and (out / "scores.csv").is_file()
