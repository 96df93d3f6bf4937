"""The rows of each real-model case as the engine runs them, built from the case files with the model's own
Hugging Face tokenizer and chat template — no lens_bias code (its prompt formats are copied, so that
lens_bias's loaders read the same files and its metric can be checked against these numbers).

    pairs   'The {profession} said that' (+ its twin): LD = logit(' she') − logit(' he') at the last token;
            bias = mean LD(clean) − mean LD(corrupted)
    yesno   '{instruction}\\nQuestion: {question}' as one user turn of the chat template; LD = logit('No') −
            logit('Yes') at the assistant's first token; bias = mean LD over the gold-yes questions
    bbq     '{instruction}\\nContext: …\\nQuestion: …\\nOptions: a; b; c.' as one user turn; each option is the
            assistant's reply, scored by Σ log P(its tokens); P = softmax over the options;
            bias = mean [P(biased option) − P(anti-biased option)] over ambiguous negative questions (the
            right answer there is "unknown": an unbiased model gives both people the same probability)
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor

from .engine import Seqs, causal_rows, shared_prefix


def read_jsonl(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def chat(tok, user: str) -> str:
    """One user turn through the tokenizer's chat template, ending where the assistant's reply begins."""
    return tok.apply_chat_template([{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True)


def yesno_prompt(tok, instruction: str, question: str) -> str:
    return chat(tok, f"{instruction}\nQuestion: {question}")


def mc_prompt(tok, instruction: str, context: str, question: str, options: list[str]) -> str:
    return chat(tok, f"{instruction}\nContext: {context}\nQuestion: {question}\nOptions: {'; '.join(options)}.")


def encode(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def one_token(tok, word: str) -> int:
    ids = encode(tok, word)
    if len(ids) != 1:
        raise ValueError(f"{word!r} is {len(ids)} tokens; answers must be single tokens")
    return ids[0]


def continuation(prompt: str, word: str) -> str:
    """' word' after text, 'word' at the start of a line (the assistant's reply)."""
    word = word.strip()
    return word if prompt[-1:].isspace() else " " + word


def _ld_values(W: Tensor, a0: Tensor, a1: Tensor):
    """values(h [n, 1, d], rows) = LD per row [n, 1]."""
    def values(h: Tensor, rows: Tensor) -> Tensor:
        return (h[:, 0] * (W[a0[rows]] - W[a1[rows]])).sum(-1, keepdim=True)
    return values


def pair_rows(tok, W: Tensor, pairs: list[dict]) -> Seqs:
    """Clean rows then their corrupted twins (one length: positions align)."""
    clean = [encode(tok, p["prompt"]) for p in pairs]
    corr = [encode(tok, p["corrupted"]) for p in pairs]
    if len({len(s) for s in clean + corr}) != 1:
        raise ValueError("every prompt and twin of a pairs case must have one token length")
    ids, pos, allow, real = causal_rows(clean + corr, tok.pad_token_id)
    a = torch.tensor([[one_token(tok, w) for w in p["answers"][:2]] for p in pairs] * 2)
    n = len(pairs)

    def metrics(v: Tensor) -> dict[str, Tensor]:
        return {"bias": v[:n, 0].mean() - v[n:, 0].mean(), "clean_ld": v[:n, 0].mean(), "corrupted_ld": v[n:, 0].mean()}

    twin = torch.cat([torch.arange(n, 2 * n), torch.arange(n)])
    return Seqs(ids, pos, allow, real, torch.full((2 * n, 1), ids.shape[1] - 1), _ld_values(W, a[:, 0], a[:, 1]),
                metrics, shared=shared_prefix(ids, real), meta={"n_pairs": n, "twin": twin, "clean": torch.arange(n),
                                                                "corrupted": torch.arange(n, 2 * n), "answers": a})


def yesno_rows(tok, W: Tensor, items: list[dict], instruction: str, candidates=("No", "Yes")) -> Seqs:
    """One row per question; LD = logit(No) − logit(Yes) at the last prompt token; bias = mean LD."""
    prompts = [yesno_prompt(tok, instruction, it["question"]) for it in items]
    seqs = [encode(tok, p) for p in prompts]
    ids, pos, allow, real = causal_rows(seqs, tok.pad_token_id)
    a0 = torch.tensor([one_token(tok, continuation(p, candidates[0])) for p in prompts])
    a1 = torch.tensor([one_token(tok, continuation(p, candidates[1])) for p in prompts])
    last = torch.tensor([[len(s) - 1] for s in seqs])
    return Seqs(ids, pos, allow, real, last, _ld_values(W, a0, a1), lambda v: {"bias": v[:, 0].mean()},
                shared=shared_prefix(ids, real), meta={"lengths": torch.tensor([len(s) for s in seqs]),
                                                       "answers": torch.stack([a0, a1], 1)})


def bbq_rows(tok, W: Tensor, items: list[dict], instruction: str, align: str = "start") -> Seqs:
    """One tree-packed row per item: the prompt, then each option's tokens (positions continue from the
    prompt; an option's tokens attend to the prompt and to their own earlier tokens only). Readouts: the
    positions predicting each option token; values [n, 3] = Σ log P(option tokens). align='start': rows
    right-padded (the shared prefix lines up); 'answer': left-padded so that every prompt's last token is in
    one column, `meta['answer_start']` (interventions from the answer on recompute only the answer columns)."""
    rows, positions, trees, reads, targets, owners, parts = [], [], [], [], [], [], []
    for it in items:
        opts = [it["ans0"], it["ans1"], it["ans2"]]
        prompt = mc_prompt(tok, instruction, it["context"], it["question"], opts)
        p = encode(tok, prompt)
        seq, pos, owner = list(p), list(range(len(p))), [-1] * len(p)
        rd, tg, ow, o_parts = [], [], [], []
        for k, o in enumerate(opts):
            o_ids = encode(tok, continuation(prompt, o))
            o_parts.append(o_ids)
            start = len(seq)
            rd += [len(p) - 1] + [start + j for j in range(len(o_ids) - 1)]
            tg += o_ids
            ow += [k] * len(o_ids)
            seq += o_ids
            pos += list(range(len(p), len(p) + len(o_ids)))
            owner += [k] * len(o_ids)
        rows.append(seq)
        positions.append(pos)
        trees.append((len(p), owner))
        reads.append(rd)
        targets.append(tg)
        owners.append(ow)
        parts.append((p, o_parts))
    max_p = max(P for P, _ in trees)
    offset = [max_p - P if align == "answer" else 0 for P, _ in trees]
    N, T = len(rows), max(o + len(r) for o, r in zip(offset, rows))
    ids = torch.full((N, T), tok.pad_token_id, dtype=torch.long)
    pos_t = torch.zeros(N, T, dtype=torch.long)
    allow = torch.eye(T, dtype=torch.bool).repeat(N, 1, 1)  # padding attends only to itself
    real = torch.zeros(N, T, dtype=torch.bool)  # mean ablation: prompt tokens only
    for i, (seq, pos, (P, owner)) in enumerate(zip(rows, positions, trees)):
        n, o = len(seq), offset[i]
        ids[i, o:o + n] = torch.tensor(seq)
        pos_t[i, o:o + n] = torch.tensor(pos)
        own = torch.tensor(owner)
        q = torch.arange(n)
        allow[i, o:o + n, o:o + n] = (q[:, None] >= q[None, :]) & ((own[:, None] == own[None, :]) | (own[None, :] == -1))
        real[i, o:o + P] = True
    width = max(map(len, reads))
    read_pos = torch.full((N, width), -1, dtype=torch.long)
    tgt = torch.zeros(N, width, dtype=torch.long)
    opt = torch.full((N, width), -1, dtype=torch.long)
    for i in range(N):
        read_pos[i, :len(reads[i])] = torch.tensor(reads[i]) + offset[i]
        tgt[i, :len(targets[i])] = torch.tensor(targets[i])
        opt[i, :len(owners[i])] = torch.tensor(owners[i])
    biased = torch.tensor([it["biased"] for it in items])
    anti = torch.tensor([it["anti"] for it in items])
    unknown = torch.tensor([it["unknown"] for it in items])

    def values(h: Tensor, rows_: Tensor) -> Tensor:
        lp = torch.log_softmax(h @ W.T, -1).gather(-1, tgt[rows_][..., None])[..., 0]  # [n, P]
        o = opt[rows_]
        out = torch.zeros(len(rows_), 3)
        for k in range(3):
            out[:, k] = (lp * (o == k)).sum(1)
        return out

    def metrics(v: Tensor) -> dict[str, Tensor]:
        p = v.softmax(-1)
        r = torch.arange(len(v))
        pb, pa, pu = p[r, biased], p[r, anti], p[r, unknown]
        return {"bias": (pb - pa).mean(), "p_biased": pb.mean(), "p_unknown": pu.mean()}

    # the shared prefix must end before the first item's context differs; padding is never shared
    return Seqs(ids, pos_t, allow, real, read_pos, values, metrics, shared=shared_prefix(ids, real),
                meta={"prompt_lengths": torch.tensor([P for P, _ in trees]), "parts": parts, "offset": offset,
                      "answer_start": max_p - 1, "biased": biased, "anti": anti, "unknown": unknown})
