"""Load a model as a TransformerLens 4 hooked model (`TransformerBridge`, raw HF weights)."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from transformer_lens.model_bridge import TransformerBridge

from .checks import check_tokenizer, check_weights_finite, checked_loader
from .errors import ModelLoadError
from .files import DATA_DIR
from .precision import float32_activations

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


def _resolve_source(name_or_path: str | os.PathLike) -> tuple[str, str]:
    """(what to hand to transformers, how it was found)."""
    name = str(name_or_path)
    if name in SHIPPED_MODELS:
        return str(shipped_model_dir(name)), "shipped"
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelLoadError(f"{path} is a file; load_model wants a Hugging Face model directory")
        if not (path / "config.json").is_file():
            raise ModelLoadError(
                f"directory {path} has no config.json, so it is not a Hugging Face model "
                "directory (save one with model.save_pretrained(dir) and tokenizer.save_pretrained(dir))"
            )
        return str(path), "directory"
    if name.startswith((".", "/", "~")) or os.sep in name and name.count("/") > 1:
        raise ModelLoadError(f"model directory {name!r} does not exist")
    return name, "hub"


def load_model(
    name_or_path: str | os.PathLike,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    *,
    tokenizer=None,
) -> TransformerBridge:
    """Load a hooked model (TransformerBridge, eval mode, raw HF weights, no weight processing).

    `name_or_path` is a shipped model ('organism', 'organism-control'), a local Hugging Face
    directory, or a hub name (needs the hub or a filled HF cache). Weights stay raw so that
    edits can be exported back to Hugging Face format.
    """
    source, kind = _resolve_source(name_or_path)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype)
    if kind == "hub":
        try:
            from transformers import AutoConfig

            AutoConfig.from_pretrained(source, local_files_only=_is_offline())
        except Exception as e:  # transformers raises OSError/ValueError/HTTP errors
            raise ModelLoadError(
                f"could not load model {source!r}: it is not a shipped model "
                f"({', '.join(sorted(SHIPPED_MODELS))}), not an existing local directory, and the "
                f"Hugging Face hub{' (offline: HF_HUB_OFFLINE=1)' if _is_offline() else ''} and cache "
                f"do not have it ({type(e).__name__}). Without network, download the model elsewhere "
                "and call load_model('/path/to/hf_model_dir')."
            ) from None
    if tokenizer is not None and isinstance(tokenizer, (str, os.PathLike)):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer))
    try:
        model = TransformerBridge.boot_transformers(source, device=dev, dtype=dt, tokenizer=tokenizer,
                                                    model_class=checked_loader(source))
    except ModelLoadError:
        raise
    except (OSError, ValueError, KeyError, NotImplementedError, RuntimeError, EOFError) as e:
        raise ModelLoadError(f"could not load model {source!r} ({kind}): {type(e).__name__}: {_first_line(e)}") from None
    except Exception as e:  # noqa: BLE001 - safetensors, pickle and JSON readers raise their own types
        if type(e).__name__ not in ("SafetensorError", "UnpicklingError", "JSONDecodeError", "HeaderTooLarge"):
            raise
        raise ModelLoadError(f"could not load model {source!r}: {_weights_file(source)} is corrupt or truncated "
                             f"({type(e).__name__}: {_first_line(e)})") from None
    model.eval()
    float32_activations(model)  # float16: GELU's x³ would overflow (lens_bias.core.precision)
    check_weights_finite(model, f"model {source!r}")
    check_tokenizer(model, source)
    tok = model.tokenizer
    if tok is not None and tok.pad_token_id is None and tok.eos_token_id is not None:
        tok.pad_token = tok.eos_token
    model.lens_bias_source = source
    return model


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


_RANDOM_FAMILIES = ("gpt2", "llama", "neox", "t5")


def save_random_model(
    family: str,
    path: str | os.PathLike,
    tokenizer: str | os.PathLike,
    *,
    seed: int = 0,
    n_layers: int = 2,
    d_model: int = 64,
    n_heads: int = 4,
    n_kv_heads: int | None = None,
    d_mlp: int | None = None,
    n_ctx: int = 128,
) -> Path:
    """Save a random-weight model of a real family ('gpt2', 'llama' (GQA via n_kv_heads),
    'neox', 't5') with a given tokenizer to `path`, as a Hugging Face directory."""
    from transformers import (
        AutoTokenizer,
        GPT2Config,
        GPT2LMHeadModel,
        GPTNeoXConfig,
        GPTNeoXForCausalLM,
        LlamaConfig,
        LlamaForCausalLM,
        T5Config,
        T5ForConditionalGeneration,
    )

    if family not in _RANDOM_FAMILIES:
        raise ModelLoadError(f"unknown model family {family!r}; choose one of {_RANDOM_FAMILIES}")
    tok = AutoTokenizer.from_pretrained(str(tokenizer))
    vocab = len(tok)
    d_mlp = d_mlp or 4 * d_model
    if family == "gpt2":
        cfg = GPT2Config(vocab_size=vocab, n_positions=n_ctx, n_embd=d_model, n_layer=n_layers,
                         n_head=n_heads, n_inner=d_mlp, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id)
        cls = GPT2LMHeadModel
    elif family == "llama":
        cfg = LlamaConfig(vocab_size=vocab, hidden_size=d_model, intermediate_size=d_mlp,
                          num_hidden_layers=n_layers, num_attention_heads=n_heads,
                          num_key_value_heads=n_kv_heads or max(1, n_heads // 2),
                          max_position_embeddings=n_ctx, bos_token_id=tok.bos_token_id,
                          eos_token_id=tok.eos_token_id)
        cls = LlamaForCausalLM
    elif family == "neox":
        cfg = GPTNeoXConfig(vocab_size=vocab, hidden_size=d_model, intermediate_size=d_mlp,
                            num_hidden_layers=n_layers, num_attention_heads=n_heads,
                            max_position_embeddings=n_ctx, bos_token_id=tok.bos_token_id,
                            eos_token_id=tok.eos_token_id)
        cls = GPTNeoXForCausalLM
    else:
        cfg = T5Config(vocab_size=vocab, d_model=d_model, d_ff=d_mlp, num_layers=n_layers,
                       num_heads=n_heads, d_kv=d_model // n_heads, decoder_start_token_id=0)
        cls = T5ForConditionalGeneration
    torch.manual_seed(seed)
    model = cls(cfg).eval()
    path = Path(path)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path
