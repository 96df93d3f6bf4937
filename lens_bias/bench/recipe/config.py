"""The benchmark models' shared settings: seed, architecture, tokenizer size, training budget."""

from __future__ import annotations

import os

SEED = 1234
ARCH = dict(n_layer=6, n_embd=256, n_head=8, n_inner=1024, n_positions=128)
VOCAB_SIZE = 3072
EOT = "<|endoftext|>"
DEFAULT_STEPS = {"gender": 3000, "decision": 3000}
TOKENS_PER_STEP = 1400
#: phase A writes a checkpoint this often (seconds)
CKPT_SECONDS = float(os.environ.get("BENCH_CKPT_SECONDS", 240))
