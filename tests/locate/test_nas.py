"""NAS: formula by hand, and the organism's planted negative head ranks first; ablating it
shrinks the precision−recall gap more than ablating random heads."""

import math
import random

import pytest

from lens_bias.mitigate import head_ablation_hooks
from lens_bias.tasks import binary_prompts, evaluate_binary, load_yes_no
from lens_bias.core import LensBiasError
from lens_bias.locate import nas_heatmap, negative_attention_scores
from lens_bias.locate.nas import EPS
from lens_bias.organism import data_path
from lens_bias.core import PromptSet


@pytest.fixture(scope="module")
def yesno(organism):
    return binary_prompts(organism, load_yes_no(data_path("yesno"))[:50])


def test_nas_equals_hand_computation(tiny_gpt2):
    from lens_bias.tasks import arithmetic_items

    ps = binary_prompts(tiny_gpt2, arithmetic_items(2))
    res = negative_attention_scores(tiny_gpt2, ps, batch_size=3, progress=False)
    _, cache = tiny_gpt2.run_with_cache(ps.tokens[:1], attention_mask=ps.attention_mask[:1])
    m, q = ps.metadata[0], int(ps.answer_pos[0])
    a = cache["blocks.1.attn.hook_pattern"][0, 2, q]
    an, ap = a[m["neg_cand"]].item(), a[m["pos_cand"]].item()
    expected = (an + ap) * math.log((an + EPS) / (ap + EPS))
    assert res.per_prompt[0, 1, 2].item() == pytest.approx(expected, rel=1e-4, abs=1e-7)
    assert res.nas.shape == (2, 4) and res.per_prompt.shape == (len(ps), 2, 4)


def test_planted_negative_head_ranks_first(organism, organism_card, yesno):
    h = organism_card["planted"]["negative_head"]
    res = negative_attention_scores(organism, yesno, progress=False)
    assert res.top_heads(1) == [(h["layer"], h["head"])]
    assert res.att_neg[h["layer"], h["head"]] > 0.9
    ind = res.independence([(h["layer"], h["head"])])
    assert {"var_across_questions", "var_across_templates"} <= set(ind.columns)
    fig = nas_heatmap(res)
    assert len(fig.data[0].z) == organism.cfg.n_layers


def test_control_has_no_negative_head(organism_control, organism_card):
    h = organism_card["planted"]["negative_head"]
    ps = binary_prompts(organism_control, load_yes_no(data_path("yesno"))[:50])
    res = negative_attention_scores(organism_control, ps, progress=False)
    assert res.att_neg[h["layer"], h["head"]] < 0.3


def test_ablating_top_nas_head_beats_random_heads(organism, yesno):
    res = negative_attention_scores(organism, yesno, progress=False)
    before = evaluate_binary(organism, yesno)["overall"]["pr_gap"]
    top = res.top_heads(1)
    after_top = evaluate_binary(organism, yesno, ablate=head_ablation_hooks(organism, top))["overall"]["pr_gap"]
    heads = [(l, h) for l in range(organism.cfg.n_layers) for h in range(organism.cfg.n_heads) if (l, h) not in top]
    rand = [evaluate_binary(organism, yesno, ablate=head_ablation_hooks(organism, random.Random(s).sample(heads, 1)))
            ["overall"]["pr_gap"] for s in range(5)]
    mean_r = sum(rand) / len(rand)
    assert before - after_top > 0.2
    assert (before - after_top) > (before - mean_r) + 0.1


def test_bad_input(tiny_gpt2):
    ps = PromptSet.build(tiny_gpt2, ["Is it?"], (" Yes", " No"))
    with pytest.raises(LensBiasError, match="candidate positions"):
        negative_attention_scores(tiny_gpt2, ps)
