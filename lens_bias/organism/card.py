"""Reading a model organism: its card (ground truth + measured metrics) and its data files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from ..core.errors import DataError, ModelLoadError
from ..core.files import DATA_DIR
from ..core.models import shipped_model_dir

ORGANISM_DATA = DATA_DIR / "organism_data"
CARD_FILE = "lens_bias_card.json"
DATA_FILES = {"bbq": "bbq_age.jsonl", "yesno": "yesno.jsonl", "neutral": "neutral.txt",
               "cloze": "cloze.jsonl"}
OrganismData = Literal["bbq", "yesno", "neutral", "cloze"]


def load_card(model_or_path="organism") -> dict:
    """The organism card (ground truth + measured metrics) of a shipped name, a directory or a model."""
    if hasattr(model_or_path, "lens_bias_source"):
        model_or_path = model_or_path.lens_bias_source
    name = str(model_or_path)
    path = Path(name)
    if not path.exists():
        path = shipped_model_dir(name)
    card = path / CARD_FILE
    if not card.is_file():
        raise ModelLoadError(f"{path} has no {CARD_FILE}: it is not a lens_bias model organism")
    return json.loads(card.read_text())


def organism_card(model_or_path) -> dict | None:
    """The card of a lens_bias model organism (one with planted units), or None for any other model."""
    source = getattr(model_or_path, "lens_bias_source", model_or_path)
    path = Path(str(source))
    if not path.exists() and str(source) in ("organism", "organism-control"):
        path = shipped_model_dir(str(source))
    card = path / CARD_FILE
    if not card.is_file():
        return None
    found = json.loads(card.read_text())
    return found if found.get("planted") else None


def data_path(name: OrganismData) -> Path:
    """Path of one of the organism's data files: 'bbq', 'yesno', 'neutral', 'cloze'."""
    if name not in DATA_FILES:
        raise DataError(f"unknown organism data {name!r}; choose one of {sorted(DATA_FILES)}")
    path = ORGANISM_DATA / DATA_FILES[name]
    if not path.is_file():
        raise DataError(f"{path} is missing; rebuild with `python -m lens_bias.organism build`")
    return path
