"""NAS of every head: lens_bias (one forward per batch, keeps only the answer rows of the attention
patterns, skips the unembedding) vs a full run_with_cache of the same prompts.

    python benchmarks/bench_nas.py [--tokenizer data/tokenizers/gpt2]
"""

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from lens_bias import (  # noqa: E402
    binary_prompts,
    comparison_items,
    load_model,
    negative_attention_scores,
    save_random_model,
)


def measure(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def nbytes(tensors):
    """MiB held, counting a tensor once even when several hook aliases point at it."""
    seen = {(t.data_ptr(), tuple(t.shape)): t for t in tensors}
    return sum(t.numel() * t.element_size() for t in seen.values()) / 2**20


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizer", default=str(Path(__file__).resolve().parents[1] / "data/tokenizers/gpt2"))
    ap.add_argument("--n", type=int, default=16, help="questions (× 4 instruction templates)")
    args = ap.parse_args()
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as d:
        path = save_random_model("gpt2", Path(d) / "m", args.tokenizer, n_layers=6, d_model=768, n_heads=12, n_ctx=64)
        model = load_model(path)
    ps = binary_prompts(model, comparison_items(args.n, level=2))
    print(f"model: 6 layers × 12 heads, d_model 768; prompts {tuple(ps.tokens.shape)}")
    res, t_ours = measure(lambda: negative_attention_scores(model, ps, batch_size=len(ps), progress=False))
    m_ours = nbytes([res.per_prompt, res.att_neg, res.att_pos])

    def full():
        with torch.no_grad():
            _, cache = model.run_with_cache(ps.tokens, attention_mask=ps.attention_mask)
        return cache

    cache, t_full = measure(full)
    m_full = nbytes(cache.values())
    pat = nbytes([v for k, v in cache.items() if k.endswith("hook_pattern")])
    print(f"NAS, all {model.cfg.n_layers * model.cfg.n_heads} heads: {t_ours:.3f}s, holds {m_ours:.2f} MiB")
    print(f"full run_with_cache:      {t_full:.3f}s, holds {m_full:.1f} MiB (patterns alone {pat:.1f} MiB)")
    print(f"→ {t_full / t_ours:.2f}× faster, {m_full / max(m_ours, 1e-6):.1f}× less memory")


if __name__ == "__main__":
    main()
