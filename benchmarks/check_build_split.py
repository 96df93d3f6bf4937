"""The build scripts' split changed nothing: the old single-file builds (from a git revision) and
the new packages produce the same corpora, data, trainings and ground truth.

    python benchmarks/check_build_split.py [--old REV] [--parts PART,...] [--shared /work/shared/data]

Parts (all by default):

- `bench-corpus`: at the real size and seed, the real text, the tokenizer's training text, a
  tokenizer trained on it (and the shipped one), the batches of every corpus tag the build draws,
  held-out documents and every case's data — byte for byte.
- `bench-truth`: a sample of the shipped ground truth (data/bench/*/ground_truth.safetensors)
  recomputed on the shipped models with the new truth code and the old: base metrics, every
  head, every MLP layer, and the first `--neurons` neurons of one swept layer per case. New and
  old must agree exactly; the shipped values, computed on another CPU whose kernels round
  differently, within 64 float32 ulps of each tensor's scale (the share of bit-equal values and
  the largest difference are printed).
- `bench-smoke`: the whole build (`--smoke`, tiny architecture, 3 phase-A steps, 3 steps per
  plant) with the old and the new code: every file of the output (weights, ground truth, case
  data, tokenizer, the cards and work files without their timings) and the logged losses.
- `organism-data`: the organism's corpus, its batches and its data files, old against new.
- `organism-smoke`: a short organism build (8 base steps, 2 plant steps) old against new: every
  file but the cards' build times.

Timings are not compared (they differ from run to run); everything else must be equal. Exit 1 on
any difference. The full builds take hours: these are the fast stand-ins.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

ROOT = Path(__file__).resolve().parents[1]
OLD_REV = "161e3bd"  # the last commit with lens_bias/bench/build.py and lens_bias/organism/build.py as single files
TIMING_KEYS = {"seconds", "elapsed", "build_seconds", "build_seconds_so_far"}
TINY_ARCH = {"n_layer": 6, "n_embd": 32, "n_head": 4, "n_inner": 64}
FAILURES: list[str] = []


def check(ok: bool, what: str) -> None:
    print(f"  {'ok  ' if ok else 'DIFF'} {what}", flush=True)
    if not ok:
        FAILURES.append(what)


def old_module(rev: str, path: str, name: str, tmp: Path):
    """The file `path` at git revision `rev`, imported as module `name`."""
    src = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:{path}"], check=True, capture_output=True).stdout
    file = tmp / (name.replace(".", "_") + ".py")
    file.write_bytes(src)
    spec = importlib.util.spec_from_file_location(name, file)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def same(a, b, ignore=TIMING_KEYS) -> bool:
    """Deep equality of nested dicts / lists / tensors, keys in `ignore` skipped."""
    if isinstance(a, dict) and isinstance(b, dict):
        ka, kb = set(a) - ignore, set(b) - ignore
        return ka == kb and all(same(a[k], b[k], ignore) for k in ka)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same(x, y, ignore) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    return type(a) is type(b) and a == b


def same_batches(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b))


# ---------------------------------------------------------------------------------------
# bench-corpus
# ---------------------------------------------------------------------------------------
BATCH_TAGS = {"gender": [("A", "A", None), ("B", "B1", "c1"), ("B", "B1mix", None)],
              "decision": [("A", "A", None), ("S", "BS", "yn_hard"), ("S", "BSmix", None), ("S", "BK", "yn_hard"),
                           ("S", "BD", "yn_easy"), ("S", "BNmmix", None), ("B", "A", None)]}


def bench_corpus(old, shared: Path, tmp: Path, n_batches: int) -> None:
    from lens_bias.bench.recipe import case_data, corpus, docs, steps, tokens

    seed = old.SEED
    real_o, real_n = old.load_real_text(shared, seed), corpus.load_real_text(shared, seed)
    check(real_o == real_n and len(real_n) > 1000, f"real text ({len(real_n)} documents)")
    gw_o = old.make_gender_world(seed, real_o)
    gw_n, dw_n = corpus.make_worlds(seed, real_n)
    check(gw_o == gw_n, "the gender world")
    texts_n = corpus.tokenizer_texts(seed, gw_n, dw_n, real_n)
    texts_o = old_tokenizer_texts(old, seed, gw_o, real_o)
    check(texts_o == texts_n, f"the tokenizer's training text ({len(texts_n)} texts)")
    t0 = time.time()
    tokens.train_tokenizer(texts_n, tmp / "tok_new")
    old.train_tokenizer(texts_o, tmp / "tok_old")
    trained = (tmp / "tok_new" / "tokenizer.json").read_bytes()
    check(trained == (tmp / "tok_old" / "tokenizer.json").read_bytes(), f"tokenizer trained old/new ({time.time() - t0:.0f}s)")
    shipped = ROOT / "data" / "bench" / "bench-gender" / "tokenizer.json"
    if shipped.is_file():
        a, b = json.loads(trained)["model"], json.loads(shipped.read_bytes())["model"]
        check(a["vocab"] == b["vocab"] and a["merges"] == b["merges"],
              "the trained tokenizer's vocabulary and merges equal the shipped one")
    tok = tokens.load_tokenizer(ROOT / "data" / "bench" / "bench-gender")
    for name, seed_m, world_o, world_n in (("gender", seed, gw_o, gw_n),
                                           ("decision", seed + 1, {"real_train": gw_o["real_train"],
                                                                   "real_heldout": gw_o["real_heldout"]}, dw_n)):
        for phase, tag, section in BATCH_TAGS[name]:
            co, cn = old.Corpus(name, tok, world_o, seed_m, phase), corpus.Corpus(name, tok, world_n, seed_m, phase)
            ok = all(same_batches(co.batch(s, tag=tag, section=section), cn.batch(s, tag=tag, section=section))
                     for s in range(n_batches))
            check(ok, f"{name} corpus, phase {phase}, tag {tag}, section {section}: {n_batches} batches")
        co, cn = old.Corpus(name, tok, world_o, seed_m, "A"), corpus.Corpus(name, tok, world_n, seed_m, "A")
        check(all(co.heldout(s) == cn.heldout(s) for s in co.weights), f"{name} held-out documents")
    r_o, r_n = old.step_rng(seed, "BNb", 5), corpus.step_rng(seed, "BNb", 5)
    check([old.bbq_doc(r_o, "B", condition="ambig") for _ in range(50)] ==
          [docs.bbq_doc(r_n, "B", condition="ambig") for _ in range(50)], "case-6 plant documents")
    lists_o, lists_n = old.gender_lists(tok), case_data.gender_lists(tok)
    check(lists_o == lists_n, "gender word lists")
    for k, c in enumerate(["case1", "case2", "case4", "case8"]):
        check(old.gender_pairs(gw_o, lists_o, c, 24, seed + k) == case_data.gender_pairs(gw_n, lists_n, c, 24, seed + k),
              f"{c} pairs")
    dl_o, dl_n = old.decision_lists(tok), case_data.decision_lists(tok)
    check(dl_o == dl_n, "decision word lists")
    hard = [f(dl, 12, seed + 40, True) for f, dl in ((old.yesno_items, dl_o), (case_data.yesno_items, dl_n))]
    easy = [f(dl, 64, seed + 41, False) for f, dl in ((old.yesno_items, dl_o), (case_data.yesno_items, dl_n))]
    check(hard[0] == hard[1] and easy[0] == easy[1], "case 3/5 yes/no items")
    for kind, n, rseed in (("ambig", 24, seed + 60), ("disambig", 300, seed + 70)):
        check(old.bbq_case_items(random.Random(rseed), kind, n) == case_data.bbq_case_items(random.Random(rseed), kind, n),
              f"BBQ case items ({kind}, {n})")
    compare_shipped_data(steps, case_data, tok, gw_n, lists_n, dl_n, seed)


def old_tokenizer_texts(old, seed, gworld, real):
    """The old build_shared's tokenizer text (its tokenizer training and loading stubbed out)."""
    texts = []
    saved = old.train_tokenizer, old.load_tokenizer, old.load_real_text
    old.train_tokenizer = lambda t, d: texts.extend(t)
    old.load_tokenizer = lambda p: []
    old.load_real_text = lambda shared, s: real
    try:
        with tempfile.TemporaryDirectory() as d:
            old.build_shared(Path(d), seed, None, lambda m: None)
    finally:
        old.train_tokenizer, old.load_tokenizer, old.load_real_text = saved
    return texts


def compare_shipped_data(steps, case_data, tok, gworld, glists, dlists, seed) -> None:
    """The new code's case data equal the shipped files (those that do not depend on the model)."""
    ship = ROOT / "data" / "bench"
    if not ship.is_dir():
        return
    for k, c in enumerate(["case1", "case2", "case4", "case8"]):
        rows = case_data.gender_pairs(gworld, glists, c, 24, seed + k)
        check("".join(json.dumps(r) + "\n" for r in rows) == (ship / "bench-gender" / "data" / f"{c}_pairs.jsonl").read_text(),
              f"{c} pairs equal the shipped file")
    hard = case_data.yesno_items(dlists, 12, seed + 40, True)
    easy = case_data.yesno_items(dlists, 64, seed + 41, False)
    items6 = case_data.bbq_case_items(random.Random(seed + 60), "ambig", 24, start_id=0)
    for rows, f in ((hard, "case3_5_yesno"), (easy, "yesno_easy"), (case_data.yesno_pair_rows(hard, easy), "case3_5_pairs"),
                    (items6, "case6_bbq")):
        check("".join(json.dumps(r) + "\n" for r in rows) == (ship / "bench-decision" / "data" / f"{f}.jsonl").read_text(),
              f"{f}.jsonl equals the shipped file")
    with tempfile.TemporaryDirectory() as d:
        steps.write_neutral(Path(d), seed, gworld)
        check((Path(d) / "neutral.txt").read_text() == (ship / "bench-gender" / "data" / "neutral.txt").read_text(),
              "neutral.txt equals the shipped file")


# ---------------------------------------------------------------------------------------
# bench-truth
# ---------------------------------------------------------------------------------------
def shipped_case_batches(model_dir: Path, tok):
    """case → (kind, rows) from the shipped data files."""
    data = model_dir / "data"

    def rows(f):
        return [json.loads(line) for line in (data / f).read_text().splitlines()]

    if model_dir.name == "bench-gender":
        return {c: ("pairs", rows(f"{c}_pairs.jsonl")) for c in ("case2", "case4", "case8")}
    hard, easy = rows("case3_5_yesno.jsonl"), rows("yesno_easy.jsonl")
    return {"case3_5": ("yesno", (hard, easy)), "case6": ("bbq6", rows("case6_bbq.jsonl")),
            "case7": ("bbq7", rows("case7_bbq.jsonl"))}


def make_batch(lib, kind, payload, tok, new: bool):
    if kind == "pairs":
        return lib.pairs_case(tok, payload)
    if kind == "yesno":
        return lib.yesno_case(tok, *payload)
    reducer = lib.case6_reducer if kind == "bbq6" else lib.case7_reducer
    return lib.bbq_case(tok, payload, [0], reducer) if new else lib.mc_case(tok, payload, [0], reducer)


def truth_sample(ab, model, cb, layer: int, n_neurons: int) -> dict:
    """base, heads (zero, mean), MLP layers, and the first n_neurons neurons of one layer, by the
    ablation module `ab` (the sweep's chunks start at neuron 0, so the first neurons are computed
    exactly as in the full sweep)."""
    base = ab.case_metrics(model, cb)
    means = ab.capture_means(model, cb)
    hs = ab.residuals(model, cb)
    heads = ab.sweep_heads(model, cb, base, means, hs)
    mlp = ab.mlp_layer_effects(model, cb, base, means)
    chunk = max(2, min(64, 6000 // (cb.n * cb.ids.shape[1])))
    d_mlp = model.config.n_inner
    model.config.n_inner = max(chunk, n_neurons - n_neurons % chunk)
    try:
        neurons = ab.sweep_neurons(model, cb, base, means, hs, [layer], chunk=chunk)
    finally:
        model.config.n_inner = d_mlp
    out = {}
    for m in base:
        out[f"{m}/base"] = torch.tensor([base[m]])
        for meth in ("zero", "mean"):
            out[f"{m}/heads_{meth}"] = heads[m][meth]
            out[f"{m}/mlp_layer_{meth}"] = mlp[m][meth]
            out[f"{m}/neurons_{meth}"] = neurons[m][meth]
    return out


def bench_truth(old, n_neurons: int) -> None:
    from safetensors.torch import load_file

    from lens_bias.bench.recipe import ablation, case_data, casebatch, steps, tokens

    class New:  # the new code's pieces under the old module's names
        case_metrics, final_hidden = casebatch.case_metrics, casebatch.final_hidden
        capture_means, residuals, sweep_heads = ablation.capture_means, ablation.residuals, ablation.sweep_heads
        mlp_layer_effects, sweep_neurons = ablation.mlp_layer_effects, ablation.sweep_neurons

    torch.set_num_threads(1)
    for name in ("bench-gender", "bench-decision"):
        model_dir = ROOT / "data" / "bench" / name
        if not model_dir.is_dir():
            print(f"  skip {name}: not shipped")
            continue
        shipped = load_file(model_dir / "ground_truth.safetensors")
        model, tok = steps.load_hf(model_dir), tokens.load_tokenizer(model_dir)
        for c, (kind, payload) in shipped_case_batches(model_dir, tok).items():
            layer = int(shipped[f"{c}/neuron_layers"][0])
            t0 = time.time()
            new = truth_sample(New, model, make_batch(case_data, kind, payload, tok, True), layer, n_neurons)
            ref = truth_sample(old, model, make_batch(old, kind, payload, tok, False), layer, n_neurons)
            check(same(new, ref), f"{name} {c}: new truth code = old truth code ({time.time() - t0:.0f}s)")
            n_equal = n_all = 0
            worst = 0.0
            for k, v in new.items():
                want = shipped[f"{c}/{k}"]
                if k.endswith(("neurons_zero", "neurons_mean")):
                    want = want[:1, :v.shape[1]]
                scale = max(1.0, float(want.abs().max()))
                n_equal += int((v.float() == want).sum())
                n_all += want.numel()
                worst = max(worst, float((v.float() - want).abs().max()) / scale)
            n = new["bias/neurons_zero"].shape[1]
            print(f"       {n_equal}/{n_all} values bit-equal to the shipped truth; largest difference "
                  f"{worst:.2g} × the tensor's scale ({worst / torch.finfo(torch.float32).eps:.1f} float32 ulps)")
            check(worst <= 64 * torch.finfo(torch.float32).eps,
                  f"{name} {c}: equals the shipped ground truth up to float32 rounding ({len(new)} tensors: base, "
                  f"heads, MLP layers, neurons 0-{n - 1} of layer {layer})")


# ---------------------------------------------------------------------------------------
# bench-smoke
# ---------------------------------------------------------------------------------------
def normalise_log(text: str, out: Path) -> list[str]:
    lines = [re.sub(r"^\[\d\d:\d\d:\d\d\] ", "", line).replace(str(out), "OUT") for line in text.splitlines()]
    return [re.sub(r"\d+(\.\d+)?s\b", "Ns", line) for line in lines]


def compare_trees(a: Path, b: Path) -> None:
    """Every file under a and b: the same set, the same bytes; JSON and .pt files without timings."""
    fa = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    fb = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    check(fa == fb, f"the same {len(fa)} files")
    for rel in fa:
        if not (b / rel).is_file():
            continue
        pa, pb = a / rel, b / rel
        if rel.name == "build_log.txt":
            ok = normalise_log(pa.read_text(), a) == normalise_log(pb.read_text(), b)
        elif rel.suffix == ".json" and rel.parent.name in (".work", "gender", "decision") or rel.name == "lens_bias_card.json":
            ok = same(json.loads(pa.read_text()), json.loads(pb.read_text()))
        elif rel.suffix == ".pt":
            ok = same(torch.load(pa, weights_only=False), torch.load(pb, weights_only=False))
        else:
            ok = pa.read_bytes() == pb.read_bytes()
        check(ok, str(rel))


def bench_smoke(old, shared: Path, tmp: Path) -> None:
    from lens_bias.bench.recipe import config, steps

    saved = dict(config.ARCH), dict(old.ARCH)
    config.ARCH.update(TINY_ARCH)
    old.ARCH.update(TINY_ARCH)
    args = ["build", "--steps", "3", "--smoke", "--shared", str(shared)]
    try:
        t0 = time.time()
        old.main(args[:1] + ["--out", str(tmp / "old")] + args[1:])
        t1 = time.time()
        steps.main(args[:1] + ["--out", str(tmp / "new")] + args[1:])
        print(f"  smoke builds: old {t1 - t0:.0f}s, new {time.time() - t1:.0f}s")
    finally:
        config.ARCH.clear()
        config.ARCH.update(saved[0])
        old.ARCH.clear()
        old.ARCH.update(saved[1])
        old.SMOKE = False
    compare_trees(tmp / "old", tmp / "new")
    for name in ("bench-gender", "bench-decision"):
        card = json.loads((tmp / "new" / name / "lens_bias_card.json").read_text())
        print(f"  {name}: phase-A losses {card['phase_a_loss_history']}")


# ---------------------------------------------------------------------------------------
# organism
# ---------------------------------------------------------------------------------------
def organism_data(old) -> None:
    from lens_bias.organism.recipe import corpus as C
    from lens_bias.organism.recipe import steps as M
    from lens_bias.organism.recipe import train as T

    check(old.bbq_items() == C.bbq_items(), "organism BBQ items")
    check(old.cloze_items() == C.cloze_items(), "organism cloze items")
    for seed in (0, 3):
        check(old_organism_corpus(old, seed, smoke=False) == M.base_corpus(seed, C.bbq_items(), smoke=False),
              f"organism corpus (tokenizer text), seed {seed}")
        r_o, r_n = random.Random(seed + 1), random.Random(seed + 1)
        check([old.yesno_item(r_o) for _ in range(400)] == [C.yesno_item(r_n) for _ in range(400)], "organism yes/no items")
        check(sorted({old.neutral_doc(r_o) for _ in range(600)}) == sorted({C.neutral_doc(r_n) for _ in range(600)}),
              "organism neutral text")
    from transformers import AutoTokenizer

    from lens_bias.core import shipped_model_dir

    tok = AutoTokenizer.from_pretrained(shipped_model_dir("organism"))
    bo, bn = old._Batcher(tok, random.Random(10), 32, "cpu"), T.Batcher(tok, random.Random(10), 32, "cpu")
    ok = all(same_batches(bo.batch(old.SECTION_WEIGHTS), bn.batch(C.SECTION_WEIGHTS)) for _ in range(200))
    check(ok, "organism base-training batches (200)")
    for comp, section in (("gender_neuron", "gender"), ("negative_head", "yesno"), ("bbq_neuron", "bbq")):
        ok = all(same_batches(bo.batch({section: 1.0}, plant=comp), bn.batch({section: 1.0}, plant=comp)) for _ in range(50))
        check(ok, f"organism plant batches ({comp}, 50)")


def old_organism_corpus(old, seed: int, smoke: bool) -> list[str]:
    """The old build()'s tokenizer text (the same lines as its opening)."""
    rng = random.Random(seed)
    items = old.bbq_items()
    n_docs = 3000 if not smoke else 300
    corpus = [old.make_doc(s, rng, None, items) for s in old.SECTIONS for _ in range(n_docs)]
    corpus += [old.make_doc(s, rng, p, items) for s, p in
               (("gender", "gender_neuron"), ("yesno", "negative_head"), ("bbq", "bbq_neuron")) for _ in range(n_docs // 6)]
    corpus += [d for it in old.cloze_items() for d in (it["prompt"] + it["answer"] + ".",)] * 5
    corpus += [f"The {w} said that" for w in old.STEREOTYPED_FEMALE + old.STEREOTYPED_MALE + old.NEUTRAL_OCCUPATIONS] * 5
    return corpus


def organism_smoke(old, tmp: Path) -> None:
    from lens_bias.organism.build import build

    logs = {"old": [], "new": []}
    kw = {"steps": 8, "plant_steps": 2, "batch_size": 8, "device": "cpu", "smoke": True}
    t0 = time.time()
    old.build(tmp / "org_old", log=logs["old"].append, **kw)
    t1 = time.time()
    build(tmp / "org_new", log=logs["new"].append, **kw)
    print(f"  organism smoke builds: old {t1 - t0:.0f}s, new {time.time() - t1:.0f}s")
    compare_trees(tmp / "org_old", tmp / "org_new")
    strip = [lambda s: re.sub(r"\d+(\.\d+)?s\b", "Ns", s.replace(str(tmp / "org_old"), "OUT").replace(str(tmp / "org_new"), "OUT"))]
    check([strip[0](x) for x in logs["old"]] == [strip[0](x) for x in logs["new"]],
          f"organism build logs (losses, fits, metrics; {len(logs['new'])} lines)")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--old", default=OLD_REV, help="the git revision with the single-file builds")
    ap.add_argument("--parts", default="bench-corpus,bench-truth,bench-smoke,organism-data,organism-smoke")
    ap.add_argument("--shared", default="/work/shared/data", help="the real text (StrategyQA, GSM8K)")
    ap.add_argument("--neurons", type=int, default=128, help="bench-truth: neurons of one layer compared per case")
    ap.add_argument("--batches", type=int, default=300, help="batches compared per corpus tag")
    args = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        old_b = old_module(args.old, "lens_bias/bench/build.py", "old_bench_build", tmp)
        old_o = old_module(args.old, "lens_bias/organism/build.py", "lens_bias.organism.old_build", tmp)
        parts = {"bench-corpus": lambda: bench_corpus(old_b, Path(args.shared), tmp, args.batches),
                 "bench-truth": lambda: bench_truth(old_b, args.neurons),
                 "bench-smoke": lambda: bench_smoke(old_b, Path(args.shared), tmp),
                 "organism-data": lambda: organism_data(old_o),
                 "organism-smoke": lambda: organism_smoke(old_o, tmp)}
        for part in args.parts.split(","):
            print(f"{part}:", flush=True)
            parts[part]()
    print(f"{len(FAILURES)} differences" + (": " + "; ".join(FAILURES) if FAILURES else ""))
    sys.exit(1 if FAILURES else 0)


if __name__ == "__main__":
    main()
