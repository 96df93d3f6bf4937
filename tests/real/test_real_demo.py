"""`lens-bias demo` on the real model says in plain words what it found, and what it names is true: the bias it
reports, the share of it the top heads restore by patching and remove by ablation, the bias after pruning, the
capability measure and the exported model — each recomputed here with plain transformers and hooks on the same
prompts (held-out professions and templates, as it says)."""

import re

import pytest
import torch
from real_reference import layers, logit_diff, record_inputs, zero_heads
from transformers import AutoModelForCausalLM

from lens_bias.apps.demo import professions_split, run_demo

HEAD = re.compile(r"L(\d+)H(\d+)")


@pytest.fixture(scope="module")
def demo(real, tmp_path_factory):
    """The demo as `lens-bias demo` runs it (the default model, seed 0; the session's copy of it, loaded once), once:
    its report and folder."""
    out = tmp_path_factory.mktemp("demo") / "out"
    report = run_demo(out=out, seed=0, model=real)  # the session model: what load_model("smollm2-135m-instruct") gives
    return report, out


@pytest.fixture(scope="module")
def split(real):
    return professions_split(real, seed=0)


def _pairs(tok, ps, corrupted=False):
    """Right-padded ids of a prompt set's prompts (or twins) tokenised by the tokenizer alone, answer positions,
    and the ' she' / ' he' ids."""
    from lens_bias.core import pad

    texts = ps.corrupted_prompts if corrupted else ps.prompts
    rows = [tok(t, add_special_tokens=False).input_ids for t in texts]
    ids, mask = pad(rows, tok.pad_token_id)
    answers = torch.tensor([[tok(" she").input_ids[0], tok(" he").input_ids[0]]] * len(rows))
    return ids, mask, torch.tensor([len(r) - 1 for r in rows]), answers


def _mean_ld(hf, tok, ps, corrupted=False, pre=None) -> float:
    ids, mask, pos, answers = _pairs(tok, ps, corrupted)
    return float(logit_diff(hf, ids, pos, answers, mask, pre=pre).mean())


def test_report_in_plain_words(demo, split):
    """Every step in a sentence, the model named with its quantization note, on held-out professions and
    templates (none shared with the prompts the heads were located on)."""
    report, out = demo
    first = report.splitlines()[0]
    assert "HuggingFaceTB/SmolLM2-135M-Instruct" in first and "Q4_1" in first and "not bit-equal" in first
    for start in ("The bias: ", "Where: ", "Proof, on the held-out prompts: ", "Mitigation: ", "Capability: ",
                  "Export: "):
        assert any(line.startswith(start) for line in report.splitlines()), start
    assert (out / "report.txt").read_text().strip() == report.strip()
    assert not set(split.professions[0]) & set(split.professions[1])
    assert not set(split.templates[0]) & set(split.templates[1])
    assert f"on {len(split.test)} held-out prompts" in report and f"on {len(split.locate)} other prompts" in report


def test_what_it_names_is_true(demo, split, real_hf, real_tok):
    """Recomputed with plain transformers: the bias and its twins' value, the share of the gap patching each named
    head restores (its z from the stereotyped prompt in the twin's run), the share of the held-out excess bias
    zero-ablating the top heads removes, and the bias after pruning."""
    import pandas as pd

    report, out = demo
    bias, twins = (float(x) for x in re.search(r"= ([+-]\d+\.\d+) on \d+ held-out prompts .*?, ([+-]\d+\.\d+) when",
                                                 report).groups())
    base, ref = _mean_ld(real_hf, real_tok, split.test), _mean_ld(real_hf, real_tok, split.test, corrupted=True)
    assert bias == pytest.approx(base, abs=0.005) and twins == pytest.approx(ref, abs=0.005)

    # "restores 42% of the gap (L26H2), ...": activation patching of one head, all positions, on the locate split
    ps = split.locate
    clean_ids, mask, pos, answers = _pairs(real_tok, ps)
    corr_ids = _pairs(real_tok, ps, corrupted=True)[0]
    m_clean = float(logit_diff(real_hf, clean_ids, pos, answers, mask).mean())
    m_corr = float(logit_diff(real_hf, corr_ids, pos, answers, mask).mean())
    where = next(line for line in report.splitlines() if line.startswith("Where: "))
    named = re.findall(r"(\d+)% of the gap \(L(\d+)H(\d+)\)", where)
    assert len(named) == 3
    dh = real_hf.config.head_dim
    for share, l, h in named:
        l, h = int(l), int(h)
        o_proj = layers(real_hf)[l].self_attn.o_proj
        z = record_inputs(real_hf, {"z": o_proj}, clean_ids, mask)[0]["z"]

        def put(x, z=z, h=h):
            x = x.clone()
            x[..., h * dh:(h + 1) * dh] = z[..., h * dh:(h + 1) * dh]
            return x

        m = float(logit_diff(real_hf, corr_ids, pos, answers, mask, pre={o_proj: put}).mean())
        assert float(share) / 100 == pytest.approx((m - m_corr) / (m_clean - m_corr), abs=0.006), (l, h)

    # "zero-ablating the top k (...) removes 70% of the excess bias" on the held-out prompts
    proof = next(line for line in report.splitlines() if line.startswith("Proof, "))
    table = pd.read_csv(out / "ablation_proof.csv")
    for k, units, share in re.findall(r"zero-ablating the top (\d+) \(([^)]*)\) removes (-?\d+)%", proof):
        heads = [(int(a), int(b)) for a, b in HEAD.findall(units)]
        assert len(heads) == int(k)
        removed = (base - _mean_ld(real_hf, real_tok, split.test, pre=zero_heads(real_hf, heads))) / (base - ref)
        row = table[(table.kind == "top") & (table.k == int(k))]
        assert float(row.removed.iloc[0]) == pytest.approx(removed, abs=1e-4)
        assert float(share) / 100 == pytest.approx(removed, abs=0.006)

    # "pruning the top k heads (...) takes the held-out bias from +1.10 to +0.54", in the exported model
    mitigation = next(line for line in report.splitlines() if line.startswith("Mitigation: "))
    pruned = [(int(a), int(b)) for a, b in HEAD.findall(mitigation.split(":")[1])]
    after = float(re.search(r"to ([+-]\d+\.\d+) \(twins", mitigation).group(1))
    exported = AutoModelForCausalLM.from_pretrained(out / "model-pruned", attn_implementation="eager").eval()
    assert after == pytest.approx(_mean_ld(exported, real_tok, split.test), abs=0.005)
    assert _mean_ld(exported, real_tok, split.test) == pytest.approx(
        _mean_ld(real_hf, real_tok, split.test, pre=zero_heads(real_hf, pruned)), abs=1e-4)


def test_attribution_agrees_with_patching_on_heads(demo):
    """Over all 270 heads of the locate split, attribution (one forward + backward) agrees with activation patching,
    as the report says ("Spearman 0.64 over heads, 4 of its top 5 are the same", measured): recomputed from the
    heads table; attribution's top 2 are among patching's top 5."""
    import pandas as pd
    from real_reference import spearman

    report, out = demo
    table = pd.read_csv(out / "heads.csv")
    assert len(table) == 270
    rho = spearman(torch.tensor(table.attribution.values), torch.tensor(table.patching_effect.values))
    said = re.search(r"Spearman (-?\d\.\d+) over heads, (\d) of its top 5 are the same", report)
    top_ap = set(table.nlargest(5, "patching_effect")[["layer", "head"]].itertuples(index=False, name=None))
    top_atp = list(table.nlargest(5, "attribution")[["layer", "head"]].itertuples(index=False, name=None))
    assert float(said.group(1)) == pytest.approx(rho, abs=0.006) and int(said.group(2)) == len(top_ap & set(top_atp))
    assert rho > 0.4 and set(top_atp[:2]) <= top_ap


def test_capability_and_export(demo):
    """"loss on 64 lines of real English" is the capability table's; the exported folder reloads with the logits it
    reports (export's own check: plain transformers, weights bit for bit)."""
    import json

    import pandas as pd

    report, out = demo
    line = next(line for line in report.splitlines() if line.startswith("Capability: "))
    loss, after = (float(x) for x in re.search(r"\(Brown corpus\) (\d+\.\d+) → (\d+\.\d+)", line).groups())
    table = pd.read_csv(out / "before_after.csv").pivot(index="measure", columns="model", values="value")
    assert (loss, after) == pytest.approx((table.loc["neutral_loss", "original"], table.loc["neutral_loss", "pruned"]),
                                          abs=0.0006)
    diff = json.loads((out / "model-pruned" / "lens_bias_export.json").read_text())["max_abs_logit_diff"]
    assert diff <= 1e-4 and f"max |Δlogit| {diff:.1e}" in report


def test_text_loss_equals_transformers(real, real_hf, real_tok):
    """The demo's capability measure, text_loss, is the mean next-token cross-entropy over the lines (batched by
    length, padding ignored): recomputed one line at a time with plain transformers on 8 Brown lines."""
    from lens_bias.tasks import default_neutral_text, text_lines, text_loss

    lines = text_lines(default_neutral_text(real))[:8]
    total, count = 0.0, 0
    for text in lines:
        ids = torch.tensor([real_tok(text, add_special_tokens=False).input_ids])
        with torch.no_grad():
            logits = real_hf(input_ids=ids).logits[0, :-1].float()
        total += float(torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum"))
        count += ids.shape[1] - 1
    assert len({len(real_tok(t).input_ids) for t in lines}) > 1  # lines of several lengths: a padded batch
    assert text_loss(real, lines) == pytest.approx(total / count, abs=1e-4)
