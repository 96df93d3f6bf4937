"""CRISPR attribution throughput: prompts/s and peak memory for batch sizes 1, 8, 32.

Distilgpt2-shaped random model with the real GPT-2 tokenizer; 32 BBQ Age items (shipped subset),
one instruction. Each batch size runs in a process of its own, so its peak resident memory
(getrusage) is its own; "above the model" subtracts the peak after loading the model.

    python benchmarks/bench_neurons.py
"""

import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

DATA = Path(__file__).resolve().parents[1] / "data"


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def one(batch_size: int) -> None:
    import torch

    from lens_bias import load_model, save_random_model
    from lens_bias.locate import crispr_scores
    from lens_bias.tasks import MC_INSTRUCTIONS as INSTRUCTIONS
    from lens_bias.tasks import load_bbq

    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as d:
        path = save_random_model("gpt2", Path(d) / "m", DATA / "tokenizers/gpt2", n_layers=6, d_model=768,
                                 n_heads=12, n_ctx=256)
        model = load_model(path)
    items = load_bbq("Age").select(range(32))
    base = peak_mib()
    t = time.perf_counter()
    crispr_scores(model, items, INSTRUCTIONS[:1], batch_size=batch_size, progress=False)
    dt = time.perf_counter() - t
    peak = peak_mib()
    print(f"batch {batch_size:2d}: {len(items) / dt:5.2f} prompts/s, peak RSS {peak:6.0f} MiB "
          f"({peak - base:5.0f} MiB above the loaded model)")


def main():
    print("model: 6 layers, d_model 768, d_mlp 3072 (18432 neurons); 32 BBQ Age items, 1 instruction")
    for bs in (1, 8, 32):
        subprocess.run([sys.executable, __file__, str(bs)], check=True)


if __name__ == "__main__":
    if len(sys.argv) > 1:
        one(int(sys.argv[1]))
    else:
        main()
