"""Time lens_bias' activation/attribution patching against TransformerLens' patching.

distilgpt2-shaped random model (6 layers × 12 heads, d_model 768, the real GPT-2 tokenizer),
batch 8 × 16 tokens, metric = mean logit difference at the last position. Prints seconds,
the speed-up over TL, the max |difference| of the results and peak memory.

    python benchmarks/bench_patching.py [--tokenizer ../shared/models/gpt2-tokenizer]
"""

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import transformer_lens.patching as tlp  # noqa: E402

from lens_bias import PromptSet, load_model, save_random_model  # noqa: E402
from lens_bias.attribution import attribution_patching  # noqa: E402
from lens_bias.metrics import logit_diff  # noqa: E402
from lens_bias.patching import activation_patching  # noqa: E402


def timed(fn, repeat=1):
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return out, best


def cache_mib(model, tokens, names_filter=None):
    _, cache = model.run_with_cache(tokens, names_filter=names_filter)
    seen = {(t.data_ptr(), tuple(t.shape)): t for t in cache.values()}  # aliases share tensors
    return sum(t.numel() * t.element_size() for t in seen.values()) / 2**20


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizer", default=str(Path(__file__).resolve().parents[2] / "shared/models/gpt2-tokenizer"))
    ap.add_argument("--device", default=None)
    args = ap.parse_args()
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as d:
        path = save_random_model("gpt2", Path(d) / "m", args.tokenizer, n_layers=6, d_model=768, n_heads=12, n_ctx=64)
        model = load_model(path, device=args.device)
    words = ["nurse", "doctor", "teacher", "lawyer", "pilot", "farmer", "baker", "clerk"]
    clean = [f"The {w} who lived in the big old house by the river said that" for w in words]
    corrupt = [f"The {w} who lived in the big old house by the river said that" for w in
               ["man", "woman", "man", "woman", "man", "woman", "man", "woman"]]
    ps = PromptSet.build(model, clean, (" she", " he"), corrupted=corrupt)
    print(f"model: 6 layers × 12 heads, d_model 768, vocab {model.cfg.d_vocab}; prompts {tuple(ps.tokens.shape)}")
    metric = lambda logits: logit_diff(logits, ps).mean()  # noqa: E731

    _, t_fwd = timed(lambda: model(ps.tokens), repeat=3)
    print(f"one forward: {t_fwd:.3f}s")
    _, cache = model.run_with_cache(ps.tokens, names_filter=lambda n: n.endswith("hook_z"))
    ref, t_tl = timed(lambda: tlp.get_act_patch_attn_head_out_all_pos(model, ps.corrupted_tokens, cache, metric))
    ours, t_ours = timed(lambda: activation_patching(model, ps, "head", per_position=False, batch_size=64, progress=False))
    diff = (ours.values - torch.as_tensor(ref)).abs().max().item()
    print(f"head patching, all positions (72 heads): TL {t_tl:.2f}s, lens_bias {t_ours:.2f}s → "
          f"{t_tl / t_ours:.2f}× faster (goal ≥ 5×), max |diff| {diff:.1e}")
    _, t_attr = timed(lambda: attribution_patching(model, ps, ["head", "neuron", "resid"]), repeat=2)
    print(f"attribution (heads + neurons + resid): {t_attr:.3f}s = {t_attr / t_fwd:.2f} forwards (goal ≤ 3.5)")
    wanted = lambda n: n.endswith(("attn.hook_z", "mlp.hook_post", "hook_resid_pre"))  # noqa: E731
    m_attr = 2 * cache_mib(model, ps.tokens, wanted)  # activations (two runs' worth) + gradients
    m_full = cache_mib(model, ps.tokens)
    print(f"activations held: attribution ≈ {m_attr:.1f} MiB (only hook_z, hook_post, resid_pre); "
          f"a full run_with_cache holds {m_full:.1f} MiB")


if __name__ == "__main__":
    main()
