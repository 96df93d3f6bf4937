"""lens_bias: locate and mitigate social and negative bias inside language models with TransformerLens 4.

The public API is re-exported here; each method lives in a module of its own.
"""

from .ablation import (ablate_heads, ablate_neurons, combine_hooks, head_ablation_hooks,
                       neuron_ablation_hooks, prune_heads, random_heads)
from .attribution import agreement, attribution_patching
from .bbq import bbq_evaluate, load_bbq, load_multiple_choice, option_logprobs, split_by_template
from .binary import (arithmetic_items, binary_prompts, comparison_items, decision_metrics, evaluate_binary,
                     load_yes_no, membership_items, negation_items)
from .data import (VIG_TEMPLATES, WINOGENDER_ANSWERS, load_professions, load_swaps, load_winobias,
                   load_winogender, professions_prompts, read_text_file, swap_gender, swapped_pairs,
                   winobias_prompts, winogender_prompts)
from .errors import DataError, LensBiasError, ModelLoadError, PromptError
from .export import (SUPPORTED_ARCHITECTURES, WeightEdit, apply_edit, export_model, hf_state_dict, load_edit,
                     load_hf_weights, save_edit, to_hf_model, verify_export, weight_edit)
from .lsdm import LSDMResult, bias_table, bias_values, lsdm_delta, lsdm_edit, trace_sites
from .metrics import (answer_logits, cloze_accuracy, compare_models, get_metric, logit_diff, normalized_metric,
                      odds_ratio, prob_ratio, text_loss, total_effect)
from .models import clone_model, load_model, resolve_device, resolve_dtype, save_random_model, shipped_model_dir
from .nas import NASResult, head_attention_figure, nas_heatmap, negative_attention_scores
from .nasa import (NASAResult, head_lora_config, head_lora_model, head_slices_unchanged, nas_gap_curve,
                   nasa_train)
from .neurons import (crispr_report, crispr_scores, option_attributions, prune_curve, prune_neurons,
                      random_neurons, top_neurons)
from .patching import (COMPONENTS, FAST_METRICS, ComponentScores, activation_patching, answer_logits_fast,
                       check_hook_names, patch_with, position_labels)
from .prompts import PromptSet, answer_token_id
from .runs import attribute_dataset, distributed, load_run_data, read_manifest, result_frame
from .tracing import causal_trace, embedding_std, subject_corruption, subject_noise
from .viz import heatmap, save_figure, top_bar

__version__ = "0.1.0"

__all__ = [
    "ablate_heads", "ablate_neurons", "combine_hooks", "head_ablation_hooks", "neuron_ablation_hooks", "prune_heads", "random_heads",
    "agreement", "attribution_patching",
    "arithmetic_items", "binary_prompts", "comparison_items", "decision_metrics", "evaluate_binary",
    "load_yes_no", "membership_items", "negation_items",
    "bbq_evaluate", "load_bbq", "load_multiple_choice", "option_logprobs", "split_by_template",
    "VIG_TEMPLATES", "WINOGENDER_ANSWERS", "read_text_file", "load_professions", "load_swaps", "load_winobias", "load_winogender",
    "professions_prompts", "swap_gender", "swapped_pairs", "winobias_prompts", "winogender_prompts",
    "SUPPORTED_ARCHITECTURES", "WeightEdit", "apply_edit", "export_model", "hf_state_dict", "load_edit",
    "load_hf_weights", "save_edit", "to_hf_model", "verify_export", "weight_edit",
    "LSDMResult", "bias_table", "bias_values", "lsdm_delta", "lsdm_edit", "trace_sites",
    "DataError", "LensBiasError", "ModelLoadError", "PromptError",
    "answer_logits", "cloze_accuracy", "compare_models", "get_metric", "logit_diff", "text_loss", "normalized_metric", "odds_ratio", "prob_ratio", "total_effect",
    "clone_model", "load_model", "resolve_device", "resolve_dtype", "save_random_model", "shipped_model_dir",
    "NASResult", "head_attention_figure", "nas_heatmap", "negative_attention_scores",
    "NASAResult", "head_lora_config", "head_lora_model", "head_slices_unchanged", "nas_gap_curve", "nasa_train",
    "crispr_report", "crispr_scores", "option_attributions", "prune_curve", "prune_neurons", "random_neurons", "top_neurons",
    "COMPONENTS", "FAST_METRICS", "ComponentScores", "activation_patching", "answer_logits_fast",
    "check_hook_names", "patch_with", "position_labels",
    "PromptSet", "answer_token_id",
    "attribute_dataset", "distributed", "load_run_data", "read_manifest", "result_frame",
    "causal_trace", "embedding_std", "subject_corruption", "subject_noise",
    "heatmap", "save_figure", "top_bar",
]
