"""The model organism: a small GPT-2 with biases planted at known components (ground truth for every
locate method). card.py reads a built organism; build.py trains one (`python -m lens_bias.organism build`)."""

from .card import data_path, load_card, organism_card

__all__ = ["data_path", "load_card", "organism_card"]
