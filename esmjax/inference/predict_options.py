"""The options of ``esmjax predict`` (``esmjax.inference.predictions``), apart from its code so
that the command line reads them without importing JAX (``--help`` stays fast)."""

from __future__ import annotations

from dataclasses import dataclass

from esmjax.inference.options import JobOptions, choice
from esmjax.io import paths

# auto: one file for an --out ending in a FILE_SUFFIXES suffix, a job folder otherwise
PREDICT_FORMATS = ("auto", "shards")
FILE_SUFFIXES = (".csv", ".jsonl")


@dataclass(frozen=True, kw_only=True)
class PredictOptions(JobOptions):
    """What ``esmjax predict`` predicts and where it writes."""

    step: int | None = None  # the run's step (default: its best)
    format: str = choice("auto", PREDICT_FORMATS)
    max_tokens_per_batch: int = 8192
    # predict computes in the run's dtype (it has no --dtype): set from the run for job.json
    dtype: str | None = None

    @property
    def writes_file(self) -> bool:
        """One ``.csv``/``.jsonl`` file (not a job of work units)."""
        return self.format == "auto" and paths.given(self.out).suffix in FILE_SUFFIXES
