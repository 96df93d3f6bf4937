"""The organism build as named steps: corpus → tokenizer → control model → planting → data files →
metrics → cards → the three directories moved into place; and the command line."""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import tempfile
import time
from pathlib import Path

import torch

from ...core.errors import DataError
from ...core.files import DATA_DIR, replace_dir, write_jsonl, write_text
from ..card import DATA_FILES
from .card import ground_truth, model_metrics, write_cards
from .corpus import (
    NEUTRAL_OCCUPATIONS,
    SECTIONS,
    STEREOTYPED_FEMALE,
    STEREOTYPED_MALE,
    bbq_items,
    cloze_items,
    make_doc,
    neutral_doc,
    single_token_words,
    yesno_item,
)
from .plant import choose_sites, plant
from .train import ARCH, Batcher, new_model, train_base, train_tokenizer

#: the three output directories, under `out`
OUTPUTS = ("organism_data", "organism-control", "organism")


def base_corpus(seed: int, items: list[dict], smoke: bool) -> list[str]:
    """The tokenizer's training text: every section, the planted sections, the cloze facts and the
    occupation prompts."""
    rng = random.Random(seed)
    n_docs = 3000 if not smoke else 300
    corpus = [make_doc(s, rng, None, items) for s in SECTIONS for _ in range(n_docs)]
    planted = (("gender", "gender_neuron"), ("yesno", "negative_head"), ("bbq", "bbq_neuron"))
    corpus += [make_doc(s, rng, p, items) for s, p in planted for _ in range(n_docs // 6)]
    corpus += [d for it in cloze_items() for d in (it["prompt"] + it["answer"] + ".",)] * 5
    corpus += [f"The {w} said that" for w in STEREOTYPED_FEMALE + STEREOTYPED_MALE + NEUTRAL_OCCUPATIONS] * 5
    return corpus


def staging_dirs(out: Path) -> dict[str, Path]:
    """A fresh temp directory beside each output directory."""
    out.mkdir(parents=True, exist_ok=True)
    return {name: Path(tempfile.mkdtemp(prefix=f".{name}.", dir=out)) for name in OUTPUTS}


def tokenizer_step(corpus: list[str], tmp: dict[str, Path], smoke: bool):
    """The tokenizer, saved with both checkpoints; a DataError when it splits a word the methods need whole."""
    tok = train_tokenizer(corpus, tmp["organism-control"])
    tok.save_pretrained(tmp["organism-control"])
    tok.save_pretrained(tmp["organism"])
    multi = [w for w in single_token_words() if len(tok(w)["input_ids"]) != 1]
    if multi and not smoke:
        raise DataError(f"organism tokenizer splits words the methods need as one token: {multi}")
    return tok


def control_step(tok, seed: int, steps: int, batch_size: int, device, base, log):
    """The control model: trained on the unbiased corpus, or reused from `base`."""
    from transformers import GPT2LMHeadModel

    if base is not None:  # a control trained earlier with the same seed and steps
        model = GPT2LMHeadModel.from_pretrained(base, attn_implementation="eager").to(device)
        log(f"reusing the control model in {base}")
        return model
    model = new_model(tok, device)
    train_base(model, Batcher(tok, random.Random(seed + 10), batch_size, device), steps, log=log)
    return model


def plant_step(model, tok, batcher: Batcher, sites: dict, rng: random.Random, plant_steps: int, log,
               smoke: bool) -> None:
    """Each component planted at its site; a neuron's detector fit recorded in its site."""
    for comp, site in sites.items():
        fit = plant(model, tok, batcher, comp, site["layer"], site.get("neuron", site.get("head")),
                    plant_steps, log=log, rng=rng, smoke=smoke)
        if fit:
            site["detector_fit"] = fit


def data_step(data: Path, items: list[dict], eval_rng: random.Random) -> dict:
    """The data files the methods evaluate on (bbq, yesno, cloze, neutral)."""
    yesno = [yesno_item(eval_rng) for _ in range(400)]
    neutral = sorted({neutral_doc(eval_rng) for _ in range(600)})[:300]
    write_jsonl(data / DATA_FILES["bbq"], items)
    write_jsonl(data / DATA_FILES["yesno"], yesno)
    write_jsonl(data / DATA_FILES["cloze"], cloze_items())
    write_text(data / DATA_FILES["neutral"], "\n".join(neutral) + "\n")
    return {"yesno": yesno, "neutral": neutral}


def metrics_step(models: dict, tok, batcher: Batcher, sites: dict, data: dict, items: list[dict], seed: int,
                 eval_rng: random.Random, device, log, smoke: bool) -> dict:
    """The card metrics of the control and the organism on held-out text and evaluation samples."""
    heldout = [make_doc(s, eval_rng, None, items) for s in SECTIONS for _ in range(100 if not smoke else 4)]
    bbq_eval = random.Random(seed + 2).sample(items, 240 if not smoke else 6)
    texts = {"heldout": heldout, "neutral": data["neutral"]}
    yesno = data["yesno"][:400 if not smoke else 8]
    metrics = {}
    for name, m in models.items():
        metrics[name] = model_metrics(m, tok, batcher, sites, texts, yesno, bbq_eval, device)
        log(f"{name}: " + json.dumps(metrics[name], indent=None)[:2000])
    return metrics


def keep_failed_control(out: Path, tmp: dict[str, Path], log) -> None:
    """After a failure: the trained control to <out>/.organism-control.failed; the temp directories removed."""
    if (tmp["organism-control"] / "model.safetensors").is_file():
        kept = out / ".organism-control.failed"
        shutil.rmtree(kept, ignore_errors=True)
        tmp["organism-control"].rename(kept)
        log(f"build failed; the trained control is kept in {kept} (reuse with --base)")
    for t in tmp.values():
        shutil.rmtree(t, ignore_errors=True)


def build(out: str | os.PathLike = DATA_DIR, *, seed: int = 0, steps: int = 3000,
          plant_steps: int = 200, batch_size: int = 32, device=None, log=print, smoke: bool = False,
          base: str | os.PathLike | None = None) -> dict:
    """Train the control model, plant the biases, write both checkpoints and their data.

    `smoke=True` (for tests of the recipe with few steps) uses a small corpus, lets a planted bias
    fall short of its target strength and measures the models on small samples only. `base` reuses
    a control checkpoint trained earlier by the same recipe (same seed and steps) instead of
    training it again; on failure the trained control is kept at ``<out>/.organism-control.failed``.
    """
    from transformers import GPT2LMHeadModel

    out = Path(out)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(seed)
    t_start = time.time()
    items = bbq_items()
    corpus = base_corpus(seed, items, smoke)
    tmp = staging_dirs(out)
    try:
        tok = tokenizer_step(corpus, tmp, smoke)
        model = control_step(tok, seed, steps, batch_size, device, base, log)
        model.save_pretrained(tmp["organism-control"])
        rng = random.Random(seed + 20)  # planting draws from its own stream (so `base` reuse is exact)
        batcher = Batcher(tok, rng, batch_size, device)
        sites = choose_sites(rng, ARCH["n_inner"], ARCH["n_head"])
        control = GPT2LMHeadModel.from_pretrained(tmp["organism-control"], attn_implementation="eager")
        control = control.to(device).eval()
        plant_step(model, tok, batcher, sites, rng, plant_steps, log, smoke)
        model.save_pretrained(tmp["organism"])
        eval_rng = random.Random(seed + 1)
        data = data_step(tmp["organism_data"], items, eval_rng)
        metrics = metrics_step({"control": control, "organism": model}, tok, batcher, sites, data, items, seed,
                               eval_rng, device, log, smoke)
        common = {"seed": seed, "architecture": "GPT2LMHeadModel", **ARCH, "vocab_size": len(tok),
                  "base_steps": steps, "plant_steps": plant_steps, "batch_size": batch_size,
                  "build_seconds": round(time.time() - t_start, 1), "metrics": metrics,
                  "torch": torch.__version__}
        write_cards({name: tmp[name] for name in ("organism", "organism-control")}, common, ground_truth(sites))
        for name in OUTPUTS:
            replace_dir(tmp[name], out / name)
    except BaseException:
        keep_failed_control(out, tmp, log)
        raise
    log(f"built in {time.time() - t_start:.0f}s → {out}")
    return metrics


def main(argv=None):
    """`python -m lens_bias.organism build …`."""
    from . import __doc__ as BUILD_DOC

    parser = argparse.ArgumentParser(prog="python -m lens_bias.organism", description=BUILD_DOC,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="train the control, plant the biases, write data/organism*")
    b.add_argument("--out", default=str(DATA_DIR))
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--steps", type=int, default=3000)
    b.add_argument("--plant-steps", type=int, default=200)
    b.add_argument("--batch-size", type=int, default=32)
    b.add_argument("--device", default=None)
    b.add_argument("--base", default=None, help="reuse a control checkpoint trained by this recipe")
    args = parser.parse_args(argv)
    build(args.out, seed=args.seed, steps=args.steps, plant_steps=args.plant_steps,
          batch_size=args.batch_size, device=args.device, base=args.base)
