"""The error base class for bad input: the CLI prints these as one line, without a traceback."""


class InputError(ValueError):
    """Input the user can fix: a malformed file, an unknown option value, a missing checkpoint."""


class StalledWrite(InputError):
    """A background write that cannot finish (a checkpoint to an object store that went away). Its
    threads keep retrying and would hold the process open for many minutes, so the CLI prints the
    line and exits at once without waiting for them (what they left is no complete checkpoint)."""


class NonFiniteLoss(InputError):
    """A training step whose loss is NaN or infinite, with ``nonfinite: stop``: the run ends
    before it saves that step, so the last checkpoint stays the last good state."""


class WriteFailed(InputError):
    """An output that could not be written because of where it goes: a full disk, a quota, a
    read-only or forbidden folder. Outputs are written under a temporary name and renamed when
    complete, so nothing partial is left under the final name and the same command can run again
    once the cause is fixed."""


class StalledRead(StalledWrite):
    """Reads that stopped answering (the training data's bucket): the stuck reader thread or
    process would hold the process open as a stalled write's threads do, so the CLI ends it the
    same way (``StalledWrite``), at once."""
