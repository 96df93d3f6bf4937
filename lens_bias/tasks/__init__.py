"""Tasks: the data sets and prompt sets each bias is measured on — gender pairs (professions,
WinoBias, Winogender), yes/no decisions, multiple choice (BBQ), counterfactual pair files — and the
capability measures that go into before/after tables."""

from .capability import (
                     bias_table,
                     bias_values,
                     cloze_accuracy,
                     compare_models,
                     default_neutral_text,
                     text_lines,
                     text_loss,
)
from .gender import (
                     VIG_TEMPLATES,
                     WINOGENDER_ANSWERS,
                     load_professions,
                     load_swaps,
                     load_winobias,
                     load_winogender,
                     professions_prompts,
                     swap_gender,
                     swapped_pairs,
                     winobias_prompts,
                     winogender_prompts,
)
from .multiple_choice import INSTRUCTIONS as MC_INSTRUCTIONS
from .multiple_choice import (
                     BBQTarget,
                     bbq_evaluate,
                     bbq_scores,
                     bbq_target,
                     bbq_targets,
                     biased_option,
                     format_mc_prompt,
                     item_options,
                     load_bbq,
                     load_multiple_choice,
                     option_logprobs,
                     split_by_template,
                     stereotyped_option,
                     unknown_option,
                     validate_items,
)
from .pairs import load_prompt_pairs
from .records import load_records, read_dataset, read_text_file, shipped_dataset
from .yesno import INSTRUCTIONS as YESNO_INSTRUCTIONS
from .yesno import (
                     arithmetic_items,
                     binary_prompts,
                     comparison_items,
                     decision_metrics,
                     evaluate_binary,
                     format_binary_prompt,
                     load_gsm8k,
                     load_yes_no,
                     membership_items,
                     negation_items,
)

__all__ = [
    "bias_table", "bias_values", "cloze_accuracy", "compare_models", "default_neutral_text", "text_lines", "text_loss",
    "VIG_TEMPLATES", "WINOGENDER_ANSWERS", "load_professions", "load_swaps", "load_winobias", "load_winogender",
    "professions_prompts", "swap_gender", "swapped_pairs", "winobias_prompts", "winogender_prompts",
    "MC_INSTRUCTIONS", "BBQTarget", "bbq_evaluate", "bbq_scores", "bbq_target", "bbq_targets", "biased_option",
    "format_mc_prompt", "item_options", "load_bbq", "load_multiple_choice", "option_logprobs", "split_by_template",
    "stereotyped_option", "unknown_option", "validate_items",
    "load_prompt_pairs", "load_records", "read_dataset", "read_text_file", "shipped_dataset",
    "YESNO_INSTRUCTIONS", "arithmetic_items", "binary_prompts", "comparison_items", "decision_metrics",
    "evaluate_binary", "format_binary_prompt", "load_gsm8k", "load_yes_no", "membership_items", "negation_items",
]
