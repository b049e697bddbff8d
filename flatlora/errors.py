"""The one exception type users see: a message that names the problem and the fix."""


class FlatLoraError(ValueError):
    """A problem the user can fix (bad hyperparameter, path, model or data).

    The CLI prints it on one line and exits with code 2, without a traceback.
    """
