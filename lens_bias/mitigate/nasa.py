"""NASA — Negative Attention Score Alignment (Yu et al. 2024): fine-tune only the attention heads
that NAS ranks as negatively biased, with a PEFT LoRA adapter restricted to those heads.

PEFT has no per-head LoRA. The bridge here targets the attention projections of the heads'
layers (`layers_to_transform`) and masks the LoRA factors outside the chosen heads' slices:

- output-side projections (q/k/v; GPT-2's fused `c_attn`, GPT-NeoX's interleaved
  `query_key_value`): only the rows of `lora_B` that produce the heads' q/k/v features may be
  non-zero, so ΔW = B·A is zero on every other head's rows;
- the output projection (`c_proj`, `o_proj`, `dense`): only the columns of `lora_A` that read the
  heads' z features may be non-zero, so ΔW is zero on every other head's columns.

The masked entries are zeroed and their gradients multiplied by 0, so with Adam(W) they stay
exactly 0 and the merged weights of other heads are bit-identical. Under grouped-query attention
(Llama with fewer KV heads) k/v are per KV group: training a head's k/v also changes the query
heads that share its KV group — pass modules=("q", "o") to change the chosen heads alone.

Training loss (documented choice; NASA's head selection and early stopping on the P−R gap):

    L = CE₂(y | logit_Yes, logit_No) + β · mean_{h ∈ selected} (NAS_h(batch) − NAS_balanced)²

CE₂ is the cross-entropy of the gold answer over the two candidate logits at the answer
position; NAS_h(batch) the batch mean of the head's Negative Attention Score (lens_bias.nas),
computed differentiably from the attention pattern; NAS_balanced the mean NAS of the other,
unselected heads on the training data before training. Training stops early when the dev
|P−R gap| has not improved for `patience` evaluations (without losing more than `max_acc_drop`
accuracy); the best adapter is kept. Dropout stays off during training (the model is in eval mode),
so the attention patterns in the NAS term are the ones the model uses.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .errors import LensBiasError
from .export import architecture, load_hf_weights, to_hf_model
from .nas import EPS
from .prompts import PromptSet

# architecture → (layers_pattern, {kind: module suffix}) with kind in q, k, v, qkv, o
HEAD_MODULES = {
    "GPT2LMHeadModel": ("h", {"qkv": "attn.c_attn", "o": "attn.c_proj"}),
    "LlamaForCausalLM": ("layers", {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj"}),
    "MistralForCausalLM": ("layers", {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj"}),
    "Qwen2ForCausalLM": ("layers", {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj"}),
    "GPTNeoXForCausalLM": ("layers", {"qkv": "attention.query_key_value", "o": "attention.dense"}),
}
_FUSED = {"GPT2LMHeadModel": "concat", "GPTNeoXForCausalLM": "interleaved"}


def _dims(config) -> tuple[int, int, int, int]:
    n_heads = config.num_attention_heads
    d_model = config.hidden_size
    d_head = getattr(config, "head_dim", None) or d_model // n_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_heads
    return d_model, n_heads, d_head, n_kv


def check_heads(config, heads) -> list[tuple[int, int]]:
    """Validate (layer, head) pairs against a config; a clear error for any out of range."""
    _, n_heads, _, _ = _dims(config)
    n_layers = config.num_hidden_layers
    heads = sorted({(int(l), int(h)) for l, h in heads})
    if not heads:
        raise LensBiasError("no heads selected")
    for l, h in heads:
        if not (0 <= l < n_layers and 0 <= h < n_heads):
            raise LensBiasError(f"head ({l}, {h}) out of range: the model has {n_layers} layers × {n_heads} heads")
    return heads


def head_lora_config(model, heads, *, r: int = 8, alpha: int = 16, dropout: float = 0.0,
                     modules: tuple[str, ...] = ("q", "k", "v", "o")):
    """A PEFT LoraConfig on the attention projections of the selected heads' layers (the per-head
    restriction is applied by `head_lora_model`'s masks)."""
    from peft import LoraConfig

    arch = architecture(model)
    if arch not in HEAD_MODULES:
        raise LensBiasError(f"no head-restricted LoRA for architecture {arch!r}; supported: {sorted(HEAD_MODULES)}")
    bad = [m for m in modules if m not in ("q", "k", "v", "o")]
    if bad or not modules:
        raise LensBiasError(f"modules must be a non-empty subset of ('q', 'k', 'v', 'o'), got {modules}")
    config = getattr(model, "original_model", model).config
    heads = check_heads(config, heads)
    pattern, kinds = HEAD_MODULES[arch]
    wanted = set(modules)
    targets = [suffix for kind, suffix in kinds.items() if kind in wanted or (kind == "qkv" and wanted & {"q", "k", "v"})]
    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets,
                      fan_in_fan_out=arch == "GPT2LMHeadModel",  # GPT-2's Conv1D stores [in, out]
                      layers_to_transform=sorted({l for l, _ in heads}), layers_pattern=pattern, bias="none")


def _row_mask(arch, kind, config, layer_heads, modules) -> Tensor:
    """Rows of a q/k/v (or fused) projection's output that belong to the selected heads."""
    d_model, n_heads, d_head, n_kv = _dims(config)
    if kind == "q":
        mask = torch.zeros(n_heads * d_head, dtype=torch.bool)
        for h in layer_heads:
            mask[h * d_head:(h + 1) * d_head] = True
        return mask
    if kind in ("k", "v"):
        mask = torch.zeros(n_kv * d_head, dtype=torch.bool)
        for h in layer_heads:
            g = h // (n_heads // n_kv)
            mask[g * d_head:(g + 1) * d_head] = True
        return mask
    # fused q, k, v
    mask = torch.zeros(3 * n_heads * d_head, dtype=torch.bool)
    parts = [i for i, m in enumerate("qkv") if m in modules]
    for h in layer_heads:
        for part in parts:
            if _FUSED[arch] == "concat":  # GPT-2: [q (all heads) | k | v]
                start = part * n_heads * d_head + h * d_head
            else:  # GPT-NeoX: per head [q | k | v]
                start = h * 3 * d_head + part * d_head
            mask[start:start + d_head] = True
    return mask


def _col_mask(config, layer_heads) -> Tensor:
    _, n_heads, d_head, _ = _dims(config)
    mask = torch.zeros(n_heads * d_head, dtype=torch.bool)
    for h in layer_heads:
        mask[h * d_head:(h + 1) * d_head] = True
    return mask


def head_lora_model(model, heads, *, r: int = 8, alpha: int = 16, dropout: float = 0.0,
                    modules: tuple[str, ...] = ("q", "k", "v", "o"), device=None, seed: int = 0):
    """A PEFT LoRA model (on a plain Hugging Face copy of `model`, eager attention) that can change
    only the selected heads: LoRA factors outside the heads' slices are zero and gradient-masked."""
    from peft import get_peft_model

    torch.manual_seed(seed)
    cfg = head_lora_config(model, heads, r=r, alpha=alpha, dropout=dropout, modules=modules)
    arch = architecture(model)
    hf = to_hf_model(model, device=device, attn_implementation="eager")
    config = hf.config
    heads = check_heads(config, heads)
    peft_model = get_peft_model(hf, cfg)
    _, kinds = HEAD_MODULES[arch]
    by_suffix = {suffix: kind for kind, suffix in kinds.items()}
    layer_re = re.compile(rf"\.{cfg.layers_pattern}\.(\d+)\.")
    masked = 0
    for name, module in peft_model.named_modules():
        if not hasattr(module, "lora_A") or "default" not in getattr(module, "lora_A", {}):
            continue
        kind = next((k for s, k in by_suffix.items() if name.endswith("." + s)), None)
        m = layer_re.search(name + ".")
        if kind is None or m is None:
            continue
        layer_heads = [h for l, h in heads if l == int(m.group(1))]
        A, B = module.lora_A["default"].weight, module.lora_B["default"].weight
        if kind == "o":
            weight, mask = A, _col_mask(config, layer_heads)[None, :]
        else:
            weight, mask = B, _row_mask(arch, kind, config, layer_heads, modules)[:, None]
        if mask.numel() != (weight.shape[1] if kind == "o" else weight.shape[0]):
            raise LensBiasError(f"unexpected LoRA shape {tuple(weight.shape)} at {name}")
        mask = mask.to(weight.device, weight.dtype).expand_as(weight).contiguous()
        with torch.no_grad():
            weight.mul_(mask)
        weight.register_hook(lambda g, mask=mask: g * mask)
        masked += 1
    if masked == 0:
        raise LensBiasError("no LoRA module was created on the selected heads' layers")
    peft_model.lens_bias_heads = heads
    return peft_model


@dataclass
class NASAResult:
    """A NASA run: the merged, trained model (a bridge), the adapter, metrics before/after, the curve."""

    model: object
    peft_model: object
    heads: list[tuple[int, int]]
    before: dict
    after: dict
    history: list[dict] = field(default_factory=list)
    nas_target: float = float("nan")


def _batch_nas(attentions, sub: PromptSet, heads) -> Tensor:
    """Differentiable NAS of each selected head, mean over the batch."""
    dev = attentions[0].device
    rows = torch.arange(len(sub), device=dev)
    q = sub.answer_pos.to(dev)
    kneg = torch.tensor([m["neg_cand"] for m in sub.metadata], device=dev)
    kpos = torch.tensor([m["pos_cand"] for m in sub.metadata], device=dev)
    out = []
    for l, h in heads:
        a = attentions[l][rows, h, q].float()  # [batch, key]
        neg, pos = a[rows, kneg], a[rows, kpos]
        out.append(((pos + neg) * torch.log((neg + EPS) / (pos + EPS))).mean())
    return torch.stack(out)


def _decisions(hf, ps: PromptSet, batch_size: int) -> dict:
    from .binary import decision_metrics

    dev = next(hf.parameters()).device
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
    model,
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
    modules: tuple[str, ...] = ("q", "k", "v", "o"),
    seed: int = 0,
    device=None,
    progress: bool = True,
) -> NASAResult:
    """Train a head-restricted LoRA adapter with the NASA loss (module docstring), early stopping
    on the dev |P−R gap|; returns the merged model as a bridge (the original is untouched)."""
    for name, ps in (("train", train), ("dev", dev)):
        if len(ps) == 0 or not ps.metadata or "neg_cand" not in ps.metadata[0]:
            raise LensBiasError(f"the {name} prompts need candidate positions: build them with binary_prompts")
    peft_model = head_lora_model(model, heads, r=r, alpha=alpha, modules=modules, device=device, seed=seed)
    heads = peft_model.lens_bias_heads
    devc = next(peft_model.parameters()).device
    L, H = model.cfg.n_layers, model.cfg.n_heads

    from .nas import negative_attention_scores

    base_nas = negative_attention_scores(model, train, batch_size=batch_size, progress=False).nas
    others = torch.ones(L, H, dtype=torch.bool)
    for l, h in heads:
        others[l, h] = False
    nas_target = float(base_nas[others].mean())

    params = [p for p in peft_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    before = _decisions(peft_model, dev, batch_size)
    best = (abs(before["pr_gap"]), 0, {n: p.detach().clone() for n, p in peft_model.named_parameters() if p.requires_grad})
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
        align = ((_batch_nas(out.attentions, sub, heads) - nas_target) ** 2).mean()
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
            if ok and abs(m["pr_gap"]) < best[0] - 1e-9:
                best = (abs(m["pr_gap"]), step, {n: p.detach().clone() for n, p in peft_model.named_parameters()
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
    return NASAResult(model=edited, peft_model=peft_model, heads=heads, before=before, after=after,
                      history=history + [{"best_step": best[1]}], nas_target=nas_target)


def head_slices_unchanged(original, edited, heads) -> dict[str, bool]:
    """For each weight: True when everything outside the selected heads' slices is bit-identical
    (attention projections of the heads' layers checked slice by slice, all other weights whole)."""
    from .export import hf_state_dict

    arch = architecture(original)
    config = getattr(original, "original_model", original).config
    heads = check_heads(config, heads)
    pattern, kinds = HEAD_MODULES[arch]
    a, b = hf_state_dict(original), hf_state_dict(edited)
    out = {}
    layer_re = re.compile(rf"\.{pattern}\.(\d+)\.")
    for name, wa in a.items():
        wb = b[name].to(wa.device)
        keep = torch.ones_like(wa, dtype=torch.bool)
        m = layer_re.search(name)
        kind = next((k for k, s in kinds.items() if name.endswith(f".{s}.weight") or name.endswith(f".{s}.bias")), None)
        layer_heads = [h for l, h in heads if m and l == int(m.group(1))]
        if kind is not None and layer_heads:
            if kind == "o":
                if name.endswith(".weight"):
                    cols = _col_mask(config, layer_heads)
                    w_cols_dim = 0 if arch == "GPT2LMHeadModel" else 1  # Conv1D stores [in, out]
                    keep = ~cols.to(wa.device)[:, None].expand_as(wa) if w_cols_dim == 0 else \
                        ~cols.to(wa.device)[None, :].expand_as(wa)
            else:
                rows = _row_mask(arch, kind, config, layer_heads, ("q", "k", "v"))
                if wa.ndim == 1:
                    keep = ~rows.to(wa.device)
                elif arch == "GPT2LMHeadModel":
                    keep = ~rows.to(wa.device)[None, :].expand_as(wa)
                else:
                    keep = ~rows.to(wa.device)[:, None].expand_as(wa)
        out[name] = bool(torch.equal(wa[keep], wb[keep]))
    return out


def nas_gap_curve(result: NASAResult):
    """The training curve as a tidy table (step, loss, dev accuracy, dev P−R gap)."""
    import pandas as pd

    return pd.DataFrame([h for h in result.history if "step" in h])

