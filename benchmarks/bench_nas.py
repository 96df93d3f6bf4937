"""NAS of every head: lens_bias (one forward per batch, keeps only the answer rows of the attention
patterns, skips the unembedding) vs a full run_with_cache of the same prompts.

    python benchmarks/bench_nas.py [--tokenizer ../shared/models/gpt2-tokenizer]
"""

import argparse
import os
import tempfile
import time
import tracemalloc
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from lens_bias import binary_prompts, comparison_items, load_model, negative_attention_scores, save_random_model  # noqa: E402


def measure(fn):
    tracemalloc.start()
    t = time.perf_counter()
    out = fn()
    dt = time.perf_counter() - t
    _, top = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return out, dt, top / 2**20


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizer", default=str(Path(__file__).resolve().parents[2] / "shared/models/gpt2-tokenizer"))
    ap.add_argument("--n", type=int, default=16, help="questions (× 4 instruction templates)")
    args = ap.parse_args()
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as d:
        path = save_random_model("gpt2", Path(d) / "m", args.tokenizer, n_layers=6, d_model=768, n_heads=12, n_ctx=64)
        model = load_model(path)
    ps = binary_prompts(model, comparison_items(args.n, level=2))
    print(f"model: 6 layers × 12 heads, d_model 768; prompts {tuple(ps.tokens.shape)}")
    res, t_ours, m_ours = measure(lambda: negative_attention_scores(model, ps, batch_size=len(ps), progress=False))

    def full():
        with torch.no_grad():
            _, cache = model.run_with_cache(ps.tokens, attention_mask=ps.attention_mask)
        return cache

    _, t_full, m_full = measure(full)
    print(f"NAS, all {model.cfg.n_layers * model.cfg.n_heads} heads: {t_ours:.3f}s, peak {m_ours:.1f} MiB")
    print(f"full run_with_cache:      {t_full:.3f}s, peak {m_full:.1f} MiB")
    print(f"→ {t_full / t_ours:.2f}× faster, {m_full / max(m_ours, 1e-6):.1f}× less memory")


if __name__ == "__main__":
    main()
