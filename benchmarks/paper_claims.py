"""The real-model tables of the issues, for anyone who has a pretrained model's weights.

    python benchmarks/real_model_tables.py --model /path/to/hf_model_dir [--device cuda] [--out DIR]
    python benchmarks/real_model_tables.py --model gpt2            # with hub access

1. NAS (negative bias): StrategyQA yes/no questions — precision − recall gap and accuracy before,
   after zero-ablating the top-k NAS heads, and after k random heads (mean ± sd over seeds).
2. CRISPR (BBQ Age): split by template (seeded); neurons found on train, n chosen on dev by the
   prune curve, report on test: original / pruned / random n, with neutral-text loss and timings.
3. LSDM (gender): Vig et al.'s professions, edit on some professions × templates, bias on held-out
   ones, WinoBias and Winogender; edit norm; neutral-text loss and cloze accuracy.

Data come from the shipped data/datasets (or --data DIR with the same layout, e.g. full copies); the neutral text and cloze set
are the project's (data/organism_data). Tables print as markdown and are saved as CSV in --out.
`--limit` caps every data set (for a quick look; tests run this script on a random model with it).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]


def _md(df) -> str:
    from lens_bias.core.viz import markdown_table

    return markdown_table(df)


def nas_table(model, data: Path, limit: int | None, ks=(1, 3), seeds=5):
    import pandas as pd

    import lens_bias as lb

    items = lb.load_yes_no(data / "strategyqa" / "train.json")
    random.Random(0).shuffle(items)
    ps = lb.binary_prompts(model, items[: limit or 400])
    t = time.perf_counter()
    nas = lb.negative_attention_scores(model, ps, progress=False)
    t_nas = time.perf_counter() - t
    before = lb.evaluate_binary(model, ps)["overall"]
    rows = [{"condition": "original", "k": 0, "pr_gap": before["pr_gap"], "pr_gap_sd": 0.0,
             "accuracy": before["accuracy"], "yes_rate": before["yes_rate"]}]
    for k in ks:
        top = nas.top_heads(k)
        o = lb.evaluate_binary(model, ps, ablate=lb.head_ablation_hooks(model, top))["overall"]
        rows.append({"condition": f"top-{k} NAS heads {top}", "k": k, "pr_gap": o["pr_gap"], "pr_gap_sd": 0.0,
                     "accuracy": o["accuracy"], "yes_rate": o["yes_rate"]})
        rand = [lb.evaluate_binary(model, ps, ablate=lb.head_ablation_hooks(model, lb.mitigate.random_heads(model, k, s)))
                ["overall"] for s in range(seeds)]
        rows.append({"condition": f"{k} random heads ({seeds} seeds)", "k": k,
                     "pr_gap": statistics.mean(r["pr_gap"] for r in rand),
                     "pr_gap_sd": statistics.stdev(r["pr_gap"] for r in rand) if seeds > 1 else 0.0,
                     "accuracy": statistics.mean(r["accuracy"] for r in rand),
                     "yes_rate": statistics.mean(r["yes_rate"] for r in rand)})
    return pd.DataFrame(rows), {"prompts": len(ps), "nas_seconds": t_nas}


def crispr_table(model, data: Path, limit: int | None, neutral: str, ns=(1, 2, 4, 8, 16, 32), instructions=2):
    import lens_bias as lb
    from lens_bias.tasks import MC_INSTRUCTIONS as INSTRUCTIONS

    train, dev, test = lb.tasks.split_by_template(lb.load_bbq(data / "bbq" / "Age.jsonl"), seed=0)
    if limit:
        rng = random.Random(0)
        train, dev, test = (rng.sample(x, min(limit, len(x))) for x in (train, dev, test))
    ins = INSTRUCTIONS[:instructions]
    t = time.perf_counter()
    scores = lb.crispr_scores(model, train, ins, progress=False)
    t_attr = time.perf_counter() - t
    ns = [n for n in ns if n <= model.cfg.n_layers * model.cfg.d_mlp]
    curve = lb.mitigate.prune_curve(model, scores, dev, ns=ns, instructions=ins)
    # the smallest n with the lowest dev ambiguous bias score that keeps disambiguated accuracy
    ok = curve[(curve.n > 0) & (curve.accuracy_disambig >= curve.accuracy_disambig.iloc[0] - 0.02)]
    best = int((ok if len(ok) else curve[curve.n > 0]).sort_values(["bias_ambig", "n"]).iloc[0]["n"])
    t = time.perf_counter()
    report = lb.mitigate.crispr_report(model, scores.units(best), test, neutral_text=neutral, instructions=ins)
    t_report = time.perf_counter() - t
    keep = ["condition", "seed", "n_neurons", "accuracy", "accuracy_ambig", "accuracy_disambig", "bias_ambig",
            "bias_disambig", "neutral_loss"]
    return report[keep], curve, {"train/dev/test items": (len(train), len(dev), len(test)), "n": best,
                                 "attribution_seconds": t_attr, "report_seconds": t_report}


def lsdm_table(model, data: Path, limit: int | None, neutral: str, cloze: list[dict], site: str | None = None):
    import lens_bias as lb

    profs = lb.tasks.load_professions(data / "professions" / "professions.json")
    profs = profs.sample(frac=1.0, random_state=0)
    templates = list(lb.tasks.VIG_TEMPLATES)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # multi-token professions are skipped (counted in the warning)
        words = lb.professions_prompts(model, profs, templates[:1], corrupt_with=None)
        single = [m["profession"] for m in words.metadata]
        cut = int(0.7 * len(single))
        if limit:
            single = single[: max(limit, 4)]
            cut = int(0.7 * len(single))
        she_he = dict(answers=(" she", " he"), corrupt_with=None)
        edit = lb.professions_prompts(model, single[:cut], templates[:8], **she_he)
        held = lb.professions_prompts(model, single[cut:], templates[8:], **she_he)
        sets = {"professions (held out)": held,
                "winobias (type 1, pro)": lb.winobias_prompts(model, lb.tasks.load_winobias(data / "winobias")),
                "winogender": lb.winogender_prompts(model, lb.tasks.load_winogender(data / "winogender"))}
    if limit:
        sets = {k: v[list(range(min(limit, len(v))))] for k, v in sets.items()}
    t = time.perf_counter()
    layers = position = None
    if site:  # else causal tracing picks it (and refuses when the corruption does not take the bias away)
        layer, position = site.split(":")
        layers = [int(layer)]
    result = lb.lsdm_edit(model, edit, neutral, layers=layers, position=position, progress=False)
    edited = result.model
    t_edit = time.perf_counter() - t
    table = lb.tasks.bias_table({"original": model, "lsdm": edited}, sets)
    cap = lb.compare_models({"original": model, "lsdm": edited},
                            {"neutral_loss": lambda m: lb.text_loss(m, neutral),
                             "cloze_accuracy": lambda m: lb.tasks.cloze_accuracy(m, cloze)["overall"]})
    r = result.report
    return table, cap, {"site": (r["layers"], r["position"]), "edit_norm": r["delta_norms"],
                        "edit prompts LD": (r["bias_before"], r["bias_after"]), "edit_seconds": t_edit}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="local Hugging Face directory or hub name")
    p.add_argument("--data", default=str(ROOT / "data" / "datasets"), help="folder with the data/datasets layout")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None)
    p.add_argument("--limit", type=int, default=None, help="cap every data set (quick look)")
    p.add_argument("--out", default="real-model-tables", help="folder for the CSV tables")
    p.add_argument("--only", choices=["nas", "crispr", "lsdm"], action="append", default=None)
    p.add_argument("--lsdm-site", default=None, metavar="LAYER:POSITION",
                   help="LSDM's edit site, e.g. 5:subject (default: the top site under causal tracing)")
    args = p.parse_args(argv)

    import lens_bias as lb
    from lens_bias.organism import data_path

    data, out = Path(args.data), Path(args.out)
    model = lb.load_model(args.model, device=args.device, dtype=args.dtype)
    neutral = data_path("neutral").read_text()
    cloze = [json.loads(line) for line in data_path("cloze").read_text().splitlines()]
    parts = args.only or ["nas", "crispr", "lsdm"]
    print(f"# real-model tables: {args.model} ({model.cfg.n_layers} layers, {model.cfg.n_heads} heads, "
          f"d_mlp {model.cfg.d_mlp})\n")
    if "nas" in parts:
        t, info = nas_table(model, data, args.limit)
        lb.core.files.write_csv(out / "nas.csv", t)
        print(f"## NAS on StrategyQA ({info})\n\n{_md(t)}\n")
    if "crispr" in parts:
        t, curve, info = crispr_table(model, data, args.limit, neutral)
        lb.core.files.write_csv(out / "crispr.csv", t)
        lb.core.files.write_csv(out / "crispr_prune_curve.csv", curve)
        print(f"## CRISPR on BBQ Age ({info})\n\n{_md(t)}\n")
    if "lsdm" in parts:
        t, cap, info = lsdm_table(model, data, args.limit, neutral, cloze, args.lsdm_site)
        lb.core.files.write_csv(out / "lsdm_bias.csv", t)
        lb.core.files.write_csv(out / "lsdm_capability.csv", cap)
        print(f"## LSDM ({info})\n\n{_md(t)}\n\n{_md(cap)}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
