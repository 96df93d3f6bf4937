"""lens_bias: locate and mitigate social and negative bias inside language models with TransformerLens 4.

The public API is re-exported here; each method lives in a module of its own.
"""

from .errors import DataError, LensBiasError, ModelLoadError, PromptError
from .models import load_model, resolve_device, resolve_dtype, save_random_model, shipped_model_dir
from .prompts import PromptSet, answer_token_id

__version__ = "0.1.0"

__all__ = [
    "DataError", "LensBiasError", "ModelLoadError", "PromptError",
    "load_model", "resolve_device", "resolve_dtype", "save_random_model", "shipped_model_dir",
    "PromptSet", "answer_token_id",
]
