"""Error types that the command line turns into a message and exit code 2."""


class UserError(Exception):
    """A mistake the user can fix: bad settings, missing data, a foreign run folder.

    The message names the value, says what was expected and how to fix it. The CLI prints it
    without a traceback.
    """


class DatasetError(UserError):
    """The dataset is missing, corrupt or cannot be prepared."""


class DivergedError(RuntimeError):
    """Training produced a non-finite loss or non-finite weights."""
