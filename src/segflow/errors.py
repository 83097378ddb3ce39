"""Errors and the exit codes they end a command with.

0 success; 1 the data failed validation or a promotion was refused; 2 the user's input (data, parameters,
files) is wrong; 3 segflow itself failed (a bug: the traceback goes to a log file). The Prefect flow retries
none of these: only a stage killed from outside or a tracking server that cannot be reached is transient.
"""

import reprlib
from typing import Any

VALIDATION_FAILED = 1
USER_ERROR = 2
INTERNAL_ERROR = 3


class SegflowError(Exception):
    """A problem with the user's input (data, parameters, files).

    The CLI prints the message as one paragraph and exits non-zero; nothing half-written is left behind
    because every stage writes to a temporary place first (see ``segflow.fsutil``).
    """

    exit_code = USER_ERROR


class ValidationFailed(SegflowError):
    """The data did not pass the Great Expectations suite."""

    exit_code = VALIDATION_FAILED


_REPR = reprlib.Repr()  # bounded work and text for any value, however large or alias-shared its nesting
_REPR.maxlevel, _REPR.maxlist, _REPR.maxdict, _REPR.maxstring, _REPR.maxother = 2, 6, 6, 200, 200


def shown(value: Any, characters: int = 200) -> str:
    """``value`` as an error message shows it: at most ``characters`` long, built without printing it whole
    (nested lists that YAML aliases share would print exponentially)."""
    text = _REPR.repr(value)
    return text if len(text) <= characters else text[: characters - 3] + "..."
