"""Operator-facing errors: each message names the file, key or model and what to do about it."""


class LtuAsError(Exception):
    """Base class of the library's own errors."""


class CheckpointError(LtuAsError):
    """A checkpoint is missing tensors, has unexpected or mis-shaped ones, or cannot be read."""


class ModelNotFoundError(LtuAsError):
    """A model component is neither on disk nor downloadable (offline, wrong id, missing files)."""
