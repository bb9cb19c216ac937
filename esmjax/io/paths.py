"""Paths that may be object-store URLs (``gs://bucket/...``, ``s3://bucket/...``) or local paths.

Every path a user gives goes through ``path()``, which returns an ``etils.epath.Path``: the path
layer that Orbax and TFDS use themselves, backed by fsspec (``gcsfs`` for ``gs://``, ``s3fs`` for
``s3://``; TensorFlow's gfile is used instead when TensorFlow is installed). No URL is parsed by
hand here. A missing client package is a one-line ``InputError`` naming the extra that brings it
(``pip install 'esmjax[gcs]'`` / ``'esmjax[s3]'``).

Credentials come from the clients' usual environment: Application Default Credentials
(``gcloud auth application-default login``, ``GOOGLE_APPLICATION_CREDENTIALS``, the metadata
server of a Cloud VM) for ``gs://``, ``AWS_*`` / ``~/.aws`` for ``s3://``. Against a local
emulator, ``STORAGE_EMULATOR_HOST`` points gcsfs at it and ``TENSORSTORE_GCS_HTTP_URL`` points
TensorStore (Orbax's array writer) at it. Failures of the store (unknown bucket, missing object,
no credentials, server unreachable) become one ``InputError`` line naming the URL
(``remote_errors``).

Datasets in a bucket are staged: ``stage()`` copies a folder once per host to local disk
(``ESMJAX_STAGE_DIR``, default ``~/.cache/esmjax/staged``) with a progress bar and a size check,
because ArrayRecord's reader opens local files only (pointed at ``gs://`` it blocks; see README
"Object storage").
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from etils import epath

from esmjax.errors import InputError

log = logging.getLogger(__name__)

# URL scheme -> (the fsspec client module epath needs, the esmjax extra that installs it)
CLIENTS = {"gs": ("gcsfs", "gcs"), "s3": ("s3fs", "s3")}


class _QuietZonalProbe(logging.Filter):
    """gcsfs probes every bucket for the zonal (rapid) storage class with the google-cloud-storage
    client and logs a warning per call when that client finds no credentials (an emulator, or
    token-only auth); the probe's fallback is the plain client, which is what esmjax uses."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Could not determine bucket type" not in record.getMessage()


logging.getLogger("gcsfs").addFilter(_QuietZonalProbe())
# gcsfs logs each request that ran out of retries with its traceback; the failure reaches the user
# as one InputError line (remote_errors), so only gcsfs's critical messages are kept.
logging.getLogger("gcsfs").setLevel(logging.CRITICAL)


def scheme(p: str | os.PathLike) -> str | None:
    """``gs``/``s3`` for a bucket URL, None for a local path (epath's own parse of the URL)."""
    s = str(p)
    if "://" not in s:
        return None
    name = s.split("://", 1)[0]
    if name not in CLIENTS:
        raise InputError(f"{s}: unsupported URL scheme {name}:// (esmjax reads gs:// and s3://)")
    return name


def is_remote(p: str | os.PathLike) -> bool:
    return scheme(p) is not None


def path(p: str | os.PathLike) -> epath.Path:
    """``p`` as an ``epath.Path``: a bucket URL as given, a local path made absolute."""
    name = scheme(p)
    if name is None:
        return epath.Path(os.path.abspath(os.fspath(p)))
    module, extra = CLIENTS[name]
    try:
        importlib.import_module(module)
    except ImportError:
        raise InputError(
            f"{p}: {name}:// paths need the {module} package: pip install 'esmjax[{extra}]'"
        ) from None
    return epath.Path(str(p))


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200]}" if text else type(e).__name__


@contextlib.contextmanager
def remote_errors(url: str | os.PathLike) -> Iterator[None]:
    """Turns an object store's failure while using ``url`` into one ``InputError`` line naming it.

    Local paths pass through untouched (their errors are the callers' to word)."""
    if not is_remote(url):
        yield
        return
    try:
        yield
    except InputError:
        raise
    except FileNotFoundError as e:
        raise InputError(f"{url}: no such bucket or object ({_first_line(e)})") from None
    except PermissionError as e:
        msg = f"{url}: access denied, check the credentials ({_first_line(e)})"
        raise InputError(msg) from None
    except Exception as e:  # noqa: BLE001 - auth, HTTP and connection errors of any client
        raise InputError(f"{url}: object store error ({_first_line(e)})") from None


def stage_root() -> Path:
    return Path(os.environ.get("ESMJAX_STAGE_DIR", Path.home() / ".cache" / "esmjax" / "staged"))


def _files(folder: epath.Path) -> Iterator[epath.Path]:
    """Every file under ``folder`` (one listing per folder: a dataset has two levels)."""
    for child in folder.iterdir():
        if child.is_dir():
            yield from _files(child)
        else:
            yield child


def _complete(dest: Path, files: dict[str, int]) -> bool:
    return dest.is_dir() and all(
        (dest / r).is_file() and (dest / r).stat().st_size == n for r, n in files.items()
    )


def stage(url: str) -> Path:
    """A local copy of the folder at ``url`` (a bucket URL), made once per host.

    Files are downloaded into a temporary folder next to the destination, their sizes checked
    against the listing, and the folder renamed into place, so an interrupted copy is never used;
    a later call (or another process on the host) reuses a complete copy whose file sizes still
    match. Takes the dataset's size on local disk (``esmjax data inspect`` prints it).
    """
    from tqdm import tqdm

    src = path(url)
    key = hashlib.blake2b(str(src).encode(), digest_size=8).hexdigest()
    dest = stage_root() / f"{src.name}-{key}"
    with remote_errors(url):
        files = {f.relative_to(src).as_posix(): f.stat().length for f in _files(src)}
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


def upload(local: Path, url: str, last: str | None = None) -> None:
    """Copies the local folder ``local`` to ``url``; the file named ``last`` (the one that makes the
    folder valid to readers, e.g. a dataset's metadata) goes last, so an interrupted upload is
    never taken for a complete folder."""
    dst = path(url)
    with remote_errors(url):
        files = sorted(
            (p for p in local.rglob("*") if p.is_file()), key=lambda p: (p.name == last, str(p))
        )
        for f in files:
            rel = f.relative_to(local).as_posix()
            target = dst / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            with open(f, "rb") as fi, target.open("wb") as fo:
                shutil.copyfileobj(fi, fo, 8 << 20)
