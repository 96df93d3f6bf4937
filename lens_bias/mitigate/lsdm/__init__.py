"""LSDM (Cai et al. 2024): causal tracing picks the MLP site, a closed-form least-squares edit of its W_out
removes the bias and preserves other outputs. keys → targets → solve → main, as ROME's compute_u,
compute_v, rome_main."""

from .keys import edit_positions, mlp_keys, preservation_keys
from .main import lsdm_edit, occupation_split
from .solve import lsdm_delta
from .targets import gender_direction, target_residuals

__all__ = ["edit_positions", "gender_direction", "lsdm_delta", "lsdm_edit", "mlp_keys", "occupation_split",
           "preservation_keys", "target_residuals"]
