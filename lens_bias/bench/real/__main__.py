"""python -m lens_bias.bench.real prepare | build CASE [--work DIR] | check CASE

prepare   write the cases' data (data/bench/real-*/data) from the shipped data sets; refuses to overwrite
build     the ground truth of one case (truth.py; resumable: the work folder keeps each finished stage)
check     recompute random truth cells with full hooked forwards (check.py) and print them
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path


def _model_dir() -> Path:
    from ...core.gguf import read_source
    from ...core.model_names import converted_dir

    folder = converted_dir("smollm2-135m-instruct")
    if read_source(folder) is None:
        sys.exit(f"the model smollm2-135m-instruct is not on this machine ({folder}): "
                 "run `lens-bias fetch smollm2-135m-instruct`")
    return folder


def prepare(out: Path, category: str, overwrite: bool, tasks: list[str]) -> None:
    from transformers import AutoTokenizer

    from ...core.files import DATA_DIR
    from ...tasks.multiple_choice import bbq_target
    from . import data

    tok = AutoTokenizer.from_pretrained(str(_model_dir()))
    datasets = DATA_DIR / "datasets"

    def targets(it):
        t = bbq_target(it)
        return t.unknown, t.biased

    make = {"professions": lambda: data.professions(tok, datasets), "yesno": lambda: data.yesno(tok, datasets),
            "bbq": lambda: data.bbq(category, datasets, targets)}
    for task in tasks:
        folder, files = f"real-{task}", make[task]()
        d = out / folder / "data"
        if d.exists() and not overwrite:
            sys.exit(f"{d} exists (pass --overwrite to replace it)")
        d.mkdir(parents=True, exist_ok=True)
        for name, rows in files.items():
            (d / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (d / "neutral.txt").write_text(data.neutral_text(datasets))
        print(f"{d}: " + ", ".join(f"{k} {len(v)}" for k, v in files.items()))


def build(name: str, out: Path, work: Path) -> None:
    from ...core.gguf import read_source
    from .truth import SPECS, Builder, update_card, write_truth

    spec = SPECS[name]
    data_dir = out / spec.folder
    model_dir = _model_dir()
    t0 = time.perf_counter()
    load0 = os.getloadavg()
    b = Builder(name, model_dir, data_dir, work)
    truth, check = b.build()
    write_truth(data_dir, name, truth)
    src = read_source(model_dir)
    entry = {
        "model": "smollm2-135m-instruct", "hub_id": src.get("hub_id"), "gguf_sha256": src.get("gguf_sha256"),
        "gguf_bytes": src.get("gguf_bytes"), "weights": "Q4_1 GGUF dequantized to float32 (lens-bias fetch)",
        "data": f"data/{spec.data}", "kind": spec.kind, "units": list(spec.units), "methods": list(spec.methods),
        "neuron_methods": list(spec.neuron_methods) if "neuron" in spec.units else None,
        "instruction": spec.instruction or None, "chat_template": spec.kind in ("yesno", "bbq"),
        "rows": b.seqs.n, "positions": b.seqs.T, "shared_prefix": b.seqs.shared,
        "base": b.eng.base, "interventions": b.eng.runs,
        "seconds_wall_cpu": {**{k: [round(w, 1), round(c, 1)] for k, (w, c) in b.times.items()},
                             "total": [round(sum(w for w, _ in b.times.values()), 1),
                                       round(sum(c for _, c in b.times.values()), 1)]},
        "clean_run_seconds": round(b.clean_seconds, 1), "wall_seconds_this_run": round(time.perf_counter() - t0, 1),
        "load_average_start_end": [round(load0[0], 2), round(os.getloadavg()[0], 2)],
        "threads": int(os.environ.get("OMP_NUM_THREADS", "0") or 0), "machine": platform.processor() or platform.machine(),
        "selfcheck": check,
    }
    if "neuron" in spec.units:
        plan = b._load("neuron_plan")["result"]
        entry["neuron_plan"] = {k: v for k, v in plan.items() if k != "sample"} | {"sample_size": len(plan["sample"])}
    update_card(data_dir, name, entry)
    print(json.dumps({k: entry[k] for k in ("base", "seconds_wall_cpu", "interventions")}, indent=1))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("prepare")
    a.add_argument("--category", default="Age")
    a.add_argument("--tasks", default="professions,yesno,bbq")
    a.add_argument("--overwrite", action="store_true")
    a.add_argument("--out", default=None, help="default: data/bench")
    b = sub.add_parser("build")
    b.add_argument("case")
    b.add_argument("--work", default=None, help="checkpoints (default: ~/.cache/lens_bias/bench-work)")
    b.add_argument("--out", default=None, help="default: data/bench")
    args = p.parse_args(argv)
    from ...core.files import DATA_DIR

    out = Path(args.out) if args.out else DATA_DIR / "bench"
    if args.cmd == "prepare":
        prepare(out, args.category, args.overwrite, args.tasks.split(","))
    else:
        from ...core.model_names import cache_dir

        build(args.case, out, Path(args.work) if args.work else cache_dir() / "bench-work")
    return 0


if __name__ == "__main__":
    sys.exit(main())
