"""The ground-truth cases: which model, data and truth each uses, which units it scores, and what
was expected of each method before any method was run (EXPECTED.md in lens_bias/bench)."""

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

    @property
    def model_dir(self) -> Path:
        return BENCH_DIR / self.model

    @property
    def available(self) -> bool:
        """Built, and its bias took: the card marks a case whose plant failed (no ground truth)."""
        return (self.model_dir / "ground_truth.safetensors").is_file() and not self.failed

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
]}


def get_case(name: str) -> Case:
    if name not in CASES:
        raise LensBiasError(f"no benchmark case {name!r}; cases: {', '.join(CASES)}")
    case = CASES[name]
    if case.failed:
        raise LensBiasError(f"case {name}: its plant did not take when the model was built (no ground truth; "
                            f"{case.model_dir / 'lens_bias_card.json'})")
    if not case.available:
        raise LensBiasError(f"case {name}: its model {case.model_dir} is not built "
                            "(python -m lens_bias.bench.build --out data/bench)")
    return case
