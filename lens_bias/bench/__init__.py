"""The localisation benchmark: small language models with biases planted mostly by training, their
ground truth measured by exhaustive ablation, and a harness that scores every locate method and
trivial baselines on them (recall@k and AUC against the truth).

    from lens_bias.bench import benchmark, wide_table
    table = benchmark()                      # every built case
    print(wide_table(table))

Models and truth: data/bench/<model>/ (built by `python -m lens_bias.bench.build`, seeded; not
part of CI). Real-model cases (SmolLM2-135M-Instruct, fetched with `lens-bias fetch`, not shipped): their
data, truth and card in data/bench/real-<task>/ (built by `python -m lens_bias.bench.real build CASE`, plain
Hugging Face hooks, independent of lens_bias). Cases: `CASES`; what each method was expected to do, written
before any was run: lens_bias/bench/EXPECTED.md.
"""

from .cases import CASES, Case, get_case
from .score import benchmark, score_case, wide_table
from .truth import auc, carriers, load_truth, recall_at_k, unit_truth

__all__ = ["CASES", "Case", "auc", "benchmark", "carriers", "get_case", "load_truth", "recall_at_k", "score_case",
           "unit_truth", "wide_table"]
