"""NAS: formula by hand, and the organism's planted negative head ranks first; ablating it
shrinks the precision−recall gap more than ablating random heads."""

import math
import random

import pytest
import torch

from lens_bias.core import LensBiasError, PromptSet
from lens_bias.locate import nas_heatmap, negative_attention_scores
from lens_bias.locate.nas import EPS
from lens_bias.mitigate import head_ablation_hooks
from lens_bias.organism import data_path
from lens_bias.tasks import binary_prompts, evaluate_binary, load_yes_no


@pytest.fixture(scope="module")
def yesno(organism):
    return binary_prompts(organism, load_yes_no(data_path("yesno"))[:50])


def _hand_nas(model, ps, i, layer, head, queries):
    """NAS of one head on prompt i from the full attention pattern, summed position by position:
    Σ_{q∈Q} (A[q,Yes] + A[q,No]) · log((A[q,No] + ε)/(A[q,Yes] + ε))."""
    name = f"blocks.{layer}.attn.hook_pattern"
    _, cache = model.run_with_cache(ps.tokens[i:i + 1], attention_mask=ps.attention_mask[i:i + 1],
                                    names_filter=[name])
    m, last = ps.metadata[i], int(ps.answer_pos[i])
    first = last if queries == "answer" else m["query_start"]
    total = 0.0
    for q in range(first, last + 1):
        an = cache[name][0, head, q, m["neg_cand"]].item()
        ap = cache[name][0, head, q, m["pos_cand"]].item()
        total += (an + ap) * math.log((an + EPS) / (ap + EPS))
    return total


@pytest.mark.parametrize("queries", ["after_instruction", "answer"])
def test_nas_equals_hand_computation(tiny_gpt2, queries):
    from lens_bias.tasks import arithmetic_items

    ps = binary_prompts(tiny_gpt2, arithmetic_items(2))
    res = negative_attention_scores(tiny_gpt2, ps, batch_size=3, progress=False, queries=queries)
    for i, (l, h) in [(0, (1, 2)), (3, (0, 1)), (5, (1, 0))]:
        assert res.per_prompt[i, l, h].item() == pytest.approx(_hand_nas(tiny_gpt2, ps, i, l, h, queries),
                                                               rel=1e-4, abs=1e-6)
    assert torch.allclose(res.nas, res.per_prompt.mean(0))


def test_query_range_is_after_the_instruction(tiny_gpt2):
    """L_I is the first token after the instruction: the instruction's tokens (with BOS) come before it."""
    ps = binary_prompts(tiny_gpt2, [{"question": "Is 2 more than 1?", "label": "yes"}], instructions=["Answer Yes or No."])
    m = ps.metadata[0]
    toks = ps.str_tokens(tiny_gpt2, 0)
    assert toks[m["pos_cand"]] == "ĠYes" and toks[m["neg_cand"]] == "ĠNo"
    assert toks[m["query_start"] - 1] == "." and toks[m["query_start"]] == "Ċ"


def test_planted_negative_head_ranks_first(organism, organism_card, yesno):
    h = organism_card["planted"]["negative_head"]
    res = negative_attention_scores(organism, yesno, progress=False)
    ranking = res.ranking()
    assert res.top_heads(1) == [(h["layer"], h["head"])]
    assert ranking["nas"].iloc[0] > 10 * ranking["nas"].iloc[1]
    # the head puts most of its candidate attention on " No", the others do not prefer it
    assert res.att_neg[h["layer"], h["head"]] > 5 * res.att_pos[h["layer"], h["head"]]
    fig = nas_heatmap(res)
    assert fig.data[0].z[h["layer"]][h["head"]] == pytest.approx(float(res.nas[h["layer"], h["head"]]))


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
