"""User-facing errors: one line, what is wrong and how to fix it, never a traceback."""


class HkftError(Exception):
    """An error caused by the user's input or environment, shown as a single line.

    The CLI prints ``str(error)`` to stderr and exits with ``exit_code``; anything that is not an
    HkftError is a bug and keeps its traceback.
    """

    exit_code = 2

    def __init__(self, message: str, hint: str | None = None):
        self.message = one_line(message)
        self.hint = one_line(hint) if hint else hint
        super().__init__(f"{self.message} ({self.hint})" if hint else self.message)


def one_line(text: str) -> str:
    """A value quoted in a message may hold line breaks (\\n, \\x85, \\u2028 ...): they are shown escaped."""
    return "".join(repr(char)[1:-1] if len(f"a{char}a".splitlines()) > 1 else char for char in text)


# How a message names a value's type; anything else is "a"/"an" and its class name.
KINDS = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list", dict: "a mapping",
         type(None): "null"}


def kind_of(value: object) -> str:
    """``value``'s type as a sentence says it: 'an integer', 'a list', 'null', 'an OrderedDict'."""
    if type(value) in KINDS:
        return KINDS[type(value)]
    name = type(value).__name__
    return f"{'an' if name[:1].lower() in 'aeiou' else 'a'} {name}"


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


def first_line(err: BaseException) -> str:
    """The first line of an error's message (at most 300 characters), or its type when it has none."""
    text = str(err).strip()
    return text.splitlines()[0][:300] if text else type(err).__name__
