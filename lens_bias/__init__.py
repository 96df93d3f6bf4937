"""lens_bias: locate and mitigate social and negative bias inside language models with TransformerLens 4.

The public API is re-exported here; each method lives in a module of its own.
"""

from .ablation import (ablate_heads, ablate_neurons, combine_hooks, head_ablation_hooks,
                       neuron_ablation_hooks)
from .attribution import agreement, attribution_patching
from .binary import (arithmetic_items, binary_prompts, comparison_items, decision_metrics, evaluate_binary,
                     load_yes_no, membership_items, negation_items)
from .bbq import bbq_evaluate, load_bbq, option_logprobs, split_by_template
from .data import (VIG_TEMPLATES, WINOGENDER_ANSWERS, load_professions, read_text_file, load_swaps, load_winobias, load_winogender,
                   professions_prompts, swap_gender, swapped_pairs, winobias_prompts, winogender_prompts)
from .errors import DataError, LensBiasError, ModelLoadError, PromptError
from .metrics import answer_logits, get_metric, logit_diff, normalized_metric, odds_ratio, prob_ratio, total_effect
from .models import load_model, resolve_device, resolve_dtype, save_random_model, shipped_model_dir
from .nas import NASResult, head_attention_figure, nas_heatmap, negative_attention_scores
from .neurons import crispr_scores, option_attributions, prune_curve, prune_neurons, random_neurons, top_neurons
from .patching import (COMPONENTS, FAST_METRICS, ComponentScores, activation_patching, answer_logits_fast,
                       check_hook_names, patch_with, position_labels)
from .prompts import PromptSet, answer_token_id
from .tracing import causal_trace, embedding_std, subject_corruption, subject_noise
from .viz import heatmap, save_figure, top_bar

__version__ = "0.1.0"

__all__ = [
    "ablate_heads", "ablate_neurons", "combine_hooks", "head_ablation_hooks", "neuron_ablation_hooks",
    "agreement", "attribution_patching",
    "arithmetic_items", "binary_prompts", "comparison_items", "decision_metrics", "evaluate_binary",
    "load_yes_no", "membership_items", "negation_items",
    "bbq_evaluate", "load_bbq", "option_logprobs", "split_by_template",
    "VIG_TEMPLATES", "WINOGENDER_ANSWERS", "read_text_file", "load_professions", "load_swaps", "load_winobias", "load_winogender",
    "professions_prompts", "swap_gender", "swapped_pairs", "winobias_prompts", "winogender_prompts",
    "DataError", "LensBiasError", "ModelLoadError", "PromptError",
    "answer_logits", "get_metric", "logit_diff", "normalized_metric", "odds_ratio", "prob_ratio", "total_effect",
    "load_model", "resolve_device", "resolve_dtype", "save_random_model", "shipped_model_dir",
    "NASResult", "head_attention_figure", "nas_heatmap", "negative_attention_scores",
    "crispr_scores", "option_attributions", "prune_curve", "prune_neurons", "random_neurons", "top_neurons",
    "COMPONENTS", "FAST_METRICS", "ComponentScores", "activation_patching", "answer_logits_fast",
    "check_hook_names", "patch_with", "position_labels",
    "PromptSet", "answer_token_id",
    "causal_trace", "embedding_std", "subject_corruption", "subject_noise",
    "heatmap", "save_figure", "top_bar",
]
