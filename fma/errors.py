"""The one exception type for mistakes a user can fix by changing the command line or a file."""


class ConfigurationError(ValueError):
    """Bad input with a known fix. `train.py` prints the message (no traceback) and exits with 2.

    Messages are one paragraph: what is wrong, then the override or action that fixes it.
    """
