"""The one exception type for mistakes in what the user asked for (not bugs)."""


class UserError(ValueError):
    """Bad input: the CLI prints the message (no traceback) and exits with status 2."""
