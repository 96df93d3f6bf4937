"""Time lens_bias' activation/attribution patching against TransformerLens' patching.

distilgpt2-shaped random model (6 layers × 12 heads, d_model 768, the real GPT-2 tokenizer,
vocab 50,257), batch 8 × 15 tokens, metric = mean logit difference (' she' − ' he') at the last
position. Prints best-of-N seconds, the speed-up over TL (goal ≥ 5×), the max |difference| of
the results (asserted ≤ 1e-4), attribution time in forward passes (goal ≤ 3.5) and the peak
resident memory each method adds (sampled from /proc every 2 ms; torch's CPU allocator has no
peak counter and tracemalloc does not see it).

    python benchmarks/bench_patching.py [--tokenizer data/tokenizers/gpt2] [--device cpu]
"""

import argparse
import os
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402
import transformer_lens.patching as tlp  # noqa: E402

from lens_bias import PromptSet, load_model, save_random_model  # noqa: E402
from lens_bias.attribution import attribution_patching  # noqa: E402
from lens_bias.core import logit_diff  # noqa: E402
from lens_bias.locate import activation_patching  # noqa: E402


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def measured(fn, repeat=1):
    """(result, best seconds, peak RSS added in MiB) of `repeat` calls."""
    best, peak, base = float("inf"), 0.0, rss_mib()
    stop = threading.Event()

    def sample():
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, rss_mib() - base)
            time.sleep(0.002)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    try:
        for _ in range(repeat):
            t = time.perf_counter()
            out = fn()
            best = min(best, time.perf_counter() - t)
    finally:
        stop.set()
        th.join()
    return out, best, peak


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizer", default=str(Path(__file__).resolve().parents[1] / "data/tokenizers/gpt2"))
    ap.add_argument("--device", default=None)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    with tempfile.TemporaryDirectory() as d:
        path = save_random_model("gpt2", Path(d) / "m", args.tokenizer, n_layers=6, d_model=768, n_heads=12, n_ctx=64)
        model = load_model(path, device=args.device)
    words = ["nurse", "doctor", "teacher", "lawyer", "pilot", "farmer", "baker", "clerk"]
    clean = [f"The {w} who lived in the big old house by the river said that" for w in words]
    corrupt = [f"The {w} who lived in the big old house by the river said that" for w in ["man", "woman"] * 4]
    ps = PromptSet.build(model, clean, (" she", " he"), corrupted=corrupt).to(model.cfg.device)
    print(f"model: {model.cfg.n_layers} layers × {model.cfg.n_heads} heads, d_model {model.cfg.d_model}, "
          f"vocab {model.cfg.d_vocab}; prompts {tuple(ps.tokens.shape)}; threads {torch.get_num_threads()}")
    metric = lambda logits: logit_diff(logits, ps).mean()  # noqa: E731

    with torch.no_grad():
        _, t_fwd, _ = measured(lambda: model(ps.tokens), repeat=5)
    print(f"one forward (full logits): {t_fwd:.3f}s")

    _, cache = model.run_with_cache(ps.tokens, names_filter=lambda n: n.endswith("hook_z"))
    ref, t_tl, m_tl = measured(lambda: tlp.get_act_patch_attn_head_out_all_pos(model, ps.corrupted_tokens, cache, metric),
                               repeat=max(1, args.repeat - 1))
    activation_patching(model, ps, "head", per_position=False, progress=False)  # warm-up
    ours, t_ours, m_ours = measured(lambda: activation_patching(model, ps, "head", per_position=False, progress=False),
                                    repeat=args.repeat)
    diff = (ours.values - torch.as_tensor(ref).cpu()).abs().max().item()
    assert diff <= 1e-4, f"results differ from TransformerLens by {diff}"
    print(f"head patching, all positions ({model.cfg.n_layers * model.cfg.n_heads} heads): TL {t_tl:.2f}s "
          f"(+{m_tl:.0f} MiB), lens_bias {t_ours:.2f}s (+{m_ours:.0f} MiB) → {t_tl / t_ours:.2f}× faster "
          f"(goal ≥ 5×), max |diff| {diff:.1e}")

    _, t_pos, _ = measured(lambda: activation_patching(model, ps, "head", progress=False), repeat=1)
    print(f"head patching per position ({model.cfg.n_layers * model.cfg.n_heads * ps.tokens.shape[1]} components): "
          f"lens_bias {t_pos:.2f}s (TL ≈ {t_tl * ps.tokens.shape[1]:.0f}s extrapolated: one forward per component)")

    attribution_patching(model, ps, ["head", "neuron", "resid"])  # warm-up
    _, t_attr, m_attr = measured(lambda: attribution_patching(model, ps, ["head", "neuron", "resid"]),
                                 repeat=args.repeat)
    print(f"attribution (every head, MLP neuron, residual position): {t_attr:.3f}s = {t_attr / t_fwd:.2f} forwards "
          f"(goal ≤ 3.5), +{m_attr:.0f} MiB")


if __name__ == "__main__":
    main()
