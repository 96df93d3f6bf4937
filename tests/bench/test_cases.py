"""The benchmark cases on the shipped models (data/bench): the toolkit's metric equals the build's
independent one, and each case's designed outcome (lens_bias/bench/EXPECTED.md, written before any
method ran) is asserted with a margin. Designed outcomes the trained models did not reproduce are
strict xfails that say what was measured instead (README § Localisation benchmark)."""

import warnings

import pytest
import torch

import lens_bias as lb
from lens_bias.bench import CASES, carriers, get_case, load_truth
from lens_bias.bench.methods import case_metric, case_scores, scores_key
from lens_bias.bench.score import score_case
from lens_bias.core.errors import LensBiasError

BUILT = [n for n, c in CASES.items() if c.available and not c.real]  # real cases: tests/bench/test_real.py
SIGNED = ("activation patching", "attribution (clean grad)", "attribution (corrupted grad)")


@pytest.fixture(scope="module")
def models():
    cache = {}

    def get(case):
        if case.model not in cache:
            cache[case.model] = lb.load_model(str(case.model_dir), device="cpu")
        return cache[case.model]

    return get


@pytest.fixture(scope="module")
def scored(models):
    """(table, scores, truth) of a case, computed once."""
    out, computed = {}, {}

    def get(name):
        if name not in out:
            case = get_case(name)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                key = scores_key(case)
                if key not in computed:
                    computed[key] = case_scores(models(case), case, seeds=20)
                scores = computed[key]
                df = score_case(models(case), case, seeds=20, mitigate=False, scores=scores)
            out[name] = df, scores, load_truth(case.model_dir)
        return out[name]

    return get


def row(df, method, unit):
    r = df[(df["method"] == method) & (df["unit"] == unit)]
    assert len(r) == 1, (method, unit)
    return r.iloc[0]


def random_bar(df, unit):
    r = row(df, "random", unit)
    return r["recall@k"] + 2 * r["recall_std"]


def unit_rank(scores: torch.Tensor, unit) -> int:
    flat = scores.float().reshape(-1)
    return int((flat > flat[unit[0] * scores.shape[-1] + unit[1]]).sum()) + 1


def top_cells(x: torch.Tensor, n: int) -> list[tuple[int, int]]:
    return [divmod(i, x.shape[1]) for i in x.float().reshape(-1).argsort(descending=True)[:n].tolist()]


# ---------------------------------------------------------------------------------------------------
def test_the_benchmark_models_ship_and_a_failed_plant_says_so():
    assert {"case2", "case3", "case4", "case5", "case6", "case7", "case8"} <= set(BUILT)
    assert CASES["case1"].failed  # the distributed plant did not take: bias −0.08 (card), no truth
    with pytest.raises(LensBiasError, match="did not take"):
        get_case("case1")


@pytest.mark.parametrize("name", BUILT)
def test_case_metric_equals_the_builds_own(models, name):
    """lens_bias's prompts, tokenisation and metric reproduce the base value the build measured with
    plain transformers and its own packing (the truth is measured on the same quantity)."""
    case = get_case(name)
    base = float(load_truth(case.model_dir)[f"{case.truth_key}/bias/base"])
    assert case_metric(models(case), case)() == pytest.approx(base, abs=2e-3, rel=2e-3)


# --- case 2: multi-hop circuit ---------------------------------------------------------------------
def test_case2_patching_finds_the_circuit_heads_and_weight_statistics_do_not(scored):
    df, _, _ = scored("case2")
    for m in SIGNED:
        assert row(df, m, "head")["recall@k"] == 1.0 and row(df, m, "head")["beats_baselines"], m
    for m in ("weight norm", "mean |activation|"):
        assert row(df, m, "head")["recall@k"] <= 0.34, m


@pytest.mark.parametrize("name", ["case2", "case8"])
def test_tracing_finds_the_top_mlp_site_and_zero_noise_finds_nothing(scored, name):
    """Causal tracing on the counterfactual twins and LSDM's site choice put the truth's top MLP site
    first; tracing with zero noise (the degraded control) has nothing to restore: recall 0, AUC ½."""
    df, scores, truth = scored(name)
    top = top_cells(truth[f"{name}/bias/pos_mlp_zero"], 1)[0]
    assert top_cells(scores["causal tracing"]["site"], 1)[0] == top
    assert top_cells(scores["LSDM site choice"]["site"], 1)[0] == top
    zero = row(df, "causal tracing (noise 0)", "site")
    assert zero["recall@k"] == 0.0 and zero["AUC"] == 0.5


@pytest.mark.xfail(strict=True, reason="designed: the bias assembled in a middle-layer MLP at the subject's last "
                   "token; measured: every carrier site is in layer 0 (the last token carries most)")
@pytest.mark.parametrize("name", ["case2", "case8"])
def test_designed_mid_layer_subject_site(scored, name):
    _, _, truth = scored(name)
    layer, pos = top_cells(truth[f"{name}/bias/pos_mlp_zero"], 1)[0]
    assert 1 <= layer <= 4 and pos == int(truth[f"{name}/subject_last_pos"])


# --- case 3 and 5: backup, suppression, decoy (yes/no) ------------------------------------------------
def test_case3_signed_methods_find_the_top_heads_and_bottom_the_suppressor(scored):
    """AP and AtP (both gradients) put the truth's top head in their top 2 and rank well above random;
    the suppression head, whose ablation raises the bias most, is at their bottom, while methods that
    score magnitudes (mean |activation|, NAS) put it in their top 3."""
    df, scores, truth = scored("case3")
    z = truth["case3_5/bias/heads_zero"]
    top, sup = top_cells(z, 1)[0], top_cells(-z, 1)[0]
    for m in SIGNED:
        assert unit_rank(scores[m]["head"], top) <= 2, m
        assert unit_rank(scores[m]["head"], sup) >= 44, m
        assert row(df, m, "head")["AUC"] > row(df, "random", "head")["AUC"] + 0.1, m
        assert row(df, m, "head")["recall@k"] > random_bar(df, "head"), m
    for m in ("mean |activation|", "NAS"):
        assert unit_rank(scores[m]["head"], sup) <= 3, m


def test_case3_backup_is_missed_by_every_single_unit_method(scored):
    """The truth shows backup: ablating main and backup together removes far more than the sum of
    their single ablations; the backup alone looks harmless, and no method that estimates an effect
    ranks it in its top 10 (mean |activation| ranks it first — for its size, not its effect)."""
    _, scores, truth = scored("case3")
    main, backup = (0, 0), (2, 6)  # lens_bias_card.json: phase_b.select M, K
    idx = [tuple(map(tuple, (p[:2], p[2:]))) for p in truth["case3_5/head_pairs_index"].int().tolist()]
    z = truth["case3_5/bias/heads_zero"]
    pair = float(truth["case3_5/bias/head_pairs_zero"][idx.index((main, backup))])
    assert pair > float(z[main] + z[backup]) + 0.3 and float(z[backup]) < 0.05
    for m in (*SIGNED, "grad×activation", "NAS", "weight norm"):
        assert unit_rank(scores[m]["head"], backup) > 10, m


def test_case5_nas_and_raw_attention_fall_for_the_decoy(scored):
    """The decoy head attends to " No" but its ablation does nothing: raw attention and NAS rank it in
    their top 5; AP, AtP and gradient × activation rank it below their top 2k."""
    df, _, _ = scored("case5")
    k = int(row(df, "random", "head")["k"])
    assert row(df, "attention to ' No'", "head")["decoy_rank"] <= 3
    assert row(df, "NAS", "head")["decoy_rank"] <= 5
    for m in (*SIGNED, "grad×activation"):
        assert row(df, m, "head")["decoy_rank"] > 2 * k, m
    assert row(df, "NAS", "head")["recall@k"] <= random_bar(df, "head")  # NAS does not locate this bias


# --- case 4: where linear estimates fail -------------------------------------------------------------
def test_case4_patching_gets_the_gated_heads_effect_and_linear_estimates_do_not(scored):
    """On the two heads with the largest ablation effect, activation patching's effect is within 25% of
    the truth; on the gated one (second), the clean-side attribution under-estimates it ≥ 3× and
    gradient × activation gets its sign wrong."""
    _, scores, truth = scored("case4")
    z = truth["case4/bias/heads_zero"]
    first, second = top_cells(z, 2)
    for h in (first, second):
        assert float(scores["activation patching"]["head"][h]) == pytest.approx(float(z[h]), rel=0.25)
    assert float(scores["attribution (clean grad)"]["head"][second]) < float(z[second]) / 3
    assert float(scores["grad×activation"]["head"][second]) < 0 < float(z[second])


@pytest.mark.xfail(strict=True, reason="designed: the corrupted-side gradient under-estimates the mover head ≥ 3×; "
                   "measured: 0.82 vs 1.18 (1.4×) — the clean-side gradient is the one that fails (4.3×)")
def test_designed_case4_corrupted_side_underestimate(scored):
    _, scores, truth = scored("case4")
    z = truth["case4/bias/heads_zero"]
    second = top_cells(z, 2)[1]
    assert float(scores["attribution (corrupted grad)"]["head"][second]) < float(z[second]) / 3


# --- case 6 and 7: CRISPR ---------------------------------------------------------------------------
def test_case6_crispr_finds_the_bias_neuron_above_the_baselines(scored):
    df, scores, truth = scored("case6")
    layers = truth["case6/neuron_layers"].tolist()
    z = truth["case6/bias/neurons_zero"]
    top = top_cells(z, 1)[0]
    for m in ("CRISPR λ=1", "CRISPR λ=0", "grad×P(biased)"):
        assert unit_rank(scores[m]["neuron"][layers], top) == 1, m
        assert row(df, m, "neuron")["beats_baselines"], m
        assert row(df, m, "neuron")["AUC"] > 0.9, m


@pytest.mark.xfail(strict=True, reason="designed: skill disentanglement (λ=1) demotes the skill+bias neuron N_mix "
                   "below where λ=0 ranks it; measured: both rank it 4th (its gold-option attribution is small)")
def test_designed_case6_disentanglement_changes_the_ranking(scored):
    _, scores, truth = scored("case6")
    layers = truth["case6/neuron_layers"].tolist()
    n_mix = (layers.index(3), 1002)  # lens_bias_card.json: cases.case6.intended.N_mix
    assert unit_rank(scores["CRISPR λ=1"]["neuron"][layers], n_mix) > unit_rank(scores["CRISPR λ=0"]["neuron"][layers], n_mix)


def test_case7_the_choice_of_y_hat_matters(scored):
    """When the gold option is already the top choice, attributing P(biased option) finds the truth's
    carriers better than CRISPR's ŷ = best non-gold option."""
    df, _, _ = scored("case7")
    assert row(df, "grad×P(biased)", "neuron")["recall@k"] > row(df, "CRISPR λ=1", "neuron")["recall@k"] + 0.1


@pytest.mark.xfail(strict=True, reason="designed: CRISPR's ŷ misses the truth (recall near random); measured: "
                   "recall 0.52 against random 0.11 — worse than attributing P(biased), far from random")
def test_designed_case7_crispr_near_random(scored):
    df, _, _ = scored("case7")
    assert row(df, "CRISPR λ=1", "neuron")["recall@k"] <= random_bar(df, "neuron")


def test_carriers_of_every_case_hold_most_of_the_positive_effect(scored):
    """Sanity of the truth itself: ablating the carriers together (the build's cumulative top-k
    ablation) removes a large part of each case's bias."""
    for name, key in (("case3", "case3_5"), ("case2", "case2")):
        _, _, truth = scored(name)
        ks = truth[f"{key}/heads_cumulative_k"].tolist()
        cum = truth[f"{key}/bias/heads_cumulative_zero"]
        k = int(carriers(truth[f"{key}/bias/heads_zero"]).sum())
        best = max(float(cum[i]) for i, kk in enumerate(ks) if kk <= max(k, ks[0]))
        assert best > 0.3 * float(truth[f"{key}/bias/base"]), name
