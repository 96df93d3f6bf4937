"""NASA — Negative Attention Score Alignment (Yu et al. 2024): fine-tune only the attention heads
that NAS ranks as negatively biased, with a PEFT LoRA adapter restricted to those heads.

The adapter is built by lora.py (head_lora_model: LoRA factors masked to the heads' slices).

Training loss (documented choice; NASA's head selection and early stopping on the P−R gap):

    L = CE₂(y | logit_Yes, logit_No) + β · mean_{h ∈ selected} (NAS_h(batch) − NAS_balanced)²

CE₂ is the cross-entropy of the gold answer over the two candidate logits at the answer
position; NAS_h(batch) the batch mean of the head's Negative Attention Score (the same definition
as lens_bias.locate.nas, `queries` included), computed differentiably from the attention pattern; NAS_balanced the mean NAS of the other,
unselected heads on the training data before training. Training stops early when the dev
|P−R gap| has not improved for `patience` evaluations (without losing more than `max_acc_drop`
accuracy); the best adapter is kept. Dropout stays off during training (the model is in eval mode),
so the attention patterns in the NAS term are the ones the model uses.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ...core.errors import LensBiasError
from ...core.hf import hf_module, load_hf_weights
from ...core.hooks import device_of
from ...core.models import HookedModel
from ...core.prompts import PromptSet
from ...locate.nas import NASQueries, nas_terms, negative_attention_scores, query_mask
from ...tasks.yesno import decision_metrics
from ..edits import Mitigation
from .lora import Projection, head_lora_model


def _batch_nas(attentions, sub: PromptSet, heads, queries: NASQueries) -> Tensor:
    """Differentiable NAS of each selected head (lens_bias.locate.nas.nas_terms), mean over the batch."""
    dev = attentions[0].device
    rows = torch.arange(len(sub), device=dev)
    kneg = torch.tensor([m["neg_cand"] for m in sub.metadata], device=dev)
    kpos = torch.tensor([m["pos_cand"] for m in sub.metadata], device=dev)
    mask = query_mask(sub, queries).to(dev)
    out = []
    for l, h in heads:
        a = attentions[l][:, h].float()  # [batch, query, key]
        out.append(nas_terms(a[rows, :, kneg], a[rows, :, kpos], mask).mean())
    return torch.stack(out)


def _gap_size(metrics: dict) -> float:
    """|P − R| for early stopping; an undefined gap (no 'yes' answer at all: precision is NaN) counts as the
    worst, so a model that never says yes is never the one kept."""
    gap = metrics["pr_gap"]
    return abs(gap) if math.isfinite(gap) else math.inf


def _decisions(hf, ps: PromptSet, batch_size: int) -> dict:
    dev = device_of(hf)
    pred = []
    with torch.no_grad():
        for sub in ps.batches(batch_size):
            sub = sub.to(dev)
            logits = hf(input_ids=sub.tokens, attention_mask=sub.attention_mask).logits
            last = logits[torch.arange(len(sub), device=dev), sub.answer_pos]
            two = last.gather(1, sub.answer_ids[:, :2])
            pred += (two[:, 0] > two[:, 1]).tolist()
    return decision_metrics(pred, [m["label"] == "yes" for m in ps.metadata])


def nasa_train(
    model: HookedModel,
    heads,
    train: PromptSet,
    dev: PromptSet,
    *,
    beta: float = 1.0,
    steps: int = 200,
    lr: float = 1e-3,
    batch_size: int = 16,
    eval_every: int = 20,
    patience: int = 3,
    max_acc_drop: float = 0.02,
    r: int = 8,
    alpha: int = 16,
    modules: tuple[Projection, ...] = ("q", "k", "v", "o"),
    queries: NASQueries = "after_instruction",
    seed: int = 0,
    device=None,
    progress: bool = True,
) -> Mitigation:
    """Train a head-restricted LoRA adapter with the NASA loss (module docstring), early stopping
    on the dev |P−R gap|. Returns the merged model as a bridge (the original is untouched), its
    weight edit, and a report: heads, dev metrics before/after, the training history, the NAS
    target and the trained adapter ('adapter': a PEFT model; .save_pretrained(dir) loads in peft)."""
    for name, ps in (("train", train), ("dev", dev)):
        if len(ps) == 0 or not ps.metadata or "neg_cand" not in ps.metadata[0]:
            raise LensBiasError(f"the {name} prompts need candidate positions: build them with binary_prompts")
    # float16 cannot hold the NAS term's gradient (∂/∂A log(A + ε) reaches 1/ε where a head ignores a
    # candidate): a float16 model trains on a float32 copy, and the merged weights are cast back
    train_dtype = torch.float32 if next(hf_module(model).parameters()).dtype == torch.float16 else None
    peft_model = head_lora_model(model, heads, r=r, alpha=alpha, modules=modules, device=device, seed=seed,
                                 dtype=train_dtype)
    heads = peft_model.lens_bias_heads
    devc = device_of(peft_model)
    L, H = model.cfg.n_layers, model.cfg.n_heads
    base_nas = negative_attention_scores(model, train, batch_size=batch_size, progress=False, queries=queries).nas
    others = torch.ones(L, H, dtype=torch.bool)
    for l, h in heads:
        others[l, h] = False
    nas_target = float(base_nas[others].mean())

    params = [p for p in peft_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    before = _decisions(peft_model, dev, batch_size)
    best = (_gap_size(before), 0, {n: p.detach().clone() for n, p in peft_model.named_parameters() if p.requires_grad})
    history = [{"step": 0, "loss": float("nan"), **{f"dev_{k}": v for k, v in before.items()}}]
    bad_evals = 0
    # dropout stays off (eval mode): GPT-2's attention dropout would put noise into the NAS term
    peft_model.eval()
    for step in tqdm(range(1, steps + 1), desc="NASA", disable=not progress):
        idx = torch.randint(0, len(train), (min(batch_size, len(train)),), generator=g).tolist()
        sub = train[idx].to(devc)
        out = peft_model(input_ids=sub.tokens, attention_mask=sub.attention_mask, output_attentions=True)
        last = out.logits[torch.arange(len(sub), device=devc), sub.answer_pos]
        two = last.gather(1, sub.answer_ids[:, :2]).float()
        gold = torch.tensor([0 if m["label"] == "yes" else 1 for m in sub.metadata], device=devc)
        ce = torch.nn.functional.cross_entropy(two, gold)
        align = ((_batch_nas(out.attentions, sub, heads, queries) - nas_target) ** 2).mean()
        loss = ce + beta * align
        if not torch.isfinite(loss):
            raise LensBiasError(f"NASA loss became {loss.item()} at step {step}; lower the learning rate")
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % eval_every == 0 or step == steps:
            m = _decisions(peft_model, dev, batch_size)
            history.append({"step": step, "loss": loss.item(), "ce": ce.item(), "align": align.item(),
                            **{f"dev_{k}": v for k, v in m.items()}})
            ok = m["accuracy"] >= before["accuracy"] - max_acc_drop
            if ok and _gap_size(m) < best[0] - 1e-9:
                best = (_gap_size(m), step, {n: p.detach().clone() for n, p in peft_model.named_parameters()
                                                 if p.requires_grad})
                bad_evals = 0
            else:
                bad_evals += 1
                if bad_evals >= patience:
                    break
    with torch.no_grad():
        named = dict(peft_model.named_parameters())
        for n, v in best[2].items():
            named[n].copy_(v)
    peft_model.eval()
    merged = copy.deepcopy(peft_model).merge_and_unload()
    edited = load_hf_weights(model, merged)
    after = _decisions(peft_model, dev, batch_size)
    return Mitigation.of(model, edited, "nasa", units=[list(h) for h in heads], heads=heads, queries=queries, before=before,
                         after=after, history=history, best_step=best[1], nas_target=nas_target, adapter=peft_model)


def nas_gap_curve(result: Mitigation):
    """The training curve of a NASA run as a tidy table (step, loss, dev accuracy, dev P−R gap)."""
    import pandas as pd

    return pd.DataFrame(result.report["history"])

