"""A PEFT LoRA adapter restricted to chosen attention heads (NASA's head-restricted fine-tuning).

PEFT has no per-head LoRA. The config targets the attention projections of the heads' layers
(`layers_to_transform`) and the model masks the LoRA factors outside the chosen heads' slices:

- output-side projections (q/k/v; GPT-2's fused `c_attn`, Phi-3's fused `qkv_proj`, GPT-NeoX's
  interleaved `query_key_value`): only the rows of `lora_B` that produce the heads' q/k/v
  features may be non-zero, so ΔW = B·A is zero on every other head's rows;
- the output projection (`c_proj`, `o_proj`, `dense`, OPT's `out_proj`): only the columns of
  `lora_A` that read the heads' z features may be non-zero, so ΔW is zero on every other head's
  columns.

The masked entries are zeroed and their gradients multiplied by 0, so with Adam(W) they stay
exactly 0 and the merged weights of other heads are bit-identical (`head_slices_unchanged`).
Under grouped-query attention (Llama, Mistral, Qwen2, Gemma, Phi-3 with fewer KV heads) k/v are per KV group: training a head's
k/v also changes the query heads that share its KV group — pass modules=("q", "o") to change the
chosen heads alone.
"""

from __future__ import annotations

import re
from typing import Literal

import torch
from torch import Tensor

from ...core.errors import LensBiasError
from ...core.hf import architecture, hf_state_dict, to_hf_model
from ...core.models import HookedModel

Projection = Literal["q", "k", "v", "o"]


_SPLIT = ("layers", {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj"})
# architecture → (layers_pattern, {kind: module suffix}) with kind in q, k, v, qkv, o
HEAD_MODULES = {
    "GPT2LMHeadModel": ("h", {"qkv": "attn.c_attn", "o": "attn.c_proj"}),
    "LlamaForCausalLM": _SPLIT,
    "MistralForCausalLM": _SPLIT,
    "Qwen2ForCausalLM": _SPLIT,
    "Gemma2ForCausalLM": _SPLIT,
    "Gemma3ForCausalLM": _SPLIT,
    "Phi3ForCausalLM": ("layers", {"qkv": "self_attn.qkv_proj", "o": "self_attn.o_proj"}),
    "GPTNeoXForCausalLM": ("layers", {"qkv": "attention.query_key_value", "o": "attention.dense"}),
    "OPTForCausalLM": ("layers", {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "out_proj"}),
}
#: how a fused q/k/v projection orders its output rows: "concat" [q (all heads) | k (all KV heads) | v]
#: (GPT-2's c_attn, Phi-3's qkv_proj with grouped-query sizes), "interleaved" per head [q | k | v] (GPT-NeoX)
_FUSED = {"GPT2LMHeadModel": "concat", "Phi3ForCausalLM": "concat", "GPTNeoXForCausalLM": "interleaved"}


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
    pairs = []
    for u in heads:
        try:
            l, h = u
        except (TypeError, ValueError):
            raise LensBiasError(f"head {u!r} is not a (layer, head) pair") from None
        try:
            whole = not any(isinstance(v, bool) or not float(v).is_integer() for v in (l, h))
        except (TypeError, ValueError):
            whole = False
        if not whole:
            raise LensBiasError(f"head ({l}, {h}): layer and head must be whole numbers")
        if (int(l), int(h)) in pairs:
            raise LensBiasError(f"head ({l}, {h}) is listed twice; give each head once")
        pairs.append((int(l), int(h)))
    heads = sorted(pairs)
    if not heads:
        raise LensBiasError("no heads selected")
    for l, h in heads:
        if not (0 <= l < n_layers and 0 <= h < n_heads):
            raise LensBiasError(f"head ({l}, {h}) out of range: the model has {n_layers} layers × {n_heads} heads")
    return heads


def head_lora_config(model: HookedModel, heads, *, r: int = 8, alpha: int = 16, dropout: float = 0.0,
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
    mask = torch.zeros((n_heads + 2 * n_kv) * d_head, dtype=torch.bool)
    parts = [i for i, m in enumerate("qkv") if m in modules]
    for h in layer_heads:
        for part in parts:
            if _FUSED[arch] == "concat":  # [q (all heads) | k (all KV heads) | v]; a head's k/v: its KV group's
                unit = h if part == 0 else h // (n_heads // n_kv)
                start = (0, n_heads, n_heads + n_kv)[part] * d_head + unit * d_head
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


def head_lora_model(model: HookedModel, heads, *, r: int = 8, alpha: int = 16, dropout: float = 0.0,
                    modules: tuple[str, ...] = ("q", "k", "v", "o"), device=None, seed: int = 0,
                    dtype: torch.dtype | None = None):
    """A PEFT LoRA model (on a plain Hugging Face copy of `model`, eager attention, in `dtype` when
    given) that can change only the selected heads: LoRA factors outside the heads' slices are zero
    and gradient-masked."""
    from peft import get_peft_model

    torch.manual_seed(seed)
    cfg = head_lora_config(model, heads, r=r, alpha=alpha, dropout=dropout, modules=modules)
    arch = architecture(model)
    hf = to_hf_model(model, device=device, attn_implementation="eager", dtype=dtype)
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


def head_slices_unchanged(original, edited, heads) -> dict[str, bool]:
    """For each weight: True when everything outside the selected heads' slices is bit-identical
    (attention projections of the heads' layers checked slice by slice, all other weights whole)."""
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
