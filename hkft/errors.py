"""User-facing errors: one line, what is wrong and how to fix it, never a traceback."""


class HkftError(Exception):
    """An error caused by the user's input or environment, shown as a single line.

    The CLI prints ``str(error)`` to stderr and exits with ``exit_code``; anything that is not an
    HkftError is a bug and keeps its traceback.
    """

    exit_code = 2

    def __init__(self, message: str, hint: str | None = None):
        self.message = message
        self.hint = hint
        super().__init__(f"{message} ({hint})" if hint else message)


class ConfigError(HkftError):
    """The preset or an override is invalid."""


class DataError(HkftError):
    """A dataset cannot be found, read or used for the configured task."""


class ModelError(HkftError):
    """A model or adapter cannot be loaded or instrumented as configured."""


class TrainingError(HkftError):
    """Training cannot continue (non-finite loss, an existing run directory, ...)."""

    exit_code = 3


class InterruptedRun(HkftError):
    """Training stopped on a signal after writing a checkpoint."""

    exit_code = 130
