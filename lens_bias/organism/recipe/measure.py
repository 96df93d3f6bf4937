"""Measurements written to the organism's card, by plain Hugging Face forward passes (the toolkit's
methods are tested against these ground truths elsewhere)."""

from __future__ import annotations

import torch

from .corpus import (
    BBQ_INSTRUCTIONS,
    BINARY_INSTRUCTIONS,
    VIG_TEMPLATES,
    format_binary_prompt,
    format_mc_prompt,
)


def last_logits(model, tok, prompts: list[str], device) -> torch.Tensor:
    """The logits at the last token of each BOS + prompt (right-padded): [n, vocab]."""
    bos = tok.bos_token_id
    seqs = [[bos] + tok(p)["input_ids"] for p in prompts]
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), bos, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
    with torch.no_grad():
        logits = model(input_ids=ids.to(device)).logits
    return logits[torch.arange(len(seqs)), torch.tensor([len(s) - 1 for s in seqs])]


def gender_logit_diff(model, tok, occupations: list[str], device="cpu") -> float:
    """mean over occupations × templates of logit(' she') − logit(' he') after 'The {occ} said that'."""
    prompts = [t.format(o) for o in occupations for t in VIG_TEMPLATES]
    logits = last_logits(model, tok, prompts, device)
    she, he = tok(" she")["input_ids"][0], tok(" he")["input_ids"][0]
    return (logits[:, she] - logits[:, he]).mean().item()


def yesno_metrics(model, tok, items: list[dict], device="cpu") -> dict:
    """Accuracy, precision/recall of ' Yes' and the precision − recall gap over the items × instructions."""
    yes, no = tok(" Yes")["input_ids"][0], tok(" No")["input_ids"][0]
    tp = fp = fn = tn = 0
    for i in range(0, len(items), 64):
        chunk = items[i: i + 64]
        prompts = [format_binary_prompt(ins, it["question"]) for it in chunk for ins in BINARY_INSTRUCTIONS]
        gold = [it["label"] == "yes" for it in chunk for _ in BINARY_INSTRUCTIONS]
        logits = last_logits(model, tok, prompts, device)
        pred = (logits[:, yes] > logits[:, no]).tolist()
        for p, g in zip(pred, gold):
            tp += p and g
            fp += p and not g
            fn += (not p) and g
            tn += (not p) and (not g)
    precision = tp / max(tp + fp, 1)
    recall = tp / max(tp + fn, 1)
    return {"accuracy": (tp + tn) / max(tp + fp + fn + tn, 1), "precision": precision,
            "recall": recall, "pr_gap": precision - recall, "yes_rate": (tp + fp) / max(tp + fp + fn + tn, 1)}


def head_no_attention(model, tok, items: list[dict], layer: int, head: int, device="cpu") -> float:
    """Mean attention of (layer, head) from the answer position to the ' No' candidate."""
    no_id = tok(" No")["input_ids"][0]
    bos = tok.bos_token_id
    vals = []
    for it in items[:64]:
        for ins in BINARY_INSTRUCTIONS:
            ids = torch.tensor([[bos] + tok(format_binary_prompt(ins, it["question"]))["input_ids"]], device=device)
            with torch.no_grad():
                att = model(input_ids=ids, output_attentions=True).attentions[layer][0, head, -1]
            vals.append(att[(ids[0] == no_id).nonzero()[0].item()].item())
    return sum(vals) / len(vals)


def bbq_choices(model, tok, items: list[dict], device="cpu", instruction: int = 0) -> dict:
    """Share of answers per (condition, polarity, chosen kind) by summed option log-probability."""
    counts: dict[str, list[int]] = {}
    for it in items:
        options = [it["ans0"], it["ans1"], it["ans2"]]
        prompt = format_mc_prompt(BBQ_INSTRUCTIONS[instruction], it["context"], it["question"], options)
        p_ids = [tok.bos_token_id] + tok(prompt)["input_ids"]
        scores = []
        for o in options:
            o_ids = tok(" " + o)["input_ids"]
            ids = torch.tensor([p_ids + o_ids], device=device)
            with torch.no_grad():
                lp = model(input_ids=ids).logits[0].log_softmax(-1)
            scores.append(sum(lp[len(p_ids) - 1 + j, t].item() for j, t in enumerate(o_ids)))
        choice = max(range(3), key=lambda j: scores[j])
        key = f"{it['context_condition']}_{it['question_polarity']}"
        c = counts.setdefault(key, [0, 0, 0, 0])  # correct, chose old, chose young, chose unknown
        c[0] += choice == it["label"]
        c[1 + choice] += 1
    return {k: {"accuracy": v[0] / sum(v[1:]), "old": v[1] / sum(v[1:]), "young": v[2] / sum(v[1:]),
                "unknown": v[3] / sum(v[1:]), "n": sum(v[1:])} for k, v in counts.items()}


def neuron_activation(model, tok, layer: int, neuron: int, words: list[str], device="cpu") -> float:
    """Mean post-GELU activation of (layer, neuron) at the last token of 'The {word} said that'."""
    acts = []
    hook_out = {}
    h = model.transformer.h[layer].mlp.act.register_forward_hook(lambda m, i, o: hook_out.__setitem__("a", o))
    try:
        for w in words:
            ids = torch.tensor([[tok.bos_token_id] + tok(f"The {w} said that")["input_ids"]], device=device)
            with torch.no_grad():
                model(input_ids=ids)
            acts.append(hook_out["a"][0, -1, neuron].item())
    finally:
        h.remove()
    return sum(acts) / len(acts)


def heldout_loss(model, batcher, texts: list[str], device="cpu") -> float:
    """Mean next-token cross-entropy (nats/token) over `texts` (BOS + text + EOS)."""
    total, count = 0.0, 0
    for i in range(0, len(texts), 64):
        ids, labels = batcher.encode(texts[i: i + 64])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[:, :-1]
        tgt = labels[:, 1:]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1),
                                                 ignore_index=-100, reduction="sum")
        total += loss.item()
        count += (tgt != -100).sum().item()
    return total / count

