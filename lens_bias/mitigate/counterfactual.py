"""Counterfactual-data fine-tuning of chosen components only — the debiasing of "Interpreting Bias in
Large Language Models: a feature-based approach" (Prakash & Lee 2024, arXiv 2406.12347): the components
patching finds (the early MLPs where the bias originates, the attention heads that move it) are trained
on a counterfactual data set while the rest of the model stays frozen.

The paper's own description of the data and objective could not be read offline (only its abstract and
summaries: "targeted debiasing using a counterfactual dataset", "interventions at the origin or during
propagation"). What is implemented is the closest documented form, counterfactual data augmentation
(CDA; Lu et al. 2020, Zmigrod et al. 2019) restricted to the components:

    L = mean over the texts T ∪ swap(T) and their tokens of −log P(token | prefix)

T the bias texts (e.g. 'The nurse said that she'), swap(T) their gender-swapped twins ('… he'): both
versions equally likely is the loss's optimum where they differ, and the shared tokens keep the model's
language modelling. Trainable: the output projection W_out of each MLP layer (`site="mlp"`), or the rows
of the attention output projection W_O that read a head's z (`site="head"`). Every other weight is
bit-identical afterwards (masked gradients, Adam without weight decay: an entry whose gradient is always
zero never moves).
"""

from __future__ import annotations

import random
from typing import Literal, Sequence

import torch
from tqdm.auto import tqdm

from ..core.checks import check_finite
from ..core.errors import LensBiasError
from ..core.hf import clone_model, out_projection
from ..core.hooks import device_of
from ..core.models import HookedModel
from ..core.prompts import PromptSet, encode_lines, pad, pad_id_of
from ..tasks.gender import SWAP
from .ablation import check_units
from .edits import Mitigation

CFSite = Literal["mlp", "head"]


def counterfactual_texts(ps: PromptSet) -> list[str]:
    """The counterfactual data set of a gender prompt set: every prompt completed with each of its answers
    ('The nurse said that' → '… she', '… he'), a text and its gender-swapped twin side by side."""
    return [p + a for p, answers in zip(ps.prompts, ps.answers) for a in answers]


def swap_pronouns(text: str) -> str:
    """`text` with its gendered pronouns swapped (he ↔ she, his/him ↔ her; first letter's case kept)."""
    import re

    def one(m):
        w = m.group(0)
        out = SWAP.get(w.lower())
        return w if out is None else (out[0].upper() + out[1:] if w[0].isupper() else out)

    return re.sub(r"[A-Za-z]+", one, text)


def _trainable(model, units, site: CFSite) -> list[tuple[torch.nn.Parameter, torch.Tensor]]:
    """(parameter, gradient mask) for the units: a layer's whole W_out, or a head's d_head rows of W_O."""
    d_head = model.cfg.d_head
    out: dict[int, tuple[torch.nn.Parameter, torch.Tensor]] = {}
    for unit in units:
        layer = unit if site == "mlp" else unit[0]
        view = out_projection(model, layer, site if site == "mlp" else "attn")  # [in, out] view of the parameter
        param = view if view._base is None else view._base
        if not isinstance(param, torch.nn.Parameter):
            raise LensBiasError(f"cannot train the {site} output projection of layer {layer} for this architecture")
        if id(param) not in out:
            out[id(param)] = (param, torch.zeros_like(param, dtype=torch.bool))
        mask = out[id(param)][1]
        mask_view = mask if view._base is None else mask.T  # the same [in, out] orientation as `view`
        rows = slice(None) if site == "mlp" else slice(unit[1] * d_head, (unit[1] + 1) * d_head)
        mask_view[rows] = True
    return list(out.values())


def _units(model, units, site: CFSite) -> list:
    if site == "mlp":
        layers = sorted({int(u) for u in units})
        bad = [l for l in layers if not 0 <= l < model.cfg.n_layers]
        if bad or not layers:
            raise LensBiasError(f"MLP layers {bad or units} out of range (the model has {model.cfg.n_layers} layers)")
        return layers
    if site == "head":
        return check_units(model, units, "head")
    raise LensBiasError(f"site must be 'mlp' or 'head', not {site!r}")


def _lm_loss(model, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the real tokens of a padded batch."""
    logits = model(ids, attention_mask=mask)
    labels = ids.masked_fill(mask == 0, -100)[:, 1:]
    return torch.nn.functional.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                             labels.reshape(-1), ignore_index=-100)


def counterfactual_finetune(model: HookedModel, units: Sequence, texts: Sequence[str], *, site: CFSite = "head",
                            counterfactuals: Sequence[str] | None = None, steps: int = 20, lr: float = 1e-3,
                            batch_size: int = 16, seed: int = 0, progress: bool = True) -> Mitigation:
    """Fine-tune only `units` — MLP layers (`site="mlp"`: their W_out) or heads (`site="head"`: their rows of
    W_O) — on the counterfactual data set `texts` ∪ `counterfactuals` (default: `swap_pronouns` of each text)
    with the language-modelling loss, Adam, `steps` steps of `batch_size` texts (module docstring). Returns
    the fine-tuned copy as a Mitigation (the original is untouched); the report holds the loss per step."""
    units = _units(model, units, site)
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise LensBiasError("no texts to fine-tune on")
    pairs = list(counterfactuals) if counterfactuals is not None else [swap_pronouns(t) for t in texts]
    if len(pairs) != len(texts):
        raise LensBiasError(f"{len(pairs)} counterfactuals for {len(texts)} texts")
    data = sorted(set(texts) | set(pairs), key=(texts + pairs).index)
    if steps < 1 or batch_size < 1 or not lr > 0:
        raise LensBiasError(f"steps ({steps}) and batch_size ({batch_size}) must be ≥ 1 and lr ({lr}) > 0")
    target = clone_model(model)
    dev = device_of(target)
    frozen = [p for p in target.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    trainable = _trainable(target, units, site)
    for p, mask in trainable:
        p.requires_grad_(True)
        p.register_hook(lambda g, mask=mask: g * mask.to(g.dtype))
    opt = torch.optim.Adam([p for p, _ in trainable], lr=lr, weight_decay=0.0)
    rng = random.Random(seed)
    encoded = encode_lines(target, data)
    history = []
    try:
        for step in tqdm(range(steps), desc="counterfactual fine-tune", disable=not progress):
            batch = rng.sample(range(len(encoded)), min(batch_size, len(encoded)))
            ids, mask = pad([encoded[i] for i in batch], pad_id_of(target.tokenizer))
            with torch.enable_grad():
                loss = _lm_loss(target, ids.to(dev), mask.to(dev))
                check_finite(loss, f"the counterfactual fine-tuning loss at step {step}", target)
                opt.zero_grad()
                loss.backward()
            opt.step()
            history.append({"step": step + 1, "loss": loss.item()})
    finally:
        for p in frozen:
            p.requires_grad_(True)
    report_units = [list(u) for u in units] if site == "head" else list(units)
    return Mitigation.of(model, target, "counterfactual-finetune", units=report_units, site=site, steps=steps, lr=lr,
                         batch_size=batch_size, seed=seed, n_texts=len(data), history=history)
