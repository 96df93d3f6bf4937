"""The table of locate methods: a new method is its file plus one REGISTRY entry, and batch runs and the
in-memory adapter (locate_units, what reports and benchmarks call) pick it up."""

import importlib.util
from pathlib import Path

import torch
from transformer_lens.utilities import get_act_name

from lens_bias.core.prompts import PromptSet
from lens_bias.runs import REGISTRY, attribute_dataset, read_manifest
from lens_bias.runs.registry import locate_units, methods_for

_spec = importlib.util.spec_from_file_location("toy_method", Path(__file__).with_name("toy_method.py"))
toy_method = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(toy_method)


def test_a_toy_method_is_one_file_and_one_entry(organism, organism_card, tmp_path, monkeypatch):
    g = organism_card["planted"]["gender_neuron"]
    prompts = [t.format(o) for o in g["occupations"][:4] + g["male_occupations"][:3] for t in g["templates"][:2]]
    ps = PromptSet.build(organism, prompts, (" she", " he"))
    monkeypatch.setitem(REGISTRY, "toy", toy_method.RUN)  # the one line
    # ground truth: TransformerLens' own cache, read at the last real token of each prompt
    names = [get_act_name("post", l) for l in range(organism.cfg.n_layers)]
    with torch.no_grad():
        _, cache = organism.run_with_cache(ps.tokens, attention_mask=ps.attention_mask, names_filter=names)
    last = ps.attention_mask.sum(1) - 1
    want = torch.stack([cache[n][torch.arange(len(ps)), last].mean(0) for n in names])
    tol = dict(atol=1e-5 * want.abs().max().item(), rtol=1e-5)
    assert "toy" in methods_for("pairs") and "toy" not in methods_for("yesno")
    torch.testing.assert_close(locate_units(organism, "toy", ps)["neuron"], want, **tol)
    batch = attribute_dataset(organism, "toy", ps, tmp_path / "run", chunk_size=5, progress=False)
    torch.testing.assert_close(batch.values, want, **tol)
    assert read_manifest(tmp_path / "run")["n_chunks"] == 3  # 14 prompts in chunks of 5


def test_locate_units_of_a_shipped_method_are_its_direct_result(organism):
    """NAS through the table (one in-memory chunk, mapped to [layer, head]) equals the direct call."""
    from lens_bias.locate.nas import negative_attention_scores
    from lens_bias.organism import data_path
    from lens_bias.tasks.yesno import binary_prompts, load_yes_no

    ps = binary_prompts(organism, load_yes_no(data_path("yesno"))[:6])
    got = locate_units(organism, "nas", ps)
    assert set(got) == {"head"} and "nas" in methods_for("yesno")
    torch.testing.assert_close(got["head"], negative_attention_scores(organism, ps, progress=False).values)


def test_the_report_runs_a_registered_method_it_has_no_runner_for(organism, monkeypatch):
    """The locate report lists the toy (before random) for a pairs task and runs it through locate_units:
    its neuron scores are the cached activations' mean, signed by the task's orientation; layer = Σ neurons."""
    from lens_bias.apps.report.methods import applicable_methods, run_method
    from lens_bias.apps.report.tasks import resolve_task

    monkeypatch.setitem(REGISTRY, "toy", toy_method.RUN)
    methods, _ = applicable_methods("pairs")
    assert methods[-2:] == ["toy", "random"] and "toy" not in applicable_methods("yesno")[0]
    task = resolve_task(organism, "professions", max_prompts=8)
    ps = task.locate
    names = [get_act_name("post", l) for l in range(organism.cfg.n_layers)]
    with torch.no_grad():
        _, cache = organism.run_with_cache(ps.tokens, attention_mask=ps.attention_mask, names_filter=names)
    last = ps.attention_mask.sum(1) - 1
    want = -torch.stack([cache[n][torch.arange(len(ps)), last].mean(0) for n in names])
    scores, meta = run_method("toy", organism, task, {"sign": -1.0}, {}, False)
    tol = dict(atol=1e-5 * want.abs().max().item(), rtol=1e-5)
    torch.testing.assert_close(scores["neuron"], want, **tol)
    torch.testing.assert_close(scores["layer"][:, 1], want.sum(1), atol=tol["atol"] * want.shape[1], rtol=1e-5)
    assert scores["layer"][:, 0].isnan().all()  # [layer, (attn, mlp)]: no heads scored
    assert "locate_units" in meta["rule"]


def test_the_benchmark_scores_a_registered_method_it_has_no_runner_for(monkeypatch):
    """The benchmark's case 1 (pairs, neuron units) gets the toy's scores without an edit of bench/:
    the cached activations' mean over the case's prompts; a BBQ case gets none (the toy runs on pairs)."""
    import lens_bias as lb
    from lens_bias.bench import CASES, get_case
    from lens_bias.bench.methods import registered_scores
    from lens_bias.tasks.pairs import load_prompt_pairs

    monkeypatch.setitem(REGISTRY, "toy", toy_method.RUN)
    case = CASES["case1"]  # its model (bench-gender) and pairs are shipped; only its planted truth is missing
    model = lb.load_model(str(case.model_dir), device="cpu")
    ps = load_prompt_pairs(model, case.model_dir / "data" / case.data)
    names = [get_act_name("post", l) for l in range(model.cfg.n_layers)]
    with torch.no_grad():
        _, cache = model.run_with_cache(ps.tokens, attention_mask=ps.attention_mask, names_filter=names)
    last = ps.attention_mask.sum(1) - 1
    want = torch.stack([cache[n][torch.arange(len(ps)), last].mean(0) for n in names])
    got = registered_scores(model, case)
    assert list(got) == ["toy"] and list(got["toy"]) == ["neuron"]
    torch.testing.assert_close(got["toy"]["neuron"], want, atol=1e-5 * want.abs().max().item(), rtol=1e-5)
    assert registered_scores(model, get_case("case6")) == {}
