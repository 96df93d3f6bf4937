"""Locate: one module per paper — activation patching, attribution patching, causal tracing (ROME),
the Negative Attention Score (NASA), CRISPR bias neurons. Every result is a ComponentScores."""

from .attribution import ATTRIBUTION_SITES, agreement, attribution_patching
from .crispr import crispr_scores, option_attributions
from .nas import (
                       NASResult,
                       head_attention_figure,
                       nas_heatmap,
                       negative_attention_scores,
)
from .patching import (
                       PATCH_SITES,
                       activation_patching,
                       check_pairs,
                       patch_attn_out,
                       patch_heads,
                       patch_heads_by_pos,
                       patch_mlp_out,
                       patch_resid_mid,
                       patch_resid_post,
                       patch_resid_pre,
                       patch_with,
                       position_labels,
)
from .tracing import (
                       TRACE_SITES,
                       causal_trace,
                       embedding_std,
                       subject_corruption,
                       subject_noise,
                       trace_sites,
)

__all__ = [
    "ATTRIBUTION_SITES", "agreement", "attribution_patching",
    "crispr_scores", "option_attributions",
    "NASResult", "head_attention_figure", "nas_heatmap", "negative_attention_scores",
    "PATCH_SITES", "activation_patching", "check_pairs", "patch_attn_out", "patch_heads", "patch_heads_by_pos",
    "patch_mlp_out", "patch_resid_mid", "patch_resid_post", "patch_resid_pre", "patch_with", "position_labels",
    "TRACE_SITES", "causal_trace", "embedding_std", "subject_corruption", "subject_noise", "trace_sites",
]
