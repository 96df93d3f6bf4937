"""The bridge ↔ Hugging Face conversion: plain HF weights of a bridge, a plain HF copy, a new bridge
around an HF model (`clone_model`), weights copied back, and the output projections to edit.

TransformerLens 4 has no converter back to Hugging Face, and `bridge.original_model.save_pretrained()`
fails on the bridge's split q/k/v views. What works (raw weights, no compatibility mode): take the
wrapped module's state dict, strip the bridge's `._original_component` from every key, keep the
keys a fresh Hugging Face model of the same config has.
"""

from __future__ import annotations

import copy

import torch
from jaxtyping import Float
from torch import Tensor
from transformer_lens.model_bridge import TransformerBridge

from .errors import LensBiasError, ModelLoadError
from .hooks import device_of
from .models import HookedModel, set_conventions
from .precision import float32_activations, logit_tolerance
from .prompts import prepends_bos

_BRIDGE_INFIX = "._original_component"


def hf_module(model) -> torch.nn.Module:
    """The Hugging Face module a bridge wraps (sharing its parameters), or the HF model itself."""
    return getattr(model, "original_model", model)


def architecture(model) -> str:
    """The Hugging Face architecture name of a bridge or a Hugging Face model."""
    hf = hf_module(model)
    archs = getattr(hf.config, "architectures", None) or [type(hf).__name__]
    return archs[0]


def fresh_model(hf: torch.nn.Module, device="meta", attn_implementation: str | None = None,
                dtype: torch.dtype | None = None) -> torch.nn.Module:
    """A new Hugging Face model of `hf`'s config and dtype (or `dtype`; on the meta device: just its keys)."""
    from transformers import AutoModelForCausalLM

    kw = {"attn_implementation": attn_implementation} if attn_implementation else {}
    with torch.device(device):
        return AutoModelForCausalLM.from_config(hf.config, torch_dtype=dtype or next(hf.parameters()).dtype, **kw)


def hf_state_dict(model) -> dict[str, Tensor]:
    """The model's weights under plain Hugging Face names (the bridge's wrapper infix removed).

    Tensors share storage with the live parameters; keys a fresh Hugging Face model of the same
    config would not have (the bridge's split q/k/v views) are dropped.
    """
    hf = hf_module(model)
    fresh_keys = set(fresh_model(hf, device="meta").state_dict())
    out = {}
    for key, value in hf.state_dict().items():
        name = key.replace(_BRIDGE_INFIX, "")
        if name in fresh_keys and name not in out:
            out[name] = value
    missing = fresh_keys - set(out)
    if missing:
        raise LensBiasError(f"cannot map the model's weights to Hugging Face names; missing {sorted(missing)[:5]}")
    return out


def to_hf_model(model: HookedModel, *, device=None, attn_implementation: str | None = None,
                dtype: torch.dtype | None = None) -> torch.nn.Module:
    """A plain Hugging Face model (a copy) with the bridge's current weights — for training with
    PEFT, exporting, or anything else that wants the unwrapped module; in `dtype` when given."""
    hf = hf_module(model)
    fresh = fresh_model(hf, device="cpu", attn_implementation=attn_implementation, dtype=dtype)
    fresh.load_state_dict({k: v.detach().to("cpu") for k, v in hf_state_dict(model).items()}, strict=True)
    float32_activations(fresh)
    return fresh.to(device or device_of(hf)).eval()


def clone_model(model: TransformerBridge) -> TransformerBridge:
    """An independent copy of a bridge (or a Hugging Face model) with the same weights, device and dtype.

    Use this, not copy.deepcopy: the bridge's split q/k/v parameters are views of the fused HF
    weight (GPT-2's c_attn), and deepcopy turns them into separate tensors, so an edit of the
    fused weight in the copy would no longer reach its forward pass.
    """
    if not hasattr(model, "original_model"):  # a plain Hugging Face model: no views to keep
        return copy.deepcopy(model)
    source = getattr(model, "lens_bias_source", None) or model.original_model.config._name_or_path
    param = next(model.original_model.parameters())
    hf = to_hf_model(model, attn_implementation="eager")
    try:
        clone = TransformerBridge.boot_transformers(str(source), hf_model=hf, tokenizer=model.tokenizer,
                                                    device=param.device, dtype=param.dtype)
    except (OSError, ValueError, KeyError) as e:
        raise ModelLoadError(f"could not copy the model (its source {source!r} must stay readable): {e}") from None
    clone.eval()
    float32_activations(clone)
    set_conventions(clone, prepends_bos(model))
    clone.lens_bias_source = source
    return clone


def probe_tokens(model: HookedModel, n: int = 12) -> Tensor:
    """Two fixed random token sequences for checking that two models compute the same logits."""
    vocab = hf_module(model).config.vocab_size
    return torch.randint(0, vocab, (2, n), generator=torch.Generator().manual_seed(0))


def _split_attentions(model):
    """(layer, attention bridge) for each attention that split a fused q/k/v weight at load time
    (GPT-2's c_attn, Phi-3's qkv_proj, GPT-NeoX's query_key_value)."""
    for layer, block in enumerate(getattr(model, "blocks", ())):
        attn = block.attn
        if getattr(attn, "split_qkv_matrix", None) is not None and getattr(attn, "original_component", None) is not None:
            yield layer, attn


def _split_pairs(attn):
    """(the bridge's q/k/v parameter, the same slice split afresh from the fused weight) pairs."""
    with torch.no_grad():
        fresh = attn.split_qkv_matrix(attn.original_component)
    for part, new in zip((attn.q, attn.k, attn.v), fresh):
        for name in ("weight", "bias"):
            ours, theirs = getattr(part.original_component, name, None), getattr(new, name, None)
            if ours is not None and theirs is not None:
                yield ours, theirs


def stale_split_qkv(model) -> list[int]:
    """Layers whose split q/k/v weights (what the bridge computes with) differ from the fused Hugging
    Face weight (what is exported). GPT-2 and Phi-3 bridges split into views, so these never
    differ; GPT-NeoX bridges keep copies, so an attention edit made on one side misses the other."""
    return [layer for layer, attn in _split_attentions(model)
            if any(not torch.equal(ours, theirs) for ours, theirs in _split_pairs(attn))]


def sync_split_qkv(model) -> list[int]:
    """Copy each fused q/k/v Hugging Face weight into the bridge's split copies (after the fused weight
    was edited, e.g. a merged LoRA adapter on GPT-NeoX); returns the layers that changed."""
    changed = []
    for layer, attn in _split_attentions(model):
        pairs = [(ours, theirs) for ours, theirs in _split_pairs(attn) if not torch.equal(ours, theirs)]
        with torch.no_grad():
            for ours, theirs in pairs:
                ours.copy_(theirs)
        if pairs:
            changed.append(layer)
    return changed


def load_hf_weights(model: TransformerBridge, hf_model: torch.nn.Module, *, inplace: bool = False) -> TransformerBridge:
    """Copy a Hugging Face model's weights (same config, e.g. a merged LoRA model) into the bridge
    (a copy unless `inplace`); the inverse of `to_hf_model`. Bridges that keep copies of split q/k/v
    weights (GPT-NeoX) get them re-split from the fused weight; the logits are checked afterwards."""
    target = model if inplace else clone_model(model)
    src = hf_model.state_dict()
    dst = hf_state_dict(target)
    missing = [k for k in dst if k not in src]
    if missing:
        raise LensBiasError(f"the Hugging Face model lacks {len(missing)} weights of the bridge, e.g. {missing[0]!r}")
    with torch.no_grad():
        for k, w in dst.items():
            if src[k].shape != w.shape:
                raise LensBiasError(f"weight {k!r} has shape {tuple(src[k].shape)}, the bridge's {tuple(w.shape)}")
            w.copy_(src[k].to(w.device, w.dtype))
        sync_split_qkv(target)
        tokens = probe_tokens(target)
        ours = target(tokens.to(device_of(target))).float().cpu()
        theirs = hf_model(input_ids=tokens.to(device_of(hf_model))).logits.float().cpu()
        diff = (ours - theirs).abs().max().item()
    dtypes = {next(hf_model.parameters()).dtype, next(hf_module(target).parameters()).dtype}
    coarse = next((d for d in (torch.bfloat16, torch.float16) if d in dtypes), torch.float32)  # weights were cast
    if not diff <= logit_tolerance(coarse, theirs, hf_module(target).config.num_hidden_layers):
        raise LensBiasError(f"the bridge did not take the weights of architecture {architecture(target)!r} "
                            f"(logits differ by {diff:.3g})")
    return target


def out_projection(model: TransformerBridge, layer: int, which: str = "mlp") -> Float[Tensor, "d_in d_model"]:
    """The output projection of `layer`'s MLP ('mlp': [d_mlp, d_model]) or attention ('attn':
    [n_heads·d_head, d_model]) as an [in, out] view sharing the Hugging Face parameter's storage —
    in-place edits of it are weight edits that export (GPT-2's Conv1D stores [in, out], nn.Linear
    [out, in])."""
    if which not in ("mlp", "attn"):
        raise LensBiasError(f"which must be 'mlp' or 'attn', not {which!r}")
    block = model.blocks[layer]
    module = getattr(block.mlp, "out", None) if which == "mlp" else getattr(block.attn, "o", None)
    hf = getattr(module, "original_component", None)
    if hf is None or not hasattr(hf, "weight"):
        raise LensBiasError(f"cannot find the {which} output projection of layer {layer} for this architecture")
    return hf.weight if type(hf).__name__ == "Conv1D" else hf.weight.T
