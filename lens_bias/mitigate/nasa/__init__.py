"""NASA (Yu et al. 2024): fine-tune only the heads NAS ranks as negatively biased — a LoRA adapter
masked to those heads (lora.py), trained with the NASA loss and early stopping (train.py)."""

from .lora import head_lora_config, head_lora_model, head_slices_unchanged
from .train import nas_gap_curve, nasa_train, split_questions

__all__ = ["head_lora_config", "head_lora_model", "head_slices_unchanged", "nas_gap_curve", "nasa_train",
           "split_questions"]
