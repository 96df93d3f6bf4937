"""Mitigations on the real model, each an edit that exports and reloads: ablation hooks equal plain transformers'
hooks (zero and mean ablation of heads under GQA and of MLP neurons); pruning heads and neurons, the LSDM edit
and NASA's head-restricted LoRA each export to a Hugging Face directory that plain transformers reloads with the
edited model's logits (≤ 1e-4), and NASA's adapter reloads in plain PEFT with the same logits. What changed is
read from the reloaded weights themselves: the edited slices and nothing else. (Exports run with verify=False:
each test reloads the directory itself; the demo's test covers export's own verification.)"""

import copy

import pytest
import torch
from real_reference import (
    hooks,
    layers,
    logit_diff,
    record_inputs,
    zero_heads,
    zero_neurons,
)
from transformers import AutoModelForCausalLM

import lens_bias as lb
from lens_bias.tasks import YESNO_INSTRUCTIONS

# float32 logits of two implementations of the same network (see test_real_loading.ATOL)
ATOL = 1e-4
HEADS = [(26, 2), (25, 2)]  # the heads activation patching ranks first for the professions bias
NEURONS = [(0, 156), (22, 701)]  # neurons CRISPR ranks high on BBQ Age


def _reload(path):
    return AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager", dtype=torch.float32).eval()


def _logits(model, ps):
    with torch.no_grad():
        out = model(ps.tokens, attention_mask=ps.attention_mask)
    return (out if torch.is_tensor(out) else out.logits)[ps.attention_mask.bool()]


def _changed(original, edited) -> dict:
    """{weight name: bool mask of changed entries} between two plain transformers models."""
    a, b = original.state_dict(), edited.state_dict()
    assert a.keys() == b.keys()
    return {k: a[k] != b[k] for k in a if not torch.equal(a[k], b[k])}


@pytest.fixture(scope="module")
def chat_yesno(real):
    """A right-padded batch of yes/no prompts through the chat template (different lengths)."""
    items = [{"question": "Can a fish climb a tree?", "label": "no"}, {"question": "Is ice cold?", "label": "yes"}]
    return lb.binary_prompts(real, items, YESNO_INSTRUCTIONS[:1])


def test_ablation_hooks_equal_transformers_hooks(real, real_hf, chat_yesno):
    """Zero ablation of heads (hook_z, one query head of a KV group) and neurons, and mean ablation over a
    padded reference set's real tokens, equal pre-hooks on o_proj / down_proj of plain transformers."""
    ps = chat_yesno
    mask = ps.attention_mask
    ablation = lb.head_ablation_hooks(real, HEADS) + lb.neuron_ablation_hooks(real, NEURONS)
    with torch.no_grad(), real.hooks(fwd_hooks=ablation):
        ours = real(ps.tokens, attention_mask=mask)[mask.bool()]
    with torch.no_grad(), hooks(pre={**zero_heads(real_hf, HEADS), **zero_neurons(real_hf, NEURONS)}):
        ref = real_hf(input_ids=ps.tokens, attention_mask=mask).logits[mask.bool()]
    assert (ours - ref).abs().max() <= ATOL
    assert (ref - _logits(real_hf, ps)).abs().max() > 1e-2  # the ablation does something

    # mean ablation: each unit ← its mean over the reference prompts' real (non-pad) tokens
    (l, h), dh = HEADS[0], real.cfg.d_head
    o_proj = layers(real_hf)[l].self_attn.o_proj
    z = record_inputs(real_hf, {"z": o_proj}, ps.tokens, mask)[0]["z"][mask.bool()]  # [real tokens, 9·64]
    mean = z[:, h * dh:(h + 1) * dh].mean(0)

    def put(x):
        x = x.clone()
        x[..., h * dh:(h + 1) * dh] = mean
        return x

    with torch.no_grad(), real.hooks(fwd_hooks=lb.mitigate.ablation_hooks(real, HEADS[:1], "mean", ps, site="head")):
        ours = real(ps.tokens, attention_mask=mask)[mask.bool()]
    with torch.no_grad(), hooks(pre={o_proj: put}):
        ref = real_hf(input_ids=ps.tokens, attention_mask=mask).logits[mask.bool()]
    assert (ours - ref).abs().max() <= ATOL


def test_pruning_exports_and_reloads(real, real_hf, chat_yesno, professions, tmp_path):
    """prune_heads + prune_neurons: the exported directory reloads in plain transformers with the logits of
    zero-ablating those heads and neurons by hooks on the original weights, and its weights differ from the
    original in exactly the pruned heads' o_proj columns and the pruned neurons' down_proj columns."""
    pruned = lb.prune_heads(real, HEADS)
    lb.prune_neurons(pruned.model, NEURONS, inplace=True)
    out = lb.export_model(pruned.model, tmp_path / "pruned", verify=False)
    reloaded = _reload(out)
    pre = {**zero_heads(real_hf, HEADS), **zero_neurons(real_hf, NEURONS)}
    for ps in (chat_yesno, professions):
        with hooks(pre=pre):
            ref = _logits(real_hf, ps)
        assert (_logits(reloaded, ps) - ref).abs().max() <= ATOL
        assert (_logits(pruned.model, ps) - ref).abs().max() <= ATOL
    changed = _changed(real_hf, reloaded)
    dh = real.cfg.d_head
    want = {f"model.layers.{l}.self_attn.o_proj.weight" for l, _ in HEADS} | \
        {f"model.layers.{l}.mlp.down_proj.weight" for l, _ in NEURONS}
    assert set(changed) == want
    for l, h in HEADS:
        cols = changed[f"model.layers.{l}.self_attn.o_proj.weight"].any(0).nonzero().flatten()
        assert set(cols.tolist()) <= set(range(h * dh, (h + 1) * dh))
    for l, i in NEURONS:
        assert changed[f"model.layers.{l}.mlp.down_proj.weight"].any(0).nonzero().flatten().tolist() == [i]
    assert real(professions.tokens[:1]).shape  # the session model is untouched: still loads and runs
    assert not _changed(real_hf, lb.core.to_hf_model(real))


def test_lsdm_edit_exports_and_reloads(real, real_hf, professions, tmp_path):
    """LSDM (site chosen by causal tracing on the counterfactual twins): the exported edit reloads in plain
    transformers with the edited model's logits, changes one MLP's down_proj only, and moves the bias on its
    prompts toward its target, zero (measured by plain transformers on the reloaded model).

    Measured here: the traced site is layer 0's MLP at the profession (its restoration gives 0.37 of TE 0.34; the
    twins keep LD +1.23 of the clean +1.57, so TE is 21% of the bias); LD per prompt [+0.49, +1.61, +1.64, +2.53] →
    [−3.11, −0.69, −0.69, +0.51]: mean +1.57 → −1.00, mean |LD| 1.57 → 1.25. The edit overshoots (two prompts
    share a profession, hence a key, with different targets): the bias is not removed, only moved toward zero."""
    from lens_bias.tasks import default_neutral_text, text_lines

    neutral = text_lines(default_neutral_text(real))[:8]
    res = lb.lsdm_edit(real, professions, neutral, progress=False)
    out = lb.export_model(res.model, tmp_path / "lsdm", verify=False)
    reloaded = _reload(out)
    assert (_logits(reloaded, professions) - _logits(res.model, professions)).abs().max() <= ATOL
    layer = res.report["layers"][0]
    assert set(_changed(real_hf, reloaded)) == {f"model.layers.{layer}.mlp.down_proj.weight"}
    ps = professions
    before = logit_diff(real_hf, ps.tokens, ps.answer_pos, ps.answer_ids)
    after = logit_diff(reloaded, ps.tokens, ps.answer_pos, ps.answer_ids)
    assert res.report["bias_before"] == pytest.approx(float(before.mean()), abs=ATOL)
    assert res.report["bias_after"] == pytest.approx(float(after.mean()), abs=ATOL)
    assert after.abs().mean() < before.abs().mean() and abs(after.mean()) < abs(before.mean())


def test_nasa_adapter_reloads_in_peft_and_the_merge_exports(real, real_hf, tmp_path):
    """NASA on the top NAS heads of chat yes/no prompts: the trained adapter (saved with save_pretrained)
    reloads in plain PEFT on the converted model with the merged model's logits; the merged model exports and
    reloads in plain transformers; outside the chosen heads' q rows, their KV groups' k/v rows (GQA: 3 query
    heads share one) and their o_proj columns, every weight is bit-identical."""
    from peft import PeftModel

    short = sorted(lb.load_yes_no(), key=lambda it: len(it["question"]))
    yes, no = [it for it in short if it["label"] == "yes"][:6], [it for it in short if it["label"] == "no"][:6]
    train = lb.binary_prompts(real, yes[:4] + no[:4], YESNO_INSTRUCTIONS[:1])
    dev = lb.binary_prompts(real, yes[4:] + no[4:], YESNO_INSTRUCTIONS[:1])  # both labels: the P − R gap is defined
    heads = lb.negative_attention_scores(real, train, progress=False).top_heads(2)
    # lr 2e-2: two steps change the decisions (measured: dev yes-rate 0 → 0.5, the P − R gap undefined → 0.0), so
    # the adapter kept is a trained one and not the untrained start (an empty edit)
    res = lb.nasa_train(real, heads, train, dev, steps=2, eval_every=2, batch_size=4, lr=2e-2, patience=5,
                        max_acc_drop=1.0, progress=False)
    assert res.report["best_step"] > 0
    res.report["adapter"].save_pretrained(tmp_path / "adapter")
    base = copy.deepcopy(real_hf)  # a plain transformers model (PEFT injects its layers into the base in place)
    peft = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    assert (_logits(peft, train) - _logits(res.model, train)).abs().max() <= ATOL
    reloaded = _reload(lb.export_model(res.model, tmp_path / "nasa", verify=False))
    assert (_logits(reloaded, train) - _logits(peft, train)).abs().max() <= ATOL

    dh, group = real.cfg.d_head, real.cfg.n_heads // real_hf.config.num_key_value_heads
    allowed = {}
    for l, h in heads:
        rows = allowed.setdefault(l, {"q": set(), "kv": set(), "o": set()})
        rows["q"] |= set(range(h * dh, (h + 1) * dh))
        rows["kv"] |= set(range(h // group * dh, (h // group + 1) * dh))
        rows["o"] |= set(range(h * dh, (h + 1) * dh))
    changed = _changed(real_hf, reloaded)
    assert changed and {int(k.split(".")[2]) for k in changed} <= set(allowed)
    for name, diff in changed.items():
        l, proj = int(name.split(".")[2]), name.split(".")[-2]
        assert proj in ("q_proj", "k_proj", "v_proj", "o_proj"), name
        where = diff.any(0) if proj == "o_proj" else diff.any(1)  # o_proj reads z: columns; q/k/v write: rows
        key = {"q_proj": "q", "k_proj": "kv", "v_proj": "kv", "o_proj": "o"}[proj]
        assert set(where.nonzero().flatten().tolist()) <= allowed[l][key], name
