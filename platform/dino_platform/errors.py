"""Errors that reach a user: each message names the file/field at fault and what to do."""


class UserError(Exception):
    """Bad input or configuration: printed as one line by the CLI, never a traceback."""


class ConfigError(UserError, ValueError):
    """A configuration value is invalid; the message names the field and the allowed values."""


class StorageError(UserError, OSError):
    """Object storage is unreachable or a path is missing; the message names the URI."""


class DataError(UserError, ValueError):
    """Input data (annotations, images) is malformed; the message names the file and the field."""


class TrainingError(UserError, RuntimeError):
    """Training stopped for good (e.g. a node was lost and ``run.max_failures`` allowed no restart)."""


class StallError(UserError, RuntimeError):
    """A job made no progress for longer than its stall timeout; the message is the watchdog's report."""

    def __init__(self, report: str):
        super().__init__(report)
        self.report = report
