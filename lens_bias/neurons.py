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

from .bbq import INSTRUCTIONS, format_mc_prompt, option_logprobs
from .errors import LensBiasError
from .models import clone_model
from .patching import ComponentScores


def _seq_batch(tok, prompts: list[str], options: list[str], device):
    bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
    seqs, spans = [], []
    for p, o in zip(prompts, options):
        p_ids = bos + tok(p, add_special_tokens=False)["input_ids"]
        o_ids = tok(" " + o, add_special_tokens=False)["input_ids"]
        if not o.strip() or not o_ids:
            raise LensBiasError(f"option {o!r} tokenises to nothing (prompt {p!r})")
        seqs.append(p_ids + o_ids)
        spans.append((len(p_ids), len(o_ids)))
    width = max(map(len, seqs))
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    return ids.to(device), mask.to(device), spans, seqs


def option_attributions(model, prompts: list[str], options: list[list[str]], targets: list[int],
                        tokens: str = "input") -> Tensor:
    """A(o) = h · ∂P(o | x)/∂h per prompt and neuron, max over tokens: [n, layer, d_mlp].

    P(o | x) is the option's probability among the prompt's options (softmax of the options'
    summed token log-probabilities), so the gradient flows through every option's sequence; a
    prompt token's activation is shared by those sequences (causal attention), so its gradient
    is their sum. One forward + backward per call. tokens: 'input' (the prompt's tokens),
    'option' (the tokens that predict the target option) or 'all'.
    """
    if tokens not in ("input", "option", "all"):
        raise LensBiasError(f"tokens must be 'input', 'option' or 'all', not {tokens!r}")
    device = next(model.parameters()).device
    k = len(options[0])
    flat_p = [p for p in prompts for _ in range(k)]
    flat_o = [o for opts in options for o in opts]
    ids, mask, spans, _ = _seq_batch(model.tokenizer, flat_p, flat_o, device)
    L = model.cfg.n_layers
    acts, grads = {}, {}

    def keep(x, hook, l):
        acts[l] = x.detach()
        x.register_hook(lambda g: grads.__setitem__(l, g.detach()))
        return x

    hooks = [(f"blocks.{l}.mlp.hook_post", (lambda l: lambda x, hook: keep(x, hook, l))(l)) for l in range(L)]
    with torch.enable_grad(), model.hooks(fwd_hooks=hooks):
        logp = model(ids, attention_mask=mask).float().log_softmax(-1)
        seq_lp = torch.stack([logp[i, torch.arange(s - 1, s - 1 + n, device=device), ids[i, s: s + n]].sum()
                              for i, (s, n) in enumerate(spans)]).view(len(prompts), k)
        p_norm = seq_lp.softmax(-1)
        p_norm[torch.arange(len(prompts)), torch.tensor(targets)].sum().backward()
    model.zero_grad(set_to_none=True)
    out = torch.empty(len(prompts), L, acts[0].shape[-1])
    for i, t in enumerate(targets):
        rows = list(range(i * k, (i + 1) * k))
        start, n = spans[rows[t]]
        for l in range(L):
            h = acts[l][rows[t]]
            g_in = grads[l][rows].sum(0)[:start]  # prompt positions: shared by every option's sequence
            a_in = h[:start] * g_in
            a_opt = h[start - 1: start - 1 + n] * grads[l][rows[t], start - 1: start - 1 + n]
            a_opt = torch.cat([a_in[start - 1:], a_opt[1:]]) if n > 1 else a_in[start - 1:]
            a = {"input": a_in, "option": a_opt, "all": torch.cat([a_in, a_opt[1:]])}[tokens]
            out[i, l] = a.amax(0).float().cpu()
    return out


def crispr_scores(model, items: list[dict], instructions: list[str] | None = None, *, lam: float = 1.0,
                  tokens: str = "input", batch_size: int = 8, progress: bool = True) -> ComponentScores:
    """Bias score B of every MLP neuron [layer, d_mlp]: confusion-weighted mean over instances of
    A(ŷ) − λ·max(A(y), 0), averaged over instructions. Instances the model already answers with
    ŷ far below y still count, weighted by their (small) confusion score."""
    if not items:
        raise LensBiasError("no BBQ items to attribute")
    instructions = instructions or INSTRUCTIONS
    L, D = model.cfg.n_layers, model.cfg.d_mlp
    per_instruction = []
    for ins in tqdm(instructions, desc="CRISPR", disable=not progress):
        total, weight = torch.zeros(L, D), 0.0
        for s in range(0, len(items), batch_size):
            chunk = items[s: s + batch_size]
            prompts = [format_mc_prompt(ins, it["context"], it["question"], [it["ans0"], it["ans1"], it["ans2"]])
                       for it in chunk]
            opts = [[it["ans0"], it["ans1"], it["ans2"]] for it in chunk]
            lp, _ = option_logprobs(model, prompts, opts, batch_size=3 * batch_size)
            probs = lp.softmax(-1)
            gold = torch.tensor([int(it["label"]) for it in chunk])
            wrong = probs.clone()
            wrong[torch.arange(len(chunk)), gold] = -1
            y_hat = wrong.argmax(-1)
            conf = probs[torch.arange(len(chunk)), y_hat]
            a_hat = option_attributions(model, prompts, opts, y_hat.tolist(), tokens)
            a_gold = option_attributions(model, prompts, opts, gold.tolist(), tokens)
            b = a_hat - lam * a_gold.clamp(min=0)
            total += (conf[:, None, None] * b).sum(0)
            weight += conf.sum().item()
        per_instruction.append(total / max(weight, 1e-12))
    vals = torch.stack(per_instruction).mean(0)
    if torch.isnan(vals).any():
        raise LensBiasError("NaN in neuron scores: check the model's dtype and inputs")
    return ComponentScores(vals, ("layer", "neuron"), "neuron", "crispr",
                           extra={"lambda": lam, "tokens": tokens, "n_instructions": len(instructions)})


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
    zero-ablating it; on a deep copy unless `inplace`."""
    target = model if inplace else clone_model(model)
    d_mlp = target.cfg.d_mlp
    for l, i in neurons:
        if not (0 <= l < target.cfg.n_layers and 0 <= i < d_mlp):
            raise LensBiasError(f"neuron ({l}, {i}) out of range (layers {target.cfg.n_layers}, d_mlp {d_mlp})")
        w = target.blocks[l].mlp.W_out  # shares storage with the HF parameter
        with torch.no_grad():
            if w.shape[0] == d_mlp:
                w[i].zero_()
            else:
                w[:, i].zero_()
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
