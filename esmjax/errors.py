"""The error base class for bad input: the CLI prints these as one line, without a traceback."""


class InputError(ValueError):
    """Input the user can fix: a malformed file, an unknown option value, a missing checkpoint."""
