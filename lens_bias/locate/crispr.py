"""CRISPR bias neurons (Yang et al., ACL 2024, "Mitigating Biases for Instruction-following Language
Models via Bias Neurons Elimination").

For an instance x with gold option y, the biased output is ŷ = argmax_{o ≠ y} P(o | x, instruction)
and its confusion score c = P(ŷ | x, instruction), P being the softmax over the options of their
summed token log-probabilities. For every MLP neuron i and token t the attribution of an option o
is A_i,t(o) = h_i,t · ∂P(o | x)/∂h_i,t. In the paper's order (the default, `order="token"`):

    B_i,t = A_i,t(ŷ) − λ·relu(A_i,t(y))          skill disentanglement, per token
    B_i(x) = max_t B_i,t                          token aggregation
    B_i(instruction) = Σ_x c(x)·B_i(x) / Σ_x c(x)   confusion-weighted instance aggregation
    B_i = mean over instructions                   instruction aggregation

`order="aggregate_first"` takes the max over tokens of A(ŷ) and of A(y) separately and then
disentangles, B_i(x) = max_t A_i,t(ŷ) − λ·relu(max_t A_i,t(y)) (the order of the authors' released
code; an option, not the paper's definition). Tokens are the prompt's input tokens (a prompt
token's activation is shared by the option sequences, so its gradient sums over them). The top
neurons are then pruned (lens_bias.mitigate.prune). One forward and two backwards per batch.
"""

from __future__ import annotations

from typing import Literal

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from ..core.checks import check_finite
from ..core.errors import LensBiasError
from ..core.hooks import hook_name
from ..core.methods import ChunkSums, LocateMethod
from ..core.models import HookedModel
from ..core.prompts import resolve_chat
from ..core.scores import ComponentScores
from ..tasks.multiple_choice import (
    INSTRUCTIONS,
    format_mc_prompt,
    item_options,
    option_sequences,
    check_contexts,
    sequence_logprobs,
    validate_items,
)
from ..tasks.records import Items, take

Unit = Literal["neuron", "head"]
UNITS = ("neuron", "head")
Tokens = Literal["input", "option", "all"]
Order = Literal["token", "aggregate_first"]


def _per_token(acts, grads, spans, i: int, target: int, k: int, layer: int, tokens: Tokens) -> Tensor:
    """h · g of prompt i at the selected tokens [tokens, units] for the target option's sequence."""
    rows = list(range(i * k, (i + 1) * k))
    start, n = spans[rows[target]]
    h = acts[layer][rows[target]].detach()
    a_in = h[:start] * grads[layer][rows].sum(0)[:start]  # prompt tokens: shared by the k option sequences
    a_opt = h[start - 1: start - 1 + n] * grads[layer][rows[target], start - 1: start - 1 + n]
    if h.ndim == 3:  # heads: z [pos, head, d_head] — a head's attribution sums its features
        a_in, a_opt = a_in.sum(-1), a_opt.sum(-1)
    a_opt = torch.cat([a_in[start - 1:], a_opt[1:]]) if n > 1 else a_in[start - 1:]
    return {"input": a_in, "option": a_opt, "all": torch.cat([a_in, a_opt[1:]])}[tokens].float()


def _attribute(model, prompts: list[str], options: list[list[str]], choose, unit: Unit = "neuron"):
    """One forward over every (prompt, option) sequence, then per target set `name` (from `choose(P)`,
    P = option probabilities [n, k]) the gradients ∂P(target | x)/∂h of every unit's activation.
    Returns (P, activations per layer, {name: (targets, gradients per layer)}, spans)."""
    if unit not in UNITS:
        raise LensBiasError(f"unit must be one of {sorted(UNITS)}, not {unit!r}")
    k, n = len(options[0]), len(prompts)
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
        grads = {}
        for j, (name, t) in enumerate(targets.items()):
            t = torch.as_tensor(t, dtype=torch.long)
            obj = probs[torch.arange(n), t.to(probs.device)].sum()
            grads[name] = (t.tolist(), torch.autograd.grad(obj, xs, retain_graph=j < len(targets) - 1))
    return probs.detach().cpu(), xs, grads, spans


def option_attributions(model: HookedModel, prompts: list[str], options: list[list[str]], targets: list[int],
                        tokens: Tokens = "input", unit: Unit = "neuron") -> Float[Tensor, "n layer units"]:
    """A(o) = max_t h_t · ∂P(o | x)/∂h_t per prompt and neuron (or head, `unit="head"`: Σ over its z
    features): [n, layer, d_mlp or n_heads].

    P(o | x) is the option's probability among the prompt's options (softmax of the options'
    summed token log-probabilities), so the gradient flows through every option's sequence.
    One forward + backward per call. tokens: 'input' (the prompt's tokens), 'option' (the tokens
    that predict the target option) or 'all'.
    """
    if tokens not in ("input", "option", "all"):
        raise LensBiasError(f"tokens must be 'input', 'option' or 'all', not {tokens!r}")
    k = len(options[0])
    _, acts, grads, spans = _attribute(model, prompts, options, lambda p: {"a": targets}, unit)
    t, g = grads["a"]
    return torch.stack([torch.stack([_per_token(acts, g, spans, i, t[i], k, l, tokens).amax(0).cpu()
                                     for l in range(len(acts))]) for i in range(len(prompts))])


def disentangled_scores(acts, grads: dict, spans, k: int, lam: float, tokens: Tokens,
                        order: Order) -> Float[Tensor, "n layer units"]:
    """B(x) per prompt and unit from the attributions of ŷ ('hat') and y ('gold'): in the paper's order
    max_t [A_t(ŷ) − λ·relu(A_t(y))], or with order='aggregate_first' max_t A_t(ŷ) − λ·relu(max_t A_t(y))."""
    (hat, g_hat), (gold, g_gold) = grads["hat"], grads["gold"]
    out = []
    for i in range(len(hat)):
        per_layer = []
        for l in range(len(acts)):
            a_hat = _per_token(acts, g_hat, spans, i, hat[i], k, l, tokens)
            a_gold = _per_token(acts, g_gold, spans, i, gold[i], k, l, tokens)
            if order == "token":
                b = (a_hat - lam * a_gold.clamp(min=0)).amax(0)
            else:
                b = a_hat.amax(0) - lam * a_gold.amax(0).clamp(min=0)
            per_layer.append(b.cpu())
        out.append(torch.stack(per_layer))
    return torch.stack(out)


def crispr_scores(model: HookedModel, items: Items, instructions: list[str] | None = None, *, lam: float = 1.0,
                  tokens: Tokens = "input", order: Order = "token", batch_size: int = 8, progress: bool = True,
                  unit: Unit = "neuron", chat: bool | None = None) -> ComponentScores:
    """Bias score B of every MLP neuron [layer, d_mlp] (or attention head [layer, head], `unit="head"`):
    B = mean over instructions of Σ_x c(x)·max_t[A_t(ŷ) − λ·relu(A_t(y))] / Σ_x c(x) (module
    docstring; `order="aggregate_first"` disentangles after the max over tokens). Instances the
    model already answers with ŷ far below y still count, weighted by their (small) confusion c. Prompts go
    through the chat template when `chat` (default: when the tokenizer has one)."""
    items = validate_items(items)  # labels are option indices, every item has the same number of options
    if unit not in UNITS:
        raise LensBiasError(f"unit must be one of {sorted(UNITS)}, not {unit!r}")
    if tokens not in ("input", "option", "all"):
        raise LensBiasError(f"tokens must be 'input', 'option' or 'all', not {tokens!r}")
    if order not in ("token", "aggregate_first"):
        raise LensBiasError(f"order must be 'token' or 'aggregate_first', not {order!r}")
    if order == "token" and tokens != "input":
        raise LensBiasError("order='token' disentangles token by token, which needs the same tokens for ŷ and y: "
                            "tokens='input' (or order='aggregate_first')")
    instructions = instructions or INSTRUCTIONS
    template = model.tokenizer if resolve_chat(model, chat) else None
    check_contexts(model, items, instructions, template)
    L, D = model.cfg.n_layers, (model.cfg.d_mlp if unit == "neuron" else model.cfg.n_heads)
    per_instruction, totals, weights = [], [], []
    bar = tqdm(total=len(instructions) * len(items), desc="CRISPR", unit="item", disable=not progress)
    for ins in instructions:
        total, weight = torch.zeros(L, D), 0.0
        for s in range(0, len(items), batch_size):
            chunk = take(items, s, s + batch_size)
            prompts = [format_mc_prompt(ins, it["context"], it["question"], item_options(it), template)
                       for it in chunk]
            opts = [item_options(it) for it in chunk]
            gold = torch.tensor([int(it["label"]) for it in chunk])

            def choose(probs):
                wrong = probs.clone()
                wrong[torch.arange(len(chunk)), gold] = -1
                return {"hat": wrong.argmax(-1), "gold": gold}

            probs, acts, grads, spans = _attribute(model, prompts, opts, choose, unit)  # one forward, two backwards
            conf = probs[torch.arange(len(chunk)), torch.tensor(grads["hat"][0])]
            b = disentangled_scores(acts, grads, spans, len(opts[0]), lam, tokens, order)
            total += (conf[:, None, None] * b).sum(0)
            weight += conf.sum().item()
            bar.update(len(chunk))
        per_instruction.append(total / max(weight, 1e-12))
        totals.append(total)
        weights.append(weight)
    bar.close()
    vals = torch.stack(per_instruction).mean(0)
    check_finite(vals, "CRISPR scores", model)
    return ComponentScores(vals, ("layer", unit), unit, "crispr",
                           extra={"lambda": lam, "tokens": tokens, "order": order, "n_instructions": len(instructions),
                                  # Σ_items c·B and Σ_items c per instruction: sums that combine across chunks
                                  "totals": torch.stack(totals), "weights": torch.tensor(weights)})


# ---------------------------------------------------------------------------------------
# As a batch-run method (lens_bias.runs)
# ---------------------------------------------------------------------------------------
def instructions_of(opts: dict) -> list[str]:
    """The instructions a batch run's `instructions` option names (None: all ten; n: the first n)."""
    n = opts["instructions"]
    if isinstance(n, int) and not 1 <= n <= len(INSTRUCTIONS):
        raise LensBiasError(f"instructions must be 1..{len(INSTRUCTIONS)}, got {n}")
    return INSTRUCTIONS if n is None else (INSTRUCTIONS[:n] if isinstance(n, int) else list(n))


def _run_chunk(model, data: Items, lo: int, hi: int, opts: dict, batch_size, state) -> ChunkSums:
    """Per instruction: crispr_scores' confusion-weighted sum and its weight, so chunks combine
    as crispr_scores' confusion-weighted mean over all items."""
    res = crispr_scores(model, take(data, lo, hi), instructions_of(opts), lam=opts["lam"], tokens=opts["tokens"],
                        order=opts["order"], batch_size=batch_size or 8, progress=False, chat=opts["chat"])
    return ChunkSums({"totals": res.extra["totals"].double(), "weights": res.extra["weights"].double()}, hi - lo)


def _finalize(model, data: Items, total: ChunkSums, opts: dict) -> ComponentScores:
    vals = (total.sums["totals"] / total.sums["weights"].clamp(min=1e-12)[:, None, None]).mean(0).float()
    return ComponentScores(vals, ("layer", "neuron"), "neuron", "crispr",
                           extra={"lambda": opts["lam"], "tokens": opts["tokens"], "order": opts["order"],
                                  "n_instructions": len(instructions_of(opts)), "n_items": total.count})


RUN = LocateMethod(
    name="crispr",
    summary="CRISPR bias score of every MLP neuron on BBQ items (Yang et al., ACL 2024)",
    data="multiple_choice",
    options={"instructions": None, "lam": 1.0, "tokens": "input", "order": "token", "chat": None},
    run=_run_chunk,
    finalize=_finalize,
)
