"""A case's sequences packed for the ground-truth forward, and how its metrics are read from the
final hidden states (plain PyTorch; see forward.py)."""

from __future__ import annotations

import torch

from .forward import Hooks, causal_mask, embed, run_blocks
from .tokens import tid


class CaseBatch:
    """The sequences of one case and how to read its metrics from final hidden states.

    kind 'ld': each sequence has an answer position and (a0, a1) ids; per-sequence LD =
    logit(a0) − logit(a1). groups: name → (indices, weight) lists combined into named metrics.
    kind 'mc': tree-packed sequences (prompt + each option, options attend only to the prompt and
    to their own earlier tokens); per-option log-prob = Σ log P(option tokens); P over options by
    softmax. metrics computed by `reduce(per_seq_values)`.
    """

    def __init__(self, kind, ids, pos_ids, mask, real, reduce, answer_pos=None, answer_ids=None,
                 opt_spans=None, meta=None):
        self.kind, self.ids, self.pos_ids, self.mask, self.real = kind, ids, pos_ids, mask, real
        self.reduce, self.answer_pos, self.answer_ids, self.opt_spans = reduce, answer_pos, answer_ids, opt_spans
        self.meta = meta or {}

    @property
    def n(self):
        return self.ids.shape[0]

    def per_seq(self, model, hf):
        """hf: final hidden states after ln_f [R*n, T, d] → per-sequence values [R, n, ...]."""
        if self.kind == "ld":
            return self._logit_diffs(model, hf)
        return self._option_logprobs(model, hf)

    def _logit_diffs(self, model, hf):
        W = model.lm_head.weight
        R = hf.shape[0] // self.n
        rows = torch.arange(hf.shape[0])
        pos = self.answer_pos.repeat(R)
        x = hf[rows, pos]  # [R*n, d]
        a = self.answer_ids.repeat(R, 1)
        ld = (x * (W[a[:, 0]] - W[a[:, 1]])).sum(-1)
        return ld.view(R, self.n)

    def _option_logprobs(self, model, hf):
        """Option log-probs, unembedding only the positions that predict option tokens."""
        W = model.lm_head.weight
        R = hf.shape[0] // self.n
        idx = self.opt_spans["flat"]  # (row, pos, target, option) per predicted token
        rows = torch.tensor([i for i, _, _, _ in idx])
        pos = torch.tensor([p for _, p, _, _ in idx])
        tgt = torch.tensor([t for _, _, t, _ in idx])
        seg = torch.tensor([i * self.opt_spans["k"] + o for i, _, _, o in idx])
        x = hf.view(R, self.n, hf.shape[1], hf.shape[2])[:, rows, pos]  # [R, P, d]
        lp = torch.log_softmax(x @ W.T, dim=-1).gather(-1, tgt[None, :, None].expand(R, -1, 1)).squeeze(-1)
        out = torch.zeros(R, self.n * self.opt_spans["k"]).index_add_(1, seg, lp)
        return out.view(R, self.n, self.opt_spans["k"])

    def metrics(self, model, hf) -> dict[str, torch.Tensor]:
        return self.reduce(self.per_seq(model, hf))


def pack_right(tok, texts: list[str]):
    """BOS + text, right-padded: (ids, real-token mask, index of each text's last token)."""
    bos = tok.bos_token_id
    seqs = [[bos] + tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    T = max(map(len, seqs))
    ids = torch.full((len(seqs), T), tok.pad_token_id, dtype=torch.long)
    real = torch.zeros(len(seqs), T, dtype=torch.bool)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        real[i, : len(s)] = True
    return ids, real, torch.tensor([len(s) - 1 for s in seqs])


def ld_case(tok, prompts: list[str], answers: list[tuple[str, str]], groups: dict, meta=None) -> CaseBatch:
    """groups: metric name → list of (index list, sign); metric = Σ sign·mean(LD[idx])."""
    ids, real, apos = pack_right(tok, prompts)
    aid = torch.tensor([[tid(tok, a0), tid(tok, a1)] for a0, a1 in answers])

    def reduce(ld):  # ld [R, n]
        return {name: sum(sign * ld[:, idx].mean(1) for idx, sign in parts) for name, parts in groups.items()}

    return CaseBatch("ld", ids, None, causal_mask(ids.shape[1]), real, reduce, apos, aid, meta=meta)


def tree_rows(tok, rows: list[tuple[str, list[str]]]):
    """Each (prompt, options) as one token row: BOS + prompt + every option's tokens, with their
    positions (each option continues the prompt), owners (-1 prompt, o option o) and the
    (predicting positions, target ids) of each (row, option)."""
    bos = tok.bos_token_id
    seqs, spans, owners, positions = [], {}, [], []
    for prompt, opts in rows:
        p = [bos] + tok(prompt, add_special_tokens=False)["input_ids"]
        seq, pos, owner = list(p), list(range(len(p))), [-1] * len(p)
        r = len(seqs)
        for o, opt in enumerate(opts):
            o_ids = tok(" " + opt, add_special_tokens=False)["input_ids"]
            start = len(seq)
            spans[(r, o)] = ([len(p) - 1] + [start + j for j in range(len(o_ids) - 1)], o_ids)
            seq += o_ids
            pos += list(range(len(p), len(p) + len(o_ids)))
            owner += [o] * len(o_ids)
        seqs.append(seq)
        positions.append(pos)
        owners.append(owner)
    return seqs, positions, owners, spans


def tree_tensors(pad_id: int, seqs, positions, owners):
    """(ids, position ids, real mask, additive attention mask [n, 1, T, T]) of tree-packed rows:
    a token sees the prompt and the earlier tokens of its own option; padding sees itself."""
    T, n = max(map(len, seqs)), len(seqs)
    ids = torch.full((n, T), pad_id, dtype=torch.long)
    pos_ids = torch.zeros(n, T, dtype=torch.long)
    real = torch.zeros(n, T, dtype=torch.bool)
    allow = torch.zeros(n, T, T, dtype=torch.bool)
    for i, (seq, pos, owner) in enumerate(zip(seqs, positions, owners)):
        L = len(seq)
        ids[i, :L] = torch.tensor(seq)
        pos_ids[i, :L] = torch.tensor(pos)
        real[i, :L] = True
        own = torch.tensor(owner)
        q = torch.arange(L)
        causal = q[:, None] >= q[None, :]
        same = (own[:, None] == own[None, :]) | (own[None, :] == -1)
        allow[i, :L, :L] = causal & same
        allow[i, L:, :] = torch.eye(T, dtype=torch.bool)[L:]
    mask = torch.zeros(n, 1, T, T)
    mask.masked_fill_(~allow[:, None], torch.finfo(torch.float32).min)
    return ids, pos_ids, real, mask


def mc_case(tok, rows: list[tuple[str, list[str]]], info: list, reducer, meta=None) -> CaseBatch:
    """Tree-packed multiple-choice sequences, one per (prompt, options) row; metrics by
    `reducer(option log-probs [R, n, k], info)` with `info[i]` describing row i."""
    seqs, positions, owners, spans = tree_rows(tok, rows)
    ids, pos_ids, real, mask = tree_tensors(tok.pad_token_id, seqs, positions, owners)
    flat = [(r, p, t, o) for (r, o), (preds, tgts) in spans.items() for p, t in zip(preds, tgts)]
    cb = CaseBatch("mc", ids, pos_ids, mask, real, None, opt_spans={"k": 3, "index": spans, "flat": flat}, meta=meta)
    cb.reduce = lambda lp: reducer(lp, info)
    return cb


def final_hidden(model, cb: CaseBatch, h0=None, start=0, R=1):
    """Run blocks start.. on h0 (or from the embeddings) and apply ln_f."""
    if h0 is None:
        h0 = embed(model, cb.ids, cb.pos_ids)
    mask = cb.mask if R == 1 or cb.mask.shape[0] == 1 else cb.mask.repeat(R, 1, 1, 1)
    h = run_blocks(model, h0, start, mask)
    return model.transformer.ln_f(h)


@torch.no_grad()
def case_metrics(model, cb: CaseBatch, hooks_fn=None) -> dict[str, float]:
    """The case's metrics of one (optionally hooked) forward."""
    with Hooks() as hk:
        if hooks_fn:
            hooks_fn(hk)
        hf = final_hidden(model, cb)
    return {k: float(v[0]) for k, v in cb.metrics(model, hf).items()}
