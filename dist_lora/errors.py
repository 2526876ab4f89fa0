"""The base class of every error caused by the user's input (config, paths, data).

The command line prints these as one clear line and exits with status 2; anything else is a bug
and keeps its traceback.
"""


class DistLoraError(ValueError):
    """Bad input: the message names the file, key or value and says what would be right."""
