"""lens_bias: locate social and negative bias inside language models, mitigate it, prove the mitigation
worked, export the edited model — on TransformerLens 4.

The front door holds the names most work needs; the rest live in the layers, each a namespace:
`lb.core` (models, hooks, prompts, metrics) → `lb.tasks` (data sets, prompt sets, capability) →
`lb.locate` (patching, attribution, tracing, NAS, CRISPR) → `lb.mitigate` (ablation, pruning, LSDM,
NASA, edits, export) → `lb.runs` (batch runs) and `lb.apps` (CLI, demo, pipeline); `lb.organism`
is the model organism.
"""

from . import apps, core, locate, mitigate, organism, runs, tasks
from .apps import locate_report
from .core import (
                     ComponentScores,
                     LensBiasError,
                     PromptSet,
                     clone_model,
                     heatmap,
                     hook_name,
                     load_model,
)
from .locate import (
                     activation_patching,
                     attribution_patching,
                     causal_trace,
                     crispr_scores,
                     negative_attention_scores,
)
from .mitigate import (
                     Mitigation,
                     ablate,
                     export_model,
                     head_ablation_hooks,
                     lsdm_edit,
                     nasa_train,
                     neuron_ablation_hooks,
                     prune_heads,
                     prune_neurons,
)
from .runs import attribute_dataset
from .tasks import (
                     bbq_evaluate,
                     binary_prompts,
                     compare_models,
                     evaluate_binary,
                     load_bbq,
                     load_yes_no,
                     professions_prompts,
                     text_loss,
                     winobias_prompts,
                     winogender_prompts,
)

__version__ = "0.1.0"

__all__ = [
    # core
    "load_model", "clone_model", "PromptSet", "ComponentScores", "hook_name", "LensBiasError", "heatmap",
    # tasks
    "professions_prompts", "winobias_prompts", "winogender_prompts", "binary_prompts", "load_yes_no", "load_bbq",
    "evaluate_binary", "bbq_evaluate", "text_loss", "compare_models",
    # locate
    "activation_patching", "attribution_patching", "causal_trace", "negative_attention_scores", "crispr_scores",
    # mitigate
    "ablate", "head_ablation_hooks", "neuron_ablation_hooks", "prune_neurons", "prune_heads", "lsdm_edit",
    "nasa_train", "export_model", "Mitigation",
    # runs, apps
    "attribute_dataset", "locate_report",
    # namespaces
    "core", "tasks", "locate", "mitigate", "runs", "apps", "organism",
]
