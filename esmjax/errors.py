"""The error base class for bad input: the CLI prints these as one line, without a traceback."""


class InputError(ValueError):
    """Input the user can fix: a malformed file, an unknown option value, a missing checkpoint."""


class StalledWrite(InputError):
    """A background write that cannot finish (a checkpoint to an object store that went away). Its
    threads keep retrying and would hold the process open for many minutes, so the CLI prints the
    line and exits at once without waiting for them (what they left is no complete checkpoint)."""
