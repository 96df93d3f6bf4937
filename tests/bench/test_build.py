"""The benchmark build (lens_bias/bench/recipe/, run by lens_bias/bench/build.py): its ground truth
stays independent of the toolkit it checks, its code reproduces the shipped case data byte for byte
and a slice of the shipped ground truth up to float32 rounding, and its command line keeps its
options. (Old and new code compared at length: benchmarks/check_build_split.py.)"""

import ast
import json
import random
import runpy
import sys
from pathlib import Path

import pytest
import torch

from lens_bias.bench.recipe import ablation, case_data, casebatch, steps, tokens
from lens_bias.bench.recipe.config import SEED
from lens_bias.bench.recipe.docs import make_gender_world

ROOT = Path(__file__).resolve().parents[2]
BUILD = ROOT / "lens_bias" / "bench" / "recipe"
BENCH = ROOT / "data" / "bench"
TRUTH_MODULES = ("forward", "casebatch", "ablation", "truth")


def local_imports(module: str) -> tuple[set[str], set[str]]:
    """(modules of the build package it imports, other lens_bias modules it imports)."""
    tree = ast.parse((BUILD / f"{module}.py").read_text())
    local, toolkit = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1:
                local.add(node.module)
            elif node.level > 1 or (node.module or "").startswith("lens_bias"):
                toolkit.add("." * node.level + (node.module or ""))
        elif isinstance(node, ast.Import):
            toolkit |= {a.name for a in node.names if a.name.startswith("lens_bias")}
    return local, toolkit


def test_the_truth_imports_nothing_from_lens_bias():
    """forward/casebatch/ablation/truth and everything they import from the build package use plain
    torch and transformers only: the truth is independent of the toolkit it checks."""
    seen, todo = set(), list(TRUTH_MODULES)
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.add(m)
        local, toolkit = local_imports(m)
        assert not toolkit, f"recipe/{m}.py imports {toolkit} from lens_bias"
        todo += local
    assert {"forward", "casebatch", "ablation", "truth", "tokens", "config"} == seen
    assert local_imports("docs")[1], "the corpus takes its formats from lens_bias.tasks"  # the contrast


@pytest.fixture(scope="module")
def shipped_tok():
    if not (BENCH / "bench-gender").is_dir():
        pytest.skip("the benchmark models are not built")
    return tokens.load_tokenizer(BENCH / "bench-gender")


def jsonl(rows) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def test_case_data_code_reproduces_the_shipped_files(shipped_tok):
    """From the seed alone (no real text needed): every case's pairs and items, byte for byte."""
    tok, world = shipped_tok, make_gender_world(SEED, [])
    lists = case_data.gender_lists(tok)
    for k, c in enumerate(["case1", "case2", "case4", "case8"]):
        rows = case_data.gender_pairs(world, lists, c, 24, SEED + k)
        assert jsonl(rows) == (BENCH / "bench-gender" / "data" / f"{c}_pairs.jsonl").read_text(), c
    dl = case_data.decision_lists(tok)
    hard, easy = case_data.yesno_items(dl, 12, SEED + 40, True), case_data.yesno_items(dl, 64, SEED + 41, False)
    items6 = case_data.bbq_case_items(random.Random(SEED + 60), "ambig", 24, start_id=0)
    data = BENCH / "bench-decision" / "data"
    assert jsonl(hard) == (data / "case3_5_yesno.jsonl").read_text()
    assert jsonl(case_data.yesno_pair_rows(hard, easy)) == (data / "case3_5_pairs.jsonl").read_text()
    assert jsonl(items6) == (data / "case6_bbq.jsonl").read_text()


def close(got: torch.Tensor, want: torch.Tensor, scale: float) -> bool:
    """Equal up to float32 rounding: the shipped truth was computed on another CPU, whose kernels
    round differently (about one ulp per value here); 64 ulps of the metric's size."""
    return bool(((got - want).abs() <= 64 * torch.finfo(torch.float32).eps * scale).all())


def test_truth_code_reproduces_the_shipped_ground_truth(shipped_tok):
    """Case 2 on bench-gender: the base metrics, every MLP layer's and two heads' zero and mean
    ablation effects, recomputed with the build's hooks (the heads by hooked full forwards, an
    independent path from the shipped shortcut sweep), equal the shipped ground truth."""
    from safetensors.torch import load_file

    model = steps.load_hf(BENCH / "bench-gender")
    data = BENCH / "bench-gender" / "data" / "case2_pairs.jsonl"
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    cb = case_data.pairs_case(shipped_tok, rows)
    truth = load_file(BENCH / "bench-gender" / "ground_truth.safetensors")
    base = casebatch.case_metrics(model, cb)
    means = ablation.capture_means(model, cb)
    mlp = ablation.mlp_layer_effects(model, cb, base, means)
    top = truth["case2/bias/heads_zero"].abs().reshape(-1).argsort(descending=True)[:1].tolist() + [47]
    heads = [divmod(i, truth["case2/bias/heads_zero"].shape[1]) for i in top]
    sets = [{"heads": [h], "method": meth} for meth in ("zero", "mean") for h in heads]
    got = ablation.ablate_sets(model, cb, base, means, sets)
    scale = max(1.0, *(abs(v) for v in base.values()))
    for m in ("bias", "clean_ld", "corrupted_ld"):
        assert close(torch.tensor([base[m]]), truth[f"case2/{m}/base"], scale), m
        for j, meth in enumerate(("zero", "mean")):
            assert close(mlp[m][meth], truth[f"case2/{m}/mlp_layer_{meth}"], scale), (m, meth)
            want = torch.stack([truth[f"case2/{m}/heads_{meth}"][h] for h in heads])
            assert close(torch.tensor([g[m] for g in got[2 * j:2 * j + 2]]), want, scale), (m, meth, heads)


def test_command_line_options(capsys):
    args = steps.parse_args(["build", "--out", "x"])
    assert (args.steps, args.threads, args.seed, args.models, args.rebuild, args.smoke, args.shared) == \
        (None, 1, SEED, "decision,gender", False, False, None)
    with pytest.raises(SystemExit) as e:
        steps.parse_args(["build", "--out", "x", "--models", "gender,decison"])
    assert e.value.code == 2 and "unknown model(s) ['decison']" in capsys.readouterr().err


def test_runs_as_a_module(monkeypatch, capsys):
    """`python -m lens_bias.bench.build build …` (run in this process)."""
    monkeypatch.setattr(sys, "argv", ["lens_bias.bench.build", "build", "--help"])
    with pytest.raises(SystemExit) as e:
        runpy.run_module("lens_bias.bench.build", run_name="__main__")
    assert e.value.code == 0
    out = capsys.readouterr().out
    for option in ("--out", "--steps", "--threads", "--seed", "--models", "--rebuild", "--smoke", "--shared"):
        assert option in out
