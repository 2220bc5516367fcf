"""User-facing errors. The CLI prints one line for these and exits with status 2."""


class ACGError(Exception):
    """Base class for every error a user can cause (bad path, wrong format, mismatch)."""


class ModelLoadError(ACGError):
    """A model spec could not be resolved or read."""


class UnsupportedArchitectureError(ModelLoadError):
    """The model's architecture is not one acgraph knows how to convert."""


class ArtifactError(ACGError):
    """An artifact on disk is missing, unreadable, of the wrong version, or does not match."""


class CorpusError(ACGError):
    """A corpus spec could not be resolved or produced no text."""


class ConfigError(ACGError):
    """A configuration value is invalid."""
