"""The one exception type for mistakes in a user's input (bottom of the import graph: imports nothing)."""


class UserError(Exception):
    """A mistake in the user's input: reported as one line, exit status `exit_code`, no traceback."""

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code


class ConfigError(UserError):
    """A mistake in a YAML config or its overrides, reported as one line before anything is built."""
