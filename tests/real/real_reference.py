"""Independent computations for the real-model tier: plain transformers (a LlamaForCausalLM with eager attention)
with PyTorch hooks and autograd — no lens_bias code. SmolLM2's layout: `model.layers[l].self_attn.o_proj` reads the
heads' outputs z concatenated ([..., n_heads · d_head], head h at columns h·d_head …), `model.layers[l].mlp.down_proj`
reads the MLP neurons' activations act(gate)·up (lens_bias's `neuron` site), `model.embed_tokens` gives the token
embeddings."""

from __future__ import annotations

import contextlib
import math

import torch


def layers(hf):
    return hf.model.layers


def d_head(hf) -> int:
    c = hf.config
    return getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads


@contextlib.contextmanager
def hooks(pre: dict | None = None, post: dict | None = None):
    """Forward pre-hooks {module: fn(inputs_tensor) -> tensor | None} and forward hooks
    {module: fn(output) -> output | None}, removed on exit."""
    handles = []
    for mod, fn in (pre or {}).items():
        handles.append(mod.register_forward_pre_hook(
            lambda m, args, fn=fn: None if (new := fn(args[0])) is None else (new, *args[1:])))
    for mod, fn in (post or {}).items():
        handles.append(mod.register_forward_hook(lambda m, args, out, fn=fn: fn(out)))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def zero_heads(hf, heads) -> dict:
    """Pre-hooks on o_proj that zero the chosen heads' z: zero ablation of (layer, head)."""
    dh, by = d_head(hf), {}
    for l, h in heads:
        by.setdefault(l, []).append(h)

    def make(hs):
        def fn(z):
            z = z.clone()
            for h in hs:
                z[..., h * dh:(h + 1) * dh] = 0
            return z
        return fn

    return {layers(hf)[l].self_attn.o_proj: make(hs) for l, hs in by.items()}


def zero_neurons(hf, neurons) -> dict:
    """Pre-hooks on down_proj that zero the chosen neurons' activations."""
    by = {}
    for l, i in neurons:
        by.setdefault(l, []).append(i)

    def make(idx):
        def fn(a):
            a = a.clone()
            a[..., idx] = 0
            return a
        return fn

    return {layers(hf)[l].mlp.down_proj: make(idx) for l, idx in by.items()}


def answer_logits(hf, tokens, answer_pos, answer_ids, attention_mask=None, pre=None, post=None):
    """Logits of the answer tokens at the answer position [batch, n_answers] under the given hooks."""
    with torch.no_grad(), hooks(pre, post):
        logits = hf(input_ids=tokens, attention_mask=attention_mask).logits
    rows = torch.arange(len(tokens))
    return logits[rows, answer_pos][rows[:, None], answer_ids]


def logit_diff(hf, tokens, answer_pos, answer_ids, attention_mask=None, pre=None, post=None) -> torch.Tensor:
    """logit(answer 0) − logit(answer 1) per prompt, in float32."""
    a = answer_logits(hf, tokens, answer_pos, answer_ids, attention_mask, pre, post).float()
    return a[:, 0] - a[:, 1]


def record_inputs(hf, modules: dict, tokens, attention_mask=None, grad_of=None):
    """The inputs of `modules` ({key: module}) in one forward; with `grad_of(logits) -> scalar` also their
    gradients (autograd through the whole model). Returns (inputs, grads or None)."""
    acts = {}

    def keep(key):
        def fn(x):  # kept in the graph (not a new leaf): the gradient sums over every path, as it must
            acts[key] = x
        return fn

    with torch.set_grad_enabled(grad_of is not None), hooks(pre={m: keep(k) for k, m in modules.items()}):
        logits = hf(input_ids=tokens, attention_mask=attention_mask).logits
        if grad_of is None:
            return {k: v.detach() for k, v in acts.items()}, None
        keys = list(acts)
        grads = torch.autograd.grad(grad_of(logits), [acts[k] for k in keys])
    return {k: acts[k].detach() for k in keys}, dict(zip(keys, grads))


def nas(attn, q_first: int, q_last: int, t_pos: int, t_neg: int, eps: float = 1e-9) -> torch.Tensor:
    """NAS of every head of one layer from its full pattern attn [head, query, key] (Yu et al. 2024):
    Σ_{i=q_first}^{q_last} (A[i,Yes] + A[i,No]) · log((A[i,No] + ε)/(A[i,Yes] + ε)), in float64."""
    a = attn.double()
    out = torch.zeros(a.shape[0], dtype=torch.float64)
    for i in range(q_first, q_last + 1):
        ay, an = a[:, i, t_pos], a[:, i, t_neg]
        out += (ay + an) * (torch.log(an + eps) - torch.log(ay + eps))
    return out


def spearman(x: torch.Tensor, y: torch.Tensor) -> float:
    """Spearman rank correlation (no ties expected in real-valued scores)."""
    rx, ry = x.flatten().argsort().argsort().double(), y.flatten().argsort().argsort().double()
    rx, ry = rx - rx.mean(), ry - ry.mean()
    return float((rx * ry).sum() / math.sqrt(float((rx * rx).sum() * (ry * ry).sum())))
