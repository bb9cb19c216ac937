"""Paths that may be object-store URLs (``gs://bucket/...``, ``s3://bucket/...``) or local paths.

Every path a user gives goes through ``path()``, which returns an ``etils.epath.Path``: the path
layer that Orbax and TFDS use themselves, backed by fsspec (``gcsfs`` for ``gs://``, ``s3fs`` for
``s3://``; TensorFlow's gfile is used instead when TensorFlow is installed). Input readers that
name the file in their messages take ``given()`` (a local path unchanged, a URL through epath) and
open text with ``open_read()``. No URL is parsed by hand here. A missing client package is a
one-line ``InputError`` naming the extra that brings it (``pip install 'esmjax[gcs]'`` /
``'esmjax[s3]'``).

Credentials come from the clients' usual environment: Application Default Credentials
(``gcloud auth application-default login``, ``GOOGLE_APPLICATION_CREDENTIALS``, the metadata
server of a Cloud VM) for ``gs://``, ``AWS_*`` / ``~/.aws`` for ``s3://``. Against a local
emulator, ``STORAGE_EMULATOR_HOST`` points gcsfs at it and ``TENSORSTORE_GCS_HTTP_URL`` points
TensorStore (Orbax's array writer) at it. Failures of the store (unknown bucket, missing object,
no credentials, server unreachable) become one ``InputError`` line naming the URL
(``remote_errors``).

Requests to the object stores time out and their retries are logged (``esmjax.io.stores``).

A dataset in a bucket is streamed (``esmjax.data.source``): its small index files are copied to
the host's stage root (``esmjax.io.stage``) and its records read with byte-range requests
(``esmjax.io.ranges``).
"""

from __future__ import annotations

import contextlib
import errno
import importlib
import io
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO

from etils import epath

from esmjax.errors import InputError, WriteFailed
from esmjax.io import stores
from esmjax.io.stores import first_line, store_deadline

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
    stores.ensure_configured()
    return epath.Path(str(p))


def given(p: str | os.PathLike) -> Path | epath.Path:
    """An input path to read and to name in messages: a local one as a ``pathlib.Path`` exactly
    as the user wrote it (a relative path stays relative, so messages and reports name it as given),
    a bucket URL as an ``epath.Path`` (the same methods: ``is_file``, ``open``, ``read_text``,
    ``iterdir``, ``/``; its ``str`` is the URL)."""
    return path(p) if is_remote(p) else Path(p)


def absolute(p: str | os.PathLike) -> str:
    """``p`` for a report: a bucket URL as given, a local path made absolute (not normalised, as
    ``pathlib.Path.absolute``)."""
    return str(p) if is_remote(p) else str(Path(p).absolute())


def open_read(p: str | os.PathLike, newline: str | None = None) -> IO[str]:
    """A text file opened for reading: a local file by ``open``, a bucket object
    through epath in binary mode, decoded as UTF-8 here (epath's own text mode takes no
    ``newline``, which the ``csv`` module wants as ``""``). Call inside ``remote_errors``."""
    if not is_remote(p):
        return open(p, newline=newline)
    return io.TextIOWrapper(path(p).open("rb"), encoding="utf-8", newline=newline)


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
        raise InputError(f"{url}: no such bucket or object ({first_line(e)})") from None
    except PermissionError as e:
        msg = f"{url}: access denied, check the credentials ({first_line(e)})"
        raise InputError(msg) from None
    except TimeoutError as e:
        # fsspec's FSTimeoutError: caused by the client's own timeout (the last attempt's), or by a
        # bare TimeoutError when fsspec's deadline of the call (ESMJAX_STORE_DEADLINE) cancelled it
        cause = e.__cause__
        if cause is not None and type(cause) is not TimeoutError:
            why = first_line(cause)
        else:
            why = f"the call's deadline of {store_deadline():g} s passed, retries included"
        raise InputError(
            f"{url}: the object store did not answer in time ({why}; ESMJAX_STORE_TIMEOUT and "
            "ESMJAX_STORE_DEADLINE set the limits)"
        ) from None
    except Exception as e:  # noqa: BLE001 - auth, HTTP and connection errors of any client
        raise InputError(f"{url}: object store error ({first_line(e)})") from None


def files_under(folder: epath.Path) -> Iterator[epath.Path]:
    """Every file under ``folder`` (one listing per folder: a dataset has two levels)."""
    for child in folder.iterdir():
        if child.is_dir():
            yield from files_under(child)
        else:
            yield child


def upload(local: Path, url: str, last: str | None = None) -> None:
    """Copies the local file or folder ``local`` to ``url``, one object per file (each appears
    whole or not at all). In a folder the file named ``last`` (the one that makes the folder valid
    to readers, e.g. a dataset's metadata or an HF folder's ``config.json``) goes last, so an
    interrupted upload is never taken for a complete folder."""
    dst = path(url)
    with remote_errors(url):
        if local.is_file():
            with open(local, "rb") as fi, dst.open("wb") as fo:
                shutil.copyfileobj(fi, fo, 8 << 20)
            return
        files = sorted(
            (p for p in local.rglob("*") if p.is_file()), key=lambda p: (p.name == last, str(p))
        )
        for f in files:
            rel = f.relative_to(local).as_posix()
            target = dst / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            with open(f, "rb") as fi, target.open("wb") as fo:
                shutil.copyfileobj(fi, fo, 8 << 20)


# --------------------------------------------------------------------------------------------------
# Write failures the user can fix: a full disk, a quota, a read-only or forbidden folder
# --------------------------------------------------------------------------------------------------
# EFBIG: a file size limit (``ulimit -f``), a quota of its own.
_FULL = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
WRITE_ERRNOS = _FULL | {errno.EROFS, errno.EACCES}
# Writers that raise no OSError keep the errno in their message: TensorStore (Orbax's array writer)
# as ``[os_error_code='28']``, Rust's io::Error (safetensors) as ``(os error 28)``; ArrayRecord's
# writer and SQLite keep only the words.
_ERRNO_TEXT = re.compile(r"os_error_code='(\d+)'|\(os error (\d+)\)")
_FULL_TEXT = (os.strerror(errno.ENOSPC), os.strerror(errno.EDQUOT), "database or disk is full")


def write_failure(e: BaseException) -> tuple[int, str | None] | None:
    """``(errno, file)`` when ``e``, or an exception it was raised from or while handling (torch's
    writer raises its own error while handling the OSError), failed for one of ``WRITE_ERRNOS``;
    ``file`` is the one an OSError names, else None. None for any other error."""
    seen: set[int] = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, OSError) and cur.errno in WRITE_ERRNOS:
            return cur.errno, (os.fsdecode(cur.filename) if cur.filename else None)
        text = str(cur)
        for m in _ERRNO_TEXT.finditer(text):
            if int(m.group(1) or m.group(2)) in WRITE_ERRNOS:
                return int(m.group(1) or m.group(2)), None
        if any(t in text for t in _FULL_TEXT):
            return errno.ENOSPC, None
        cur = cur.__cause__ or cur.__context__
    return None


def write_failed(
    target: str | os.PathLike,
    code: int,
    what: str = "",
    kept: str = "nothing partial was kept",
    then: str = "",
) -> str:
    """The one line of a failed write: ``target``, ``what`` was being written, the cause, what is
    left (``kept``) and what to do (``then`` ends "... and run again")."""
    todo = {errno.EACCES: "check the permissions", errno.EROFS: "write elsewhere"}
    return (
        f"{target}: {what + ' ' if what else ''}{os.strerror(code)} ({kept}; "
        f"{todo.get(code, 'free space')} and run again{then})"
    )


def _outside(file: str, target: str | os.PathLike) -> bool:
    """Whether ``file`` lies outside the folder of the output ``target`` (where its temporary
    siblings are): another disk (``TMPDIR``), or an input that could not be read."""
    here = os.path.dirname(os.path.abspath(os.fspath(target)))
    return os.path.commonpath([os.path.abspath(file), here]) != here


@contextlib.contextmanager
def write_errors(target: str | os.PathLike, what: str = "") -> Iterator[None]:
    """Turns a failed write of the output ``target`` (``write_failure``) into one ``WriteFailed``
    line naming it (or the file an OSError names, where that lies elsewhere) and the cause
    (``write_failed``); other errors pass through untouched."""
    try:
        yield
    except InputError:
        raise
    except Exception as e:
        found = write_failure(e)
        if found is None:
            raise
        code, file = found
        where = file if file and not is_remote(target) and _outside(file, target) else target
        raise WriteFailed(write_failed(where, code, what)) from None


# --------------------------------------------------------------------------------------------------
# Outputs and inputs of the commands (embed/fold --out, export, convert, figures)
# --------------------------------------------------------------------------------------------------
def write_bytes(p: str | os.PathLike, data: bytes) -> None:
    """Writes the whole file ``p``: a bucket object in one upload (it appears whole or not at
    all), a local file through a temporary sibling renamed into place (its folder created; the
    sibling removed again when the write fails, e.g. on a full disk: ``WriteFailed``)."""
    if is_remote(p):
        with remote_errors(p):
            path(p).write_bytes(data)
        return
    local = Path(p)
    with write_errors(p):
        local.parent.mkdir(parents=True, exist_ok=True)
        tmp = local.with_name(f".{local.name}.tmp")
        try:
            tmp.write_bytes(data)
            os.replace(tmp, local)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise


def write_text(p: str | os.PathLike, text: str) -> None:
    write_bytes(p, text.encode())


def nonempty(p: str | os.PathLike) -> bool:
    """Whether ``p`` is a file or a folder with something in it (what an output refuses to
    overwrite); a bucket URL is listed (a missing bucket is an ``InputError``)."""
    with remote_errors(p):
        q = path(p)
        if is_remote(p) and not q.exists():
            import fsspec

            fs, key = fsspec.core.url_to_fs(str(q))
            bucket = fs.split_path(key)[0]  # the client's own parse of the URL
            if not fs.exists(bucket):
                raise FileNotFoundError(f"bucket {bucket}")
            return False
        return q.exists() and (q.is_file() or any(q.iterdir()))


def output_dir(p: str | os.PathLike) -> epath.Path:
    """The output folder ``p`` before per-record files are written into it with ``write_bytes``:
    a local folder is created; a bucket needs no folders, but must exist."""
    if is_remote(p):
        nonempty(p)
        return path(p)
    q = path(p)
    with write_errors(p):
        q.mkdir(parents=True, exist_ok=True)
    return q


@contextlib.contextmanager
def output_folder(p: str | os.PathLike) -> Iterator[epath.Path]:
    """``output_dir(p)`` for a block that fills it with per-record files (``write_bytes``, each
    whole or absent): a local folder this call created is removed again when the block fails
    before anything was written into it (a full disk at the first record, a wrong step), so a
    failed run leaves no empty output folder."""
    created = not is_remote(p) and not os.path.lexists(p)
    q = output_dir(p)
    try:
        yield q
    except BaseException:
        if created:
            with contextlib.suppress(OSError):  # not empty: the records written are complete
                os.rmdir(p)
        raise


def _move_into_place(tmp: Path, local: Path, final: Path) -> None:
    """Renames what a writer left in ``tmp`` next to ``final`` (one file system: no copy, no space
    needed): siblings first, ``local`` (the output a rerun checks for) last as ``final``."""
    for entry in sorted(tmp.iterdir(), key=lambda e: (e == local, e.name)):
        os.replace(entry, final if entry == local else final.parent / entry.name)


@contextlib.contextmanager
def local_output(url: str | os.PathLike, last: str | None = None) -> Iterator[Path]:
    """A local path for writers that need one (safetensors, ``torch.save``), in an empty temporary
    folder; the output appears under its name only once the block ends without an error.

    For a local ``url`` the folder is a hidden sibling of it (``.NAME.partial-*``, on the same
    file system), whose entries are renamed into place (``_move_into_place``): any sibling the
    writer put next to the output (fair-esm's ``-contact-regression.pt``) first, the output last.
    For a bucket URL it is in ``TMPDIR`` (it takes the output's size there), and its entries are
    uploaded by ``upload`` in the same order (one object per file; in a folder ``last`` last). A
    failed block leaves nothing: the temporary folder is deleted, and a write the disk refused is
    one ``WriteFailed`` line (``write_errors``)."""
    if not is_remote(url):
        final = Path(url)
        with write_errors(url):
            final.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-", dir=final.parent))
            try:
                local = tmp / final.name
                yield local
                _move_into_place(tmp, local, final)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        return
    dst = path(url)
    with tempfile.TemporaryDirectory(prefix="esmjax-out-") as tmp:
        local = Path(tmp) / dst.name
        with write_errors(f"{url} (its local copy in {tmp})"):
            yield local
        for entry in sorted(Path(tmp).iterdir(), key=lambda e: (e == local, e.name)):
            upload(entry, str(dst.parent / entry.name), last=last)


def _download(src: epath.Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    with src.open("rb") as fi, open(dst, "wb") as fo:
        shutil.copyfileobj(fi, fo, 8 << 20)


@contextlib.contextmanager
def local_input(url: str | os.PathLike, siblings: Sequence[str] = ()) -> Iterator[Path]:
    """A local copy of the file or folder ``url`` for readers that need one (the ``.pt`` reader,
    HF folders): ``url`` itself when local; a bucket file or folder is downloaded into a temporary
    folder (``TMPDIR``), with the files named in ``siblings`` next to it when they exist (fair-esm's
    ``-contact-regression.pt``), and deleted when the block ends."""
    if not is_remote(url):
        yield Path(url)
        return
    src = path(url)
    with tempfile.TemporaryDirectory(prefix="esmjax-in-") as tmp:
        local = Path(tmp) / src.name
        with remote_errors(url):
            if src.is_file():
                _download(src, local)
                for name in siblings:
                    if (src.parent / name).is_file():
                        _download(src.parent / name, local.parent / name)
            else:
                files = list(files_under(src)) if src.exists() else []
                if not files:
                    raise InputError(f"{url}: no such file or folder")
                for f in files:
                    _download(f, local / f.relative_to(src).as_posix())
        yield local


# --------------------------------------------------------------------------------------------------
# Text inputs
# --------------------------------------------------------------------------------------------------
def read_text(p: str | os.PathLike, what: str) -> str:
    """The text of the file ``p`` (a local path or a bucket URL; call inside ``remote_errors``).
    A file that is not UTF-8 text, such as a binary given by mistake, is one ``InputError`` line
    naming it and ``what`` was expected, not a ``UnicodeDecodeError`` traceback."""
    q = given(p)
    try:
        return q.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(
            f"{p}: not a text file, expected {what} (byte {e.start} is not UTF-8)"
        ) from None
