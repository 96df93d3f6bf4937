"""The build, as named steps per model: lists → phase A → its statistics → phase B → float16 →
case data → ground truth → card → the model directory. Every step's result is kept under
DIR/.work/<model>/ and loaded instead of redone."""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ...core.files import replace_dir, write_jsonl, write_text
from . import __doc__ as BUILD_DOC
from .ablation import capture_means, residuals, sweep_positions
from .card import (
    bbq_stats,
    decision_card,
    gender_card,
    gender_stats,
    json_default,
    loss_report,
    units_of,
    yesno_stats,
)
from .case_data import (
    bbq_case,
    bbq_case_items,
    case6_reducer,
    case7_items,
    case7_reducer,
    decision_lists,
    gender_lists,
    gender_pairs,
    mc_probs,
    pairs_case,
    subject_last_pos,
    yesno_case,
    yesno_items,
    yesno_pair_rows,
)
from .casebatch import case_metrics
from .config import DEFAULT_STEPS, SEED
from .corpus import Corpus, load_real_text, make_worlds, tokenizer_texts
from .docs import neutral_doc
from .plant import plant_case1, plant_decision
from .tokens import load_tokenizer, train_tokenizer
from .train import new_model, save_checkpoint, train_phase_a
from .truth import compute_truth, patch_diagnostics

ROOT = Path(__file__).resolve().parents[3]
GENDER_CASES = ["case1", "case2", "case4", "case8"]


@dataclass
class Build:
    """One build's output folder, seed, log and size."""

    out: Path
    seed: int
    log: Callable[[str], None]
    smoke: bool = False

    def work(self, name: str) -> Path:
        path = self.out / ".work" / name
        path.mkdir(parents=True, exist_ok=True)
        return path


# ---------------------------------------------------------------------------------------
# Steps both models take
# ---------------------------------------------------------------------------------------
def build_shared(b: Build, shared: Path | None) -> dict:
    """The real text, both worlds and the tokenizer (trained once, shared by both models)."""
    tok_dir = b.work("tokenizer")
    real = load_real_text(shared, b.seed)
    gworld, dworld = make_worlds(b.seed, real)
    if not (tok_dir / "tokenizer.json").is_file():
        texts = tokenizer_texts(b.seed, gworld, dworld, real)
        train_tokenizer(texts, tok_dir)
        b.log(f"tokenizer trained on {len(texts)} texts")
    tok = load_tokenizer(tok_dir)
    b.log(f"tokenizer: vocab {len(tok)}; real-text docs {len(real)}")
    return {"tok": tok, "tok_dir": tok_dir, "gworld": gworld, "dworld": dworld, "n_real": len(real)}


def resumable(model, path: Path, train: Callable[[], dict]) -> dict:
    """train() changes `model` and returns its info; both are saved to `path`, and loaded from it
    instead when it exists."""
    if path.is_file():
        st = torch.load(path, weights_only=False)
        model.load_state_dict(st["model"])
        return st["info"]
    info = train()
    save_checkpoint({"model": model.state_dict(), "info": info}, path)
    return info


def phase_a(b: Build, model, corpus: Corpus, steps: int, work: Path) -> dict:
    """Phase A, trained once (work/phaseA_done.pt)."""
    return resumable(model, work / "phaseA_done.pt", lambda: train_phase_a(model, corpus, steps, work, b.log))


def phase_a_stats(work: Path, measure: Callable[[], dict]) -> dict:
    """The phase-A model's statistics (work/stats_phaseA.json, measured once)."""
    path = work / "stats_phaseA.json"
    if not path.is_file():
        write_text(path, json.dumps(measure(), indent=1))
    return json.loads(path.read_text())


def save_hf(model, tok, path: Path):
    """The model in float16 and its tokenizer as a Hugging Face directory (the model stays float32)."""
    path.mkdir(parents=True, exist_ok=True)
    m = model.half()
    m.config.dtype = "float16"
    m.save_pretrained(str(path))
    model.float()
    tok.save_pretrained(str(path))


def load_hf(path: Path):
    """A saved benchmark model, upcast to float32, eager attention, eval mode."""
    from transformers import GPT2LMHeadModel

    m = GPT2LMHeadModel.from_pretrained(str(path), attn_implementation="eager").float().eval()
    m.config._attn_implementation = "eager"
    return m


def round_to_fp16(model, tok, stage: Path):
    """Round to float16 and reload: everything after is measured on the shipped weights."""
    if stage.exists():
        shutil.rmtree(stage)
    save_hf(model, tok, stage)
    return load_hf(stage)


def write_neutral(data: Path, seed: int, world: dict) -> None:
    """data/neutral.txt: 200 neutral sentences and 100 held-out real ones (capability checks)."""
    neutral = sorted({neutral_doc(random.Random(seed + 9 + i)) for i in range(400)})[:200] + world["real_heldout"][:100]
    write_text(data / "neutral.txt", "\n".join(neutral) + "\n")


def compute_truths(work: Path, cases: list[str], truth_of: Callable[[str], tuple[dict, dict]]) -> tuple[dict, dict]:
    """truth_of(case) → (tensors, summary) for each case not yet in work/truth.pt (saved after each)."""
    truths, summaries = {}, {}
    tpath = work / "truth.pt"
    if tpath.is_file():
        truths, summaries = torch.load(tpath, weights_only=False)
    for c in cases:
        if c in summaries:
            continue
        T, summ = truth_of(c)
        truths.update(T)
        summaries[c] = summ
        save_checkpoint((truths, summaries), tpath)
    return truths, summaries


def write_model_dir(b: Build, stage: Path, final: Path, truths: dict, card: dict, t_start: float) -> None:
    """The ground truth and the card into the staged model directory, then the directory into place."""
    from safetensors.torch import save_file

    card["build_seconds"] = round(time.time() - t_start, 1)
    tensors = {k: v.float().contiguous() if v.is_floating_point() else v.long().contiguous() for k, v in truths.items()}
    save_file(tensors, str(stage / "ground_truth.safetensors"))
    write_text(stage / "lens_bias_card.json", json.dumps(card, indent=1, default=json_default) + "\n")
    replace_dir(stage, final)
    b.log(f"{final.name} written to {final}")


# ---------------------------------------------------------------------------------------
# bench-gender
# ---------------------------------------------------------------------------------------
def case8_position_sweeps(model, tok, cb, row: dict) -> list:
    """Case 8's neuron sweeps: at the subject's last token and at the last token, each in the two
    layers whose MLP output matters most at that position (from the position sweep)."""
    base = case_metrics(model, cb)
    pos = sweep_positions(model, cb, base, capture_means(model, cb), residuals(model, cb))["bias"]
    sp, lp = subject_last_pos(tok, row), int(cb.answer_pos[0])
    sub_layers = pos["mlp_zero"][:, sp].abs().argsort(descending=True)[:2].tolist()
    last_layers = pos["mlp_zero"][:, lp].abs().argsort(descending=True)[:2].tolist()
    return [("at_subject", sorted(sub_layers), torch.full((cb.n,), sp)),
            ("at_last", sorted(last_layers), torch.full((cb.n,), lp))]


def gender_truth(b: Build, model, tok, c: str, rows: list[dict], plant: dict) -> tuple[dict, dict]:
    """One gender case's truth. Neurons: the layers whose MLP matters most for the case (and the
    planted ones), not all six (a full sweep of 6 × 1024 neurons per case took hours on one thread)."""
    cb = pairs_case(tok, rows)
    if c == "case1":
        base1 = case_metrics(model, cb)
        if base1["bias"] < 0.2:  # nothing to locate: the plant did not take (reported in the card, no truth)
            b.log(f"  case1: the distributed plant did not take (bias {base1['bias']:+.3f} < 0.2): no ground truth")
            return {}, {"failed": True, "base": base1}
    kw = {"neuron_layers": "auto", "auto_k": 1 if c in ("case1", "case8") else 2, "positions": True}
    if c == "case1":
        kw["planted_neurons"] = [(u["layer"], u["index"]) for u in plant["units"]]
    if c == "case8":
        kw["pos_neuron_sweeps"] = case8_position_sweeps(model, tok, cb, rows[0])
    T, summ = compute_truth(model, cb, c, b.log, smoke=b.smoke, **kw)
    T[f"{c}/subject_last_pos"] = torch.tensor([subject_last_pos(tok, rows[0])])
    T[f"{c}/answer_pos"] = torch.tensor([int(cb.answer_pos[0])])
    summ["subject_last_pos"] = subject_last_pos(tok, rows[0])
    summ["answer_pos"] = int(cb.answer_pos[0])
    summ["seq_len"] = int(cb.ids.shape[1])
    if c == "case4":
        summ["patch_diagnostics"] = patch_diagnostics(model, cb, units_of(summ["top_heads"]["bias"], 4),
                                                      units_of(summ["top_neurons"]["bias"], 4))
    return T, summ


def gender_case_data(b: Build, world: dict, lists: dict, data: Path) -> dict[str, list[dict]]:
    """Cases 1, 2, 4, 8's pairs and the neutral text, written to `data`."""
    rows = {c: gender_pairs(world, lists, c, 8 if b.smoke else 24, b.seed + k) for k, c in enumerate(GENDER_CASES)}
    for c, r in rows.items():
        write_jsonl(data / f"{c}_pairs.jsonl", r)
    write_neutral(data, b.seed, world)
    return rows


def build_gender(b: Build, S: dict, steps: int, t_start: float) -> None:
    """bench-gender: lists → phase A → statistics → case-1 plant → float16 → data → truth → card."""
    tok, world = S["tok"], S["gworld"]
    work = b.work("gender")
    lists = gender_lists(tok)
    b.log(f"gender lists: c1 {lists['c1']}, n0 {len(lists['n0'])}, templates {len(lists['templates'])}, "
          f"case-8 token count {lists['prof_n']} (f8 {lists['f8_eval']}, z8 {lists['z8_eval']}); "
          f"single-token professions {lists['single_token_profs']}")
    corpus = Corpus("gender", tok, world, b.seed, "A")
    torch.manual_seed(b.seed)
    model = new_model(tok)
    info_a = phase_a(b, model, corpus, steps, work)
    if os.environ.get("BENCH_STOP_AFTER_PHASE_A"):
        return
    model.eval()
    stats_a = phase_a_stats(work, lambda: {"gender_stats": gender_stats(model, tok, world, lists, "A"),
                                           "losses": loss_report(model, tok, corpus)})
    corpus_b = Corpus("gender", tok, world, b.seed, "B")
    plant = resumable(model, work / "phaseB_done.pt", lambda: plant_case1(model, corpus_b, b.log, b.seed, b.smoke))
    stage = b.out / ".work" / "gender_final"
    model = round_to_fp16(model, tok, stage)
    rows = gender_case_data(b, world, lists, stage / "data")
    truths, summaries = compute_truths(work, GENDER_CASES, lambda c: gender_truth(b, model, tok, c, rows[c], plant))
    losses = {"final_model_on_phaseB_corpus": loss_report(model, tok, corpus_b, extra_sections=("c1",)),
              "final_model_on_phaseA_corpus": loss_report(model, tok, corpus, extra_sections=("c1",))}
    card = gender_card(model, tok, b.seed, info_a, losses, time.time() - t_start, world, lists, plant, stats_a,
                       truths, summaries)
    write_model_dir(b, stage, b.out / "bench-gender", truths, card, t_start)


# ---------------------------------------------------------------------------------------
# bench-decision
# ---------------------------------------------------------------------------------------
def decision_case_data(b: Build, model, tok, world: dict, hard: list, easy: list, data: Path):
    """Cases 3/5 (yes/no items and pairs), 6 (ambiguous BBQ items) and 7 (items selected on the
    model's own answers). Returns (case-6 items, case-7 items, case-7 selection counts)."""
    write_jsonl(data / "case3_5_yesno.jsonl", hard)
    write_jsonl(data / "yesno_easy.jsonl", easy)
    write_jsonl(data / "case3_5_pairs.jsonl", yesno_pair_rows(hard, easy))
    items6 = bbq_case_items(random.Random(b.seed + 60), "ambig", 8 if b.smoke else 24, start_id=0)
    write_jsonl(data / "case6_bbq.jsonl", items6)
    rng7 = random.Random(b.seed + 70)
    pool = (bbq_case_items(rng7, "ambig", 40 if b.smoke else 300, start_id=1000)
            + bbq_case_items(rng7, "disambig", 40 if b.smoke else 300, start_id=2000))
    items7, select7 = case7_items(pool, mc_probs(model, tok, pool))
    write_jsonl(data / "case7_bbq.jsonl", items7)
    write_neutral(data, b.seed, world)
    return items6, items7, select7


def decision_truth_specs(tok, plant: dict, yn_cb, items6: list, items7: list) -> dict:
    """case → (CaseBatch, compute_truth options)."""
    M, K, Sh, D = (tuple(plant["select"][k]) for k in ("M", "K", "S", "D"))
    NB, NM = tuple(plant["N"]["N_bias"]), tuple(plant["N"]["N_mix"])
    neurons = {"planted_neurons": [NB, NM], "auto_k": 1, "auto_min_layer": 2}
    heads = {"planted_heads": [M, K, Sh, D], "extra_pairs": [(M, K), (M, Sh), (K, Sh)], "auto_k": 1}
    return {"case3_5": (yn_cb, heads),
            "case6": (bbq_case(tok, items6, [0], case6_reducer), neurons),
            "case7": (bbq_case(tok, items7, [0], case7_reducer), neurons)}


def build_decision(b: Build, S: dict, steps: int, t_start: float) -> None:
    """bench-decision: lists → phase A → statistics → S, K, D, N plants → float16 → data → truth →
    card."""
    tok, world = S["tok"], S["dworld"]
    work = b.work("decision")
    lists = decision_lists(tok)
    b.log(f"decision lists: names {lists['names']}, adjs {lists['hard_adj']}, numbers {lists['numbers']}")
    corpus = Corpus("decision", tok, world, b.seed + 1, "A")
    torch.manual_seed(b.seed + 1)
    model = new_model(tok)
    info_a = phase_a(b, model, corpus, steps, work)
    model.eval()
    stats_a = phase_a_stats(work, lambda: {"yesno": yesno_stats(model, tok, lists), "bbq": bbq_stats(model, tok),
                                           "losses": loss_report(model, tok, corpus)})
    hard = yesno_items(lists, 4 if b.smoke else 12, b.seed + 40, True)
    easy = yesno_items(lists, 64, b.seed + 41, False)
    yn_cb = yesno_case(tok, hard, easy)
    corpus_s = Corpus("decision", tok, world, b.seed + 1, "S")
    corpus_b = Corpus("decision", tok, world, b.seed + 1, "B")
    plant = resumable(model, work / "phaseB_done.pt",
                      lambda: plant_decision(model, tok, corpus_s, yn_cb, b.log, b.seed, work, b.smoke))
    stage = b.out / ".work" / "decision_final"
    model = round_to_fp16(model, tok, stage)
    items6, items7, select7 = decision_case_data(b, model, tok, world, hard, easy, stage / "data")
    specs = decision_truth_specs(tok, plant, yn_cb, items6, items7)
    truths, summaries = compute_truths(work, list(specs), lambda c: compute_truth(model, specs[c][0], c, b.log,
                                                                                  smoke=b.smoke, **specs[c][1]))
    losses = {"final_model_on_phaseB_corpus": loss_report(model, tok, corpus_b),
              "final_model_on_phaseA_corpus": loss_report(model, tok, corpus)}
    card = decision_card(model, tok, b.seed, info_a, losses, time.time() - t_start, lists, plant, stats_a,
                         truths, summaries, select7)
    write_model_dir(b, stage, b.out / "bench-decision", truths, card, t_start)


BUILDERS = {"gender": build_gender, "decision": build_decision}


def parse_args(argv=None) -> argparse.Namespace:
    """The command line; an unknown --models name is a usage error (exit 2)."""
    ap = argparse.ArgumentParser(prog="python -m lens_bias.bench.build", description=BUILD_DOC,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("build")
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=None, help="phase-A steps per model (default: per-model)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=SEED)
    p.add_argument("--models", default="decision,gender")
    p.add_argument("--rebuild", action="store_true", help="rewrite finished models from their work files")
    p.add_argument("--smoke", action="store_true", help="tiny plants and sweeps (pipeline test only)")
    p.add_argument("--shared", default=None,
                   help="the shared data folder (real text); default ../shared/data or /work/shared/data")
    args = ap.parse_args(argv)
    bad = [m for m in args.models.split(",") if m not in BUILDERS]
    if bad:
        ap.error(f"--models: unknown model(s) {bad}; choose from {', '.join(BUILDERS)}")
    return args


def shared_folder(arg: str | None) -> Path | None:
    """--shared, else ../shared/data beside the repository or /work/shared/data when present."""
    if arg:
        return Path(arg)
    return next((p for p in (ROOT.parent / "shared" / "data", Path("/work/shared/data")) if p.is_dir()), None)


def main(argv=None):
    """`python -m lens_bias.bench.build build …`."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "build_log.txt", "a") as logf:
        def log(msg):
            line = f"[{time.strftime('%H:%M:%S')}] {msg}"
            print(line, flush=True)
            logf.write(line + "\n")
            logf.flush()

        b = Build(out, args.seed, log, args.smoke)
        shared = shared_folder(args.shared)
        t0 = time.time()
        log(f"build start: out {out}, seed {args.seed}, threads {args.threads}, models {args.models}, shared {shared}")
        S = build_shared(b, shared)
        for name in args.models.split(","):
            if (out / f"bench-{name}" / "lens_bias_card.json").is_file() and not args.rebuild:
                log(f"bench-{name} exists: skipped (--rebuild to redo its final stage)")
                continue
            BUILDERS[name](b, S, args.steps or DEFAULT_STEPS[name], time.time())
        log(f"build done in {time.time() - t0:.0f}s")
