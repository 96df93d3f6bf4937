"""Export edited models as Hugging Face directories, the reload checked against the model's logits
(the conversion itself: lens_bias.core.hf)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import Tensor

from ..core.checks import check_weights_finite
from ..core.errors import LensBiasError
from ..core.families import DECODER_FAMILIES, FAMILIES
from ..core.files import check_output_dir, renamed_error, replace_dir, writing_error
from ..core.hf import (
    architecture,
    hf_module,
    hf_state_dict,
    probe_tokens,
    stale_split_qkv,
    to_hf_model,
)
from ..core.precision import float32_activations, logit_tolerance
from ..core.models import HookedModel

#: architectures whose export round trip is tested (every decoder family of core.families: edited,
#: exported, reloaded in transformers with the same logits)
SUPPORTED_ARCHITECTURES = tuple(FAMILIES[f].model for f in DECODER_FAMILIES)


def check_exportable(model) -> str:
    """The model's architecture; a clear error when its export round trip is not supported, or when
    the bridge computes with other q/k/v weights than the fused ones it would export (GPT-NeoX)."""
    arch = architecture(model)
    if arch not in SUPPORTED_ARCHITECTURES and type(hf_module(model)).__name__ not in SUPPORTED_ARCHITECTURES:
        raise LensBiasError(
            f"exporting architecture {arch!r} is not supported; supported (round trip tested): "
            f"{', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    stale = stale_split_qkv(model) if hasattr(model, "original_model") else []
    if stale:
        raise LensBiasError(
            f"cannot export: in layer(s) {stale} the {arch} bridge's split q/k/v copies differ from the fused "
            "Hugging Face q/k/v weight it would export (an attention edit reached one and not the other); edit the "
            "fused weight (lens_bias.core.hf_state_dict) and call lens_bias.core.sync_split_qkv(model)")
    return arch


def export_model(model: HookedModel, out_dir: str | os.PathLike, *, tokenizer=None, overwrite: bool = False,
                 verify: bool = True, atol: float | None = None) -> Path:
    """Write a (possibly edited) bridge or Hugging Face model as a Hugging Face directory
    (config.json, model.safetensors, tokenizer) that `AutoModelForCausalLM.from_pretrained` loads.

    The directory is written to a temporary sibling and renamed into place, so a failure leaves
    nothing half-written. With `verify` (default) the export is reloaded and checked by `verify_export`
    (weights bit for bit, logits on a probe input within `atol`); this holds a second copy of the model
    in memory — pass verify=False for models that do not fit twice.
    """
    check_exportable(model)
    out_dir = Path(out_dir)
    check_output_dir(out_dir, overwrite)
    check_weights_finite(model, "export")
    tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    fresh = to_hf_model(model, device="cpu")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        try:
            fresh.save_pretrained(tmp)
        except Exception as e:  # noqa: BLE001 - safetensors raises SafetensorError for a full disk
            named = writing_error(e, tmp / "model.safetensors")
            if named is None:
                raise
            raise named from None
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if verify:
            diff = verify_export(model, tmp, atol=atol)
            (tmp / "lens_bias_export.json").write_text(json.dumps(
                {"architecture": architecture(model), "max_abs_logit_diff": diff}, indent=2))
        replace_dir(tmp, out_dir)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        named = renamed_error(e, tmp, out_dir)
        if named is not e:
            raise named from None
        raise
    return out_dir


def verify_export(model: HookedModel, out_dir: str | os.PathLike, tokens: Tensor | None = None, atol: float | None = None) -> float:
    """Reload an exported directory with `transformers` — in the model's dtype and attention implementation
    (the bridge's eager; a float16 model with its activations in float32, as load_model runs it) — and check
    it: every weight equal to the model's bit for bit, and the logits on `tokens` within `atol` of the
    model's. Returns the max abs logit difference.

    `atol` defaults to core.precision.logit_tolerance = 4·u·√(2·n_layers)·max(1, max|logit|), u the dtype's
    unit roundoff (float32: 1e-4 at least): what another order of rounding may change (the reload computes
    with transformers' own forward, the model with the bridge's). The weights are compared exactly."""
    from transformers import AutoModelForCausalLM

    hf = hf_module(model)
    param = next(hf.parameters())
    tokens = probe_tokens(model) if tokens is None else tokens
    attn = getattr(hf.config, "_attn_implementation", None) or "eager"
    reloaded = AutoModelForCausalLM.from_pretrained(str(out_dir), dtype=param.dtype, attn_implementation=attn)
    reloaded = reloaded.to(param.device).eval()
    float32_activations(reloaded)
    saved = reloaded.state_dict()
    for name, w in hf_state_dict(model).items():
        got = saved.get(name)
        if got is None or got.shape != w.shape or not torch.equal(got.to(w.device), w.detach()):
            why = "is missing" if got is None else ("has another shape" if got.shape != w.shape else "has other values")
            raise LensBiasError(f"exported weight {name} {why}: the export differs from the edited model")
    with torch.no_grad():
        ours = model(tokens.to(param.device)) if hasattr(model, "original_model") else hf(tokens.to(param.device)).logits
        theirs = reloaded(tokens.to(param.device)).logits
    if atol is None:
        atol = logit_tolerance(param.dtype, ours, hf.config.num_hidden_layers)
    diff = float((ours.float() - theirs.float()).abs().max())
    if not diff <= atol:
        raise LensBiasError(f"exported model's logits differ from the edited model's by {diff:.3g} (> {atol:.3g}, "
                            f"4·u·√(2·layers)·max|logit| in {str(param.dtype).removeprefix('torch.')})")
    return diff
