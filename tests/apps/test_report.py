"""The locate report (#16) against ground truth: on the organism it names the planted units and their
necessity curves stand far above random units' (professions: the gender neuron; yes/no: the negative head by
NAS; BBQ: the BBQ neuron by CRISPR); on a random-weight GPT-2 no method beats random (the negative
control); the CLI writes a page and a summary a script can read, refuses bad input in one line, and a rerun
resumes from the stage cache without computing anything again."""

import json
import math
import warnings

import pytest
import torch

from lens_bias.apps.cli import main
from lens_bias.apps.report import locate_report
from lens_bias.apps.report import main as report_main
from lens_bias.apps.report.faithfulness import BEATS_RANDOM
from lens_bias.core.hooks import hook_name

# the organism card: planted units (lens_bias.organism.load_card)
GENDER_NEURON, NEGATIVE_HEAD, BBQ_NEURON = (0, 103), (2, 1), (3, 266)


def _quiet(fn, *a, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*a, **kw)


def _curve(report, method, unit_type, ablation="zero", measure="necessity"):
    c = report.curves
    return c[(c.method == method) & (c.unit_type == unit_type) & (c.ablation == ablation)
             & (c.measure == measure)].sort_values("k")


def _random_draws(report, unit_type, k, ablation="zero"):
    return [r["value"] for r in report.rows if r["method"] == "random" and r["unit_type"] == unit_type
            and r["k"] == k and r["measure"] == "necessity" and r["ablation"] == ablation]


def _assert_ranking_rule(report):
    """Every pair that beats random ranks above every pair that does not; within a group by area."""
    r = report.ranking
    beats = r["beats_random"].tolist()
    assert beats == sorted(beats, reverse=True), f"a method that does not beat random ranks above one that does:\n{r}"
    for flag in (True, False):
        areas = r[r.beats_random == flag]["area"].fillna(-math.inf).tolist()
        assert areas == sorted(areas, reverse=True)
    assert r["rank"].tolist() == list(range(1, len(r) + 1))


@pytest.fixture(scope="module")
def card():
    from lens_bias.organism import load_card

    c = load_card("organism")["planted"]
    assert (c["gender_neuron"]["layer"], c["gender_neuron"]["neuron"]) == GENDER_NEURON
    assert (c["negative_head"]["layer"], c["negative_head"]["head"]) == NEGATIVE_HEAD
    assert (c["bbq_neuron"]["layer"], c["bbq_neuron"]["neuron"]) == BBQ_NEURON
    return c


#: the professions report's options (the CLI rerun passes the same flags); CLI defaults add mean ablation, 5 seeds
PROF_OPTIONS = {"ablations": ("zero", "resample"), "seeds": 3}
PROF_FLAGS = ["--ablations", "zero,resample", "--seeds", "3"]


@pytest.fixture(scope="module")
def professions(organism, tmp_path_factory, card):
    """The default report (what `lens-bias locate --model organism --task professions` runs), written to a folder."""
    out = tmp_path_factory.mktemp("report") / "professions"
    return _quiet(locate_report, organism, "professions", out, progress=False, **PROF_OPTIONS), out


# ---------------------------------------------------------------------------------------
# (a) the organism: planted units named, curves far above random
# ---------------------------------------------------------------------------------------
def test_professions_names_the_gender_neuron_and_its_ablation_removes_the_bias(professions, organism):
    report, _ = professions
    planted = {p["name"]: p for p in report.planted}["gender_neuron"]
    assert planted["unit"] == "L0N103"
    # the methods that see neurons and know the metric put it first
    for method in ("attribution", "grad_x_act"):
        assert planted["ranks"][method] == 1, planted["ranks"]
        assert report.rank_of(method, "neuron", GENDER_NEURON) == 1
        for ablation in PROF_OPTIONS["ablations"]:
            c = _curve(report, method, "neuron", ablation)
            assert len(c) == 4 and c["units"].iloc[0] == "L0N103"
            # every k: at least half the bias removed, and far above k random neurons (mean + 5 std)
            margin = (c["value"] - c["random_mean"] - 5 * c["random_std"]).min()
            assert (c["value"] > 0.5).all() and margin > 0.3, c[["k", "value", "random_mean", "random_std"]]
    # the neuron methods beat random and head the ranking
    r = report.ranking.set_index(["method", "unit_type"])
    assert r.loc[("attribution", "neuron"), "beats_random"] and r.loc[("grad_x_act", "neuron"), "beats_random"]
    top = report.ranking.iloc[0]
    assert top["beats_random"] and top["unit_type"] == "neuron" and top["top_units"].startswith("L0N103")
    _assert_ranking_rule(report)

    # the report's k=1 zero-ablation value equals an independent computation on the held-out prompts
    ps = report.task.test
    def ld(hooks):
        logits = organism.run_with_hooks(ps.tokens, attention_mask=ps.attention_mask, fwd_hooks=hooks)
        rows = torch.arange(len(ps))
        a = logits[rows, ps.answer_pos][rows[:, None], ps.answer_ids]
        return float((a[:, 0] - a[:, 1]).mean())

    def zero(x, hook):
        x[..., GENDER_NEURON[1]] = 0
        return x

    with torch.no_grad():
        clean, ablated = ld([]), ld([(hook_name("neuron", GENDER_NEURON[0]), zero)])
        ps_ref = ps.swapped()
        logits = organism(ps_ref.tokens, attention_mask=ps_ref.attention_mask)
        rows = torch.arange(len(ps))
        a = logits[rows, ps.answer_pos][rows[:, None], ps.answer_ids]
        ref = float((a[:, 0] - a[:, 1]).mean())
    expected = (clean - ablated) / (clean - ref)
    got = _curve(report, "attribution", "neuron").iloc[0]["value"]
    assert got == pytest.approx(expected, abs=1e-4)


def test_yesno_nas_names_the_negative_head(organism, card):
    report = _quiet(locate_report, organism, "yesno", ablations=("zero", "resample"), seeds=5, k_values=(1, 2),
                    max_items=24, capability=False, progress=False)
    assert "nas" in report.methods and report.task.kind == "yesno"
    planted = {p["name"]: p for p in report.planted}["negative_head"]
    assert planted["unit"] == "L2H1" and planted["ranks"]["nas"] == 1
    for ablation in ("zero", "resample"):
        c = _curve(report, "nas", "head", ablation).iloc[0]  # k = 1: the planted head alone
        draws = _random_draws(report, "head", 1, ablation)
        # above every random head (random single heads swing the metric both ways, a heavy tail toward more
        # bias: mean ± std is not the yardstick here, the best random draw and exhaustion below are)
        assert c["units"] == "L2H1" and c["value"] > 0.3 and c["value"] > max(draws) + 0.15, (c, draws)
    # ground truth by exhaustion: of all 16 single-head zero ablations, the planted head's removes the most bias
    from lens_bias.apps.report.faithfulness import Faithfulness
    from lens_bias.mitigate.ablation import head_ablation_hooks

    f = Faithfulness(organism, report.task, ablations=("zero",), capability=False)
    heads = [(l, h) for l in range(organism.cfg.n_layers) for h in range(organism.cfg.n_heads)]
    shares = [f.share(r["bias"]) for r in f.measure([head_ablation_hooks(organism, [u], "zero") for u in heads])]
    assert heads[max(range(len(heads)), key=shares.__getitem__)] == NEGATIVE_HEAD
    assert shares[heads.index(NEGATIVE_HEAD)] == pytest.approx(_curve(report, "nas", "head").iloc[0]["value"], abs=1e-5)
    _assert_ranking_rule(report)


def test_bbq_crispr_names_the_bbq_neuron(organism, card):
    report = _quiet(locate_report, organism, "bbq", methods=["crispr"], ablations=("zero",), seeds=3, k_values=(1, 2),
                    max_items=24, capability=False, progress=False)
    assert report.task.kind == "multiple_choice" and report.methods == ["crispr", "random"]
    planted = {p["name"]: p for p in report.planted}["bbq_neuron"]
    assert planted["unit"] == "L3N266" and planted["ranks"]["crispr"] == 1
    c = _curve(report, "crispr", "neuron")
    assert c["units"].iloc[0] == "L3N266"
    assert (c["value"] > 0.5).all() and (c["value"] - c["random_mean"] - 3 * c["random_std"]).min() > 0.3, c
    assert report.ranking.set_index(["method", "unit_type"]).loc[("crispr", "neuron"), "beats_random"]
    _assert_ranking_rule(report)


# ---------------------------------------------------------------------------------------
# (b) negative control: a random-weight GPT-2 has nothing to find
# ---------------------------------------------------------------------------------------
def test_random_model_no_method_beats_random(tiny_gpt2):
    report = _quiet(locate_report, tiny_gpt2, "professions", ablations=("zero", "resample"), seeds=5, progress=False)
    r = report.ranking
    assert len(r) >= 10 and set(r.method) >= {"patching", "attribution", "grad_x_act"}
    assert not r["beats_random"].any(), r
    # not only by the significance gate: no method's necessity area clears the beat-random margin either
    assert (r["area"] <= BEATS_RANDOM * r["spread"]).all(), r[["method", "unit_type", "area", "spread"]]
    assert any("not significant" in n for n in report.notes)


# ---------------------------------------------------------------------------------------
# (c) the CLI, (d) resuming
# ---------------------------------------------------------------------------------------
def test_cli_writes_page_and_summary_and_resumes_from_the_cache(professions, monkeypatch, capsys):
    report, out = professions
    stages = sorted((out / "stages").glob("*.pt"))
    assert {p.stem for p in stages} >= {"bias", "method-patching", "method-attribution", "faithfulness", "contexts"}
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in stages}
    calls = []
    real = report_main.run_method
    monkeypatch.setattr(report_main, "run_method", lambda *a, **kw: calls.append(a[0]) or real(*a, **kw))
    monkeypatch.setattr(report_main.Faithfulness, "run", lambda *a, **kw: calls.append("faithfulness"))

    assert main(["locate", "--model", "organism", "--task", "professions", "--out", str(out), "--quiet",
                 *PROF_FLAGS]) == 0
    printed = capsys.readouterr().out
    assert calls == [], f"the rerun computed {calls} again"
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted((out / "stages").glob("*.pt"))} == before
    # a script reads the summary: the same ranking and planted ranks as the Python run, every stage cached
    s = json.loads((out / "summary.json").read_text())
    assert [(x["method"], x["unit_type"]) for x in s["ranking"]] == report.method_ranking()
    assert s["ranking"][0]["beats_random"] is True and s["ranking"][0]["top_units"].startswith("L0N103")
    assert {p["name"]: p["ranks"]["attribution"] for p in s["planted"]} == {"gender_neuron": 1}
    assert all(v["cached"] for k, v in s["timings"].items() if k not in ("agreement", "total", "write"))
    assert "1. grad_x_act (neuron)" in printed and "L0N103: attribution #1" in printed
    page = (out / "report.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and "Ranking rule" in page and "L0N103" in page
    assert "plotly" in page.lower() and '<script src="http' not in page  # plotly.js embedded: opens offline
    for name in ("ranking", "curves", "agreement", "top_units", "scores"):
        assert (out / "tables" / f"{name}.csv").stat().st_size > 0 and (out / "tables" / f"{name}.parquet").is_file()


def test_cli_refuses_bad_input_in_one_line(tmp_path, capsys):
    user = tmp_path / "mine"
    user.mkdir()
    (user / "notes.txt").write_text("mine")
    assert main(["locate", "--model", "organism", "--task", "professions", "--out", str(user), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--overwrite" in err and "Traceback" not in err
    assert (user / "notes.txt").read_text() == "mine" and sorted(p.name for p in user.iterdir()) == ["notes.txt"]
    assert main(["locate", "--model", "organism", "--task", "nonsense", "--out", str(tmp_path / "new"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "unknown task 'nonsense'" in err
    assert main(["locate", "--model", "organism", "--task", "bbq/Nope", "--out", str(tmp_path / "new"), "--quiet"]) == 2
    assert "unknown BBQ category 'Nope'; shipped: Age, Nationality, Religion" in capsys.readouterr().err


def test_a_shipped_bbq_category_resolves(tiny_gpt2):
    from lens_bias.apps.report import resolve_task

    t = resolve_task(tiny_gpt2, "bbq/Nationality", max_items=12)
    assert t.kind == "multiple_choice" and t.name == "bbq/Nationality" and len(t.locate) + len(t.test) == 12
    assert {it["category"] for it in t.locate + t.test} == {"Nationality"}


def test_ranking_puts_methods_that_beat_random_first():
    """A large area with a larger spread (heads: random draws swing ±3) ranks below a smaller area that beats
    random (neurons: random draws within ±0.01) — the organism's grad_x_act (head) case."""
    from lens_bias.apps.report import rank_methods

    rows = []
    for unit_type, method, value, draws in (("head", "noisy", 2.0, (-3.0, 3.0, -2.5, 2.5)),
                                            ("neuron", "clean", 0.9, (0.01, -0.01, 0.0, 0.005)),
                                            ("neuron", "weak", 0.02, (0.01, -0.01, 0.0, 0.005))):
        for k in (1, 2):
            base = {"unit_type": unit_type, "k": k, "measure": "necessity", "ablation": "zero", "units": "u"}
            rows.append({**base, "method": method, "seed": None, "value": value})
            rows += [{**base, "method": "random", "seed": s, "value": v} for s, v in enumerate(draws)]
    r = rank_methods(rows, {"neutral_loss": float("nan")})
    assert list(zip(r["method"], r["beats_random"])) == [("clean", True), ("noisy", False), ("weak", False)]
    assert r.set_index("method").loc["noisy", "area"] > r.set_index("method").loc["clean", "area"]
