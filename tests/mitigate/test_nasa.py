"""NASA: a LoRA adapter restricted to chosen heads (others bit-identical after training), saved and
reloaded in plain peft; training on the organism shrinks the planted negative bias."""

import random

import pytest
import torch

from lens_bias.core import (
    LensBiasError,
    hf_state_dict,
    load_hf_weights,
    load_model,
    save_random_model,
)
from lens_bias.locate import negative_attention_scores
from lens_bias.mitigate import (
    export_model,
    head_lora_config,
    head_lora_model,
    head_slices_unchanged,
    nas_gap_curve,
    nasa_train,
)
from lens_bias.organism import data_path
from lens_bias.tasks import binary_prompts, evaluate_binary, load_yes_no

IDS = torch.tensor([[50, 312, 77, 1024, 5, 901, 33], [7, 8, 9, 10, 11, 12, 13]])


def _train_a_little(peft_model, steps=5):
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=5e-2)
    peft_model.train()
    for _ in range(steps):
        out = peft_model(input_ids=IDS, labels=IDS)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    return peft_model.eval()


def test_lora_config_targets_attention_of_the_heads_layers(tiny_gpt2, tiny_llama):
    cfg = head_lora_config(tiny_gpt2, [(1, 2), (1, 0)])
    assert set(cfg.target_modules) == {"attn.c_attn", "attn.c_proj"} and cfg.layers_to_transform == [1]
    assert cfg.layers_pattern == "h" and cfg.fan_in_fan_out
    cfg = head_lora_config(tiny_llama, [(0, 3)], modules=("q", "o"))
    assert set(cfg.target_modules) == {"q_proj", "o_proj"} and cfg.layers_to_transform == [0]


@pytest.mark.parametrize("family,heads,modules", [("gpt2", [(1, 2)], ("q", "k", "v", "o")),
                                                  ("llama", [(0, 1), (1, 3)], ("q", "k", "v", "o")),
                                                  ("llama", [(1, 0)], ("q", "o"))])
def test_only_the_selected_heads_change(family, heads, modules, tmp_path, gpt2_tokenizer_dir):
    from peft import PeftModel

    path = save_random_model(family, tmp_path / family, gpt2_tokenizer_dir, seed=2, n_kv_heads=2)
    model = load_model(path, device="cpu")
    peft_model = _train_a_little(head_lora_model(model, heads, modules=modules))
    merged = load_hf_weights(model, peft_model.merge_and_unload())
    unchanged = head_slices_unchanged(model, merged, heads)
    assert all(unchanged.values()), [k for k, v in unchanged.items() if not v]
    # and the selected heads did change (the check can fail)
    before, after = hf_state_dict(model), hf_state_dict(merged)
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed and all("attn" in k for k in changed)
    # the adapter saves and loads in plain peft with the same logits
    peft_model = _train_a_little(head_lora_model(model, heads, modules=modules))
    peft_model.save_pretrained(tmp_path / "adapter")
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, attn_implementation="eager")
    reloaded = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    with torch.no_grad():
        assert (reloaded(input_ids=IDS).logits - peft_model(input_ids=IDS).logits).abs().max() < 1e-5


def test_slice_check_sees_a_change_outside_the_heads(tiny_gpt2):
    from lens_bias.core import clone_model

    other = clone_model(tiny_gpt2)
    with torch.no_grad():
        hf_state_dict(other)["transformer.h.1.attn.c_attn.weight"][:, 0] += 1  # head 0's query
    result = head_slices_unchanged(tiny_gpt2, other, [(1, 2)])
    assert not result["transformer.h.1.attn.c_attn.weight"]
    assert head_slices_unchanged(tiny_gpt2, other, [(1, 0)])["transformer.h.1.attn.c_attn.weight"]


def test_bad_heads_and_architectures(tiny_gpt2, tmp_path, gpt2_tokenizer_dir):
    with pytest.raises(LensBiasError, match=r"head \(1, 7\) out of range"):
        head_lora_config(tiny_gpt2, [(1, 7)])
    with pytest.raises(LensBiasError, match="out of range"):
        head_lora_model(tiny_gpt2, [(5, 0)])
    with pytest.raises(LensBiasError, match="no heads"):
        head_lora_config(tiny_gpt2, [])
    with pytest.raises(LensBiasError, match="modules"):
        head_lora_config(tiny_gpt2, [(0, 0)], modules=("x",))
    t5 = load_model(save_random_model("t5", tmp_path / "t5", gpt2_tokenizer_dir), device="cpu")
    with pytest.raises(LensBiasError, match="no head-restricted LoRA"):
        head_lora_config(t5, [(0, 0)])


def test_nasa_on_the_organism_shrinks_the_negative_bias(organism, organism_card, tmp_path):
    h = organism_card["planted"]["negative_head"]
    head = (h["layer"], h["head"])
    items = load_yes_no(data_path("yesno"))
    random.Random(0).shuffle(items)
    train, dev, test = (binary_prompts(organism, items[a:b]) for a, b in ((0, 150), (150, 190), (190, 290)))
    result = nasa_train(organism, [head], train, dev, steps=60, eval_every=20, progress=False)
    before = evaluate_binary(organism, test)["overall"]
    after = evaluate_binary(result.model, test)["overall"]
    assert before["pr_gap"] > 0.3
    assert after["pr_gap"] < before["pr_gap"] / 2 and after["accuracy"] >= before["accuracy"] - 0.05
    nas_before = negative_attention_scores(organism, test, progress=False).nas[head]
    nas_after = negative_attention_scores(result.model, test, progress=False).nas[head]
    assert nas_after < nas_before / 1.5
    assert all(head_slices_unchanged(organism, result.model, [head]).values())
    assert result.report["before"] == evaluate_binary(organism, dev)["overall"]  # HF-side and bridge evaluation agree
    curve = nas_gap_curve(result)
    assert list(curve["step"])[:2] == [0, 20] and curve["dev_pr_gap"].notna().all()
    # the merged model exports, and plain transformers reloads it with the same logits
    from transformers import AutoModelForCausalLM

    out = export_model(result.model, tmp_path / "nasa")
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        ours = result.model(test.tokens[:4], attention_mask=test.attention_mask[:4])
        theirs = reloaded(input_ids=test.tokens[:4], attention_mask=test.attention_mask[:4]).logits
    assert (ours - theirs).abs().max().item() < 1e-4
    assert (ours - organism(test.tokens[:4], attention_mask=test.attention_mask[:4])).abs().max().item() > 1e-3


def test_split_questions_keeps_each_question_in_one_part(organism, tmp_path):
    """`lens-bias mitigate --method nasa`'s 60/20/20 split: by question (all its instruction prompts in the
    same part), disjoint, covering every prompt, the shuffle set by the seed; too few items refused."""
    from lens_bias.core import DataError
    from lens_bias.mitigate import Questions, split_questions

    items = load_yes_no(data_path("yesno"))[:25]
    ps = binary_prompts(organism, items)
    per = len(ps) // len(items)
    assert per > 1 and len(ps) == per * len(items)
    q = Questions(data_path("yesno"), items, ps)
    parts = split_questions(q, seed=3)
    asked = [[m["question"] for m in part.metadata] for part in parts]
    assert [len(a) for a in asked] == [15 * per, 5 * per, 5 * per]  # int(0.6·25), int(0.8·25) − 15, the rest
    sets = [set(a) for a in asked]
    assert [len(s) for s in sets] == [15, 5, 5] and not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])
    assert set().union(*sets) == {it["question"] for it in items}
    assert all(a.count(x) == per for a in asked for x in set(a))  # every instruction of a question, together
    prompts = {(m["question"], m["template"]): p for m, p in zip(ps.metadata, ps.prompts)}
    assert all(prompts[(m["question"], m["template"])] == p for part in parts for m, p in zip(part.metadata, part.prompts))
    assert split_questions(q, seed=3)[0].prompts == parts[0].prompts
    assert split_questions(q, seed=4)[0].prompts != parts[0].prompts
    with pytest.raises(DataError, match=r"yesno\.jsonl: nasa needs at least 10 yes/no items, got 9"):
        split_questions(Questions(data_path("yesno"), items[:9], binary_prompts(organism, items[:9])))
