"""CRISPR attribution throughput: prompts/s and activations held for batch sizes 1, 8, 32.

Distilgpt2-shaped random model with the real GPT-2 tokenizer; BBQ Age items from ../shared.

    python benchmarks/bench_neurons.py
"""

import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from lens_bias import load_model, save_random_model  # noqa: E402
from lens_bias.bbq import INSTRUCTIONS, load_bbq  # noqa: E402
from lens_bias.neurons import crispr_scores  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared"


def main():
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as d:
        path = save_random_model("gpt2", Path(d) / "m", SHARED / "models/gpt2-tokenizer", n_layers=6, d_model=768,
                                 n_heads=12, n_ctx=256)
        model = load_model(path)
    items = load_bbq(SHARED / "data/bbq/Age.jsonl")[:32]
    n_neurons = model.cfg.n_layers * model.cfg.d_mlp
    print(f"model: 6 layers, d_mlp {model.cfg.d_mlp} ({n_neurons} neurons); 32 BBQ items, 1 instruction")
    for bs in (1, 8, 32):
        t = time.perf_counter()
        crispr_scores(model, items, INSTRUCTIONS[:1], batch_size=bs, progress=False)
        dt = time.perf_counter() - t
        # held per batch: hook_post activations and gradients of 3 option sequences × bs prompts
        seq = 110  # typical BBQ prompt + option length in GPT-2 tokens
        held = 2 * 3 * bs * seq * n_neurons * 4 / 2**20
        print(f"batch {bs:2d}: {len(items) / dt:5.2f} prompts/s, ≈ {held:.0f} MiB of activations+gradients held")


if __name__ == "__main__":
    main()
