"""Errors lens_bias raises for bad input: each names the problem in plain words."""


class LensBiasError(ValueError):
    """Base class: bad input to a lens_bias function (a ValueError, so callers can catch either)."""


class ModelLoadError(LensBiasError):
    """A model could not be found or loaded."""


class PromptError(LensBiasError):
    """A prompt set is malformed: multi-token answers, misaligned pairs, empty data, ..."""

    item: int | None = None  # the 0-based prompt it is about, when known (core.prompts.prompt_error)


class DataError(LensBiasError):
    """A data file is missing, empty or malformed."""
