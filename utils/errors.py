"""The one exception type for bad user input; CLIs print its message without a traceback."""


class UserError(Exception):
    """Bad input (missing file, unknown key, misfit checkpoint, ...); the message names the problem and the fix."""
