"""What the commands check before the distributed start-up, and the start-up itself.

A user mistake must be one line on stderr, and on a pod ``jax.distributed.initialize`` can take
minutes and logs the devices it found: so each command first parses and validates its config and
checks its local inputs (files present, a checkpoint folder's ``config.json``), then starts. Bucket
URLs are checked where they are read, after the start-up: no extra object-store request is made
here. Nothing here may touch a JAX device (that would start the backend before
``jax.distributed.initialize``, which refuses to run after it)."""

from __future__ import annotations

from pathlib import Path

from esmjax.errors import InputError
from esmjax.io import paths

_started: list[bool] = []  # a start-up ran in this process


def start(
    coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None
) -> None:
    """``esmjax.parallel.distributed.initialize``, once per process: ``evaluate all`` runs several
    evaluations in one process and JAX's start-up may only run once."""
    from esmjax.parallel import distributed

    if not _started:
        distributed.initialize(coordinator, num_processes, process_id)
        _started.append(True)


def local_checkpoint(path: str, *, esmfold: bool = False) -> None:
    """A local checkpoint folder or workdir holds a ``config.json`` with a valid model (ESM-2, or
    with ``esmfold`` an ESMFold): the first thing a restore reads."""
    if not paths.is_remote(path):
        from esmjax.io import checkpoint

        (checkpoint.esmfold_config if esmfold else checkpoint.model_config)(path)


def local_source(src: str) -> None:
    """What ``esmjax train --init-from`` / ``finetune --backbone`` take (fair-esm .pt, HF folder,
    esmjax checkpoint or workdir) exists, in the words of ``esmjax.io.convert``."""
    if src and not paths.is_remote(src) and not Path(src).exists():
        raise InputError(f"{src}: no such checkpoint file or folder")
