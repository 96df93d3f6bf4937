"""python -m lens_bias.bench.real prepare | build CASE [--work DIR] [--card-only] | check CASE [-n N]

prepare   write the cases' data (data/bench/real-*/data) from the shipped data sets; refuses to overwrite
build     the ground truth of one case (truth.py; resumable: the work folder keeps each finished stage)
check     recompute random truth cells with full hooked forwards (check.py) and print them
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
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
    from .truth import SPECS, Builder, write_truth

    spec = SPECS[name]
    b = Builder(name, _model_dir(), out / spec.folder, work)
    truth, _ = b.build()
    write_truth(out / spec.folder, name, truth)
    entry = card(name, out, work)
    print(json.dumps({k: entry[k] for k in ("base", "seconds", "cells")}, indent=1))


def card(name: str, out: Path, work: Path) -> dict:
    """The case's card entry, from its truth file and its build's work folder (timings, neuron plan,
    self-check): model and GGUF sha256, data and prompt format, options, sizes, timings."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from ...core.gguf import read_source
    from .rows import read_jsonl
    from .truth import SPECS, case_rows, update_card

    spec = SPECS[name]
    data_dir, w = out / spec.folder, work / name
    model_dir = _model_dir()
    src = read_source(model_dir)
    assert src is not None  # _model_dir checked it
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    seqs = case_rows(spec, tok, torch.zeros(tok.vocab_size + 64, 1), data_dir)
    truth = {k: v for k, v in load_file(str(data_dir / "ground_truth.safetensors")).items() if k.startswith(f"{name}/")}
    times = torch.load(w / "times.pt", weights_only=False)
    stages = {k: (v if isinstance(v, dict) else {"wall": v[0], "cpu": v[1]}) for k, v in times.items()}
    cells = {k.split("/")[-1]: int(v.numel()) for k, v in truth.items() if k.startswith(f"{name}/bias/") and v.ndim}
    first = read_jsonl(data_dir / "data" / spec.data)[0]
    row0 = seqs.ids[0][seqs.real[0] if spec.kind != "bbq" else seqs.ids[0] != tok.pad_token_id]
    entry = {
        "model": "smollm2-135m-instruct", "hub_id": src.get("hub_id"), "gguf_sha256": src.get("gguf_sha256"),
        "gguf_bytes": src.get("gguf_bytes"), "weights": "the Q4_1 GGUF dequantized to float32 (lens-bias fetch)",
        "data": f"data/{spec.data}", "n_items": len(read_jsonl(data_dir / "data" / spec.data)), "kind": spec.kind,
        "prompt_format": {"pairs": "'The {profession} {verb} that' and its twin; answers ' she' / ' he'; no BOS",
                          "yesno": "chat template: one user turn '{instruction}\nQuestion: {question}'; answers "
                                   "'No' / 'Yes' (the assistant's first token); no BOS",
                          "bbq": "chat template: one user turn '{instruction}\nContext: …\nQuestion: …\nOptions: "
                                 "a; b; c.'; each option scored as the assistant's reply; no BOS"}[spec.kind],
        "instruction": spec.instruction or None, "example_item": first,
        "example_row": tok.decode(row0),
        "units": list(spec.units), "methods": list(spec.methods),
        "neuron_methods": list(spec.neuron_methods) if "neuron" in spec.units else None,
        "interventions_from_answer": spec.from_answer,
        "rows": seqs.n, "positions": seqs.T, "shared_prefix": seqs.shared,
        "base": {k.split("/")[1]: float(v) for k, v in truth.items() if k.endswith("/base")},
        "cells": cells,
        "seconds": {k: {"wall": round(v["wall"], 1), "cpu": round(v["cpu"], 1), **({"load": v["load"]} if "load" in v
                                                                                    else {})} for k, v in stages.items()},
        "total_seconds": {"wall": round(sum(v["wall"] for v in stages.values()), 1),
                          "cpu": round(sum(v["cpu"] for v in stages.values()), 1)},
        "timing_note": "one thread, niced, on 2 cores shared with other jobs (load: the 1-min load average at a "
                       "stage's start, where recorded): wall ≫ cpu under load; cpu is the work",
        "machine": platform.processor() or platform.machine(),
        "selfcheck": torch.load(w / "selfcheck.pt", weights_only=False)["result"],
    }
    if "neuron" in spec.units:
        plan = torch.load(w / "neuron_plan.pt", weights_only=False)["result"]
        entry["neuron_plan"] = {k: v for k, v in plan.items() if k != "sample"} | {"sample_size": len(plan["sample"])}
    update_card(data_dir, name, entry)
    return entry


def check(name: str, out: Path, n: int, seed: int) -> int:
    """Recompute n random cells of the shipped truth with full hooked forwards; exit 1 when one differs."""
    from safetensors.torch import load_file

    from .check import recompute_cell, truth_cells
    from .truth import SPECS, case_rows, donors, load_hf

    spec = SPECS[name]
    data_dir = out / spec.folder
    hf, tok = load_hf(_model_dir())
    seqs = case_rows(spec, tok, hf.lm_head.weight, data_dir)
    truth = load_file(str(data_dir / "ground_truth.safetensors"))
    worst = 0.0
    for cell in truth_cells(truth, name, seed=seed, n=n):
        got = recompute_cell(hf, seqs, cell, donors(seqs, spec.kind))
        worst = max(worst, abs(got - cell["value"]))
        where = ", ".join(f"{k} {cell[k]}" for k in ("layer", "index", "position") if cell.get(k) is not None)
        print(f"{cell['key']} [{where}]: truth {cell['value']:+.6f}  full forward {got:+.6f}")
    print(f"max |difference| {worst:.2e} over {n} cells")
    return 0 if worst <= 2e-4 else 1


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])  # pyright: ignore[reportOptionalMemberAccess] - the module has a docstring
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("prepare")
    a.add_argument("--category", default="Age")
    a.add_argument("--tasks", default="professions,yesno,bbq")
    a.add_argument("--overwrite", action="store_true")
    a.add_argument("--out", default=None, help="default: data/bench")
    b = sub.add_parser("build")
    b.add_argument("case")
    b.add_argument("--card-only", action="store_true", help="rewrite the card from the truth and the work folder")
    b.add_argument("--work", default=None, help="checkpoints (default: ~/.cache/lens_bias/bench-work)")
    b.add_argument("--out", default=None, help="default: data/bench")
    c = sub.add_parser("check")
    c.add_argument("case")
    c.add_argument("-n", type=int, default=6, help="cells (half uniform, half among the largest effects)")
    c.add_argument("--seed", type=int, default=1)
    c.add_argument("--out", default=None, help="default: data/bench")
    args = p.parse_args(argv)
    from ...core.files import DATA_DIR

    out = Path(args.out) if args.out else DATA_DIR / "bench"
    if args.cmd == "prepare":
        prepare(out, args.category, args.overwrite, args.tasks.split(","))
    elif args.cmd == "check":
        return check(args.case, out, args.n, args.seed)
    else:
        from ...core.model_names import cache_dir

        work = Path(args.work) if args.work else cache_dir() / "bench-work"
        card(args.case, out, work) if args.card_only else build(args.case, out, work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
