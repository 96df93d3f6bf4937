"""The four papers' claims, measured on a real model: for each paper its claim in one sentence, what the
toolkit measures with its default options, a control, and a verdict (holds / partly / does not hold).

    python benchmarks/paper_claims.py --model smollm2-135m-instruct --out paper-claims/
    python benchmarks/paper_claims.py --model organism --budget quick --out /tmp/claims   # ~1 min check

Sections (benchmarks/claims/, one module each; the checks behind each verdict are in its docstring):

1. features  Feature-based analysis (arXiv 2406.12347): layer × position patching of MLP/attention outputs and
             the residual stream, head patching, AP vs AtP agreement, counterfactual-data debiasing of the
             components found vs random components — professions, held-out professions and templates.
2. lsdm      LSDM (arXiv 2403.14409): causal tracing by site, the LSDM edit at the traced site vs a random site
             vs pruning the top neurons; held-out professions, WinoBias pro/anti, Winogender, neutral loss, cloze.
3. nasa      NASA (arXiv 2408.00137): StrategyQA and GSM8K answer verification, with and without the chat
             template: P − R gap and accuracy, top-k NAS heads vs k random heads (seeds) vs raw attention to
             "No", NASA trained on a train split and judged on a held-out split.
4. crispr    CRISPR (arXiv 2311.09627): every shipped BBQ category — is there bias (s_AMB)? If so, pruned n
             (chosen on dev) vs n random neurons on test, and across the 10 instructions.

Every figure carries a 95% interval: a bootstrap over held-out prompts or items, the spread over seeds for
random controls. Outputs in --out: claims.md (summary table and one table per paper), summary.csv,
<section>/*.csv, <section>/figures.html (plotly, offline), stages/ (the stage cache: a rerun resumes; a stage
whose model, code, options or stored value changed is computed again). `--budget quick` shrinks every size
(prompts, items, seeds, steps) for a plumbing check; no method option differs between budgets.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

SECTIONS = ("features", "lsdm", "nasa", "crispr")


def _modules():
    from claims import crispr, features, lsdm, nasa

    return {"features": features, "lsdm": lsdm, "nasa": nasa, "crispr": crispr}


def summary_table(sections):
    import pandas as pd

    return pd.DataFrame([{"paper": s.paper, "claim": s.claim, "measured on the model": s.measured,
                          "control": s.control, "verdict": s.verdict} for s in sections])


def _write(out: Path, model_name: str, sections, stages, seconds: dict) -> str:
    from claims.common import write_figures

    from lens_bias.core.files import write_csv, write_text
    from lens_bias.core.viz import markdown_table

    parts = [f"# The four papers' claims on {model_name}\n", markdown_table(summary_table(sections)), ""]
    for s in sections:
        d = out / s.key
        write_csv(d / "table.csv", s.table)
        for name, t in s.tables.items():
            write_csv(d / f"{name}.csv", t)
        if s.figures:
            write_figures(d / "figures.html", s.paper, s.figures)
        checks = ", ".join(f"{k} {'✓' if v else '✗'}" for k, v in s.checks.items())
        parts += [f"## {s.paper} — {s.verdict}\n", f"Claim: {s.claim}\n", markdown_table(s.table), "",
                  f"Checks: {checks}. Duration {seconds[s.key]:.0f} s.", *[f"- {n}" for n in s.notes], ""]
    text = "\n".join(parts)
    write_text(out / "claims.md", text)
    write_csv(out / "summary.csv", summary_table(sections))
    write_text(out / "timings.json", json.dumps({"sections": seconds, "stages": stages.log}, indent=1))
    return text


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="a model name (smollm2-135m-instruct, organism), a Hugging Face "
                                                  "directory or a hub name")
    p.add_argument("--out", default="paper-claims", help="output folder (and its stage cache)")
    p.add_argument("--only", choices=SECTIONS, action="append", default=None)
    p.add_argument("--budget", choices=("full", "quick"), default="full")
    p.add_argument("--data", default=str(ROOT / "data" / "datasets"), help="folder with the data/datasets layout")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--crispr-anyway", action="store_true",
                   help="variant: run CRISPR's steps on BBQ categories without bias too (marked in the notes)")
    args = p.parse_args(argv)

    from claims.common import BUDGETS, Context, Stages, code_fingerprint

    import lens_bias as lb
    from lens_bias.organism import data_path
    from lens_bias.runs.store import model_fingerprint

    out = Path(args.out)
    model = lb.load_model(args.model, device=args.device, dtype=args.dtype)
    neutral = lb.tasks.text_lines(lb.tasks.default_neutral_text(model))  # real English for a real model
    cloze = [json.loads(line) for line in data_path("cloze").read_text().splitlines() if line.strip()]
    stages = Stages(out / "stages", {"model": model_fingerprint(model), "code": code_fingerprint(),
                                     "data": str(Path(args.data).resolve())})
    ctx = Context(model, stages, BUDGETS[args.budget], Path(args.data), neutral, cloze, args.seed,
                  progress=not args.no_progress, crispr_anyway=args.crispr_anyway)
    mods, sections, seconds = _modules(), [], {}
    for key in args.only or SECTIONS:
        t = time.perf_counter()
        sections.append(mods[key].run(ctx))
        seconds[key] = round(time.perf_counter() - t, 1)
        sections[-1].seconds = seconds[key]
        print(f"[{key}] {sections[-1].verdict} in {seconds[key]:.0f} s", flush=True)
    print(_write(out, args.model, sections, stages, seconds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
