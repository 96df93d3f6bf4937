"""`lens-bias` command line: a thin layer over the functions the notebooks call."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _common(p: argparse.ArgumentParser):
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--dtype", default=None, help="float32 (default), bfloat16, float16")
    p.add_argument("--seed", type=int, default=0)


def cmd_demo(args) -> int:
    from .demo import run_demo

    report = run_demo(out=Path(args.out), device=args.device, dtype=args.dtype, seed=args.seed)
    print(report)
    return 0


def cmd_info(args) -> int:
    from .models import load_model
    from .organism import load_card

    model = load_model(args.model, device=args.device, dtype=args.dtype)
    cfg = model.cfg
    info = {"model": args.model, "n_layers": cfg.n_layers, "n_heads": cfg.n_heads, "d_model": cfg.d_model,
            "d_mlp": cfg.d_mlp, "d_vocab": cfg.d_vocab}
    try:
        info["planted"] = load_card(model)["planted"]
    except Exception:
        pass
    print(json.dumps(info, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lens-bias",
        description="Locate and mitigate social and negative bias inside language models (TransformerLens 4).",
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="locate → mitigate → verify → export on the shipped model organism")
    d.add_argument("--out", default="lens-bias-out", help="folder for the report, figures (HTML) and tables")
    _common(d)
    d.set_defaults(func=cmd_demo)
    i = sub.add_parser("info", help="describe a model (and its planted ground truth, for the organism)")
    i.add_argument("--model", default="organism", help="shipped name, local HF directory or hub name")
    _common(i)
    i.set_defaults(func=cmd_info)
    return parser


def main(argv=None) -> int:
    from .errors import LensBiasError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except LensBiasError as e:
        print(f"lens-bias: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
