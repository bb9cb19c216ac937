"""Released weights by name: fair-esm names (``esm2_t33_650M_UR50D``, downloaded from fair-esm's
public URLs into torch hub's cache, so files fair-esm already fetched are reused) and HF hub ids
(``facebook/esmfold_v1``, through ``huggingface_hub``, which honours ``HF_HOME``, ``HF_ENDPOINT``
and ``HF_HUB_OFFLINE``); ``convert.checkpoint_folder`` converts one once into
esmjax's model cache (``cached_checkpoint``)."""

from __future__ import annotations

import contextlib
import fcntl
import http.client
import logging
import os
import re
import sys
import urllib.error
import urllib.request
from pathlib import Path

from esmjax.errors import InputError
from esmjax.io import paths
from esmjax.io.stores import first_line

FAIR_ESM_NAMES = (
    "esm2_t6_8M_UR50D",
    "esm2_t12_35M_UR50D",
    "esm2_t30_150M_UR50D",
    "esm2_t33_650M_UR50D",
    "esm2_t36_3B_UR50D",
    "esm2_t48_15B_UR50D",
)
FAIR_ESM_URL = "https://dl.fbaipublicfiles.com/fair-esm"  # ESMJAX_FAIR_ESM_URL replaces it
_HF_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_CHUNK = 1 << 20
_TIMEOUT_S = 60


def is_name(src: str | os.PathLike) -> bool:
    """A fair-esm name or an HF hub id that is not also an existing local path or a bucket URL."""
    s = str(src)
    if paths.is_remote(s) or Path(s).exists():
        return False
    if s.endswith((".pt", ".pth")):  # a missing weights file, not a repository
        return False
    return s in FAIR_ESM_NAMES or _HF_ID.fullmatch(s) is not None


def source(name: str) -> Path:
    """The local file (fair-esm ``.pt``, its contact regression beside it) or folder (an HF
    snapshot) of ``name`` (``is_name``), downloaded first where it is not cached."""
    return fair_esm_file(name) if name in FAIR_ESM_NAMES else hf_snapshot(name)


def models_dir() -> Path:
    """Where converted named models live: ``$ESMJAX_HOME/models`` (default
    ``~/.cache/esmjax/models``)."""
    home = os.environ.get("ESMJAX_HOME") or Path(_xdg_cache(), "esmjax")
    return Path(home).expanduser() / "models"


def cached_checkpoint(name: str) -> Path:
    """The esmjax checkpoint folder that ``name`` converts into (``/`` of an HF id as ``--``)."""
    return models_dir() / name.replace("/", "--")


# --------------------------------------------------------------------------------------------------
# fair-esm: plain HTTPS files, resumed with a Range request
# --------------------------------------------------------------------------------------------------
def torch_hub_checkpoints() -> Path:
    """torch hub's download folder (``$TORCH_HOME/hub/checkpoints``), where fair-esm caches."""
    torch_home = os.environ.get("TORCH_HOME") or Path(_xdg_cache(), "torch")
    return Path(torch_home).expanduser() / "hub" / "checkpoints"


def fair_esm_file(name: str) -> Path:
    """``<name>.pt`` and ``<name>-contact-regression.pt`` in torch hub's cache, downloaded from
    fair-esm's URL layout (``models/``, ``regression/``) where missing."""
    base = os.environ.get("ESMJAX_FAIR_ESM_URL", FAIR_ESM_URL).rstrip("/")
    folder = torch_hub_checkpoints()
    model = folder / f"{name}.pt"
    regression = folder / f"{name}-contact-regression.pt"
    download(f"{base}/models/{model.name}", model)
    download(f"{base}/regression/{regression.name}", regression)
    return model


def download(url: str, dest: Path) -> None:
    """``url`` to ``dest`` unless it is there: into ``<dest>.part`` (resumed from its length with
    an HTTP Range request), its size checked against the server's, then renamed into place. One
    process of the machine at a time: the others wait and then find the file."""
    if dest.exists():
        return
    dest.parent.mkdir(parents=True, exist_ok=True)
    with exclusive(dest.with_name(dest.name + ".lock")):
        if not dest.exists():
            _download(url, dest)


@contextlib.contextmanager
def exclusive(lock: Path):
    """Held by one process of this machine at a time (``flock``): the processes of a job on one
    host start together and would otherwise append to the same ``.part`` file or convert into the
    same folder. The lock file stays; it is empty."""
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _download(url: str, dest: Path) -> None:
    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        with urllib.request.urlopen(request, timeout=_TIMEOUT_S) as response:
            total = _receive(response, part, have)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # the range starts at or past the end of the file
            if e.headers.get("Content-Range") == f"bytes */{have}":  # whole: stopped before rename
                return part.replace(dest)
            part.unlink()  # longer than the file: another file's bytes
            return _download(url, dest)
        raise InputError(f"cannot download {url}: HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as e:  # IncompleteRead too
        reason = getattr(e, "reason", None) or e
        raise InputError(
            f"cannot download {url} ({reason}); fetch it by hand into {dest} "
            "(or set ESMJAX_FAIR_ESM_URL to a mirror); a rerun resumes a partial download"
        ) from None
    got = part.stat().st_size
    if total is not None and got != total:
        raise InputError(f"{url}: got {got} of {total} bytes; run again to resume")
    part.replace(dest)


def _receive(response, part: Path, have: int) -> int | None:
    """Appends the body to ``part`` (from scratch where the server ignored the range), with a
    progress bar on stderr; returns the file's whole size where the server says it."""
    length = response.headers.get("Content-Length")
    if response.status == 206:
        total = response.headers.get("Content-Range", "").rpartition("/")[2]
        total = int(total) if total.isdigit() else None
    else:
        have = 0
        total = int(length) if length is not None else None
    from tqdm import tqdm

    with (
        open(part, "ab" if have else "wb") as f,
        tqdm(
            total=total,
            initial=have,
            unit="B",
            unit_scale=True,
            desc=part.name[:-5],
            file=sys.stderr,
            disable=None,  # a bar on a terminal only, not \r-lines in a job's log
        ) as bar,
    ):
        while chunk := response.read(_CHUNK):
            f.write(chunk)
            bar.update(len(chunk))
    return total


# --------------------------------------------------------------------------------------------------
# HF hub ids
# --------------------------------------------------------------------------------------------------
_HF_WEIGHTS = (["*.safetensors", "*.safetensors.index.json"], ["pytorch_model.bin*"])


def hf_snapshot(repo_id: str) -> Path:
    """The snapshot folder of ``repo_id``'s config and weights (safetensors where the repository
    has them, else ``pytorch_model.bin``) in huggingface_hub's cache."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise InputError(
            f"{repo_id}: HF hub ids need huggingface_hub (pip install 'esmjax[hub]')"
        ) from None
    logging.getLogger("httpx2").setLevel(logging.WARNING)  # not a line per request
    for weights in _HF_WEIGHTS:
        try:
            folder = Path(snapshot_download(repo_id, allow_patterns=["config.json", *weights]))
        except Exception as e:  # huggingface_hub's and httpx's errors: one line, no traceback
            raise InputError(_hf_error(repo_id, e)) from None
        if any(folder.glob("*.safetensors")) or (folder / "pytorch_model.bin").exists():
            return folder
    raise InputError(f"{repo_id}: no *.safetensors or pytorch_model.bin in the repository")


def _hf_error(repo_id: str, e: Exception) -> str:
    from huggingface_hub import constants

    url = f"{constants.ENDPOINT}/{repo_id}"
    if type(e).__name__ != "LocalEntryNotFoundError":  # not found, gated, a hub error
        return (
            f"{repo_id} is no local path; cannot download {url}: {first_line(e)} (a private or "
            "gated repository needs `hf auth login` or HF_TOKEN)"
        )
    why = first_line(e.__cause__) if e.__cause__ is not None else "HF_HUB_OFFLINE is set"
    return (
        f"{repo_id} is no local path, nor in the HF cache ({constants.HF_HUB_CACHE}); cannot "
        f"download {url} ({why}): run `hf download {repo_id}` where the hub is reachable (or set "
        "HF_ENDPOINT to a mirror)"
    )


def _xdg_cache() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
