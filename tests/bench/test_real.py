"""The real-model cases (SmolLM2-135M-Instruct; lens_bias/bench/real): the shipped truth reproduces — random
cells recomputed with full forwards of the Hugging Face model and plain hooks, independent of lens_bias and of
the build's shortcuts —, lens_bias's metric equals the truth's base value (its prompts, chat template and
tokenisation are the ones the truth was measured on), a case says clearly when the model is missing, and the
mutation check's degraded methods score below their intact versions here too.

The model is not shipped: CI fetches it (`lens-bias fetch smollm2-135m-instruct` in .ci/run); elsewhere these
tests skip, saying so, when it is not on the machine (and fail when CI is set)."""

import os
import random
import warnings

import pytest
import torch

from lens_bias.bench import CASES, auc, carriers, get_case, load_truth, recall_at_k
from lens_bias.core.errors import LensBiasError

REAL = [n for n, c in CASES.items() if c.real and c.built]


def _need_model():
    missing = next((c.model_missing for c in CASES.values() if c.real), None)
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"CI is set but {missing}")
        pytest.skip(missing)


@pytest.fixture(scope="module")
def hf():
    _need_model()
    from lens_bias.bench.real.truth import load_hf
    from lens_bias.core.model_names import converted_dir

    return load_hf(converted_dir("smollm2-135m-instruct"))


@pytest.fixture(scope="module")
def lens_model():
    _need_model()
    import lens_bias as lb

    return lb.load_model("smollm2-135m-instruct")


def test_real_cases_are_built_and_shipped_small():
    assert {"rprof", "ryesno"} <= set(REAL), REAL  # the others: `python -m lens_bias.bench.real build CASE`
    for name in REAL:
        case = CASES[name]
        size = sum(p.stat().st_size for p in case.model_dir.rglob("*") if p.is_file())
        assert size < 5e6, (name, size)  # truth tables and prompts, no model, no activations
        assert not list(case.model_dir.rglob("*.bin")) and not (case.model_dir / "model.safetensors").exists()


def test_a_real_case_says_when_its_model_is_missing(monkeypatch, tmp_path):
    import lens_bias.core.model_names as names

    monkeypatch.setenv("LENS_BIAS_CACHE", str(tmp_path))
    monkeypatch.setattr(names, "package_file", lambda entry: None)
    case = CASES["rprof"]
    assert not case.available and "lens-bias fetch smollm2-135m-instruct" in case.model_missing
    with pytest.raises(LensBiasError, match="not on this machine.*lens-bias fetch smollm2-135m-instruct"):
        get_case("rprof")


@pytest.mark.parametrize("name", REAL)
def test_truth_cells_reproduce_with_plain_hooks(hf, name):
    """Random cells of the shipped truth (half uniform, half among the largest effects) recomputed from
    scratch: full forwards of the HF model, the unit set by a forward hook at every position (or its one),
    means and donors from this run. Tolerance: float32 over 30 layers; logits of size ~20 agree to ~1e-5
    relative, so effects agree to 2e-4 (far below the carriers' effects, ≥ 1e-2)."""
    from lens_bias.bench.real.check import recompute_cell, truth_cells
    from lens_bias.bench.real.truth import SPECS, case_rows, donors

    model, tok = hf
    spec = SPECS[name]
    case = CASES[name]
    truth = load_truth(case.model_dir)
    seqs = case_rows(spec, tok, model.lm_head.weight, case.model_dir)
    donor = donors(seqs, spec.kind)
    cells = truth_cells(truth, name, seed=random.Random(name).randrange(10**6), n=2)
    for cell in cells:
        got = recompute_cell(model, seqs, cell, donor)
        assert got == pytest.approx(cell["value"], abs=2e-4), cell


@pytest.mark.parametrize("name", REAL)
def test_lens_bias_metric_equals_the_truths_base(lens_model, name):
    from lens_bias.bench.methods import case_metric

    case = get_case(name)
    base = float(load_truth(case.model_dir)[f"{case.truth_key}/bias/base"])
    assert case_metric(lens_model, case)() == pytest.approx(base, abs=1e-3)


# --- the mutation check's degraded methods, on the real cases -------------------------------------------
def _scores_against(scores: torch.Tensor, effect: torch.Tensor) -> tuple[float, float]:
    pos = carriers(effect)
    return recall_at_k(scores, pos), auc(scores, pos)


@pytest.mark.parametrize("tname", ["patch", pytest.param("zero", marks=pytest.mark.xfail(strict=True, reason=(
    "measured: against the zero-ablation truth the mutant (= gradient × activation, the first-order estimate of "
    "zero ablation) ranks rprof's carrier heads as well as the intact estimate or better (16 pairs: recall 0.37 "
    "vs 0.30, AUC 0.598 vs 0.594) — the mutation is only visible against the truth attribution estimates")))])
def test_attribution_without_the_corrupted_baseline_scores_below_attribution(lens_model, tname):
    """Mutation 'attribution: gradient × activation (no corrupted baseline)': ∂m/∂a · a instead of
    ∂m/∂a · (a_clean − a_corr). On rprof's heads, against the truth attribution estimates (noising patch:
    the clean prompt with the twin's head), the intact estimate ranks the carriers better; against the zero
    truth it does not (strict xfail: a finding, README)."""
    from lens_bias.core.hooks import hook_name
    from lens_bias.locate.attribution import (
        activations_and_gradients,
        attribution_patching,
    )
    from lens_bias.tasks.pairs import load_prompt_pairs

    case = get_case("rprof")
    truth = load_truth(case.model_dir)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ps = load_prompt_pairs(lens_model, case.model_dir / "data" / case.data)[:16]
    intact = attribution_patching(lens_model, ps, ["head"], at="clean")["head"].values
    names = [hook_name("head", l) for l in range(lens_model.cfg.n_layers)]
    acts, grads, _ = activations_and_gradients(lens_model, ps, ps.tokens, names)
    mutant = torch.stack([(grads[n] * acts[n] * len(ps)).mean(0).sum((0, -1)) for n in names])  # delta = a_g
    eff = truth[f"rprof/bias/heads_{tname}"]
    (ri, ai), (rm, am) = _scores_against(intact, eff), _scores_against(mutant, eff)
    assert ai > am and ri >= rm, (tname, ri, ai, rm, am)


@pytest.mark.xfail(strict=True, reason=(
    "measured: on ryesno (6 method items) NAS's log-ratio terms rank the zero-truth carrier heads below the "
    "raw attention to ' No' they refine (recall 0.32 vs 0.35, AUC 0.56 vs 0.62): the mutation is not visible "
    "on the real model — a finding, README"))
def test_nas_as_raw_attention_scores_below_nas(lens_model, monkeypatch):
    """Mutation 'NAS: raw attention to No': the summed attention to ' No' instead of NAS's log-ratio terms,
    on ryesno's heads against the zero-ablation truth (strict xfail: it does not score below NAS here)."""
    from lens_bias.bench.methods import _items
    from lens_bias.locate import nas
    from lens_bias.tasks.yesno import binary_prompts

    if not CASES["ryesno"].built:
        pytest.skip("ryesno's truth is not shipped yet: python -m lens_bias.bench.real build ryesno")
    case = get_case("ryesno")
    eff = load_truth(case.model_dir)["ryesno/bias/heads_zero"]
    yn = binary_prompts(lens_model, _items(case, case.data)[:6])
    intact = nas.negative_attention_scores(lens_model, yn, progress=False).values
    monkeypatch.setattr(nas, "nas_terms", lambda att_neg, att_pos, queries: (att_neg * queries.to(att_neg.dtype)).sum(-1))
    mutant = nas.negative_attention_scores(lens_model, yn, progress=False).values
    (ri, ai), (rm, am) = _scores_against(intact, eff), _scores_against(mutant, eff)
    assert ai > am, (ri, ai, rm, am)


# --- the shipped benchmark scores (README's real-model table) reproduce ----------------------------------
def test_a_methods_shipped_scores_reproduce(lens_model):
    """Attribution patching (clean grad) on rprof's heads, recomputed from the method split, scores against each
    shipped truth (zero, mean, resample, patch, denoise) the recall@k and AUC of benchmark_scores.json (written by
    `bench_localization.py --ship`, the README table), and zero-ablating its top-k heads removes the shipped
    share of the held-out bias. Tolerance: float32 gradients of one forward/backward differ across CPUs by ~1e-6
    relative, which can swap only near-tied heads: AUC (one swap = 1/(k·(270−k)) ≈ 1e-4) to 1e-3, recall@k to one
    head (1/k), the bias share to 1e-3 (a sum over 18 prompts of logits of size ~10, float32)."""
    import json

    from lens_bias.bench.methods import case_metric
    from lens_bias.bench.score import mitigation, real_truths, score_real
    from lens_bias.locate.attribution import attribution_patching
    from lens_bias.tasks.capability import text_loss
    from lens_bias.tasks.pairs import load_prompt_pairs

    case = get_case("rprof")
    rows = json.loads((case.model_dir / "benchmark_scores.json").read_text())["rprof"]
    shipped = {r["truth"]: r for r in rows if r["method"] == "attribution (clean grad)" and r["unit"] == "head"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ps = load_prompt_pairs(lens_model, case.model_dir / "data" / case.data)
    s = attribution_patching(lens_model, ps, ["head"], at="clean")["head"].values.float()
    truths = real_truths(case, load_truth(case.model_dir), "head", tuple(s.shape))
    assert set(truths) == set(shipped) == {"zero", "mean", "resample", "patch", "denoise"}
    for name, t in truths.items():
        rec, area, k = score_real(s[None], t)
        want = shipped[name]
        assert k == want["k"], name
        assert float(area[0]) == pytest.approx(want["AUC"], abs=1e-3), name
        assert float(rec[0]) == pytest.approx(want["recall@k"], abs=1 / k + 1e-9), name
    k = shipped["zero"]["k"]
    top = [divmod(int(i), s.shape[1]) for i in s.reshape(-1).argsort(descending=True)[:k]]
    bias = case_metric(lens_model, case)
    neutral = (case.model_dir / "data" / "neutral.txt").read_text()
    got = mitigation(lens_model, case, "head", top, bias, neutral, (bias(), float(text_loss(lens_model, neutral))))
    assert got["bias_removed"] == pytest.approx(shipped["zero"]["bias_removed"], abs=1e-3)
