"""The checks that keep a broken model or a non-finite result from passing as a result.

- Finite: NaN or inf in a model's weights or in a method's output is an error that says where it came
  from — the first non-finite parameter, or float16 overflow when the weights are finite — never a
  table of NaN with exit code 0. `check_finite(x, what, model)` costs one reduction over the output;
  the model's parameters are scanned only when the output is not finite, to name the culprit.
  `check_weights_finite(model)` scans them up front (load_model, mitigations, export).
- A model folder (load_model): `checked_hf_model` loads the Hugging Face model with transformers'
  own loading report and refuses a config value of the wrong type, a weight the architecture needs
  and the file lacks (transformers would initialise it at random), a weight the file holds and the
  architecture has no place for, and a weight of the wrong shape; `check_tokenizer` refuses a
  tokenizer that is missing or larger than the embedding. Each names the file and the keys.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import Tensor

from .errors import LensBiasError, ModelLoadError


class NonFiniteError(LensBiasError):
    """NaN or inf in a model's weights or in a result computed from them."""


def first_nonfinite_parameter(model) -> tuple[str, int, int, tuple[int, ...]] | None:
    """(name, number of non-finite entries, numel, index of the first) of the first parameter holding
    NaN/inf, or None when every weight is finite. (Buffers are not weights: some models keep -inf
    masks in them. Parameters offloaded to disk are on the meta device and are not read here: the
    outputs' own check catches what they hold.)"""
    if model is None or not hasattr(model, "named_parameters"):
        return None
    seen = set()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.is_meta or p.data_ptr() in seen or p.numel() == 0 or not p.is_floating_point():
                continue
            seen.add(p.data_ptr())
            bad = ~torch.isfinite(p)
            if bad.any():
                first = tuple(int(i) for i in bad.nonzero()[0].tolist())
                return name.replace("._original_component", ""), int(bad.sum()), p.numel(), first
    return None


def nonfinite_cause(model) -> str:
    """Why a result from `model` is not finite: its first non-finite weight, float16 overflow, or the input."""
    hit = first_nonfinite_parameter(model)
    if hit is not None:
        name, n, numel, first = hit
        return (f"the model's weight {name} holds {n} non-finite value{'s' * (n != 1)} of {numel} (first at "
                f"index {list(first)}); reload or repair the model")
    dtype = _dtype_of(model)
    if dtype == torch.float16:
        return ("every weight is finite, so the activations overflowed float16 (largest value 65504); "
                "use dtype='bfloat16' or 'float32'")
    return "every weight is finite: the input or an intervention produced them"


def _dtype_of(model) -> torch.dtype | None:
    try:
        return next(p for p in model.parameters() if p.is_floating_point()).dtype
    except (StopIteration, AttributeError):
        return None


def check_weights_finite(model, what: str = "model") -> None:
    """A NonFiniteError naming the first parameter that holds NaN or inf (one pass over the weights)."""
    hit = first_nonfinite_parameter(model)
    if hit is not None:
        name, n, numel, first = hit
        raise NonFiniteError(f"{what}: weight {name} holds {n} non-finite value{'s' * (n != 1)} (NaN/inf) of "
                             f"{numel}, first at index {list(first)}; reload or repair the model")


def _tensors(x: Any) -> Iterable[Tensor]:
    if isinstance(x, Tensor):
        yield x
    elif isinstance(x, (int, float)):
        yield torch.tensor(float(x))
    elif isinstance(x, dict):
        for v in x.values():
            yield from _tensors(v)
    elif isinstance(x, (list, tuple)):
        for v in x:
            yield from _tensors(v)
    elif hasattr(x, "values") and isinstance(getattr(x, "values"), Tensor):  # ComponentScores
        yield x.values


def count_nonfinite(x: Any) -> tuple[int, int]:
    """(non-finite entries, all entries) over a tensor, a number, or a dict/list/ComponentScores of them."""
    bad = total = 0
    for t in _tensors(x):
        if t.is_floating_point() or t.is_complex():
            bad += int((~torch.isfinite(t.detach())).sum())
        total += t.numel()
    return bad, total


def check_finite(x, what: str, model=None):
    """`x` (a tensor, a number, or a dict/list/ComponentScores of them) unchanged; a NonFiniteError
    when it holds NaN or inf, naming `what` and — with `model` — the first non-finite weight, or
    float16 overflow when every weight is finite."""
    if isinstance(x, float) and math.isfinite(x):
        return x
    bad, total = count_nonfinite(x)
    if bad:
        cause = nonfinite_cause(model) if model is not None else "check the model's weights and dtype"
        raise NonFiniteError(f"{what}: {bad} of {total} value{'s' * (total != 1)} are NaN or inf; {cause}")
    return x


MAX_SEED = 2 ** 32 - 1  # numpy's limit; torch's is 2**64 − 1, and tracing multiplies the seed


def check_seed(seed, what: str = "seed") -> int:
    """`seed` as an int; a LensBiasError when it is not a whole number in 0..MAX_SEED (torch would raise
    'Overflow when unpacking long long' from deep inside)."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise LensBiasError(f"{what} must be a whole number from 0 to {MAX_SEED}, got {seed!r}")
    return seed


# ---- model folders -------------------------------------------------------------------------------
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "merges.txt", "vocab.txt", "spiece.model",
                   "tokenizer_config.json")
_LAYER = re.compile(r"\.(\d+)\.")


def _weights_name(source: str) -> str:
    """'m/model.safetensors' (or the folder's weights files), for error messages."""
    path = Path(source)
    files = sorted(p.name for p in path.iterdir() if p.suffix in (".safetensors", ".bin")) if path.is_dir() else []
    if len(files) == 1:
        return str(path / files[0])
    return f"{path}/{{{','.join(files)}}}" if files else f"the weights of {source}"


def _layer_of(key: str) -> int | None:
    hit = _LAYER.search(key)
    return int(hit.group(1)) if hit else None


def describe_keys(keys, model_keys, shown: int = 3) -> str:
    """Weight names in a line: a layer's many weights as 'transformer.h.4.* (every weight of layer 4)'
    or '(11 weights)', the others by name, at most `shown` names."""
    keys = sorted(keys, key=lambda k: (-1 if _layer_of(k) is None else _layer_of(k), k))
    per_layer = sum(1 for k in model_keys if _layer_of(k) == 0)
    parts, names = [], []
    for layer in dict.fromkeys(_layer_of(k) for k in keys):
        group = [k for k in keys if _layer_of(k) == layer]
        if layer is None or len(group) <= shown:
            names += group
            continue
        prefix = group[0][: _LAYER.search(group[0]).start()]
        count = f"every weight of layer {layer}" if len(group) == per_layer else f"{len(group)} weights"
        parts.append(f"{prefix}.{layer}.* ({count})")
    parts = names[:shown] + parts + ([f"and {len(names) - shown} more"] if len(names) > shown else [])
    return ", ".join(parts)


def _layer_hint(config, keys, model_keys, missing: bool) -> str:
    """' — config.json's n_layer is 5 …' when the keys are the weights of whole layers past the file's
    last one (missing) or past the config's (unexpected): then the layer count is what is wrong."""
    n = getattr(config, "num_hidden_layers", None)
    layers = {_layer_of(k) for k in keys}
    if n is None or None in layers:
        return ""
    if missing:
        per_layer = sum(1 for k in model_keys if _layer_of(k) == 0)
        whole = all(sum(_layer_of(k) == l for k in keys) == per_layer for l in layers)
        if not (whole and layers == set(range(min(layers), n))):
            return ""
    elif min(layers) < n:
        return ""
    name = getattr(config, "attribute_map", {}).get("num_hidden_layers", "num_hidden_layers")
    return f" — config.json's {name} is {n}, is that the number of layers the weights have?"


def check_loading_info(source: str, model, info: dict) -> None:
    """A ModelLoadError naming the weights transformers' loading report (`output_loading_info=True`)
    found missing (they would be random), unexpected (ignored) or of another shape than the config's."""
    arch = type(model).__name__
    weights, cfg = _weights_name(source), model.config
    model_keys = list(model.state_dict())
    missing, unexpected = set(info.get("missing_keys") or ()), set(info.get("unexpected_keys") or ())
    mismatched = sorted(info.get("mismatched_keys") or ())
    if missing:
        raise ModelLoadError(f"could not load model {source!r}: {weights} lacks {len(missing)} weight"
                             f"{'s' * (len(missing) != 1)} that config.json's {arch} has: "
                             f"{describe_keys(missing, model_keys)}{_layer_hint(cfg, missing, model_keys, True)}")
    if unexpected:
        raise ModelLoadError(f"could not load model {source!r}: {weights} holds {len(unexpected)} weight"
                             f"{'s' * (len(unexpected) != 1)} that config.json's {arch} has no place for: "
                             f"{describe_keys(unexpected, model_keys)}{_layer_hint(cfg, unexpected, model_keys, False)}")
    if mismatched:
        key, in_file, in_model = mismatched[0]
        raise ModelLoadError(f"could not load model {source!r}: {len(mismatched)} weight"
                             f"{'s' * (len(mismatched) != 1)} of {weights} do not have the shape config.json "
                             f"gives them, e.g. {key} is {list(in_file)} in the file, {list(in_model)} by the config")


def checked_config(source: str):
    """config.json as transformers reads it; a value of the wrong type (`"n_embd": "128"`) is a
    ModelLoadError naming the file and the key."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(source)
    except Exception as e:  # noqa: BLE001 - huggingface_hub's strict dataclasses raise their own type
        if type(e).__name__ != "StrictDataclassFieldValidationError":
            raise
        cause = str(e.__cause__ or e).strip().splitlines()[-1].strip()
        where = Path(source) / "config.json" if Path(source).is_dir() else f"the config of {source}"
        raise ModelLoadError(f"could not load model {source!r}: {where}: {cause}") from None


class CheckedLoader:
    """What the bridge loads the Hugging Face model with (`boot_transformers(model_class=...)`): the
    class it would pick itself, its `from_pretrained` asked for transformers' loading report, which
    `check_loading_info` reads (no weight missing, unexpected or of another shape)."""

    def __init__(self, source: str):
        self.source = source

    @staticmethod
    def model_class(config):
        from transformer_lens.model_bridge.sources.transformers import (
            determine_architecture_from_hf_config,
            get_hf_model_class_for_architecture,
        )

        return get_hf_model_class_for_architecture(determine_architecture_from_hf_config(config))

    def from_pretrained(self, name, **kwargs):
        import transformers

        cls = self.model_class(kwargs.get("config") or checked_config(name))
        verbosity = transformers.logging.get_verbosity()
        transformers.logging.set_verbosity_error()  # its loading report is ours to give, as one line
        try:
            model, info = cls.from_pretrained(name, output_loading_info=True, ignore_mismatched_sizes=True, **kwargs)
        finally:
            transformers.logging.set_verbosity(verbosity)
        check_loading_info(self.source, model, info)
        return model

    def from_config(self, config, **kwargs):
        return self.model_class(config).from_config(config, **kwargs)


def checked_loader(source: str) -> CheckedLoader:
    """`checked_config(source)` now, `CheckedLoader(source)` for the bridge's load."""
    checked_config(source)
    return CheckedLoader(source)


def check_tokenizer(model, source: str) -> None:
    """A ModelLoadError when the model's tokenizer is missing or empty (a folder without tokenizer
    files loads as a 1-token tokenizer), or holds more tokens than the embedding has rows."""
    tok = getattr(model, "tokenizer", None)
    size = len(tok) if tok is not None else 0
    if size < 2 or not tok("a b", add_special_tokens=False)["input_ids"]:
        path = Path(source)
        have = sorted(p.name for p in path.iterdir() if p.name in TOKENIZER_FILES) if path.is_dir() else []
        raise ModelLoadError(f"model {source!r} has no usable tokenizer (it loads with {size} token"
                             f"{'s' * (size != 1)}): a folder needs tokenizer.json, vocab.json + merges.txt, or "
                             f"tokenizer.model (it has {', '.join(have) or 'none of them'}); save one with "
                             "tokenizer.save_pretrained(folder), or pass tokenizer=")
    d_vocab = getattr(model.cfg, "d_vocab", None)
    if d_vocab and size > d_vocab:
        raise ModelLoadError(f"model {source!r}: its tokenizer has {size} tokens but the embedding only {d_vocab} "
                             "rows (token ids past it would fail); is it the model's own tokenizer?")


__all__ = ["MAX_SEED", "NonFiniteError", "check_finite", "check_seed", "check_loading_info", "check_tokenizer", "check_weights_finite",
           "CheckedLoader", "checked_config", "checked_loader", "count_nonfinite", "describe_keys", "first_nonfinite_parameter",
           "nonfinite_cause"]
