"""What a job checks before the distributed start-up, and the start-up itself.

A user mistake must be one line on stderr, and on a pod ``jax.distributed.initialize`` can take
minutes and logs the devices it found: so each job first parses and validates its config and
checks its local inputs and outputs (files present, folders writable, optional packages), then
starts. Bucket URLs are checked where they are read, after the start-up: no extra object-store
request is made here. Nothing here may touch a JAX device (that would start the backend before
``jax.distributed.initialize``, which refuses to run after it)."""

from __future__ import annotations

import json
import os
import tempfile
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


def local_source(src: str) -> None:
    """What ``esmjax train --init-from`` / ``finetune --backbone`` take (fair-esm .pt, HF folder,
    esmjax checkpoint or workdir) exists, in the words of ``esmjax.io.convert``; a released
    model's name is downloaded where it is read (``convert.named_source``)."""
    from esmjax.io import hub

    if src and not paths.is_remote(src) and not Path(src).exists() and not hub.is_name(src):
        raise InputError(f"{src}: no such checkpoint file or folder")


# --------------------------------------------------------------------------------------------------
# Outputs, optional packages and what a workdir holds: checked before any compute, so that a wrong
# --out or --workdir is one line at once instead of a traceback after the work. Local paths only:
# a bucket URL is checked where it is written (no request here).
# --------------------------------------------------------------------------------------------------
def output(path: str | os.PathLike | None, label: str, *, folder: bool = True) -> None:
    """The local output ``path`` (``folder``: a folder the command creates or fills; else one
    file) can be written. ``label`` starts the message (``--out X``). A file where a folder goes,
    a folder where a file goes, a parent that is a file, or a place the user cannot write in is
    one line. The write test makes and deletes a file where the output will go: permission bits
    do not tell (root passes ``os.access`` even on read-only and virtual file systems)."""
    if not path or paths.is_remote(path):
        return
    p = Path(path)
    try:
        if p.exists():
            if folder and not p.is_dir():
                raise InputError(f"{label}: exists and is not a folder")
            if not folder and p.is_dir():
                raise InputError(f"{label}: is a folder, not a file name")
            _writable(p if folder else p.parent, label)
            return
        parent = p.absolute().parent
        while not parent.exists():  # the folders the command will create
            parent = parent.parent
    except OSError as e:  # ENAMETOOLONG and the like, from stat
        raise InputError(f"{label}: {e.strerror or e}") from None
    if not parent.is_dir():
        raise InputError(f"{label}: {parent} is a file, not a folder")
    _writable(parent, label)


def _writable(folder: Path, label: str) -> None:
    try:
        fd, tmp = tempfile.mkstemp(prefix=".esmjax-write-check-", dir=folder)
    except OSError as e:
        raise InputError(f"{label}: cannot write in {folder} ({e.strerror or e})") from None
    os.close(fd)
    os.unlink(tmp)


def plotting(what: str = "--plot") -> None:
    """matplotlib is importable: ``--plot`` draws after the work, so without it a run would
    compute (and ``evaluate contacts --fit`` save its head) and then fail."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise InputError(f"{what} needs matplotlib: pip install 'esmjax[eval]'") from None


def workdir_kind(path: str, command: str) -> None:
    """``--workdir`` of ``esmjax train`` holds nothing yet or a pretraining run, that of ``esmjax
    finetune`` nothing or a fine-tuning run: said in one line before the config is read, where the
    restore would otherwise fail on every step (train) or list every fine-tuning field (finetune).
    A bucket workdir is read here only where the command reads its config.json anyway (resuming
    without --config)."""
    if paths.is_remote(path):
        return
    p = Path(path) / "config.json"
    if not p.is_file():
        return
    try:
        config = json.loads(p.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{p}: not a readable config.json ({type(e).__name__})") from None
    if not isinstance(config, dict):
        raise InputError(f"{p}: not an esmjax config.json (no JSON object)")
    from esmjax.io import checkpoint

    found = checkpoint.Checkpoint(path, config).holds
    want = checkpoint.HOLDS[checkpoint.TRAIN if command == "train" else checkpoint.FINETUNE]
    if found == want:
        return
    hint = {
        ("train", "a fine-tuning run"): f"; resume it with `esmjax finetune --workdir {path}`",
        ("train", "a converted checkpoint"): f"; start from its weights with --init-from {path}",
        ("finetune", "a pretraining run"): f"; fine-tune from it with --backbone {path}",
        ("finetune", "a converted checkpoint"): f"; fine-tune from it with --backbone {path}",
    }.get((command, found), "")
    raise InputError(
        f"--workdir {path} holds {found}, not {want}: give `esmjax {command}` a new --workdir"
        + hint
    )


def stored_path(value: str, saved: str | None = None, *, weights: bool = False) -> str:
    """A path as a run's config.json keeps it: a local one absolute, so that the workdir still
    names its data and backbone when it is read from another folder or copied (``evaluate
    perplexity`` of a copied run); a bucket URL as given. ``saved``: what the workdir's
    config.json already says, kept when it names the same file, because a resumed fine-tuning
    run compares its backbone with the saved one (runs saved before paths were made absolute).
    ``weights``: ``value`` names weights (``init_from``, ``backbone``), where a released model's
    name (``hub.is_name``) stays a name; a data path is never one."""
    from esmjax.io import hub

    if not value or paths.is_remote(value) or (weights and hub.is_name(value)):
        return value
    if saved and not paths.is_remote(saved) and os.path.abspath(saved) == os.path.abspath(value):
        return saved
    return os.path.abspath(value)
