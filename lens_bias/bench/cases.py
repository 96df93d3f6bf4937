"""The ground-truth cases: which model, data and truth each uses, which units it scores, and what
was expected of each method before any method was run (EXPECTED.md in lens_bias/bench).

Synthetic cases (1–8) live with their model in data/bench/bench-{gender,decision}. Real cases (`real=True`)
run a pretrained model known by name (lens_bias.core.model_names: not shipped, `lens-bias fetch NAME`);
their data, truth and card live in data/bench/<folder>, the methods see the `method_*` split and the truth
was measured on the held-out `heldout_*` split (lens_bias/bench/real)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from ..core.errors import LensBiasError
from ..core.files import DATA_DIR

BENCH_DIR = DATA_DIR / "bench"
#: a case's data, in core.methods.DataKind's names (a yes/no case: counterfactual pairs and yes/no questions)
Kind = Literal["pairs", "yesno", "multiple_choice"]
REAL_MODEL = "smollm2-135m-instruct"


@dataclass(frozen=True)
class Case:
    """One case: `data` in the model folder's data/, scored on `units` against `truth_key`'s ablations."""

    name: str
    title: str
    model: str
    truth_key: str
    kind: Kind
    data: str
    units: tuple[str, ...]
    wins: tuple[str, ...] = ()
    loses: tuple[str, ...] = ()
    expected: str = ""
    extra: dict = field(default_factory=dict)
    folder: str | None = None
    real: bool = False
    heldout: str | None = None
    split: str = ""
    metric: str = ""

    @property
    def model_dir(self) -> Path:
        """The folder of the case's data, truth and card (a synthetic case's model too)."""
        return BENCH_DIR / (self.folder or self.model)

    @property
    def model_source(self) -> str:
        """What load_model takes: the synthetic model's folder, or a real model's registered name."""
        return self.model if self.real else str(self.model_dir)

    @property
    def model_missing(self) -> str | None:
        """Why a real case's model is not on this machine (None when it is, and for synthetic cases)."""
        if not self.real:
            return None
        from ..core.gguf import read_source
        from ..core.model_names import MODELS, converted_dir, package_file

        entry = MODELS[self.model]
        if read_source(converted_dir(self.model)) is not None or package_file(entry) is not None:
            return None
        return (f"the model {self.model} is not on this machine (it is not shipped): run "
                f"`{entry.fetch_command}`")

    @property
    def built(self) -> bool:
        """Its ground truth exists (for a real case: this case's tensors in the folder's truth file)."""
        path = self.model_dir / "ground_truth.safetensors"
        if not path.is_file():
            return False
        if not self.real:
            return True
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            return any(k.startswith(f"{self.truth_key}/") for k in f.keys())  # noqa: SIM118 (safe_open has no __iter__)

    @property
    def available(self) -> bool:
        """Built, its bias took (the card marks a case whose plant failed: no ground truth) and, for a real
        case, its model is on this machine."""
        return self.built and not self.failed and self.model_missing is None

    @property
    def failed(self) -> bool:
        card = self.model_dir / "lens_bias_card.json"
        if not card.is_file():
            return False
        truth = json.loads(card.read_text()).get("cases", {}).get(self.name, {}).get("truth") or {}
        return bool(truth.get("failed"))


CASES: dict[str, Case] = {c.name: c for c in [
    Case("case1", "distributed bias (graded neurons)", "bench-gender", "case1", "pairs", "case1_pairs.jsonl",
         ("neuron",), wins=("attribution (clean grad)", "attribution (corrupted grad)"),
         loses=("weight norm", "mean |activation|"),
         expected="AtP on neurons finds ≥ 4 of the 6; weight norm and mean |activation| ≈ random"),
    Case("case2", "multi-hop circuit", "bench-gender", "case2", "pairs", "case2_pairs.jsonl", ("head", "site"),
         wins=("activation patching", "causal tracing"), loses=("weight norm", "mean |activation|", "causal tracing (noise 0)"),
         expected="AP on heads finds mover and late head; CT finds the MLP at the subject"),
    Case("case3", "backup and suppression (yes/no)", "bench-decision", "case3_5", "yesno", "case3_5_pairs.jsonl",
         ("head",), wins=("activation patching", "attribution (clean grad)", "attribution (corrupted grad)"),
         loses=("weight norm", "random"),
         expected="AP and AtP find the main head; every single-unit method misses the backup; S signed to the bottom",
         extra={"yesno": "case3_5_yesno.jsonl"}),
    Case("case4", "AND gate (linear estimates fail)", "bench-gender", "case4", "pairs", "case4_pairs.jsonl", ("head",),
         wins=("activation patching",), loses=("attribution (corrupted grad)", "weight norm", "mean |activation|"),
         expected="AP right on the mover head; AtP with the corrupted-side gradient under-estimates it ≥ 3×"),
    Case("case5", "NAS decoy (yes/no)", "bench-decision", "case3_5", "yesno", "case3_5_pairs.jsonl", ("head",),
         wins=("activation patching", "attribution (clean grad)", "grad×activation"),
         loses=("NAS", "attention to ' No'"),
         expected="NAS and raw attention put the decoy at the top; AP/AtP/GxA rank it low",
         extra={"yesno": "case3_5_yesno.jsonl", "decoy": True}),
    Case("case6", "CRISPR disentanglement (skill + bias neuron)", "bench-decision", "case6", "multiple_choice", "case6_bbq.jsonl",
         ("neuron",), wins=("CRISPR λ=0", "grad×P(biased)"), loses=("weight norm", "mean |activation|"),
         expected="λ=0 ranks both planted neurons high; λ=1 demotes the mixed one (changes the ranking)"),
    Case("case7", "gold already top", "bench-decision", "case7", "multiple_choice", "case7_bbq.jsonl", ("neuron",),
         wins=("grad×P(biased)",), loses=("CRISPR λ=1", "weight norm", "mean |activation|"),
         expected="CRISPR's ŷ (best non-gold = 'unknown') misses the truth; attribution to P(biased) finds it"),
    Case("case8", "LSDM's own site (subject's last token)", "bench-gender", "case8", "pairs", "case8_pairs.jsonl",
         ("site",), wins=("causal tracing", "LSDM site choice"), loses=("causal tracing (noise 0)",),
         expected="CT and LSDM's site choice: a middle-layer MLP at the subject's last token"),
    # ---- real model: SmolLM2-135M-Instruct (not shipped: `lens-bias fetch smollm2-135m-instruct`) ----
    Case("rprof", "professions gender bias", REAL_MODEL, "rprof", "pairs", "method_pairs.jsonl",
         ("head", "site", "attn_site"), folder="real-professions", real=True, heldout="heldout_pairs.jsonl",
         wins=("activation patching", "attribution (clean grad)", "attribution (corrupted grad)", "causal tracing"),
         loses=("weight norm", "mean |activation|", "grad×activation", "causal tracing (noise 0)"),
         split="held-out professions and templates (6 pairs × 3 templates); methods: 6 other pairs × 8 templates",
         metric="bias = mean LD(female-stereotyped) − mean LD(male-stereotyped twin), LD = logit(' she') − logit(' he')",
         expected="AP/AtP find the late carrier heads (≥ 0.8 vs denoise, ≥ 0.6 vs zero); GxA below them; "
                  "sites: first-token sink dominates zero truth, AP/CT find the subject MLP vs patch truth"),
    Case("rprof-neurons", "professions gender bias (neurons)", REAL_MODEL, "rprof-neurons", "pairs",
         "method_pairs.jsonl", ("neuron",), folder="real-professions", real=True,
         heldout="heldout_neuron_pairs.jsonl",
         wins=("attribution (clean grad)", "attribution (corrupted grad)", "grad×activation"),
         loses=("weight norm", "mean |activation|"),
         split="held-out professions, 1 template (6 pairs); methods: 6 other pairs × 8 templates",
         metric="as rprof",
         expected="distributed (k in the hundreds): AtP and GxA AUC ≥ 0.7, recall 0.2–0.5; MA, WN ≈ random"),
    Case("ryesno", "yes/no negative bias (StrategyQA)", REAL_MODEL, "ryesno", "yesno", "method_yesno.jsonl",
         ("head",), folder="real-yesno", real=True, heldout="heldout_yesno.jsonl",
         wins=("grad×activation",), loses=("attention to ' No'", "weight norm", "mean |activation|"),
         split="16 held-out gold-yes questions (8 same-length pairs), instruction 0; methods: 40 others × 4 instructions",
         metric="bias = mean logit(No) − logit(Yes) over gold-yes questions, chat template",
         expected="GxA best against zero truth; NAS above random but below GxA; attention to ' No', MA, WN ≈ random",
         extra={"instruction": "Answer Yes or No."}),
    Case("rbbq", "BBQ Age (ambiguous, negative questions)", REAL_MODEL, "rbbq", "multiple_choice", "method_bbq.jsonl", ("head",),
         folder="real-bbq", real=True, heldout="heldout_bbq.jsonl",
         wins=("grad×P(biased)",), loses=("CRISPR λ=1", "weight norm", "mean |activation|"),
         split="4 held-out BBQ templates (8 items); methods: 8 other templates (16 items)",
         metric="bias = mean P(biased) − P(anti-biased) over ambiguous negative questions, chat template; truth: "
                "every intervention from the answer on (the prompt's last token and the options)",
         expected="CRISPR λ=1 ≈ λ=0, near random; grad×P(biased) better than CRISPR; MA, WN ≈ random"),
    Case("rbbq-neurons", "BBQ Age (neurons)", REAL_MODEL, "rbbq-neurons", "multiple_choice", "method_bbq.jsonl", ("neuron",),
         folder="real-bbq", real=True, heldout="heldout_bbq_neurons.jsonl",
         wins=("grad×P(biased)",), loses=("CRISPR λ=1", "weight norm", "mean |activation|"),
         split="3 of the held-out templates (6 items); methods: 8 other templates (16 items)",
         metric="as rbbq (zero ablation from the answer on)",
         expected="CRISPR λ=1 ≈ λ=0, near random; grad×P(biased) better than CRISPR; MA, WN ≈ random"),
]}


def get_case(name: str) -> Case:
    if name not in CASES:
        raise LensBiasError(f"no benchmark case {name!r}; cases: {', '.join(CASES)}")
    case = CASES[name]
    if case.failed:
        raise LensBiasError(f"case {name}: its plant did not take when the model was built (no ground truth; "
                            f"{case.model_dir / 'lens_bias_card.json'})")
    if case.model_missing:
        raise LensBiasError(f"case {name}: {case.model_missing}")
    if not case.available:
        how = f"python -m lens_bias.bench.real build {name}" if case.real else "python -m lens_bias.bench.build --out data/bench"
        raise LensBiasError(f"case {name}: its ground truth in {case.model_dir} is not built ({how})")
    return case
