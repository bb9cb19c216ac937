"""``esmjax data build``: FASTA (+ cluster membership TSV) -> a TFDS ArrayRecord dataset grouped by
cluster; ``build_dataset`` picks the back-end and runs ``esmjax.data.builder.build``.

The steps, the output folder and the atomic commit are described in ``esmjax.data.builder``; the
back-ends are ``esmjax.data.build_local`` (one process, SQLite registry; the default) and
``esmjax.data.build_beam`` (Apache Beam, with ``beam_runner``). They write the same dataset, record
for record.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from esmjax.data.build_local import LocalBackend
from esmjax.data.builder import Backend, BuildError, build
from esmjax.io import paths

__all__ = ["BuildError", "backend", "build_dataset"]


def backend(beam_runner: str | None = None, beam_options: Sequence[str] = ()) -> Backend:
    """The local back-end, or the Beam one when ``beam_runner`` is given (imported only then:
    Beam is an optional extra and slow to import)."""
    if not beam_runner:
        return LocalBackend()
    from esmjax.data.build_beam import BeamBackend

    return BeamBackend(beam_runner, beam_options)


def build_dataset(
    fastas: Sequence[str | Path],
    out: str | Path,
    *,
    clusters: str | Path | None = None,
    val_fraction: float = 0.005,
    skip_invalid: bool = False,
    unknown_as_x: bool = False,
    beam_runner: str | None = None,
    beam_options: Sequence[str] = (),
) -> dict[str, Any]:
    """Builds a dataset folder at ``out``; returns its metadata (also written as
    ``esmjax_dataset.json``).

    Args:
      fastas: FASTA files, plain or gzip.
      out: the folder to create (must not exist).
      clusters: optional membership TSV ``cluster_id<TAB>member_id``; without it each record is its
        own cluster.
      val_fraction: fraction of clusters held out as the ``validation`` split.
      skip_invalid: skip and count bad records and rows instead of stopping at the first.
      unknown_as_x: read characters outside the alphabet as ``X``.
      beam_runner: run steps 1-3 as an Apache Beam pipeline on this runner (e.g. ``DirectRunner``).
      beam_options: extra Beam pipeline flags (``--direct_num_workers=4`` ...).
    """
    # A full disk is one line (the temporary folder is gone, nothing is under ``out``); a bucket
    # dataset is built on the local temporary disk first, which is then the one that filled up.
    where = f"{out} (built in {tempfile.gettempdir()} first)" if paths.is_remote(out) else out
    with paths.write_errors(where):
        return build(
            fastas,
            out,
            backend(beam_runner, beam_options),
            clusters=clusters,
            val_fraction=val_fraction,
            skip_invalid=skip_invalid,
            unknown_as_x=unknown_as_x,
        )
