"""Forward hooks on the Hugging Face GPT-2 modules and a block-by-block forward.

The ground truth is computed with these plain PyTorch hooks, independent of lens_bias (this module
and `casebatch.py`, `ablation.py`, `truth.py` import nothing from the toolkit), so it can check the
toolkit's methods.
"""

from __future__ import annotations

import torch


class Hooks:
    """Context manager holding forward hooks; removed on exit."""

    def __init__(self):
        self.handles = []

    def fwd(self, module, fn):
        self.handles.append(module.register_forward_hook(fn))

    def pre(self, module, fn):
        self.handles.append(module.register_forward_pre_hook(fn))

    def __enter__(self):
        return self

    def __exit__(self, *a):
        for h in self.handles:
            h.remove()
        self.handles = []


def causal_mask(T: int, dtype=torch.float32) -> torch.Tensor:
    """Additive causal attention mask [1, 1, T, T]."""
    m = torch.full((T, T), torch.finfo(dtype).min, dtype=dtype).triu(1)
    return m[None, None]


def run_blocks(model, h, start: int, mask, stop: int | None = None):
    """Run the GPT-2 blocks start … stop-1 on hidden states h."""
    for l in range(start, stop if stop is not None else len(model.transformer.h)):
        h = model.transformer.h[l](h, attention_mask=mask)
    return h


def embed(model, ids, pos_ids=None):
    """Token plus position embeddings."""
    if pos_ids is None:
        pos_ids = torch.arange(ids.shape[1])[None]
    return model.transformer.wte(ids) + model.transformer.wpe(pos_ids)


def dh(model) -> int:
    """d_head."""
    return model.config.n_embd // model.config.n_head


def head_hook(model, layer: int, rows_heads, values):
    """Pre-hook on attn.c_proj of `layer`: for each (row slice, head) set that head's z to values."""
    d = dh(model)

    def fn(module, args):
        x = args[0].clone()
        for (r0, r1), hh, v in zip(rows_heads[0], rows_heads[1], values):
            x[r0:r1, :, hh * d:(hh + 1) * d] = v
        return (x,) + tuple(args[1:])
    return fn



def zero_head(model, head: int):
    """Pre-hook on attn.c_proj: head `head`'s z set to 0 in every row and position."""
    d = dh(model)

    def fn(module, args):
        x = args[0].clone()
        x[:, :, head * d:(head + 1) * d] = 0
        return (x,)
    return fn
