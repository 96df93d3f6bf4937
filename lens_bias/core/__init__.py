"""Core: loading models, the bridge ↔ Hugging Face conversion, the one hook vocabulary and forward
helpers, prompt sets and padding, metrics, the locate result type, files, errors, figures."""

from .checks import NonFiniteError, check_finite, check_weights_finite
from .errors import DataError, LensBiasError, ModelLoadError, PromptError
from .files import (
                 DATA_DIR,
                 atomic_write,
                 check_output_dir,
                 replace_dir,
                 shipped,
                 write_table,
                 write_text,
)
from .hf import (
                 architecture,
                 clone_model,
                 hf_module,
                 hf_state_dict,
                 load_hf_weights,
                 out_projection,
                 stale_split_qkv,
                 sync_split_qkv,
                 to_hf_model,
)
from .hooks import (
                 SITES,
                 Site,
                 check_hook_names,
                 device_of,
                 hook_name,
                 last_resid,
                 run_until,
                 site_kind,
                 trace,
)
from .methods import ChunkSums, LocateMethod
from .metrics import (
                 FAST_METRICS,
                 METRICS,
                 answer_logits,
                 answer_logits_fast,
                 get_metric,
                 logit_diff,
                 normalized_metric,
                 odds_ratio,
                 prob_ratio,
                 total_effect,
)
from .models import (
                 HookedModel,
                 load_model,
                 resolve_device,
                 resolve_dtype,
                 save_random_model,
                 shipped_model_dir,
)
from .prompts import PromptSet, answer_token_id, encode_lines, pad, tokenizer_of
from .scores import ComponentScores
from .viz import heatmap, save_figure, top_bar

__all__ = [
    "DataError", "LensBiasError", "ModelLoadError", "PromptError", "NonFiniteError", "check_finite",
    "check_weights_finite",
    "DATA_DIR", "atomic_write", "check_output_dir", "replace_dir", "shipped", "write_table", "write_text",
    "architecture", "clone_model", "hf_module", "hf_state_dict", "load_hf_weights", "out_projection",
    "stale_split_qkv", "sync_split_qkv", "to_hf_model",
    "SITES", "Site", "check_hook_names", "device_of", "hook_name", "last_resid", "run_until", "site_kind", "trace",
    "ChunkSums", "LocateMethod",
    "FAST_METRICS", "METRICS", "answer_logits", "answer_logits_fast", "get_metric", "logit_diff",
    "normalized_metric", "odds_ratio", "prob_ratio", "total_effect",
    "HookedModel", "load_model", "resolve_device", "resolve_dtype", "save_random_model", "shipped_model_dir",
    "PromptSet", "answer_token_id", "encode_lines", "pad", "tokenizer_of",
    "ComponentScores", "heatmap", "save_figure", "top_bar",
]
