"""Domain errors. Each is reported to a user as one clear line; none needs a traceback."""


class ChaidError(Exception):
    """Base of every error chaid reports to its user."""

    # The command line's exit status for it (2: usage or setup; see chaid.cli).
    exit_status = 2


class ConfigError(ChaidError, ValueError):
    """A setting is unknown, of the wrong type, or out of range."""


class WeightsError(ChaidError):
    """A checkpoint is missing, unreadable, or does not match the model (names or shapes)."""


class InputError(ChaidError, ValueError):
    """A request parameter is invalid (prompt, frames, size, steps, seed)."""
