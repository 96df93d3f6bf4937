"""The real-model truth's exhaustive-ablation engine (lens_bias/bench/real/engine.py) against full forwards of
the same Hugging Face model with plain hooks (check.py) — on a tiny random Llama, so it runs everywhere: every
shortcut (cached residuals, the clean run's keys and values before the first intervened position, the shared
prefix run once, donor values) must give the effect a full hooked forward gives. The groups come from the
build's own `unit_group` (restart layer and position, shared prefix); planted bugs caught here: a restart one
position late, the shared prefix not intervened, a donor value read one position early."""

import pytest
import torch

from lens_bias.bench.real.check import recompute_cell
from lens_bias.bench.real.engine import (
    Engine,
    Group,
    Seqs,
    Spec,
    causal_rows,
    shared_prefix,
)
from lens_bias.bench.real.truth import unit_group


@pytest.fixture(scope="module")
def tiny():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=32, tie_word_embeddings=True,
                      initializer_range=0.3)  # large weights: every cell moves the metric visibly
    model = LlamaForCausalLM(cfg).eval()
    g = torch.Generator().manual_seed(1)
    n, T = 5, 6
    clean = [[7] + torch.randint(8, 64, (T - 1,), generator=g).tolist() for _ in range(n)]  # one shared token
    corr = [[7] + torch.randint(8, 64, (T - 1,), generator=g).tolist() for _ in range(n)]
    ids, pos, allow, real = causal_rows(clean + corr, 0)
    a = torch.tensor([[3, 4]] * (2 * n))
    W = model.lm_head.weight

    def values(h, rows):
        return (h[:, 0] * (W[a[rows, 0]] - W[a[rows, 1]])).sum(-1, keepdim=True)

    def metrics(v):
        return {"bias": v[:n, 0].mean() - v[n:, 0].mean()}

    seqs = Seqs(ids, pos, allow, real, torch.full((2 * n, 1), T - 1), values, metrics, shared=shared_prefix(ids, real),
                meta={"answers": a, "twin": torch.cat([torch.arange(n, 2 * n), torch.arange(n)]),
                      "clean": torch.arange(n), "corrupted": torch.arange(n, 2 * n)})
    return model, seqs, Engine(model, seqs, rows_per_batch=7)


CELLS = [("head", 1, 2, None, "zero"), ("head", 0, 3, None, "mean"), ("head", 2, 0, None, "patch"),
         ("head", 1, 1, None, "denoise"), ("head", 2, 3, None, "resample"), ("neuron", 0, 5, None, "zero"),
         ("neuron", 1, 40, None, "mean"), ("mlp_out", 0, None, 0, "zero"), ("mlp_out", 1, None, 3, "denoise"),
         ("attn_out", 2, None, 5, "mean"), ("attn_out", 0, None, 2, "resample"), ("mlp", 1, None, None, "mean"),
         ("attn", 0, None, None, "patch")]


def test_engine_effects_equal_full_hooked_forwards(tiny):
    model, seqs, e = tiny
    donor = torch.roll(torch.arange(seqs.n), 1)
    groups = [unit_group(e, seqs, site, layer, index, method, pos, donor) for site, layer, index, pos, method in CELLS]
    got = e.run(groups)  # batched: groups share batches where their start and first position agree
    for c, g in zip(CELLS, got):
        cell = dict(zip(("site", "layer", "index", "position", "method"), c))
        want = recompute_cell(model, seqs, cell, donor)
        assert g["bias"] == pytest.approx(want, abs=1e-5), c
        assert abs(want) > 1e-4, c  # each cell moves the metric: a shortcut that changes nothing would fail


def test_engine_base_equals_the_hf_forward(tiny):
    model, seqs, e = tiny
    with torch.no_grad():
        lg = model(input_ids=seqs.ids).logits[:, -1]
    ld = lg[:, 3] - lg[:, 4]
    n = seqs.n // 2
    assert e.base["bias"] == pytest.approx(float(ld[:n].mean() - ld[n:].mean()), abs=1e-5)


def test_a_set_of_units_equals_the_full_forward(tiny):
    """Pairs and cumulative sets: several units ablated together from the earliest layer."""
    model, seqs, e = tiny
    specs = [Spec("head", 0, 1, e.value("head", 0, 1, "zero")), Spec("neuron", 2, 7, e.value("neuron", 2, 7, "zero"))]
    got = e.run([Group(specs, torch.arange(seqs.n), 0, seqs.shared, True)])[0]["bias"]
    hooks = []
    for layer, mod, sl in ((0, model.model.layers[0].self_attn.o_proj, slice(8, 16)),
                           (2, model.model.layers[2].mlp.down_proj, slice(7, 8))):
        def pre(m, a, sl=sl):
            x = a[0].clone()
            x[..., sl] = 0
            return (x,)
        hooks.append(mod.register_forward_pre_hook(pre))
    try:
        with torch.no_grad():
            lg = model(input_ids=seqs.ids).logits[:, -1]
    finally:
        for h in hooks:
            h.remove()
    ld = lg[:, 3] - lg[:, 4]
    n = seqs.n // 2
    assert got == pytest.approx(e.base["bias"] - float(ld[:n].mean() - ld[n:].mean()), abs=1e-5)


def test_the_real_truth_imports_nothing_from_lens_bias():
    """engine/truth/check/rows use torch and transformers only (the truth checks the toolkit, so it must not
    share its code); the command line (__main__) and the data selection may use lens_bias helpers."""
    import ast
    from pathlib import Path

    from lens_bias.bench import real

    for name in ("engine", "truth", "check", "rows"):
        tree = ast.parse((Path(real.__file__).parent / f"{name}.py").read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                mod = node.module or ""
                assert not mod.startswith("lens_bias") and (node.level == 0 or node.level == 1), (name, mod)
                if node.level == 1:
                    assert mod in ("engine", "rows", "check"), (name, mod)
            elif isinstance(node, ast.Import):
                assert not any(a.name.startswith("lens_bias") for a in node.names), name
