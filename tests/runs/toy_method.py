"""A toy locate method, written as a new method is (one file ending with its spec): the mean MLP
activation h_i at the answer position, over prompts — [layer, neuron]."""

import math

import torch

from lens_bias.core.hooks import device_of, trace, unit_names
from lens_bias.core.methods import ChunkSums, LocateMethod
from lens_bias.core.scores import ComponentScores


def _run(model, data, lo, hi, opts, batch_size, state) -> ChunkSums:
    ps = data[lo:hi].to(device_of(model))
    names = list(unit_names(model, "neuron").values())
    with torch.no_grad(), trace(model, names) as acts:
        model(ps.tokens, attention_mask=ps.attention_mask)
    rows = torch.arange(len(ps), device=ps.tokens.device)
    at = torch.stack([acts[n][rows, ps.answer_pos] for n in names], 1)  # [prompt, layer, neuron]
    return ChunkSums({"h": at.double().sum(0).cpu()}, hi - lo)


def _finalize(model, data, total: ChunkSums, opts) -> ComponentScores:
    return ComponentScores((total.sums["h"] / total.count).float(), ("layer", "neuron"), "neuron", "toy",
                           math.nan, math.nan)


RUN = LocateMethod(name="toy", summary="mean MLP activation at the answer position (a test's toy)", data="pairs",
                   options={}, run=_run, finalize=_finalize)
