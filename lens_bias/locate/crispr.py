"""CRISPR bias neurons (Yang et al., ACL 2024, "Mitigating Biases for Instruction-following Language
Models via Bias Neurons Elimination").

For an instance x with gold option y, the biased output is ŷ = argmax_{o ≠ y} P(o | x, instruction)
and its confusion score P(ŷ | x, instruction), P being the softmax over the options of their
summed token log-probabilities. For every MLP neuron i and token t, the attribution of an option
o is A_i,t(o) = h_i,t · ∂P(o | x)/∂h_i,t (one forward + backward per batch and option). Aggregation: max over tokens (input or option tokens), skill
disentanglement B_i = A_i(ŷ) − λ·max(A_i(y), 0), confusion-weighted mean over instances, mean
over instructions. The top neurons are then pruned (lens_bias.mitigate.prune).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..core.errors import LensBiasError
from ..core.hooks import hook_name
from ..core.methods import ChunkSums, LocateMethod
from ..core.scores import ComponentScores
from ..tasks.records import Items, take
from ..tasks.multiple_choice import (INSTRUCTIONS, format_mc_prompt, item_options, option_sequences, sequence_logprobs,
                                      validate_items)

Unit = Literal["neuron", "head"]
UNITS = ("neuron", "head")
Tokens = Literal["input", "option", "all"]


def _attribute(model, prompts: list[str], options: list[list[str]], tokens: Tokens, choose,
               unit: Unit = "neuron") -> tuple[Tensor, dict]:
    """One forward over every (prompt, option) sequence, then per target set `name` (from
    `choose(P)`, P = option probabilities [n, k]) the attribution A = h · ∂P(target | x)/∂h of every
    MLP neuron (or head: summed over its d_head output features z), max over the selected tokens:
    (P, {name: [n, layer, d_mlp or n_heads]})."""
    if tokens not in ("input", "option", "all"):
        raise LensBiasError(f"tokens must be 'input', 'option' or 'all', not {tokens!r}")
    if unit not in UNITS:
        raise LensBiasError(f"unit must be one of {sorted(UNITS)}, not {unit!r}")
    k = len(options[0])
    n = len(prompts)
    seqs, spans = option_sequences(model.tokenizer, prompts, options)
    L = model.cfg.n_layers
    acts = {}

    def keep(x, hook, l):
        acts[l] = x
        return x

    hooks = [(hook_name(unit, l), (lambda l: lambda x, hook: keep(x, hook, l))(l)) for l in range(L)]
    with torch.enable_grad(), model.hooks(fwd_hooks=hooks):
        probs = sequence_logprobs(model, seqs, spans).view(n, k).softmax(-1)
        targets = choose(probs.detach().cpu())
        xs = [acts[l] for l in range(L)]
        out = {}
        for j, (name, t) in enumerate(targets.items()):
            t = torch.as_tensor(t, dtype=torch.long)
            obj = probs[torch.arange(n), t.to(probs.device)].sum()
            grads = torch.autograd.grad(obj, xs, retain_graph=j < len(targets) - 1)
            out[name] = _reduce(xs, grads, spans, t.tolist(), k, tokens)
    return probs.detach().cpu(), out


def _reduce(acts, grads, spans, targets, k, tokens) -> Tensor:
    """h · g at the selected tokens, max over them, per prompt and layer. A prompt token's
    activation is shared by its k option sequences (causal attention): its gradient is their sum."""
    L = len(acts)
    out = torch.empty(len(targets), L, acts[0].shape[2])
    for i, t in enumerate(targets):
        rows = list(range(i * k, (i + 1) * k))
        start, n = spans[rows[t]]
        for l in range(L):
            h = acts[l][rows[t]].detach()
            g_in = grads[l][rows].sum(0)[:start]
            a_in = h[:start] * g_in
            a_opt = h[start - 1: start - 1 + n] * grads[l][rows[t], start - 1: start - 1 + n]
            if h.ndim == 3:  # heads: z [pos, head, d_head] — a head's attribution sums its features
                a_in, a_opt = a_in.sum(-1), a_opt.sum(-1)
            a_opt = torch.cat([a_in[start - 1:], a_opt[1:]]) if n > 1 else a_in[start - 1:]
            a = {"input": a_in, "option": a_opt, "all": torch.cat([a_in, a_opt[1:]])}[tokens]
            out[i, l] = a.amax(0).float().cpu()
    return out


def option_attributions(model, prompts: list[str], options: list[list[str]], targets: list[int],
                        tokens: Tokens = "input", unit: Unit = "neuron") -> Tensor:
    """A(o) = h · ∂P(o | x)/∂h per prompt and neuron (or head, `unit="head"`: Σ over its z features),
    max over tokens: [n, layer, d_mlp or n_heads].

    P(o | x) is the option's probability among the prompt's options (softmax of the options'
    summed token log-probabilities), so the gradient flows through every option's sequence.
    One forward + backward per call. tokens: 'input' (the prompt's tokens), 'option' (the tokens
    that predict the target option) or 'all'.
    """
    return _attribute(model, prompts, options, tokens, lambda p: {"a": targets}, unit)[1]["a"]


def crispr_scores(model, items: Items, instructions: list[str] | None = None, *, lam: float = 1.0,
                  tokens: Tokens = "input", batch_size: int = 8, progress: bool = True,
                  unit: Unit = "neuron") -> ComponentScores:
    """Bias score B of every MLP neuron [layer, d_mlp] (or attention head [layer, head], `unit="head"`):
    confusion-weighted mean over instances of A(ŷ) − λ·max(A(y), 0), averaged over instructions.
    Instances the model already answers with ŷ far below y still count, weighted by their (small)
    confusion score."""
    items = validate_items(items)  # labels are option indices, every item has the same number of options
    if unit not in UNITS:
        raise LensBiasError(f"unit must be one of {sorted(UNITS)}, not {unit!r}")
    instructions = instructions or INSTRUCTIONS
    L, D = model.cfg.n_layers, (model.cfg.d_mlp if unit == "neuron" else model.cfg.n_heads)
    per_instruction, totals, weights = [], [], []
    bar = tqdm(total=len(instructions) * len(items), desc="CRISPR", unit="item", disable=not progress)
    for ins in instructions:
        total, weight = torch.zeros(L, D), 0.0
        for s in range(0, len(items), batch_size):
            chunk = take(items, s, s + batch_size)
            prompts = [format_mc_prompt(ins, it["context"], it["question"], item_options(it))
                       for it in chunk]
            opts = [item_options(it) for it in chunk]
            gold = torch.tensor([int(it["label"]) for it in chunk])

            def choose(probs):
                wrong = probs.clone()
                wrong[torch.arange(len(chunk)), gold] = -1
                return {"hat": wrong.argmax(-1), "gold": gold}

            probs, a = _attribute(model, prompts, opts, tokens, choose, unit)  # one forward, two backwards
            y_hat = choose(probs)["hat"]
            conf = probs[torch.arange(len(chunk)), y_hat]
            a_hat, a_gold = a["hat"], a["gold"]
            b = a_hat - lam * a_gold.clamp(min=0)
            total += (conf[:, None, None] * b).sum(0)
            weight += conf.sum().item()
            bar.update(len(chunk))
        per_instruction.append(total / max(weight, 1e-12))
        totals.append(total)
        weights.append(weight)
    bar.close()
    vals = torch.stack(per_instruction).mean(0)
    if torch.isnan(vals).any():
        raise LensBiasError("NaN in neuron scores: check the model's dtype and inputs")
    return ComponentScores(vals, ("layer", unit), unit, "crispr",
                           extra={"lambda": lam, "tokens": tokens, "n_instructions": len(instructions),
                                  # Σ_items c·B and Σ_items c per instruction: sums that combine across chunks
                                  "totals": torch.stack(totals), "weights": torch.tensor(weights)})


# ---------------------------------------------------------------------------------------
# As a batch-run method (lens_bias.runs)
# ---------------------------------------------------------------------------------------
def _instructions(opts: dict) -> list[str]:
    n = opts["instructions"]
    if isinstance(n, int) and not 1 <= n <= len(INSTRUCTIONS):
        raise LensBiasError(f"instructions must be 1..{len(INSTRUCTIONS)}, got {n}")
    return INSTRUCTIONS if n is None else (INSTRUCTIONS[:n] if isinstance(n, int) else list(n))


def _run_chunk(model, data: Items, lo: int, hi: int, opts: dict, batch_size, state) -> ChunkSums:
    """Per instruction: crispr_scores' confusion-weighted sum and its weight, so chunks combine
    as crispr_scores' confusion-weighted mean over all items."""
    res = crispr_scores(model, take(data, lo, hi), _instructions(opts), lam=opts["lam"], tokens=opts["tokens"],
                        batch_size=batch_size or 8, progress=False)
    return ChunkSums({"totals": res.extra["totals"].double(), "weights": res.extra["weights"].double()}, hi - lo)


def _finalize(model, data: Items, total: ChunkSums, opts: dict) -> ComponentScores:
    vals = (total.sums["totals"] / total.sums["weights"].clamp(min=1e-12)[:, None, None]).mean(0).float()
    return ComponentScores(vals, ("layer", "neuron"), "neuron", "crispr",
                           extra={"lambda": opts["lam"], "tokens": opts["tokens"],
                                  "n_instructions": len(_instructions(opts)), "n_items": total.count})


RUN = LocateMethod(
    name="crispr",
    summary="CRISPR bias score of every MLP neuron on BBQ items (Yang et al., ACL 2024)",
    data="multiple_choice",
    options={"instructions": None, "lam": 1.0, "tokens": "input"},
    run=_run_chunk,
    finalize=_finalize,
)
