"""Time lens_bias' activation patching against TransformerLens' patching as the work grows.

Random-weight models with the real GPT-2 tokenizer (vocab 50,257; data/tokenizers/gpt2), distinct
clean/corrupted pairs ("The nurse who lived in the big old house by the river said that" vs "… man …",
first difference at position 2 of 15), metric = mean logit difference (' she' − ' he') at the
last position. Each case runs in fresh processes with one thread: one times both sides on the same
inputs, interleaved (TL, lens_bias, TL, lens_bias …, best of --repeat), and checks the results
agree; another measures the peak memory lens_bias adds (VmHWM after resetting it through
/proc/self/clear_refs, minus the resident size before the call; torch's CPU allocator has no peak
counter and tracemalloc does not see it). TransformerLens runs for real when a first timing of a
few of its forwards predicts ≤ --tl-budget seconds; otherwise its time is that timing
extrapolated (TL's patching costs one full forward per component, all of the same size) and the
max |diff| covers the components it ran. Prints one table (markdown), the load average and the
thread count.

    python benchmarks/bench_patching.py [--cases default|full|NAME,...] [--repeat 2] [--tl-budget 240]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT / "data" / "tokenizers" / "gpt2"

OCCUPATIONS = ("nurse doctor teacher lawyer pilot farmer baker clerk chef judge driver writer singer dancer painter "
               "banker engineer surgeon dentist mechanic guard soldier sailor tailor poet actor editor manager "
               "builder miner secretary professor scientist officer pastor priest coach").split()
SUBJECTS = "man woman boy girl person guy lady child".split()
TEMPLATE = "The {} who lived in the big old house by the river said that"
INSTRUCTION = ("Read the sentence below and continue it with a pronoun. Do not assume anything about a "
               "person from their job; if the sentence does not say, either pronoun is fine. Answer with "
               "one word only. Sentence: ")
SHORT = "The {} said that"

#: model shapes: (family, layers, d_model, heads, kv heads)
MODELS = {"gpt2-L4-d256": ("gpt2", 4, 256, 8, None), "gpt2-L6": ("gpt2", 6, 768, 12, None),
          "gpt2-L12": ("gpt2", 12, 768, 12, None), "gpt2-L24": ("gpt2", 24, 768, 12, None),
          "llama-L8-gqa": ("llama", 8, 512, 8, 2)}

#: name → (model, batch, per_position, prompt kind)
CASES = {
    "heads L6 b8": ("gpt2-L6", 8, False, "plain"),
    "heads L6 b32": ("gpt2-L6", 32, False, "plain"),
    "heads L6 b128": ("gpt2-L6", 128, False, "plain"),
    "heads L12 b8": ("gpt2-L12", 8, False, "plain"),
    "heads L12 b32": ("gpt2-L12", 32, False, "plain"),
    "heads L12 b128": ("gpt2-L12", 128, False, "plain"),
    "heads L24 b8": ("gpt2-L24", 8, False, "plain"),
    "heads L24 b32": ("gpt2-L24", 32, False, "plain"),
    "heads L24 b128": ("gpt2-L24", 128, False, "plain"),
    "heads llama-GQA L8 b8": ("llama-L8-gqa", 8, False, "plain"),
    "heads by pos L6 b8": ("gpt2-L6", 8, True, "plain"),
    "heads by pos L4 d256 b8": ("gpt2-L4-d256", 8, True, "plain"),
    "heads L6 b8 shared-prefix": ("gpt2-L6", 8, False, "prefix"),
    "heads by pos L6 b8 shared-prefix": ("gpt2-L6", 8, True, "prefix"),
}
DEFAULT = ["heads L6 b8", "heads L6 b32", "heads L6 b128", "heads L12 b8", "heads L12 b32", "heads L24 b8",
           "heads llama-GQA L8 b8", "heads by pos L6 b8", "heads by pos L4 d256 b8", "heads L6 b8 shared-prefix",
           "heads by pos L6 b8 shared-prefix"]


def prompts(kind: str, n: int) -> tuple[list[str], list[str]]:
    """n distinct clean/corrupted pairs (occupation vs subject word), all the same number of tokens."""
    pairs = [(o, s) for s in SUBJECTS for o in OCCUPATIONS][:n]
    if len(pairs) < n:
        raise SystemExit(f"at most {len(OCCUPATIONS) * len(SUBJECTS)} distinct pairs")
    t = TEMPLATE if kind == "plain" else INSTRUCTION + SHORT
    return [t.format(o) for o, _ in pairs], [t.format(s) for _, s in pairs]


def model_dir(name: str, root: Path) -> Path:
    from lens_bias.core import save_random_model

    family, L, d, H, kvh = MODELS[name]
    path = root / name
    if not (path / "config.json").exists():
        save_random_model(family, path, TOKENIZER, n_layers=L, d_model=d, n_heads=H, n_kv_heads=kvh, n_ctx=128)
    return path


def _status() -> dict:
    text = Path("/proc/self/status").read_text()
    return {k: int(re.search(rf"{k}:\s+(\d+)", text).group(1)) / 1024 for k in ("VmRSS", "VmHWM")}


def peak_added(fn):
    """(result, MiB the call added at its peak): VmHWM reset before the call, minus VmRSS before."""
    Path("/proc/self/clear_refs").write_text("5")
    before = _status()["VmRSS"]
    out = fn()
    return out, _status()["VmHWM"] - before


# ---------------------------------------------------------------------------------------
# one case, in its own process
# ---------------------------------------------------------------------------------------
def _setup(case: str, root: Path):
    import torch

    from lens_bias.core import PromptSet, load_model

    torch.set_num_threads(1)
    mname, n, per_pos, kind = CASES[case]
    model = load_model(model_dir(mname, root), device="cpu")
    clean, corrupt = prompts(kind, n)
    ps = PromptSet.build(model, clean, (" she", " he"), corrupted=corrupt)
    return model, ps, per_pos


def run_memory(case: str, root: Path, memory_mb: float) -> dict:
    """Peak memory lens_bias adds (after a one-prompt warm-up, so lazy set-up is not counted)."""
    from lens_bias.locate import activation_patching

    model, ps, per_pos = _setup(case, root)
    activation_patching(model, ps[:1], "head", per_position=per_pos, layers=[0], progress=False)
    _, mib = peak_added(lambda: activation_patching(model, ps, "head", per_position=per_pos, memory_mb=memory_mb,
                                                    progress=False))
    return {"mib": mib}


def run_timing(case: str, root: Path, repeat: int, tl_budget: float, memory_mb: float) -> dict:
    import pandas as pd
    import torch
    import transformer_lens.patching as tlp

    from lens_bias.core import logit_diff
    from lens_bias.locate import activation_patching

    model, ps, per_pos = _setup(case, root)
    L, H, P = model.cfg.n_layers, model.cfg.n_heads, ps.tokens.shape[1]
    metric = lambda logits: logit_diff(logits, ps).mean()  # noqa: E731
    with torch.no_grad():
        _, cache = model.run_with_cache(ps.tokens, names_filter=lambda name: name.endswith("hook_z"))
    cells = [(l, p, h) for l in range(L) for p in range(P) for h in range(H)] if per_pos else \
        [(l, h) for l in range(L) for h in range(H)]
    cols = ["layer", "pos", "head"] if per_pos else ["layer", "head"]
    setter = tlp.layer_pos_head_vector_patch_setter if per_pos else tlp.layer_head_vector_patch_setter

    def tl(idx):
        df = pd.DataFrame([cells[i] for i in idx], columns=cols)
        with torch.no_grad():
            return tlp.generic_activation_patch(model, ps.corrupted_tokens, cache, metric, patch_setter=setter,
                                                activation_name="z", index_df=df)

    def ours():
        return activation_patching(model, ps, "head", per_position=per_pos, memory_mb=memory_mb, progress=False)

    ours()  # warm-up
    # a first TL timing on a few components spread over the layers (and positions) predicts the whole run
    k = min(len(cells), max(4, L))
    probe = [round(i * (len(cells) - 1) / (k - 1)) for i in range(k)]
    t = time.perf_counter()
    tl(probe[:1])  # warm-up
    t = time.perf_counter()
    probe_vals = tl(probe)
    t_probe = (time.perf_counter() - t) / k
    real = t_probe * len(cells) <= tl_budget
    t_tl, t_ours, tl_mib, res = float("inf"), float("inf"), None, None
    for r in range(repeat):  # sides interleaved
        if real:
            t = time.perf_counter()
            ref, tl_mib_r = peak_added(lambda: tl(range(len(cells))))
            t_tl = min(t_tl, time.perf_counter() - t)
            tl_mib = tl_mib_r if tl_mib is None else min(tl_mib, tl_mib_r)
        elif r > 0:
            t = time.perf_counter()
            probe_vals = tl(probe)
            t_probe = min(t_probe, (time.perf_counter() - t) / k)
        t = time.perf_counter()
        res = ours()
        t_ours = min(t_ours, time.perf_counter() - t)
    per_cell = res.values.reshape(-1)
    if real:
        diff = (per_cell - torch.as_tensor(ref).reshape(-1).cpu()).abs().max().item()
    else:
        t_tl = t_probe * len(cells)
        diff = (per_cell[probe] - torch.as_tensor(probe_vals).cpu()).abs().max().item()
    first = int((ps.tokens != ps.corrupted_tokens).int().argmax(1).min())
    return {"tl": t_tl, "ours": t_ours, "diff": diff, "real": real, "tl_ran": len(cells) if real else k,
            "cells": len(cells), "tl_mib": tl_mib, "shape": f"{len(ps)}×{P}", "first_diff": first,
            "prefix": bool(res.extra.get("prefix")), "fast": bool(res.extra.get("fast"))}


# ---------------------------------------------------------------------------------------
# the table
# ---------------------------------------------------------------------------------------
def _child(args: list[str]) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, env=env)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    if out.returncode or not lines:
        raise SystemExit(f"child {args} failed:\n{out.stderr[-3000:]}")
    return json.loads(lines[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", default="default", help="'default', 'full' (every case) or names separated by commas")
    ap.add_argument("--repeat", type=int, default=2, help="timings per side (best is kept)")
    ap.add_argument("--tl-budget", type=float, default=240, help="run TL for real when predicted ≤ this many seconds")
    ap.add_argument("--memory-mb", type=float, default=512)
    ap.add_argument("--models", default=None, help="folder to keep the random models in (default: a temp folder)")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--memory", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        root = Path(args.models)
        res = run_memory(args.one, root, args.memory_mb) if args.memory else \
            run_timing(args.one, root, args.repeat, args.tl_budget, args.memory_mb)
        print(json.dumps(res))
        return
    names = list(CASES) if args.cases == "full" else DEFAULT if args.cases == "default" else \
        [c.strip() for c in args.cases.split(",")]
    unknown = [c for c in names if c not in CASES]
    if unknown:
        raise SystemExit(f"unknown case(s) {unknown}; choose from {list(CASES)}")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.models or tmp)
        root.mkdir(parents=True, exist_ok=True)
        common = ["--models", str(root), "--memory-mb", str(args.memory_mb)]
        rows = []
        print("| case | prompts | first diff | TL | lens_bias | ratio | max abs diff | lens_bias peak added "
              f"(memory_mb={args.memory_mb:g}) | TL peak added |", flush=True)
        print("|---|---|---|---|---|---|---|---|---|", flush=True)
        for case in names:
            t = _child(["--one", case, "--repeat", str(args.repeat), "--tl-budget", str(args.tl_budget), *common])
            m = _child(["--one", case, "--memory", *common])
            tl = f"{t['tl']:.1f} s" if t["real"] else f"≈{t['tl']:.0f} s (extrapolated from {t['tl_ran']} of {t['cells']})"
            tl_mib = f"+{t['tl_mib']:.0f} MiB" if t["tl_mib"] is not None else "–"
            rows.append(t)
            print(f"| {case} | {t['shape']} | {t['first_diff']} | {tl} | {t['ours']:.1f} s | {t['tl'] / t['ours']:.1f}× | "
                  f"{t['diff']:.1e} | +{m['mib']:.0f} MiB | {tl_mib} |", flush=True)
    load = Path("/proc/loadavg").read_text().split()[:3]
    print(f"\nload average (1, 5, 15 min) at the end: {' '.join(load)}; 1 thread per side; "
          f"fast path: {all(r['fast'] for r in rows)}, prefix reuse: {all(r['prefix'] for r in rows)}")


if __name__ == "__main__":
    main()
