"""User-facing errors: one readable paragraph, no traceback."""


class SegflowError(Exception):
    """A problem with the user's input (data, parameters, files).

    The CLI prints the message as one paragraph and exits non-zero; nothing half-written is left behind
    because every stage writes to a temporary place first (see ``segflow.fsutil``).
    """

    exit_code = 2


class ValidationFailed(SegflowError):
    """The data did not pass the Great Expectations suite."""

    exit_code = 1
