"""Export edited models as Hugging Face directories, and save/load/re-apply weight edits.

TransformerLens 4 has no converter back to Hugging Face, and `bridge.original_model.save_pretrained()`
fails on the bridge's split q/k/v views. What works (raw weights, no compatibility mode): take
the wrapped module's state dict, strip the bridge's `._original_component` from every key, keep
the keys a fresh Hugging Face model of the same config has, load them into that fresh model and
`save_pretrained` it.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from .errors import LensBiasError
from .files import atomic_write, check_output_dir, replace_dir
from .models import clone_model

# Architectures whose export round trip is tested (logits equal after reload). GPT-NeoX is not:
# its bridge keeps separate copies of the split q/k/v weights, so the fused query_key_value the
# export reads does not follow edits made through the bridge.
SUPPORTED_ARCHITECTURES = ("GPT2LMHeadModel", "LlamaForCausalLM")
_BRIDGE_INFIX = "._original_component"


def _hf_module(model) -> torch.nn.Module:
    return getattr(model, "original_model", model)


def architecture(model) -> str:
    """The Hugging Face architecture name of a bridge or a Hugging Face model."""
    hf = _hf_module(model)
    archs = getattr(hf.config, "architectures", None) or [type(hf).__name__]
    return archs[0]


def check_exportable(model) -> str:
    arch = architecture(model)
    if arch not in SUPPORTED_ARCHITECTURES and type(_hf_module(model)).__name__ not in SUPPORTED_ARCHITECTURES:
        raise LensBiasError(
            f"exporting architecture {arch!r} is not supported; supported (round trip tested): "
            f"{', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    return arch


def hf_state_dict(model) -> dict[str, Tensor]:
    """The model's weights under plain Hugging Face names (the bridge's wrapper infix removed).

    Tensors share storage with the live parameters; keys a fresh Hugging Face model of the same
    config would not have (the bridge's split q/k/v views) are dropped.
    """
    hf = _hf_module(model)
    fresh_keys = set(_fresh_model(hf, device="meta").state_dict())
    out = {}
    for key, value in hf.state_dict().items():
        name = key.replace(_BRIDGE_INFIX, "")
        if name in fresh_keys and name not in out:
            out[name] = value
    missing = fresh_keys - set(out)
    if missing:
        raise LensBiasError(f"cannot map the model's weights to Hugging Face names; missing {sorted(missing)[:5]}")
    return out


def _fresh_model(hf: torch.nn.Module, device="meta", attn_implementation: str | None = None):
    """A new Hugging Face model of `hf`'s config and dtype (on the meta device: just its keys)."""
    from transformers import AutoModelForCausalLM

    kw = {"attn_implementation": attn_implementation} if attn_implementation else {}
    with torch.device(device):
        return AutoModelForCausalLM.from_config(hf.config, torch_dtype=next(hf.parameters()).dtype, **kw)


def to_hf_model(model, *, device=None, attn_implementation: str | None = None) -> torch.nn.Module:
    """A plain Hugging Face model (a copy) with the bridge's current weights — for training with
    PEFT or anything else that wants the unwrapped module."""
    hf = _hf_module(model)
    fresh = _fresh_model(hf, device="cpu", attn_implementation=attn_implementation)
    fresh.load_state_dict({k: v.detach().to("cpu") for k, v in hf_state_dict(model).items()}, strict=True)
    return fresh.to(device or next(hf.parameters()).device).eval()


def load_hf_weights(model, hf_model: torch.nn.Module, *, inplace: bool = False):
    """Copy a Hugging Face model's weights (same config, e.g. a merged LoRA model) into the bridge
    (a deep copy unless `inplace`); the inverse of `to_hf_model`."""
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
        # self-check: some bridges keep copies (not views) of split weights, which a copy misses
        tokens = _probe_tokens(target)
        ours = target(tokens.to(next(target.parameters()).device)).float().cpu()
        theirs = hf_model(input_ids=tokens.to(next(hf_model.parameters()).device)).logits.float().cpu()
        diff = (ours - theirs).abs().max().item()
    tol = _logit_tolerance(next(hf_model.parameters()).dtype, theirs)
    if not diff <= tol:
        raise LensBiasError(f"the bridge did not take the weights of architecture {architecture(target)!r} "
                            f"(logits differ by {diff:.3g}); supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    return target


def export_model(model, out_dir: str | os.PathLike, *, tokenizer=None, overwrite: bool = False,
                 verify: bool = True, atol: float | None = None) -> Path:
    """Write a (possibly edited) bridge or Hugging Face model as a Hugging Face directory
    (config.json, model.safetensors, tokenizer) that `AutoModelForCausalLM.from_pretrained` loads.

    The directory is written to a temporary sibling and renamed into place, so a failure leaves
    nothing half-written. With `verify` (default) the export is reloaded and its logits on a
    probe input are compared with the model's (max abs diff ≤ `atol`, 1e-4 in float32); this holds
    a second copy of the model in memory — pass verify=False for models that do not fit twice.
    """
    check_exportable(model)
    out_dir = Path(out_dir)
    check_output_dir(out_dir, overwrite)
    tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    fresh = to_hf_model(model, device="cpu")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        fresh.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if verify:
            diff = verify_export(model, tmp, atol=atol)
            (tmp / "lens_bias_export.json").write_text(json.dumps(
                {"architecture": architecture(model), "max_abs_logit_diff": diff}, indent=2))
        replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _logit_tolerance(dtype: torch.dtype, logits: Tensor) -> float:
    """1e-4 in float32; in half precision relative to the logits' scale (rounding grows with it)."""
    if dtype in (torch.float32, torch.float64):
        return 1e-4
    return 1e-2 * max(1.0, float(logits.float().abs().max()))


def _probe_tokens(model, n: int = 12) -> Tensor:
    hf = _hf_module(model)
    vocab = hf.config.vocab_size
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab, (2, n), generator=g)


def verify_export(model, out_dir: str | os.PathLike, tokens: Tensor | None = None, atol: float | None = None) -> float:
    """Reload an exported directory with `transformers` and return the max abs logit difference
    from `model` on `tokens`; raise if it exceeds `atol` (default 1e-4 in float32, 1% of the largest
    logit in half precision)."""
    from transformers import AutoModelForCausalLM

    hf = _hf_module(model)
    param = next(hf.parameters())
    tokens = _probe_tokens(model) if tokens is None else tokens
    reloaded = AutoModelForCausalLM.from_pretrained(str(out_dir), torch_dtype=param.dtype).to(param.device).eval()
    with torch.no_grad():
        ours = model(tokens.to(param.device)) if hasattr(model, "original_model") else hf(tokens.to(param.device)).logits
        theirs = reloaded(tokens.to(param.device)).logits
    if atol is None:
        atol = _logit_tolerance(param.dtype, ours)
    diff = float((ours.float() - theirs.float()).abs().max())
    if not diff <= atol:
        raise LensBiasError(f"exported model's logits differ from the edited model's by {diff:.3g} (> {atol})")
    return diff


@dataclass
class WeightEdit:
    """Which weights an edit changed and to what: per parameter (Hugging Face name) the index of the
    changed slices along `dim` and their new values, plus a fingerprint of the original slices."""

    changes: dict[str, dict] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)

    def to_frame(self):
        import pandas as pd

        rows = [{"parameter": k, "dim": c["dim"], "n_changed": len(c["index"]), "delta_norm": c["delta_norm"]}
                for k, c in self.changes.items()]
        return pd.DataFrame(rows, columns=["parameter", "dim", "n_changed", "delta_norm"])

    @property
    def norm(self) -> float:
        """Frobenius norm of the whole edit (all changed weights)."""
        return float(sum(c["delta_norm"] ** 2 for c in self.changes.values()) ** 0.5)


def _fingerprint(t: Tensor) -> list[float]:
    t = t.double()
    return [float(t.sum()), float(t.abs().sum())]


def weight_edit(original, edited, meta: dict | None = None) -> WeightEdit:
    """The difference between two models of the same config, stored compactly: for each changed
    parameter, only the slices (rows or columns, whichever are fewer) that changed."""
    a, b = hf_state_dict(original), hf_state_dict(edited)
    if a.keys() != b.keys():
        raise LensBiasError("the two models have different parameters: not the same architecture")
    edit = WeightEdit(meta=dict(meta or {}))
    seen = set()
    for name, wa in a.items():
        wb = b[name]
        if wa.shape != wb.shape:
            raise LensBiasError(f"parameter {name} has shape {tuple(wa.shape)} vs {tuple(wb.shape)}")
        if wb.data_ptr() in seen:  # tied weights: record once
            continue
        seen.add(wb.data_ptr())
        changed = wa.detach().cpu() != wb.detach().cpu()
        if not changed.any():
            continue
        best = None
        for dim in range(changed.dim()):
            other = [d for d in range(changed.dim()) if d != dim]
            idx = changed.any(dim=other).nonzero().flatten() if other else changed.nonzero().flatten()
            if best is None or len(idx) < len(best[1]):
                best = (dim, idx)
        dim, idx = best
        new = wb.detach().cpu().index_select(dim, idx).clone()
        old = wa.detach().cpu().index_select(dim, idx)
        edit.changes[name] = {"dim": dim, "index": idx, "values": new, "fingerprint": _fingerprint(old),
                              "delta_norm": float((new.double() - old.double()).norm())}
    return edit


def save_edit(edit: WeightEdit, path: str | os.PathLike) -> Path:
    """Save an edit as one small safetensors file (written to a temp file, then renamed)."""
    from safetensors.torch import save

    path = Path(path)
    tensors, info = {}, {}
    for i, (name, c) in enumerate(edit.changes.items()):
        tensors[f"{i}.index"] = c["index"].contiguous()
        tensors[f"{i}.values"] = c["values"].contiguous()
        info[name] = {"i": i, "dim": c["dim"], "fingerprint": c["fingerprint"], "delta_norm": c["delta_norm"]}
    data = save(tensors, metadata={"lens_bias_edit": json.dumps({"changes": info, "meta": edit.meta})})
    return atomic_write(path, lambda f: f.write(data))


def load_edit(path: str | os.PathLike) -> WeightEdit:
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise LensBiasError(f"edit file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = json.loads((f.metadata() or {})["lens_bias_edit"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (KeyError, ValueError, OSError, SafetensorError) as e:
        raise LensBiasError(f"{path} is not a lens_bias edit file ({type(e).__name__}: {e})") from None
    changes = {}
    for name, c in header["changes"].items():
        changes[name] = {"dim": c["dim"], "index": tensors[f"{c['i']}.index"], "values": tensors[f"{c['i']}.values"],
                         "fingerprint": c["fingerprint"], "delta_norm": c["delta_norm"]}
    return WeightEdit(changes=changes, meta=header["meta"])


def apply_edit(model, edit: WeightEdit, *, inplace: bool = False, check: bool = True):
    """Apply a saved edit to a model (a deep copy unless `inplace`). With `check`, refuse when the
    model's weights at the edited places differ from those the edit was computed on."""
    target = model if inplace else clone_model(model)
    state = hf_state_dict(target)
    for name, c in edit.changes.items():
        if name not in state:
            raise LensBiasError(f"the edit changes {name!r}, which this model does not have")
        w = state[name]
        idx = c["index"].to(w.device)
        values = c["values"]
        want = list(w.shape)
        want[c["dim"]] = len(idx)
        if c["dim"] >= w.ndim or (len(idx) and int(idx.max()) >= w.shape[c["dim"]]) or list(values.shape) != want:
            raise LensBiasError(f"the edit of {name!r} (values {tuple(values.shape)} along dim {c['dim']}) does not "
                                f"fit this model's weight of shape {tuple(w.shape)}: another model size")
        if check:
            fp = _fingerprint(w.detach().index_select(c["dim"], idx).cpu())
            # the originals' sums, to the rounding of the coarser of the two dtypes
            eps = max(torch.finfo(w.dtype).eps, torch.finfo(values.dtype).eps)
            tol = max(1e-5 * max(1.0, abs(c["fingerprint"][0])), 4 * eps * c["fingerprint"][1])
            if any(abs(x - y) > tol for x, y in zip(fp, c["fingerprint"])):
                raise LensBiasError(f"parameter {name!r} differs from the model the edit was made on "
                                    "(pass check=False to apply anyway)")
        with torch.no_grad():
            w.index_copy_(c["dim"], idx, values.to(w.device, w.dtype))
    return target
