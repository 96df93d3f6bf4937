"""Random-weight models of real Hugging Face families, for tests and benchmarks (no pretrained weights
offline). One row per family: its config and model classes and how its config spells the sizes; a
new family is one row of FAMILIES."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import ModelLoadError


@dataclass(frozen=True)
class Family:
    """A transformers family: config class, model class, the config's name for each size
    (d_model, n_layers, n_heads, n_kv_heads, d_head, d_mlp, n_ctx; a size the family lacks is left
    out) and fixed config entries (a value that names a size, e.g. "d_head", takes that size)."""

    config: str
    model: str
    sizes: dict[str, str]
    fixed: dict = field(default_factory=dict)
    seq2seq: bool = False


#: how Llama-style configs spell the sizes (Llama, Mistral, Qwen2, Gemma, Phi-3)
_LLAMA_SIZES = {"d_model": "hidden_size", "n_layers": "num_hidden_layers", "n_heads": "num_attention_heads",
                "n_kv_heads": "num_key_value_heads", "d_head": "head_dim", "d_mlp": "intermediate_size",
                "n_ctx": "max_position_embeddings"}
_NO_GQA = {k: v for k, v in _LLAMA_SIZES.items() if k not in ("n_kv_heads", "d_head")}

FAMILIES: dict[str, Family] = {
    "gpt2": Family("GPT2Config", "GPT2LMHeadModel",
                   {"d_model": "n_embd", "n_layers": "n_layer", "n_heads": "n_head", "d_mlp": "n_inner",
                    "n_ctx": "n_positions"}),
    "llama": Family("LlamaConfig", "LlamaForCausalLM", _LLAMA_SIZES),
    "mistral": Family("MistralConfig", "MistralForCausalLM", _LLAMA_SIZES),
    "qwen2": Family("Qwen2Config", "Qwen2ForCausalLM", _LLAMA_SIZES),
    # Gemma 2 keeps its soft-capping of attention scores and final logits (50, 30: the real models')
    "gemma2": Family("Gemma2Config", "Gemma2ForCausalLM", _LLAMA_SIZES, {"query_pre_attn_scalar": "d_head"}),
    "gemma3": Family("Gemma3TextConfig", "Gemma3ForCausalLM", _LLAMA_SIZES, {"query_pre_attn_scalar": "d_head"}),
    "phi3": Family("Phi3Config", "Phi3ForCausalLM", {k: v for k, v in _LLAMA_SIZES.items() if k != "d_head"}),
    # parallel attention and MLP (use_parallel_residual, Pythia's default): no resid_mid
    "neox": Family("GPTNeoXConfig", "GPTNeoXForCausalLM", _NO_GQA),
    "opt": Family("OPTConfig", "OPTForCausalLM", {**_NO_GQA, "d_mlp": "ffn_dim"}, {"word_embed_proj_dim": "d_model"}),
    "t5": Family("T5Config", "T5ForConditionalGeneration",
                 {"d_model": "d_model", "n_layers": "num_layers", "n_heads": "num_heads", "d_head": "d_kv",
                  "d_mlp": "d_ff"}, {"decoder_start_token_id": 0}, seq2seq=True),
}

#: the decoder families (every lens_bias method runs on these)
DECODER_FAMILIES = tuple(name for name, f in FAMILIES.items() if not f.seq2seq)


def random_config(family: str, tokenizer, *, n_layers: int = 2, d_model: int = 64, n_heads: int = 4,
                  n_kv_heads: int | None = None, d_mlp: int | None = None, n_ctx: int = 128, **overrides):
    """The family's config with these sizes, the tokenizer's vocabulary and special tokens, and
    `overrides` (config entries in the family's own spelling, e.g. sliding_window=4).
    n_kv_heads (default n_heads // 2) applies to families with grouped-query attention only."""
    import transformers

    if family not in FAMILIES:
        raise ModelLoadError(f"unknown model family {family!r}; choose one of {tuple(FAMILIES)}")
    fam = FAMILIES[family]
    sizes = {"d_model": d_model, "n_layers": n_layers, "n_heads": n_heads, "d_head": d_model // n_heads,
             "n_kv_heads": n_kv_heads or max(1, n_heads // 2), "d_mlp": d_mlp or 4 * d_model, "n_ctx": n_ctx}
    kw = {name: sizes[ours] for ours, name in fam.sizes.items()}
    kw.update({k: sizes.get(v, v) if isinstance(v, str) else v for k, v in fam.fixed.items()})
    kw["vocab_size"] = len(tokenizer)
    if not fam.seq2seq:
        # no pad id: some configs' default (OPT's 1, Gemma's 0) is a real token of this tokenizer, whose
        # embedding row would be initialised to zero
        kw.update(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=None)
    kw.update(overrides)
    return getattr(transformers, fam.config)(**kw)


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
    **overrides,
) -> Path:
    """Save a random-weight model of a real family (a key of FAMILIES: 'gpt2', 'llama', 'mistral',
    'qwen2', 'gemma2', 'gemma3', 'phi3', 'neox', 'opt', 't5') with a given tokenizer to `path`, as a
    Hugging Face directory; `overrides` are further config entries (random_config)."""
    import transformers
    from transformers import AutoTokenizer

    if family not in FAMILIES:
        raise ModelLoadError(f"unknown model family {family!r}; choose one of {tuple(FAMILIES)}")
    tok = AutoTokenizer.from_pretrained(str(tokenizer))
    cfg = random_config(family, tok, n_layers=n_layers, d_model=d_model, n_heads=n_heads, n_kv_heads=n_kv_heads,
                        d_mlp=d_mlp, n_ctx=n_ctx, **overrides)
    torch.manual_seed(seed)
    model = getattr(transformers, FAMILIES[family].model)(cfg).eval()
    path = Path(path)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path
