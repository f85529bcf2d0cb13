"""Exceptions raised by the library."""

from __future__ import annotations


class SamplingInputError(ValueError):
    """Invalid input: a parameter, an ids array or the logits. The message names field and row."""


class InvalidLogitsError(SamplingInputError):
    """A logits row with NaN or +inf (after penalties and temperature), or with no finite value."""


class BackendUnavailableError(ImportError):
    """A backend's framework is not installed; the message names the extra to install."""


def first_bad_row(mask) -> int:
    """Index of the first True in a 1-D boolean numpy array."""
    import numpy as np

    return int(np.flatnonzero(mask)[0])
