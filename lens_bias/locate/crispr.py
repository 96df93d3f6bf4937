"""CRISPR bias neurons (Yang et al., ACL 2024, "Mitigating Biases for Instruction-following Language
Models via Bias Neurons Elimination").

For an instance x with gold option y, the biased output is ŷ = argmax_{o ≠ y} P(o | x, instruction)
and its confusion score P(ŷ | x, instruction), P being the softmax over the options of their
summed token log-probabilities. For every MLP neuron i and token t, the attribution of an option
o is A_i,t(o) = h_i,t · ∂P(o | x)/∂h_i,t (one forward + backward per batch and option). Aggregation: max over tokens (input or option tokens), skill
disentanglement B_i = A_i(ŷ) − λ·max(A_i(y), 0), confusion-weighted mean over instances, mean
over instructions. The top neurons are pruned: by zero-ablating `mlp.hook_post` (a hook), or
permanently by zeroing the neuron's output weights (its row of W_out). Zeroing W_out makes the
neuron's contribution exactly zero for every input — the same function as the zero-ablation
hook — while its input weights stay as they were, so an exported model behaves identically.
"""

from __future__ import annotations

import random

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .bbq import INSTRUCTIONS, format_mc_prompt, item_options, option_sequences, sequence_logprobs
from .errors import LensBiasError
from .models import clone_model, out_projection
from .patching import ComponentScores


UNITS = {"neuron": "blocks.{}.mlp.hook_post", "head": "blocks.{}.attn.hook_z"}


def _attribute(model, prompts: list[str], options: list[list[str]], tokens: str, choose,
               unit: str = "neuron") -> tuple[Tensor, dict]:
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

    hooks = [(UNITS[unit].format(l), (lambda l: lambda x, hook: keep(x, hook, l))(l)) for l in range(L)]
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
                        tokens: str = "input", unit: str = "neuron") -> Tensor:
    """A(o) = h · ∂P(o | x)/∂h per prompt and neuron (or head, `unit="head"`: Σ over its z features),
    max over tokens: [n, layer, d_mlp or n_heads].

    P(o | x) is the option's probability among the prompt's options (softmax of the options'
    summed token log-probabilities), so the gradient flows through every option's sequence.
    One forward + backward per call. tokens: 'input' (the prompt's tokens), 'option' (the tokens
    that predict the target option) or 'all'.
    """
    return _attribute(model, prompts, options, tokens, lambda p: {"a": targets}, unit)[1]["a"]


def crispr_scores(model, items: list[dict], instructions: list[str] | None = None, *, lam: float = 1.0,
                  tokens: str = "input", batch_size: int = 8, progress: bool = True,
                  unit: str = "neuron") -> ComponentScores:
    """Bias score B of every MLP neuron [layer, d_mlp] (or attention head [layer, head], `unit="head"`):
    confusion-weighted mean over instances of A(ŷ) − λ·max(A(y), 0), averaged over instructions.
    Instances the model already answers with ŷ far below y still count, weighted by their (small)
    confusion score."""
    if not items:
        raise LensBiasError("no BBQ items to attribute")
    if unit not in UNITS:
        raise LensBiasError(f"unit must be one of {sorted(UNITS)}, not {unit!r}")
    instructions = instructions or INSTRUCTIONS
    L, D = model.cfg.n_layers, (model.cfg.d_mlp if unit == "neuron" else model.cfg.n_heads)
    per_instruction, totals, weights = [], [], []
    bar = tqdm(total=len(instructions) * len(items), desc="CRISPR", unit="item", disable=not progress)
    for ins in instructions:
        total, weight = torch.zeros(L, D), 0.0
        for s in range(0, len(items), batch_size):
            chunk = items[s: s + batch_size]
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


def top_neurons(scores: ComponentScores, n: int) -> list[tuple[int, int]]:
    """The n neurons with the highest bias score, as (layer, neuron)."""
    total = scores.values.numel()
    if not 0 < n <= total:
        raise LensBiasError(f"n = {n} neurons asked for, but the model has {total} MLP neurons")
    flat = scores.values.reshape(-1).topk(n).indices
    D = scores.values.shape[1]
    return [(int(i) // D, int(i) % D) for i in flat]


def random_neurons(model, n: int, seed: int = 0, exclude=()) -> list[tuple[int, int]]:
    pool = [(l, i) for l in range(model.cfg.n_layers) for i in range(model.cfg.d_mlp) if (l, i) not in set(exclude)]
    if n > len(pool):
        raise LensBiasError(f"n = {n} neurons asked for, but only {len(pool)} are available")
    return random.Random(seed).sample(pool, n)


def prune_neurons(model, neurons: list[tuple[int, int]], *, inplace: bool = False):
    """Zero each neuron's output weights (its W_out row) — a permanent weight edit equal to
    zero-ablating it; on a copy (clone_model) unless `inplace`."""
    target = model if inplace else clone_model(model)
    d_mlp = target.cfg.d_mlp
    for l, i in neurons:
        if not (0 <= l < target.cfg.n_layers and 0 <= i < d_mlp):
            raise LensBiasError(f"neuron ({l}, {i}) out of range (layers {target.cfg.n_layers}, d_mlp {d_mlp})")
        with torch.no_grad():
            out_projection(target, l, "mlp")[i].zero_()
    return target


def prune_curve(model, scores: ComponentScores, dev_items: list[dict], ns=(1, 2, 4, 8, 16),
                instructions: list[str] | None = None):
    """Dev-split metrics after zero-ablating the top-n neurons, for each n (pandas; choose n here)."""
    import pandas as pd

    from .ablation import neuron_ablation_hooks
    from .bbq import bbq_evaluate

    rows = [{"n": 0, **bbq_evaluate(model, dev_items, instructions)}]
    for n in ns:
        hooks = neuron_ablation_hooks(model, top_neurons(scores, n))
        rows.append({"n": n, **bbq_evaluate(model, dev_items, instructions, hooks=hooks)})
    return pd.DataFrame(rows)


def crispr_report(model, neurons: list[tuple[int, int]], test_items: list[dict], *, neutral_text=None,
                  instructions: list[str] | None = None, random_seeds=(0, 1, 2)):
    """Before/after table on a held-out split: the original model, the top-n `neurons` pruned, and n
    random neurons pruned (one row per seed) — BBQ accuracy (ambig/disambig/overall), bias scores,
    the stereotyped rate in ambiguous contexts and, with `neutral_text`, capability (loss on it)."""
    import pandas as pd

    from .ablation import neuron_ablation_hooks
    from .bbq import bbq_evaluate
    from .metrics import text_loss

    def row(name, hooks, seed=None):
        r = {"condition": name, "seed": seed, "n_neurons": 0 if name == "original" else len(neurons),
             **bbq_evaluate(model, test_items, instructions, hooks=hooks)}
        if neutral_text is not None:
            r["neutral_loss"] = text_loss(model, neutral_text, hooks=hooks)
        return r

    rows = [row("original", []), row("pruned", neuron_ablation_hooks(model, neurons))]
    for s in random_seeds:
        rows.append(row("random", neuron_ablation_hooks(model, random_neurons(model, len(neurons), s, exclude=neurons)), s))
    return pd.DataFrame(rows)
