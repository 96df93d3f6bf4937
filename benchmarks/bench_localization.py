#!/usr/bin/env python
"""The localisation benchmark (issues #15, #24): every locate method and baseline on every ground-truth
case — the synthetic ones (small GPT-2s trained here with planted mechanisms) and the real ones
(SmolLM2-135M-Instruct, truth by exhaustive ablation on held-out prompts) — recall@k and AUC against the
truth, printed side by side as one method × case table.

    python benchmarks/bench_localization.py [--cases case3,rprof] [--device cpu] [--out bench.csv] [--cache DIR] [--ship]

A cell is "recall@k / AUC" against the zero-ablation truth; * marks a method that does not beat the best
baseline on that case (random: its mean + 2 std over 20 seeds). The real cases are then scored against each
of their truths (zero, mean, resample, patch = noising from the twin, denoise = lens_bias's patching
direction), with the mitigation columns, and the synthetic verdicts are checked on them (EXPECTED.md, written
before any method was run). A real case whose model is not on this machine is skipped with a note saying
`lens-bias fetch smollm2-135m-instruct`.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", default=None, help="comma-separated case names (default: every available case)")
    p.add_argument("--device", default=None)
    p.add_argument("--seeds", type=int, default=20, help="random-baseline draws")
    p.add_argument("--out", default=None, help="write the long table here (CSV)")
    p.add_argument("--cache", default=None, help="keep each case's method scores in this folder (re-scoring "
                                                  "against the truth then runs no method)")
    p.add_argument("--ship", action="store_true", help="write each real case's scores to its data folder "
                                                        "(benchmark_scores.json: the README table, tested)")
    args = p.parse_args(argv)

    import pandas as pd

    from lens_bias.bench import CASES, benchmark, load_truth, wide_table
    from lens_bias.bench.verdicts import interaction_table, verdict_table
    from lens_bias.core.files import write_csv
    from lens_bias.core.viz import markdown_table

    t = time.perf_counter()
    for n, c in CASES.items():
        if c.real and c.model_missing:
            print(f"note: real case {n} skipped — {c.model_missing}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        df, scores = benchmark(args.cases.split(",") if args.cases else None, device=args.device, seeds=args.seeds,
                               with_scores=True, cache=args.cache)
    pd.set_option("display.width", 250)
    pd.set_option("display.max_columns", 40)
    print(f"# localisation benchmark: recall@k / AUC against exhaustive ablation ({time.perf_counter() - t:.0f} s)\n")
    print("## Synthetic and real cases, zero-ablation truth\n")
    print(markdown_table(wide_table(df), index=True))
    print("\n* = does not beat the best baseline on that case\n")
    real = df[df["real"]]
    if not real.empty:
        print("## Real cases against each truth (zero, mean, resample, patch = noising, denoise = AP's direction)\n")
        print(markdown_table(wide_table(real, by_truth=True), index=True))
        mit = real[(real["truth"] == "zero") & real["bias_removed"].notna()] if "bias_removed" in real else real.iloc[:0]
        if not mit.empty:
            print("\n## Mitigation: zero-ablating each method's top-k units on the held-out split\n")
            tab = mit.assign(col=mit["case"] + " " + mit["unit"], cell=[
                f"{r.bias_removed:+.2f} / {r.loss_added:+.3f}" for r in mit.itertuples()])
            print(markdown_table(tab.pivot_table(index="method", columns="col", values="cell", aggfunc="first",
                                                 sort=False).fillna("—"), index=True))
            print("\ncell: share of the held-out bias removed / neutral-text loss added (nats/token); k = the "
                  "zero truth's carriers (neurons: the estimate k̂)\n")
    print("| case | k | expected (written before running) | measured |\n|---|---|---|---|")
    zero = df[df["truth"] == "zero"]
    for (case, unit), g in zero.groupby(["case", "unit"], sort=False):
        won = [m for m in g[g["designed"] == "win"]["method"] if bool(g[g["method"] == m]["beats_baselines"].iloc[0])]
        lost = [m for m in g[g["designed"] == "lose"]["method"]
                if float(g[g["method"] == m]["recall@k"].iloc[0]) < g[g["designed"] == "win"]["recall@k"].max()]
        wins, loses = list(g[g["designed"] == "win"]["method"]), list(g[g["designed"] == "lose"]["method"])
        extra = ""
        if "decoy_rank" in g and g["decoy_rank"].notna().any():
            extra = "; decoy rank: " + ", ".join(f"{r.method} {int(r.decoy_rank)}" for r in g.itertuples()
                                                 if r.method in ("NAS", "attention to ' No'", "activation patching"))
        print(f"| {case} {unit} | {int(g['k'].iloc[0])} | {CASES[case].expected} | designed winners beating the "
              f"baselines: {len(won)}/{len(wins)}; designed losers below the best winner: {len(lost)}/{len(loses)}{extra} |")
    if not real.empty:
        truths = {c: load_truth(CASES[c].model_dir) for c in real["case"].unique()}
        print("\n## Interactions the single-unit truth misses (the truth's pair and cumulative ablations)\n")
        print(markdown_table(interaction_table(truths, list(truths)), index=False))
        print("\n## Do the synthetic verdicts hold on the real model? (criteria: EXPECTED.md)\n")
        print(markdown_table(verdict_table(df, scores, truths), index=False))
    if args.out:
        write_csv(args.out, df)
    if args.ship:
        from lens_bias.bench.score import ship_scores

        for path in ship_scores(df):
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
