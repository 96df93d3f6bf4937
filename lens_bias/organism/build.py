"""Build the model organism (`python -m lens_bias.organism build [--out data] [--steps 3000]`).

The recipe, cut by stage, is lens_bias/organism/recipe/ (its docstring describes it). This module
is the command line and keeps the names code used from the single-file build.py: `build`, `main`,
the measurements (`gender_logit_diff`, `bbq_choices`, …), `Batcher`, `component_masks`.
"""

from __future__ import annotations

import warnings

from .card import CARD_FILE, DATA_FILES
from .recipe.corpus import bbq_items, cloze_items, yesno_item
from .recipe.measure import (
    bbq_choices,
    gender_logit_diff,
    head_no_attention,
    heldout_loss,
    last_logits,
    neuron_activation,
    yesno_metrics,
)
from .recipe.plant import plant
from .recipe.steps import build, main
from .recipe.train import (
    ARCH,
    Batcher,
    component_masks,
    lm_loss,
    train_base,
    train_tokenizer,
)

__all__ = ["ARCH", "CARD_FILE", "DATA_FILES", "Batcher", "bbq_choices", "bbq_items", "build", "cloze_items",
           "component_masks", "gender_logit_diff", "head_no_attention", "heldout_loss", "last_logits", "lm_loss",
           "main", "neuron_activation", "plant", "train_base", "train_tokenizer", "yesno_item", "yesno_metrics"]

#: private names of the single-file build.py that code used; they still work, with a warning
_RENAMED = {"_Batcher": ("Batcher", Batcher), "_last_logits": ("last_logits", last_logits),
            "_lm_loss": ("lm_loss", lm_loss)}


def __getattr__(name: str):
    if name in _RENAMED:
        new, value = _RENAMED[name]
        warnings.warn(f"lens_bias.organism.build.{name} is deprecated: use lens_bias.organism.build.{new} "
                      "(defined in lens_bias.organism.recipe)", DeprecationWarning, stacklevel=2)
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if __name__ == "__main__":
    main()
