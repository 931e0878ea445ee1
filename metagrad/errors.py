"""User-facing errors: the CLI prints their message (no traceback) and exits with status 2."""


class MetagradError(Exception):
    """Base class for mistakes a user can fix; the message says what was wrong and how to fix it."""


class ConfigError(MetagradError, ValueError):
    """An unknown, misspelt, out-of-range or incompatible setting."""


class DataError(MetagradError):
    """Missing, corrupt or too small data (e.g. more ways than classes available)."""


class CheckpointError(MetagradError):
    """A checkpoint that is corrupt, foreign, or could run code on load."""


class TrainingDivergedError(MetagradError):
    """A non-finite loss; the last good checkpoint is kept."""


class RunLockedError(MetagradError):
    """Another training holds the run directory's lock (two writers would corrupt the run)."""
