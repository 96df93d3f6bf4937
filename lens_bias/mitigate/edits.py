"""Weight edits and the result of a mitigation.

`weight_edit(original, edited)` stores only the changed slices of the changed weights (a pruned
neuron is a few KB) with a fingerprint of the originals; `save_edit` / `load_edit` / `apply_edit`
move it between runs and refuse a different base model. Every weight-editing mitigation returns a
`Mitigation`: the edited model, its WeightEdit and a report.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..core.checks import check_finite
from ..core.errors import LensBiasError
from ..core.files import atomic_write
from ..core.hf import clone_model, hf_state_dict, sync_split_qkv
from ..core.models import HookedModel


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
        new = check_finite(wb.detach().cpu().index_select(dim, idx).clone(), f"the edited weight {name}")
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


def apply_edit(model: HookedModel, edit: WeightEdit, *, inplace: bool = False, check: bool = True):
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
    sync_split_qkv(target)  # GPT-NeoX bridges compute with copies of the fused q/k/v weight
    return target


@dataclass
class Mitigation:
    """What every weight-editing mitigation returns (prune_neurons, prune_heads, lsdm_edit, nasa_train):
    the edited model (a copy; the original is untouched), the WeightEdit that turns the original
    into it, and a report — the method, its units or sites, and the numbers it measured."""

    model: Any
    edit: WeightEdit
    report: dict = field(default_factory=dict)

    @classmethod
    def of(cls, original, edited, method: str, **report) -> "Mitigation":
        """The Mitigation of `edited` against `original` (the edit computed from their weights)."""
        meta = {"method": method, **{k: v for k, v in report.items() if isinstance(v, (int, float, str, list, tuple))}}
        return cls(edited, weight_edit(original, edited, meta=json.loads(json.dumps(meta, default=str))),
                   {"method": method, **report})

    def __repr__(self) -> str:
        shown = {k: v for k, v in self.report.items() if isinstance(v, (int, float, str, list, tuple))}
        return f"Mitigation({shown}, {len(self.edit.changes)} weights changed, ‖Δ‖ = {self.edit.norm:.4g})"
