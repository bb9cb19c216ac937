"""The stage root: a host's local copies of (parts of) bucket folders, under ``ESMJAX_STAGE_DIR``
(default ``~/.cache/esmjax/staged``), each file written whole or not at all.

A streamed bucket dataset (``esmjax.data.source``) keeps its small index files here
(``staged_path(url, "index")``, filled by ``download`` and ``keep``). ``stage`` copies a whole
folder once per host, with a progress bar and a size check: ``esmjax data inspect --sample`` of a
bucket dataset needs the record ids in its ArrayRecord files, and ArrayRecord's reader opens local
files only (pointed at ``gs://`` it blocks).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from esmjax.errors import InputError
from esmjax.io.paths import files_under, path, remote_errors

log = logging.getLogger(__name__)


def stage_root() -> Path:
    return Path(os.environ.get("ESMJAX_STAGE_DIR", Path.home() / ".cache" / "esmjax" / "staged"))


def _complete(dest: Path, files: dict[str, int]) -> bool:
    return dest.is_dir() and all(
        (dest / r).is_file() and (dest / r).stat().st_size == n for r, n in files.items()
    )


def staged_path(url: str, suffix: str = "") -> Path:
    """Where a host keeps its local copy of (part of) the bucket folder ``url``: under
    ``stage_root()``, named after the folder and a hash of its URL (``-suffix`` appended, so that
    copies of different parts of one folder do not meet)."""
    src = path(url)
    key = hashlib.blake2b(str(src).encode(), digest_size=8).hexdigest()
    return stage_root() / f"{src.name}-{key}{'-' + suffix if suffix else ''}"


def _replace(local: Path, fill: Callable[[BinaryIO], None]) -> None:
    """Writes ``local`` whole or not at all: ``fill`` writes a uniquely named temporary sibling
    (private to the user, as the rest of the stage root), which is then renamed into place, so that
    a reader, or another process of the host writing the same file, never sees a partial file."""
    local.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{local.name}.", dir=local.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            fill(f)
        os.replace(tmp, local)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def download(url: str, local: Path) -> None:
    """Copies the bucket file ``url`` to the local cache file ``local`` (``_replace``)."""

    def fill(fo: BinaryIO) -> None:
        with remote_errors(url), path(url).open("rb") as fi:
            shutil.copyfileobj(fi, fo, 8 << 20)

    _replace(local, fill)


def keep(local: Path, data: bytes) -> None:
    """Writes ``data`` (already downloaded) to the local cache file ``local`` (``_replace``)."""
    _replace(local, lambda f: f.write(data))


def stage(url: str) -> Path:
    """A local copy of the folder at ``url`` (a bucket URL), made once per host.

    Files are downloaded into a temporary folder next to the destination, their sizes checked
    against the listing, and the folder renamed into place, so an interrupted copy is never used;
    a later call (or another process on the host) reuses a complete copy whose file sizes still
    match. Takes the dataset's size on local disk (``esmjax data inspect`` prints it).
    """
    from tqdm import tqdm

    src = path(url)
    dest = staged_path(url)
    with remote_errors(url):
        files = {f.relative_to(src).as_posix(): f.stat().length for f in files_under(src)}
        if not files:
            raise InputError(f"{url}: no such folder (nothing under it)")
        if _complete(dest, files):
            return dest
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
        try:
            with tqdm(
                total=sum(files.values()),
                unit="B",
                unit_scale=True,
                desc=f"staging {url}",
                file=sys.stderr,
                disable=None,
            ) as bar:
                for rel, size in sorted(files.items()):
                    out = tmp / rel
                    out.parent.mkdir(parents=True, exist_ok=True)
                    with (src / rel).open("rb") as fi, open(out, "wb") as fo:
                        while chunk := fi.read(8 << 20):
                            fo.write(chunk)
                            bar.update(len(chunk))
                    if out.stat().st_size != size:
                        raise InputError(
                            f"{url}/{rel}: staged {out.stat().st_size} bytes, the bucket lists "
                            f"{size}"
                        )
            if dest.exists() and not _complete(dest, files):
                shutil.rmtree(dest, ignore_errors=True)  # a stale copy of an older version
            try:
                os.rename(tmp, dest)
            except OSError:  # another process on this host finished first
                shutil.rmtree(tmp, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    log.info("staged %s to %s (%.1f MB)", url, dest, sum(files.values()) / 1e6)
    return dest
