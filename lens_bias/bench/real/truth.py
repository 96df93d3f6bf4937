"""The ground truth of the real-model cases by exhaustive ablation (engine.py: plain Hugging Face modules
and hooks, no lens_bias code), built in stages with checkpoints so that a killed build resumes.

    python -m lens_bias.bench.real build rprof [--work DIR]

Stages: base metrics and means → whole attention / MLP output per layer → every head, or every
(layer, position, site), or the neurons of the swept layers and a uniform sample of the others →
pairs among the top 20 units (by |zero effect|) → cumulative top-k sets (by the truth's own ranking,
largest effect first) → a self-check of random cells against full hooked forwards. Each stage's result
is saved to WORK/<case>/<stage>.pt when done (the long sweeps also every few minutes), and skipped when
present. The result: `{case}/{metric}/{kind}_{method}` tensors merged into the task folder's
ground_truth.safetensors, timings and options into its lens_bias_card.json.

Methods: zero (a ← 0), mean (a ← its mean over the held-out rows' real tokens, position-independent),
resample (a ← its value in a donor row at the same position: a seeded random other prompt of the case
of the same token length), patch (noising: clean rows get the twin's value; effect = LD(clean) −
LD(clean patched)) and denoise (corrupted rows get the clean twin's value, as lens_bias's activation
patching: effect = LD(corrupted patched) − LD(corrupted)). Sign: effect = metric(model) − metric(intervened).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm.auto import tqdm

from .engine import Engine, Group, Spec
from .rows import bbq_rows, pair_rows, read_jsonl, yesno_rows

CKPT_SECONDS = float(os.environ.get("BENCH_CKPT_SECONDS", "180"))
TOP_PAIRS = 20
CUMULATIVE_K = (1, 2, 3, 5, 8, 13, 20, 30, 50)


@dataclass(frozen=True)
class TruthSpec:
    """A real case's truth: the task folder (data/bench/<folder>), its held-out file, the kind of rows, the
    units swept and the interventions."""

    folder: str
    data: str
    kind: str  # pairs | yesno | bbq
    units: tuple[str, ...]  # head, site (attn_out and mlp_out by layer × position), neuron
    methods: tuple[str, ...]
    neuron_methods: tuple[str, ...] = ("zero", "mean")
    neuron_top_layers: int = 2
    neuron_random_layers: int = 2
    neuron_sample: int = 2000
    instruction: str = ""
    from_answer: bool = False  # every intervention acts from the answer on (the prompt's last token, options)
    extra: dict = field(default_factory=dict)


SPECS: dict[str, TruthSpec] = {
    "rprof": TruthSpec("real-professions", "heldout_pairs.jsonl", "pairs", ("head", "site"),
                       ("zero", "mean", "resample", "patch", "denoise")),
    "rprof-neurons": TruthSpec("real-professions", "heldout_neuron_pairs.jsonl", "pairs", ("neuron",),
                               ("zero", "mean", "resample", "patch", "denoise"), neuron_methods=("zero", "patch")),
    "ryesno": TruthSpec("real-yesno", "heldout_yesno.jsonl", "yesno", ("head",), ("zero", "mean", "resample"),
                        instruction="Answer Yes or No."),
    "rbbq": TruthSpec("real-bbq", "heldout_bbq.jsonl", "bbq", ("head",), ("zero", "mean"), from_answer=True,
                      instruction="Select the best answer among the options for the context and question."),
    "rbbq-neurons": TruthSpec("real-bbq", "heldout_bbq_neurons.jsonl", "bbq", ("neuron",), ("zero", "mean"),
                              neuron_methods=("zero",), from_answer=True,
                              instruction="Select the best answer among the options for the context and question."),
}


# ---------------------------------------------------------------------------------------------------
def load_hf(model_dir: str | Path):
    """(model, tokenizer) with plain transformers, float32, eval."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(str(model_dir))


def case_rows(spec: TruthSpec, tok, W: Tensor, data_dir: Path):
    items = read_jsonl(data_dir / "data" / spec.data)
    if spec.kind == "pairs":
        return pair_rows(tok, W, items)
    if spec.kind == "yesno":
        return yesno_rows(tok, W, items, spec.instruction)
    seqs = bbq_rows(tok, W, items, spec.instruction, align="answer" if spec.from_answer else "start")
    seqs.meta["from_answer"] = spec.from_answer
    return seqs


def donors(seqs, kind: str, seed: int = 0) -> Tensor | None:
    """Resample donors: row i takes its activations from donor[i], another row of the same token length
    (pairs: a seeded random other prompt, clean or corrupted; yes/no: its length partner); None (BBQ) when
    the rows' tokens do not align."""
    if kind == "bbq":
        return None
    n = seqs.n
    if kind == "pairs":
        g = torch.Generator().manual_seed(seed)
        d = torch.randint(0, n - 1, (n,), generator=g)
        return d + (d >= torch.arange(n)).long()  # never itself
    lengths = seqs.meta["lengths"]
    d = torch.arange(n)
    for i in range(0, n, 2):
        if int(lengths[i]) != int(lengths[i + 1]):
            raise ValueError(f"yes/no rows {i} and {i + 1} are not a same-length pair")
        d[i], d[i + 1] = i + 1, i
    return d


def unit_group(e: Engine, s, site: str, layer: int, index: int | None, method: str, position: int | None,
               donor: Tensor | None, from_answer: bool = False) -> Group | None:
    """The intervention `method` on one unit as an engine Group: which rows, from which layer and position the
    run restarts, and whether the shared prefix runs once (None: it changes nothing — a donor on a position
    every row shares)."""
    shared = s.shared
    every = torch.arange(s.n)
    if method in ("zero", "mean"):
        v = e.value(site, layer, index, method)
        if from_answer:
            return Group([Spec(site, layer, index, v, position)], every, layer, s.meta["answer_start"], False)
        if position is None or position < shared:
            return Group([Spec(site, layer, index, v, position)], every, layer, shared, shared > 0)
        return Group([Spec(site, layer, index, v, position)], every, layer, position, False)
    if position is not None and position < shared:
        return None
    if method == "resample":
        rows = every
    elif method == "patch":
        rows, donor = s.meta["clean"], s.meta["twin"]
    elif method == "denoise":
        rows, donor = s.meta["corrupted"], s.meta["twin"]
    else:
        raise ValueError(f"unknown method {method!r}")
    v = e.value(site, layer, index, method, donor)
    return Group([Spec(site, layer, index, v, position)], rows, layer, shared if position is None else position)


# ---------------------------------------------------------------------------------------------------
class Builder:
    """One case's truth build: the engine, the interventions and the checkpointed stages."""

    def __init__(self, name: str, model_dir: Path, data_dir: Path, work: Path, *, log: Callable = print,
                 rows_per_batch: int = 96, progress: bool = True, n_layers: int | None = None,
                 spec: TruthSpec | None = None):
        self.name, self.spec = name, spec or SPECS[name]
        self.data_dir, self.work, self.log, self.progress = data_dir, work / name, log, progress
        self.work.mkdir(parents=True, exist_ok=True)
        self.model_dir = Path(model_dir)
        self.hf, self.tok = load_hf(model_dir)
        if n_layers is not None:  # a smoke test of the pipeline on the model's first layers
            self.hf.model.layers = self.hf.model.layers[:n_layers]
            self.hf.config.num_hidden_layers = n_layers
        self.seqs = case_rows(self.spec, self.tok, self.hf.lm_head.weight, data_dir)
        t0 = time.perf_counter()
        self.eng = Engine(self.hf, self.seqs, rows_per_batch=rows_per_batch,
                          cache_neurons="neuron" in self.spec.units)
        self.clean_seconds = time.perf_counter() - t0
        self.donor = donors(self.seqs, self.spec.kind)
        cfg = self.hf.config
        self.L, self.H, self.D = cfg.num_hidden_layers, cfg.num_attention_heads, cfg.intermediate_size
        self.metric_names = list(self.eng.base)
        self.times = self._load("times") or {}

    # ---- checkpoints -----------------------------------------------------------------------------
    def _path(self, stage: str) -> Path:
        return self.work / f"{stage}.pt"

    def _load(self, stage: str):
        p = self._path(stage)
        return torch.load(p, weights_only=False) if p.is_file() else None

    def _save(self, stage: str, obj) -> None:
        tmp = self._path(stage).with_suffix(".tmp")
        torch.save(obj, tmp)
        os.replace(tmp, self._path(stage))

    def _timed(self, stage: str, fn: Callable):
        """Run a stage unless its result is saved; its seconds add up over resumed runs."""
        done = self._load(stage)
        if done is not None and done.get("done"):
            return done["result"]
        t0, c0, load = time.perf_counter(), time.process_time(), round(os.getloadavg()[0], 1)
        result = fn()
        old = self.times.get(stage, {"wall": 0.0, "cpu": 0.0})
        old = old if isinstance(old, dict) else {"wall": old[0], "cpu": old[1]}
        self.times[stage] = {"wall": old["wall"] + time.perf_counter() - t0, "cpu": old["cpu"] + time.process_time() - c0,
                             "load": load}
        self._save(stage, {"done": True, "result": result})
        self._save("times", self.times)
        return result

    # ---- interventions -----------------------------------------------------------------------------
    def groups(self, site: str, layer: int, index: int | None, method: str, position: int | None = None
               ) -> Group | None:
        """The intervention `method` on one unit as an engine Group (`unit_group`)."""
        return unit_group(self.eng, self.seqs, site, layer, index, method, position, self.donor, self.spec.from_answer)

    def set_group(self, units: list[tuple[str, int, int | None]], method: str) -> Group:
        """Several units set together (zero or mean), from the earliest layer."""
        specs = [Spec(site, l, i, self.eng.value(site, l, i, method)) for site, l, i in units]
        shared, start = self.seqs.shared, min(l for _, l, _ in units)
        if self.spec.from_answer:
            return Group(specs, torch.arange(self.seqs.n), start, self.seqs.meta["answer_start"], False)
        return Group(specs, torch.arange(self.seqs.n), start, shared, shared > 0)

    def effects(self, groups: list[Group | None]) -> list[dict[str, float]]:
        todo = [g for g in groups if g is not None]
        got = iter(self.eng.run(todo))
        return [next(got) if g is not None else dict.fromkeys(self.metric_names, 0.0) for g in groups]

    def table(self, found: list[dict[str, float]], shape) -> dict[str, Tensor]:
        return {m: torch.tensor([f[m] for f in found]).view(shape) for m in self.metric_names}

    # ---- stages ------------------------------------------------------------------------------------
    def stage_layers(self) -> dict:
        """Whole attention and MLP outputs of each layer, every method of the case."""
        out = {}
        for site in ("attn", "mlp"):
            for m in self.spec.methods:
                found = self.effects([self.groups(site, l, None, m) for l in range(self.L)])
                out[f"{site}_layer_{m}"] = self.table(found, (self.L,))
        return out

    def stage_heads(self) -> dict:
        """Every head, every method; checkpointed per layer."""
        part = (self._load("heads_part") or {"layers": {}})
        bar = tqdm(range(self.L), desc=f"{self.name} heads", disable=not self.progress)
        for l in bar:
            if l in part["layers"]:
                continue
            row = {}
            for m in self.spec.methods:
                row[m] = self.table(self.effects([self.groups("head", l, h, m) for h in range(self.H)]), (self.H,))
            part["layers"][l] = row
            self._save("heads_part", part)
        return {f"heads_{m}": {k: torch.stack([part["layers"][l][m][k] for l in range(self.L)])
                               for k in self.metric_names} for m in self.spec.methods}

    def stage_sites(self) -> dict:
        """attn_out and mlp_out at every (layer, position), every method; checkpointed per layer."""
        T = self.seqs.T
        part = (self._load("sites_part") or {"layers": {}})
        for l in tqdm(range(self.L), desc=f"{self.name} sites", disable=not self.progress):
            if l in part["layers"]:
                continue
            row = {}
            for site, key in (("attn_out", "attn"), ("mlp_out", "mlp")):
                for m in self.spec.methods:
                    row[f"{key}_{m}"] = self.table(self.effects([self.groups(site, l, None, m, p) for p in range(T)]),
                                                   (T,))
            part["layers"][l] = row
            self._save("sites_part", part)
        keys = part["layers"][0].keys()
        return {f"pos_{k}": {m: torch.stack([part["layers"][l][k][m] for l in range(self.L)])
                             for m in self.metric_names} for k in keys}

    def neuron_plan(self, layers_truth: dict) -> dict:
        """Swept layers: the top layers by the whole-MLP zero-ablation effect on the bias, plus random
        others; and a uniform sample of the neurons of every other layer."""
        eff = layers_truth["mlp_layer_zero"]["bias"]
        top = eff.argsort(descending=True)[:self.spec.neuron_top_layers].tolist()
        rng = random.Random(zlib.crc32(self.name.encode()))
        rest = [l for l in range(self.L) if l not in top]
        rand = sorted(rng.sample(rest, self.spec.neuron_random_layers))
        swept = sorted(top + rand)
        pool = [(l, i) for l in range(self.L) if l not in swept for i in range(self.D)]
        sample = sorted(rng.sample(pool, self.spec.neuron_sample))
        return {"top_layers": top, "random_layers": rand, "layers": swept, "sample": sample,
                "population": self.L * self.D, "outside": len(pool)}

    def stage_neurons(self, plan: dict) -> dict:
        """Every neuron of the swept layers and the sample, every neuron method; checkpointed."""
        units = [(l, i) for l in plan["layers"] for i in range(self.D)] + [tuple(u) for u in plan["sample"]]
        part = self._load("neurons_part") or {"done": 0, "found": {m: [] for m in self.spec.neuron_methods}}
        chunk, last = 64, time.perf_counter()
        bar = tqdm(total=len(units), initial=part["done"], desc=f"{self.name} neurons", disable=not self.progress)
        while part["done"] < len(units):
            todo = units[part["done"]: part["done"] + chunk]
            for m in self.spec.neuron_methods:
                part["found"][m] += self.effects([self.groups("neuron", l, i, m) for l, i in todo])
            part["done"] += len(todo)
            bar.update(len(todo))
            if time.perf_counter() - last > CKPT_SECONDS or part["done"] == len(units):
                self._save("neurons_part", part)
                last = time.perf_counter()
        bar.close()
        n_full = len(plan["layers"]) * self.D
        out = {}
        for m in self.spec.neuron_methods:
            tab = self.table(part["found"][m], (len(units),))
            out[f"neurons_{m}"] = {k: v[:n_full].view(len(plan["layers"]), self.D) for k, v in tab.items()}
            out[f"sample_neurons_{m}"] = {k: v[n_full:] for k, v in tab.items()}
        return out

    def stage_pairs(self, kind: str, eff: Tensor, index: Callable[[int], tuple]) -> dict:
        """Zero-ablation of every pair among the top 20 units by |zero effect| (and the sum of their
        single effects, for the interaction)."""
        flat = eff.reshape(-1)
        top = flat.abs().argsort(descending=True)[:TOP_PAIRS].tolist()
        pairs = [(a, b) for j, a in enumerate(top) for b in top[j + 1:]]
        site = "head" if kind == "head" else "neuron"
        found = self.effects([self.set_group([(site, *index(a)), (site, *index(b))], "zero") for a, b in pairs])
        return {"index": torch.tensor([[*index(a), *index(b)] for a, b in pairs]),
                "zero": self.table(found, (len(pairs),)),
                "singles": torch.tensor([[float(flat[a]), float(flat[b])] for a, b in pairs])}

    def stage_cumulative(self, kind: str, eff: Tensor, index: Callable[[int], tuple]) -> dict:
        """The top-k units by the truth's own ranking (largest zero effect first), ablated together."""
        order = eff.reshape(-1).argsort(descending=True).tolist()
        ks = [k for k in CUMULATIVE_K if k <= len(order)]
        site = "head" if kind == "head" else "neuron"
        out: dict[str, Tensor | dict[str, Tensor]] = {"k": torch.tensor(ks)}
        for m in ("zero", "mean"):
            found = self.effects([self.set_group([(site, *index(u)) for u in order[:k]], m) for k in ks])
            out[m] = self.table(found, (len(ks),))
        return out

    def selfcheck(self, truth: dict[str, Tensor], n: int = 6, seed: int = 0) -> dict:
        """Random truth cells recomputed with full forwards of the HF model and plain hooks (no shortcut)."""
        from .check import recompute_cell, truth_cells

        cells = truth_cells(truth, self.name, seed=seed, n=n)
        rows = []
        for cell in cells:
            got = recompute_cell(self.hf, self.seqs, cell, self.donor)
            rows.append({**{k: v for k, v in cell.items() if k != "value"}, "truth": cell["value"], "recomputed": got})
        return {"cells": rows, "max_abs_diff": max(abs(r["truth"] - r["recomputed"]) for r in rows)}

    # ---- the whole build ---------------------------------------------------------------------------
    def build(self) -> tuple[dict[str, Tensor], dict]:
        """Every stage (the finished ones read back), the truth tensors and the self-check."""
        spec, out = self.spec, {}
        key = self.name
        layers = self._timed("layers", self.stage_layers)
        for name, per in layers.items():
            for m, v in per.items():
                out[f"{key}/{m}/{name}"] = v
        if "head" in spec.units:
            heads = self._timed("heads", self.stage_heads)
            for name, per in heads.items():
                for m, v in per.items():
                    out[f"{key}/{m}/{name}"] = v
            z = heads["heads_zero"]["bias"]
            def hidx(u):
                return divmod(u, self.H)
            self._add_sets(out, "head", z, hidx)
        if "site" in spec.units:
            for name, per in self._timed("sites", self.stage_sites).items():
                for m, v in per.items():
                    out[f"{key}/{m}/{name}"] = v
        if "neuron" in spec.units:
            plan = self._timed("neuron_plan", lambda: self.neuron_plan(layers))
            neurons = self._timed("neurons", lambda: self.stage_neurons(plan))
            for name, per in neurons.items():
                for m, v in per.items():
                    out[f"{key}/{m}/{name}"] = v
            out[f"{key}/neuron_layers"] = torch.tensor(plan["layers"])
            out[f"{key}/sample_index"] = torch.tensor(plan["sample"])
            # every known neuron (swept layers, then the sample) ranks for the pairs and the cumulative sets
            z = torch.cat([neurons["neurons_zero"]["bias"].reshape(-1), neurons["sample_neurons_zero"]["bias"]])
            n_full = len(plan["layers"]) * self.D

            def nidx(u: int) -> tuple[int, int]:
                return (plan["layers"][u // self.D], u % self.D) if u < n_full else tuple(plan["sample"][u - n_full])

            self._add_sets(out, "neuron", z, nidx)
        for m, v in self.eng.base.items():
            out[f"{key}/{m}/base"] = torch.tensor(v)
        out = {k: v.float().contiguous() if v.is_floating_point() else v.contiguous() for k, v in out.items()}
        check = self._timed("selfcheck", lambda: self.selfcheck(out))
        return out, check

    def _add_sets(self, out: dict, kind: str, eff: Tensor, index: Callable) -> None:
        key, label = self.name, {"head": "head", "neuron": "neuron"}[kind]
        pairs = self._timed(f"{kind}_pairs", lambda: self.stage_pairs(kind, eff, index))
        out[f"{key}/{label}_pairs_index"] = pairs["index"]
        out[f"{key}/{label}_pairs_singles"] = pairs["singles"]
        for m, v in pairs["zero"].items():
            out[f"{key}/{m}/{label}_pairs_zero"] = v
        cum = self._timed(f"{kind}_cumulative", lambda: self.stage_cumulative(kind, eff, index))
        out[f"{key}/{label}s_cumulative_k"] = cum["k"]
        for meth in ("zero", "mean"):
            for m, v in cum[meth].items():
                out[f"{key}/{m}/{label}s_cumulative_{meth}"] = v


# ---------------------------------------------------------------------------------------------------
def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_truth(data_dir: Path, name: str, truth: dict[str, Tensor]) -> Path:
    """Merge one case's tensors into the folder's ground_truth.safetensors (its old keys replaced), atomically."""
    path = data_dir / "ground_truth.safetensors"
    old = load_file(str(path)) if path.is_file() else {}
    old = {k: v for k, v in old.items() if not k.startswith(f"{name}/")}
    tmp = path.with_suffix(".tmp")
    save_file({**old, **truth}, str(tmp))
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
    return path


#: what every real case's card says first: what is shipped, the model it was measured on, the licences
CARD_HEAD = {
    "what": "ground truth of a real-model localisation case by exhaustive ablation on held-out prompts "
            "(lens_bias/bench/real): effect tables only, no activations, no model weights",
    "model": "SmolLM2-135M-Instruct (HuggingFaceTB/SmolLM2-135M-Instruct), measured on its Q4_1 GGUF dequantized "
             "to float32 (`lens-bias fetch smollm2-135m-instruct`; sha256 of the GGUF per case below); not shipped",
    "licence": {"truth tables and card": "MIT (this project)",
                "model (not shipped)": "Apache-2.0 (SmolLM2)",
                "prompts in data/": "their data sets' licences: professions (Vig et al.) MIT, StrategyQA MIT, "
                                    "BBQ CC-BY 4.0, GSM8K (neutral text) MIT — see data/README.md"},
    "rebuild": "python -m lens_bias.bench.real build CASE (resumable; checkpoints in ~/.cache/lens_bias/bench-work)",
}


def update_card(data_dir: Path, name: str, entry: dict) -> Path:
    path = data_dir / "lens_bias_card.json"
    card = json.loads(path.read_text()) if path.is_file() else {}
    cases = {**card.get("cases", {}), name: entry}
    card = {**CARD_HEAD, "cases": dict(sorted(cases.items()))}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(card, indent=1, default=float) + "\n")
    os.replace(tmp, path)
    return path
