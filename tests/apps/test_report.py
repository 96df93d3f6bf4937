"""The locate report (#16, #21) against ground truth: on the organism it names the planted units and their
necessity curves stand far above random units' (professions: the gender neuron; yes/no: the negative head by
NAS; BBQ: the BBQ neuron by CRISPR), and the ranking that counts capability keeps them first; on a random-weight
GPT-2 no method beats random (the negative control); the rank test is fair to few units and to many; the
bootstrap resamples the shared neutral twins; the page renders in a real browser; the CLI writes a page and a
summary a script can read, refuses bad input in one line, and a rerun resumes from the stage cache (checked
by checksum) without computing anything again, also when two runs share a folder."""

import json
import math
import os
import re
import warnings

import pytest
import torch

from lens_bias.apps.cli import main
from lens_bias.apps.report import locate_report
from lens_bias.apps.report import main as report_main
from lens_bias.apps.report.faithfulness import ALPHA, BREAKS
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


def _random_draws(report, unit_type, k, ablation="zero", without=None):
    """Random draws' necessity at k (leaving out the draws that hold the unit `without`)."""
    return [r["value"] for r in report.rows if r["method"] == "random" and r["unit_type"] == unit_type
            and r["k"] == k and r["measure"] == "necessity" and r["ablation"] == ablation
            and (without is None or without not in r["units"].split())]


def assert_capability_order(ranking, budget: float):
    """The ranking counts capability: every ranked top-k is within the loss budget; those that beat random with
    such a k come first, each group by bias removed beyond random; and no method whose ranked top-k costs more
    than BREAKS nats ranks above one that costs < budget and removes at least half as much bias."""
    r = ranking
    assert r["rank"].tolist() == list(range(1, len(r) + 1))
    assert (r["d_loss"].dropna() <= budget + 1e-12).all(), r[["method", "unit_type", "k_budget", "d_loss"]]
    first = (r["beats_random"] & r["k_budget"].notna()).tolist()
    assert first == sorted(first, reverse=True), f"a method that does not beat random within budget ranks first:\n{r}"
    for flag in (True, False):
        g = r[(r["beats_random"] & r["k_budget"].notna()) == flag]
        v = g["beyond_random"].fillna(-math.inf).tolist()
        assert v == sorted(v, reverse=True), g[["method", "unit_type", "beyond_random"]]
    cost = r["d_loss"].where(r["k_budget"].notna(), r["d_neutral_loss_kmax"])  # what the ranked top-k cost
    removed = r["removed"].where(r["k_budget"].notna(), r["necessity_k1_zero"])
    for i in range(len(r)):
        for j in range(i + 1, len(r)):
            if cost.iloc[i] > BREAKS and cost.iloc[j] < budget and removed.iloc[j] >= 0.5 * removed.iloc[i]:
                raise AssertionError(f"{r.iloc[i]['method']} ({r.iloc[i]['unit_type']}) costs {cost.iloc[i]:+.2f} and ranks "
                                     f"above {r.iloc[j]['method']} ({r.iloc[j]['unit_type']}) at {cost.iloc[j]:+.2f}")


def _assert_ranking_rule(report):
    if report.ranking["d_loss"].notna().any():
        assert_capability_order(report.ranking, report.loss_budget)
        return
    r = report.ranking  # no capability measure: by area, those that beat random first
    beats = r["beats_random"].tolist()
    assert beats == sorted(beats, reverse=True)
    for flag in (True, False):
        areas = r[r.beats_random == flag]["area"].fillna(-math.inf).tolist()
        assert areas == sorted(areas, reverse=True)


@pytest.fixture(scope="module")
def card():
    from lens_bias.organism import load_card

    c = load_card("organism")["planted"]
    assert (c["gender_neuron"]["layer"], c["gender_neuron"]["neuron"]) == GENDER_NEURON
    assert (c["negative_head"]["layer"], c["negative_head"]["head"]) == NEGATIVE_HEAD
    assert (c["bbq_neuron"]["layer"], c["bbq_neuron"]["neuron"]) == BBQ_NEURON
    return c


#: the professions report's options (the CLI rerun passes the same flags): the defaults but resample ablation
PROF_OPTIONS = {"ablations": ("zero", "resample")}
PROF_FLAGS = ["--ablations", "zero,resample"]


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
            # every k: at least half the bias removed, and far above k random neurons on average (a random draw
            # may hold the planted neuron itself: 19 draws of 8 among 2048 do, 7% of the time; the rank test below
            # is the yardstick, not mean + n std)
            margin = (c["value"] - c["random_mean"]).min()
            assert (c["value"] > 0.5).all() and margin > 0.5, c[["k", "value", "random_mean", "random_std"]]
    # the neuron methods beat random (the rank test: above all 19 random draws) and head the ranking, which
    # counts capability: ablating the planted neuron costs nothing, the whole-layer top-k break the model
    r = report.ranking.set_index(["method", "unit_type"])
    for method in ("attribution", "grad_x_act"):
        row = r.loc[(method, "neuron")]
        assert row["beats_random"] and row["p_random"] <= ALPHA and row["k_budget"] >= 1, row
        assert row["removed"] > 0.9 and abs(row["d_loss"]) < report.loss_budget and row["random_removed"] < 0.1, row
    top = report.ranking.iloc[0]
    assert top["beats_random"] and top["unit_type"] == "neuron" and top["top_units"].startswith("L0N103")
    assert r.xs("layer", level="unit_type")["breaks_model"].all(), "ablating 4 of 8 whole layers breaks the organism"
    _assert_ranking_rule(report)
    assert "L0N103" in report.answer() and "breaking the model" in report.answer()

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

    # a top-k that starts at a later layer (its forward resumes there) against plain run_with_hooks: the share
    # removed and the neutral-text loss (tasks.capability.text_loss, full forward)
    from lens_bias.mitigate.ablation import head_ablation_hooks
    from lens_bias.tasks.capability import text_loss

    c = report.curves
    c = c[(c.measure == "necessity") & (c.ablation == "zero") & (c.unit_type == "head")]
    late = c[c.units.map(lambda u: min(int(x[1:].split("H")[0]) for x in u.split()) >= 1)].iloc[0]
    heads = [tuple(int(v) for v in x[1:].split("H")) for x in late["units"].split()]
    hooks = head_ablation_hooks(organism, heads, "zero")
    with torch.no_grad():
        assert late["value"] == pytest.approx((clean - ld(hooks)) / (clean - ref), abs=1e-4)
    assert late["neutral_loss"] == pytest.approx(text_loss(organism, report.task.neutral, hooks=hooks), abs=1e-4)


def test_yesno_nas_names_the_negative_head(organism, card):
    report = _quiet(locate_report, organism, "yesno", ablations=("zero", "resample"), seeds=5, k_values=(1, 2),
                    max_items=24, capability=False, progress=False)
    assert "nas" in report.methods and report.task.kind == "yesno"
    planted = {p["name"]: p for p in report.planted}["negative_head"]
    assert planted["unit"] == "L2H1" and planted["ranks"]["nas"] == 1
    for ablation in ("zero", "resample"):
        c = _curve(report, "nas", "head", ablation).iloc[0]  # k = 1: the planted head alone
        draws = _random_draws(report, "head", 1, ablation, without="L2H1")
        # above every random head that is not the planted one (19 draws of 1 among 16 heads hit it too; random
        # single heads swing the metric both ways: the best random draw and exhaustion below are the yardstick)
        assert c["units"] == "L2H1" and c["value"] > 0.3 and c["value"] > max(draws) + 0.15, (c, draws)
    # ground truth by exhaustion: of all 16 single-head zero ablations, the planted head's removes the most bias
    from lens_bias.apps.report.faithfulness import Faithfulness
    from lens_bias.mitigate.ablation import head_ablation_hooks

    f = Faithfulness(organism, report.task, ablations=("zero",), capability=False)
    heads = [(l, h) for l in range(organism.cfg.n_layers) for h in range(organism.cfg.n_heads)]
    # full forwards (first layer 0), where the report resumed at the head's layer
    shares = [f.share(r["bias"]) for r in f.measure([(head_ablation_hooks(organism, [u], "zero"), 0) for u in heads])]
    assert heads[max(range(len(heads)), key=shares.__getitem__)] == NEGATIVE_HEAD
    assert shares[heads.index(NEGATIVE_HEAD)] == pytest.approx(_curve(report, "nas", "head").iloc[0]["value"], abs=1e-5)
    _assert_ranking_rule(report)


def test_bbq_crispr_names_the_bbq_neuron(organism, card):
    report = _quiet(locate_report, organism, "bbq", methods=["crispr"], ablations=("zero",), k_values=(1,),
                    max_items=24, capability=False, progress=False)
    assert report.task.kind == "multiple_choice" and report.methods == ["crispr", "random"]
    planted = {p["name"]: p for p in report.planted}["bbq_neuron"]
    assert planted["unit"] == "L3N266" and planted["ranks"]["crispr"] == 1
    c = _curve(report, "crispr", "neuron")
    assert c["units"].iloc[0] == "L3N266"
    assert (c["value"] > 0.5).all() and (c["value"] - c["random_mean"] - 3 * c["random_std"]).min() > 0.3, c
    row = report.ranking.set_index(["method", "unit_type"]).loc[("crispr", "neuron")]
    assert row["p_random"] <= ALPHA, row  # above all 19 random draws at every k
    # but on 12 held-out items the organism's BBQ bias (+0.07) is not distinguishable from 0 when the items are
    # resampled, so the report does not say it beats random, and says why
    b = report.baseline
    assert b["bias_lo"] <= 0 <= b["bias_hi"] and not row["beats_random"]
    assert any("not significant" in n and "resampled items" in n for n in report.notes)
    _assert_ranking_rule(report)
    # the stacked measurement (instruction text once per hook set, resumed at the first hooked layer) equals
    # bias_of's one forward per hook set, for zero and mean ablation of a late neuron and an early head
    from lens_bias.apps.report.faithfulness import Faithfulness
    from lens_bias.apps.report.tasks import bias_of
    from lens_bias.mitigate.ablation import head_ablation_hooks, neuron_ablation_hooks

    f = Faithfulness(organism, report.task, ablations=("zero", "mean"), capability=False)
    configs = [(neuron_ablation_hooks(organism, [BBQ_NEURON], "zero"), BBQ_NEURON[0], True),
               (neuron_ablation_hooks(organism, [BBQ_NEURON], "mean", f.reference), BBQ_NEURON[0], True),
               (head_ablation_hooks(organism, [(1, 2)], "zero"), 1, True), ([], organism.cfg.n_layers, True)]
    got = f.measure(configs)
    for (hooks, _, _), g in zip(configs, got):
        want = bias_of(organism, report.task, hooks)
        assert g["bias"] == pytest.approx(want["bias"], abs=1e-5) and g["accuracy"] == want["accuracy"]
    assert abs(got[0]["bias"] - got[3]["bias"]) > 0.01, "the ablation must move the metric for the check to bite"


# ---------------------------------------------------------------------------------------
# (b) negative control: a random-weight GPT-2 has nothing to find
# ---------------------------------------------------------------------------------------
def test_random_model_no_method_beats_random(tiny_gpt2):
    report = _quiet(locate_report, tiny_gpt2, "professions", progress=False)
    r = report.ranking
    assert len(r) >= 10 and set(r.method) >= {"patching", "attribution", "grad_x_act"}
    assert not r["beats_random"].any(), r
    # the held-out bias (twins resampled with their prompts) is not significant on a random model
    assert any("not significant" in n for n in report.notes)
    assert report.baseline["bias_lo"] <= 0 <= report.baseline["bias_hi"]
    assert "not found" in report.answer()


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
    assert f"1. {report.ranking.iloc[0]['method']} (neuron)" in printed and "L0N103: attribution #1" in printed
    assert s["answer"] == report.answer() and "L0N103" in s["answer"]
    page = (out / "report.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and "Where is the bias?" in page and "L0N103" in page
    assert "plotly" in page.lower() and '<script src="http' not in page  # plotly.js embedded: opens offline
    # plotly.js once, in <head>, before the first figure; the pairwise table only in the CSV; no special tokens
    assert page.count("* plotly.js v") == 1 and page.index("* plotly.js v") < page.index("</head>") \
        < page.index("plotly-graph-div")
    assert "overlap@4" not in page and "tables/agreement.csv" in page
    assert "endoftext" not in page and "title=" in page  # cut cells carry their whole text on hover
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


def _rows(spec, ks=(1, 2, 4, 8), draws=19, loss0=2.0):
    """Synthetic faithfulness rows: spec maps (unit type, method) → (necessity by k, Δloss by k) and
    (unit type, 'random') → (per-k list of draws, Δloss of the first two draws)."""
    rows = []
    for (unit_type, method), (values, dloss) in spec.items():
        for i, k in enumerate(ks):
            base = {"unit_type": unit_type, "k": k, "measure": "necessity", "ablation": "zero", "units": f"{method}-{k}"}
            if method == "random":
                for s in range(draws):
                    row = {**base, "method": "random", "seed": s, "value": values[i][s]}
                    if s < 2:
                        row["neutral_loss"] = loss0 + dloss[i]
                    rows.append(row)
            else:
                rows.append({**base, "method": method, "seed": None, "value": values[i], "neutral_loss": loss0 + dloss[i],
                             "value_lo": values[i] - 0.1, "value_hi": values[i] + 0.1})
    return rows


def test_rank_test_is_fair_to_few_heads_and_to_many_neurons():
    """Heads: random draws swing from -3 to +1.5 (a few heads move the metric a lot); a method above every draw
    at every k beats random although its area is under 3 random spreads (the old rule's failure). Neurons:
    random draws within ±0.01; a method at 0.02, above them all, beats random too. A method at the draws'
    median does not."""
    from lens_bias.apps.report import rank_methods

    g = torch.Generator().manual_seed(0)
    heads = [(torch.rand(19, generator=g) * 4.5 - 3.0).tolist() for _ in range(4)]
    neurons = [(torch.rand(19, generator=g) * 0.02 - 0.01).tolist() for _ in range(4)]
    flat = [0.0] * 4
    spec = {("head", "random"): (heads, flat), ("neuron", "random"): (neurons, flat),
            ("head", "top"): ([1.6] * 4, flat), ("head", "inside"): ([-0.75] * 4, flat),
            ("neuron", "top"): ([0.02] * 4, flat), ("neuron", "inside"): ([0.0] * 4, flat)}
    r = rank_methods(_rows(spec), {"neutral_loss": 2.0}).set_index(["method", "unit_type"])
    assert r.loc[("top", "head"), "beats_random"] and r.loc[("top", "neuron"), "beats_random"]
    assert r.loc[("top", "head"), "p_random"] == pytest.approx(1 / 20)
    assert r.loc[("top", "head"), "z"] < 3, "the old rule (area > 3 spreads) would have refused it"
    assert not r.loc[("inside", "head"), "beats_random"] and not r.loc[("inside", "neuron"), "beats_random"]
    assert r.loc[("inside", "head"), "p_random"] > 0.2
    assert all(r.loc[("top", "head"), f"p@{k}"] == pytest.approx(1 / 20) for k in (1, 2, 4, 8))


def test_ranking_counts_capability():
    """A method whose top-k remove 95% of the bias by raising the loss 2 nats ranks below one that removes 50%
    at +0.02 nats, and is marked as breaking the model; a method within budget at k = 1 only is ranked by that k.
    A ranking by area alone fails the capability check."""
    from lens_bias.apps.report import rank_methods

    draws = [[0.01 * (s - 9) for s in range(19)] for _ in range(4)]
    spec = {("neuron", "random"): (draws, [0.0] * 4),
            ("neuron", "breaker"): ([0.95] * 4, [2.0] * 4),
            ("neuron", "clean"): ([0.5] * 4, [0.02] * 4),
            ("neuron", "first"): ([0.6, 0.7, 0.8, 0.9], [0.05, 1.5, 1.6, 1.7])}
    r = rank_methods(_rows(spec), {"neutral_loss": 2.0})
    assert r["method"].tolist() == ["first", "clean", "breaker"], r[["method", "k_budget", "removed", "d_loss"]]
    row = r.set_index("method")
    assert row.loc["first", "k_budget"] == 1 and row.loc["clean", "k_budget"] == 1  # the most beyond random, fewest units
    assert row.loc["breaker", "breaks_model"] and not row.loc["clean", "breaks_model"]
    assert pd_isna(row.loc["breaker", "k_budget"]) and row.loc["breaker", "beats_random"]
    assert_capability_order(r, 0.1)
    by_area = r.sort_values("area", ascending=False).reset_index(drop=True)
    by_area["rank"] = range(1, len(by_area) + 1)
    with pytest.raises(AssertionError):
        assert_capability_order(by_area, 0.1)


def pd_isna(v) -> bool:
    return v is None or v != v


def test_resampling_draws_the_shared_neutral_twins_too():
    """20 professions share 2 neutral twin words: the gap's uncertainty is the twins' (their logit differences
    are +1 and -1), which a bootstrap over professions alone understates."""
    from lens_bias.apps.report.resampling import interval, resampling
    from lens_bias.apps.report.tasks import ReportTask
    from lens_bias.core import PromptSet

    n = 40  # 20 professions × 2 templates; twin word = profession % 2
    prof = [i // 2 for i in range(n)]
    tokens = torch.tensor([[1, 100 + p, 7] for p in prof])
    corrupted = torch.tensor([[1, 10 + p % 2, 7] for p in prof])
    ps = PromptSet(prompts=[""] * n, tokens=tokens, attention_mask=torch.ones_like(tokens),
                   answer_pos=torch.full((n,), 2), answers=[(" she", " he")] * n, answer_ids=torch.zeros(n, 2, dtype=torch.long),
                   corrupted_prompts=[""] * n, corrupted_tokens=corrupted, metadata=[{"profession": f"p{p}"} for p in prof])
    task = ReportTask("t", "pairs", ps, ps)
    boot = resampling(task, n_boot=2000)
    assert boot.n_clusters == 20 and boot.n_twins == 2
    clean = torch.zeros(n)
    twins = torch.tensor([1.0 if p % 2 else -1.0 for p in prof])
    gap = boot.mean(clean) - boot.mean(twins)
    lo, hi = interval(gap)
    assert float(gap[0]) == pytest.approx(0.0) and lo < -0.5 and hi > 0.5, (lo, hi)
    # the prompts' own spread is resampled too: professions differ, one twin word (a fixed design) adds nothing
    one = ReportTask("t", "pairs", ps.__class__(**{**ps.__dict__, "corrupted_tokens": torch.tensor([[1, 10, 7]] * n)}), None)
    one.test = one.locate
    b1 = resampling(one, n_boot=2000)
    assert b1.n_twins == 1
    lo1, hi1 = interval(b1.mean(torch.tensor([float(p % 5) for p in prof])) - b1.mean(torch.zeros(n)))
    assert lo1 < 2.0 < hi1 and hi1 - lo1 > 0.5


# ---------------------------------------------------------------------------------------
# (e) the page in a real browser, the stage cache's checksums, shared folders, odd inputs
# ---------------------------------------------------------------------------------------
def test_report_renders_in_a_browser(professions, browser):
    """Every figure of the page holds a rendered plot in headless Chromium, offline, with no console error;
    screenshots at 1400 and 800 px are saved next to the page. Fails when plotly.js comes after a figure."""
    report, out = professions
    check = browser(out / "report.html", widths=(1400, 800))
    assert len(check.figures) == len(report.figures()) >= 8, check
    assert (out / "report-1400px.png").stat().st_size > 10_000 and (out / "report-800px.png").is_file()


def test_stage_cache_checksum_catches_a_changed_value(professions, tmp_path):
    """Write 50.0 into one score of a cached stage (its file rewritten, well-formed): the rerun does not trust
    it — it says so and computes the stage again, and scores, top units and ranking agree."""
    import shutil

    report, out = professions
    folder = tmp_path / "copy"
    shutil.copytree(out, folder)
    path = folder / "stages" / "method-attribution.pt"
    rec = torch.load(path, weights_only=True)
    rec["value"]["scores"]["head"][3, 3] = 50.0
    torch.save(rec, path)
    with pytest.warns(UserWarning, match="does not match the checksum"):
        again = locate_report("organism", "professions", folder, progress=False, **PROF_OPTIONS)
    assert again.timings["method-attribution"]["cached"] is False
    assert float(again.scores["head"]["attribution"][3, 3]) != 50.0
    assert torch.equal(again.scores["head"]["attribution"], report.scores["head"]["attribution"])
    assert again.method_ranking() == report.method_ranking()


def test_two_identical_runs_into_one_folder_share_the_work(tmp_path):
    """Two `lens-bias locate` at the same moment into one folder: both exit 0 (no false 'not a report folder'),
    and every stage is computed once — by one run, read from the cache by the other."""
    import subprocess
    import sys

    out = tmp_path / "shared"
    cmd = [sys.executable, "-m", "lens_bias.apps.cli", "locate", "--model", "organism", "--task", "professions",
           "--out", str(out), "--quiet", "--methods", "attribution", "--k", "1", "--ablations", "zero"]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [p.communicate(timeout=900) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [r[1][-500:] for r in results]
    computed = [int(re.search(r"stages: (\d+) computed, (\d+) read", out).group(1)) for out, _ in results]
    s = json.loads((out / "summary.json").read_text())
    assert s["ranking"] and (out / "report.html").is_file()
    stamps = {p.name: p.stat().st_mtime_ns for p in (out / "stages").glob("*.pt")}
    assert {"method-attribution.pt", "faithfulness.pt"} <= set(stamps)
    # one manifest with every stage's checksum, and a third run computes nothing
    m = json.loads((out / "locate_report.json").read_text())
    assert set(m["stages"]) == {p[:-3] for p in stamps}
    assert sum(computed) == len(stamps), f"stages computed {computed} times by the two runs, {len(stamps)} stages"
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0 and {p.name: p.stat().st_mtime_ns for p in (out / "stages").glob("*.pt")} == stamps


def test_one_group_says_nothing_was_held_out(organism, tmp_path):
    """A yes/no file of one question: its prompts are both the locate and the test split, and the report says so
    (held_out False, a note, and no method can beat random on prompts it was located on)."""
    path = tmp_path / "one.jsonl"
    path.write_text(json.dumps({"question": "Is 3 more than 2?", "label": "yes"}) + "\n")
    report = _quiet(locate_report, organism, f"yesno:{path}", ablations=("zero",), k_values=(1,), capability=False,
                    progress=False)
    assert report.task.held_out is False and any("nothing could be held out" in n for n in report.notes)
    assert not report.ranking["beats_random"].any()
    assert json.loads(json.dumps(report.summary()))["task"]["held_out"] is False


def test_tied_scores_are_not_rank_one(organism, tmp_path):
    """Every corrupted prompt equal to its clean prompt: attribution scores are all 0, and the planted neuron is
    not 'attribution #1' but tied with every other neuron (last place), with a note."""
    g = load_card_planted()
    rows = [{"prompt": f"The {o} said that", "corrupted": f"The {o} said that", "subject": o, "answers": [" she", " he"]}
            for o in g["occupations"][:6]]
    path = tmp_path / "same.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = _quiet(locate_report, organism, f"pairs:{path}", methods=["attribution"], ablations=("zero",),
                    k_values=(1,), capability=False, progress=False)
    n = report.scores["neuron"]["attribution"].numel()
    assert (report.scores["neuron"]["attribution"] == 0).all()
    assert report.rank_of("attribution", "neuron", GENDER_NEURON) == n
    assert "attribution #1" not in repr(report) and any("all" in x and "scores are 0" in x for x in report.notes)


def load_card_planted():
    from lens_bias.organism import load_card

    return load_card("organism")["planted"]["gender_neuron"]


def test_half_precision_is_checked_against_float32(organism, monkeypatch):
    """In bfloat16 the report re-runs each method on a sample in float32 and names the ones whose top units
    change; here a method is made to rank differently in bfloat16 only, and the report says so."""
    from lens_bias.apps.report import precision

    real = precision.run_method

    def skewed(name, model, task, orient, opts, progress):
        scores, meta = real(name, model, task, orient, opts, progress)
        if name == "grad_x_act" and precision.model_dtype(model) == torch.bfloat16:
            scores = {u: -t for u, t in scores.items()}  # what a precision flip of the order would look like
        return scores, meta

    monkeypatch.setattr(precision, "run_method", skewed)
    report = _quiet(locate_report, "organism", "professions", dtype="bfloat16", methods=["attribution", "grad_x_act"],
                    ablations=("zero",), k_values=(1,), capability=False, progress=False)
    flagged = [n for n in report.notes if n.startswith("bfloat16 changes")]
    assert any("grad_x_act" in n for n in flagged), report.notes
    assert not any("attribution (neuron)" in n for n in flagged), flagged
    rows = {(r["method"], r["unit_type"]): r for r in report.precision}
    assert rows[("attribution", "neuron")]["same_top"] and rows[("attribution", "neuron")]["overlap"] >= 0.5


# ---------------------------------------------------------------------------------------
# (f) the real model (SmolLM2-135M-Instruct, dequantized Q4_1), where it is converted in the cache
# ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def real_report(tmp_path_factory):
    """Reduced options (the cheap methods, zero ablation, k = 2 and 8, 5 random draws, 32 prompts) keep it to
    about a minute."""
    from lens_bias.core.model_names import converted_dir

    source = os.environ.get("LENS_BIAS_REAL_MODEL") or (
        "smollm2-135m-instruct" if (converted_dir("smollm2-135m-instruct") / "config.json").is_file() else None)
    if source is None:
        pytest.skip("no converted SmolLM2 in the cache (lens-bias fetch smollm2-135m-instruct) and no "
                    "LENS_BIAS_REAL_MODEL")
    out = tmp_path_factory.mktemp("real") / "professions"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return locate_report(source, "professions", out, methods=["attribution", "grad_x_act", "mean_activation"],
                             ablations=("zero",), k_values=(2, 8), seeds=5, max_prompts=32, progress=False), out


@pytest.mark.slow
def test_real_model_ranking_counts_capability(real_report, browser):
    """SmolLM2: the ranking keeps every model breaker (top-8 > 1 nat) below the clean methods, marks it, and the
    first screen answers from the held-out bias's interval (with the neutral twins resampled it includes 0 on
    the 32 held-out prompts: then nothing may beat random and the answer says 'not found')."""
    report, out = real_report
    r = report.ranking
    assert_capability_order(r, report.loss_budget)
    assert (r["breaks_model"] == (r["d_neutral_loss_kmax"] > BREAKS)).all() and r["breaks_model"].any()
    none = r[r["k_budget"].isna()]
    assert none.empty or none["rank"].min() > r[r["k_budget"].notna()]["rank"].max()
    b = report.baseline
    assert b["bias_clean"] > b["bias_reference"], "she − he is larger on female-stereotyped professions than on twins"
    if b["bias_lo"] > 0:
        top = r.iloc[0]
        assert top["beats_random"] and top["d_loss"] <= report.loss_budget, top
    else:
        assert not r["beats_random"].any() and "not found" in report.answer()
        assert any("not significant" in n for n in report.notes)
    assert "Breaks the model" in report.answer()
    browser(out / "report.html", widths=(1400, 800))
