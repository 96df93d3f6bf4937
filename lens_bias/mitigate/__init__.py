"""Mitigate: reversible ablation (hooks), pruning as a weight edit, LSDM's least-squares edit, NASA's
head-restricted LoRA; every weight edit returns a Mitigation (model, WeightEdit, report) and exports."""

from .ablation import METHODS as ABLATIONS
from .ablation import Reference as AblationReference
from .ablation import (
                       ablate,
                       ablation_hooks,
                       check_units,
                       combine_hooks,
                       head_ablation_hooks,
                       neuron_ablation_hooks,
                       random_units,
                       reference_activations,
)
from .counterfactual import counterfactual_finetune, counterfactual_texts, swap_pronouns
from .edits import Mitigation, WeightEdit, apply_edit, load_edit, save_edit, weight_edit
from .export import (
                       SUPPORTED_ARCHITECTURES,
                       check_exportable,
                       export_model,
                       verify_export,
)
from .lsdm import lsdm_delta, lsdm_edit, occupation_split
from .methods import MitigationMethod, MitigationRequest, MitigationRun, Occupations, Questions
from .nasa import (
                       head_lora_config,
                       head_lora_model,
                       head_slices_unchanged,
                       nas_gap_curve,
                       nasa_train,
                       split_questions,
)
from .registry import MITIGATIONS, get_mitigation
from .prune import (
                       crispr_report,
                       prune_curve,
                       prune_heads,
                       prune_neurons,
                       random_heads,
                       random_neurons,
)

__all__ = [
    "ABLATIONS", "ablate", "ablation_hooks", "check_units", "combine_hooks", "head_ablation_hooks",
    "neuron_ablation_hooks", "random_units",
    "AblationReference", "reference_activations",
    "counterfactual_finetune", "counterfactual_texts", "swap_pronouns",
    "Mitigation", "WeightEdit", "apply_edit", "load_edit", "save_edit", "weight_edit",
    "SUPPORTED_ARCHITECTURES", "check_exportable", "export_model", "verify_export",
    "lsdm_delta", "lsdm_edit", "occupation_split",
    "MITIGATIONS", "MitigationMethod", "MitigationRequest", "MitigationRun", "Occupations", "Questions",
    "get_mitigation",
    "head_lora_config", "head_lora_model", "head_slices_unchanged", "nas_gap_curve", "nasa_train",
    "split_questions",
    "crispr_report", "prune_curve", "prune_heads", "prune_neurons", "random_heads", "random_neurons",
]
