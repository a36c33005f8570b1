"""The one error type a user can cause: printed as one line, exit code 2, nothing changed."""


class UsageError(ValueError):
    """A bad command-line value or input: the message names it and the fix."""
