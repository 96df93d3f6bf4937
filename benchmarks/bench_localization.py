#!/usr/bin/env python
"""The localisation benchmark (issue #15): every locate method and baseline on every ground-truth
case, recall@k and AUC against exhaustive ablation, printed as one method × case table.

    python benchmarks/bench_localization.py [--cases case3,case6] [--device cpu] [--out bench.csv]

A cell is "recall@k / AUC"; * marks a method that does not beat the best baseline on that case
(random: its mean + 2 std over 20 seeds). The expected outcome of each case, written before any
method was run, is printed beside what was measured (lens_bias/bench/EXPECTED.md has the long form).
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", default=None, help="comma-separated case names (default: every built case)")
    p.add_argument("--device", default=None)
    p.add_argument("--seeds", type=int, default=20, help="random-baseline draws")
    p.add_argument("--out", default=None, help="write the long table here (CSV)")
    args = p.parse_args(argv)

    import pandas as pd

    from lens_bias.bench import CASES, benchmark, wide_table
    from lens_bias.core.files import write_csv
    from lens_bias.core.viz import markdown_table

    t = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        df = benchmark(args.cases.split(",") if args.cases else None, device=args.device, seeds=args.seeds)
    pd.set_option("display.width", 250)
    pd.set_option("display.max_columns", 40)
    print(f"# localisation benchmark: recall@k / AUC against exhaustive ablation ({time.perf_counter() - t:.0f} s)\n")
    print(markdown_table(wide_table(df), index=True))
    print("\n* = does not beat the best baseline on that case\n")
    print("| case | k | expected (written before running) | measured |\n|---|---|---|---|")
    for (case, unit), g in df.groupby(["case", "unit"], sort=False):
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
    if args.out:
        write_csv(args.out, df)
    return 0


if __name__ == "__main__":
    sys.exit(main())
