"""LSDM keys: the MLP hidden activations (hook_post) an edit of W_out acts on — at the edit position
of the bias prompts (H), and at every token of neutral text and of the bias prompts' other tokens
(H₀, to be preserved). ROME's compute_u / MEMIT's covariance statistics play this role there."""

from __future__ import annotations

from typing import Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor

from ...core.errors import LensBiasError
from ...core.hooks import device_of, hook_name, run_until
from ...core.models import HookedModel
from ...core.prompts import PromptSet, encode_lines, pad
from ...tasks.capability import text_lines

EditPosition = Literal["subject", "last"]
POSITIONS = ("subject", "last")


def edit_positions(ps: PromptSet, position: EditPosition) -> Int[Tensor, " batch"]:
    """Token index per prompt: 'subject' = last token of the subject (occupation), 'last' = answer position."""
    if position == "last":
        return ps.answer_pos
    if position == "subject":
        if ps.subject_spans is None:
            raise LensBiasError("position='subject' needs subject spans: build the PromptSet with subjects=[...]")
        return ps.subject_spans[:, 1] - 1
    raise LensBiasError(f"unknown edit position {position!r}; choose one of {POSITIONS}")


def mlp_keys(model: HookedModel, ps: PromptSet, layer: int, positions: Int[Tensor, " batch"],
             batch_size: int = 32) -> tuple[Float[Tensor, "n d_mlp"], Float[Tensor, "m d_mlp"]]:
    """MLP hidden activations (hook_post) of `layer`: at one position per prompt (the edit keys, H),
    and at the prompts' other real tokens but BOS (context keys, to be preserved)."""
    name = hook_name("neuron", layer)
    dev = device_of(model)
    bos = model.tokenizer.bos_token_id
    keys, context = [], []
    for start in range(0, len(ps), batch_size):
        b = ps[list(range(start, min(start + batch_size, len(ps))))].to(dev)
        pos = positions[start:start + len(b)].to(dev)
        with torch.no_grad():
            act = run_until(model, b.tokens, name, attention_mask=b.attention_mask)[name]
        rows = torch.arange(len(b), device=dev)
        keys.append(act[rows, pos].float())
        other = b.attention_mask.bool().clone()
        other[rows, pos] = False
        if bos is not None:
            other &= b.tokens != bos  # BOS keys are the same in every prompt
        context.append(act[other].float())
    return torch.cat(keys), torch.cat(context)


def preservation_keys(model: HookedModel, texts: str | list[str], layer: int, *, max_keys: int = 20000,
                      batch_size: int = 32) -> Float[Tensor, "n0 d_mlp"]:
    """H₀: MLP hidden activations of `layer` at every (non-pad, non-BOS) token of neutral text lines."""
    dev = device_of(model)
    name = hook_name("neuron", layer)
    bos = model.tokenizer.bos_token_id
    lines = text_lines(texts)
    out, total = [], 0
    for i in range(0, len(lines), batch_size):
        ids, mask = pad(encode_lines(model, lines[i:i + batch_size], max_tokens=model.cfg.n_ctx))
        ids, mask = ids.to(dev), mask.to(dev)
        with torch.no_grad():
            act = run_until(model, ids, name, attention_mask=mask)[name]
        keep = mask.bool()
        if bos is not None:
            keep &= ids != bos  # BOS keys are the same for every line
        out.append(act[keep].float())
        total += out[-1].shape[0]
        if total >= max_keys:
            break
    return torch.cat(out)[:max_keys]
