"""Errors and the exit codes they end a command with.

0 success; 1 the data failed validation or a promotion was refused; 2 the user's input (data, parameters,
files, or the machine: a full disk, no permission) is wrong; 3 segflow itself failed (a bug: the traceback goes
to a log file); 4 a service segflow needs (the MLflow tracking server) could not be reached. The Prefect flow
tells them apart by the code alone and retries only 4 and a stage killed from outside.
"""

import errno
import reprlib
from collections.abc import Callable
from typing import Any

VALIDATION_FAILED = 1
USER_ERROR = 2
INTERNAL_ERROR = 3
UNAVAILABLE = 4


class SegflowError(Exception):
    """A problem with the user's input (data, parameters, files).

    The CLI prints the message as one paragraph and exits non-zero; nothing half-written is left behind
    because every stage writes to a temporary place first (see ``segflow.fsutil``).
    """

    exit_code = USER_ERROR


class ValidationFailed(SegflowError):
    """The data did not pass the Great Expectations suite."""

    exit_code = VALIDATION_FAILED


class ServiceUnavailable(SegflowError):
    """A server segflow needs did not answer: running again later may succeed."""

    exit_code = UNAVAILABLE


_REPR = reprlib.Repr()  # bounded work and text for any value, however large or alias-shared its nesting
_REPR.maxlevel, _REPR.maxlist, _REPR.maxdict, _REPR.maxstring, _REPR.maxother = 2, 6, 6, 200, 200


def shown(value: Any, characters: int = 200) -> str:
    """``value`` as an error message shows it: at most ``characters`` long, built without printing it whole
    (nested lists that YAML aliases share would print exponentially)."""
    text = _REPR.repr(value)
    return text if len(text) <= characters else text[: characters - 3] + "..."


def in_chain(exc: BaseException, wanted: Callable[[BaseException], bool]) -> BaseException | None:
    """The first exception in ``exc``'s chain (itself, then its cause or context, and so on) that is ``wanted``:
    libraries wrap the error that says what happened (MLflow keeps a ``requests`` error as the context)."""
    cause: BaseException | None = exc
    while cause is not None and not wanted(cause):
        cause = cause.__cause__ or cause.__context__
    return cause


# What the user or the machine can do about an OSError: the environment's problems, not segflow's bugs.
_ENVIRONMENT_CAUSES = {
    errno.ENOSPC: "the disk is full; free some space and run it again",
    errno.EDQUOT: "the disk quota is used up; free some space and run it again",
    errno.EISDIR: "it is a folder where a file was expected; give a file's path",
    errno.ENOTDIR: "a part of the path is a file where a folder was expected",
    errno.EEXIST: "it already exists; remove it or give another path",
    errno.EACCES: "permission denied; give a path you can write to, or change its permissions",
    errno.EPERM: "operation not permitted; give a path you can write to, or change its permissions",
    errno.EROFS: "the file system is read-only; give a writable path",
}


def environment_error(exc: BaseException) -> SegflowError | None:
    """The user's paths or the machine (a full disk, a folder given for a file, no permission) as one paragraph
    naming the path and the cause, for an OSError anywhere in ``exc``'s chain; None for any other failure."""
    cause = in_chain(exc, lambda e: isinstance(e, OSError) and e.errno in _ENVIRONMENT_CAUSES)
    if cause is None:
        return None
    where = " -> ".join(str(name) for name in (cause.filename, cause.filename2) if name is not None) or "a file"
    return SegflowError(f"{where}: {cause.strerror or errno.errorcode[cause.errno]}: {_ENVIRONMENT_CAUSES[cause.errno]}.")
