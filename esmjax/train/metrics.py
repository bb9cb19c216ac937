"""Throughput accounting (FLOPs, MFU, a windowed throughput meter with the step-time breakdown)
and the metrics sinks: ``metrics.jsonl``, TensorBoard event files and, optionally, a Weights &
Biases run.

Training FLOPs per token follow the PaLM/Megatron accounting without causal halving, since ESM-2
attention is bidirectional: ``6 * (matmul weights) + 12 * N * E * S`` (forward + backward of the
weight matmuls, and of the S x S attention scores and values), counting full padded rows as BioNeMo
does. MFU divides the achieved FLOP/s of one device by its dense bf16 peak from ``PEAK_BF16_FLOPS``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import secrets
import shutil
import socket
import struct
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax

from esmjax.config import ConfigError, ESM2Config
from esmjax.config.train import WandbConfig
from esmjax.io import paths

log = logging.getLogger(__name__)

# Dense (not 2:4-sparse) bf16 peak FLOP/s of one device, keyed by ``jax.Device.device_kind`` exactly
# as JAX reports it; a kind is looked up whole (no substring match: "NVIDIA L4" is not "NVIDIA
# L40S").
# - GPU kinds are the CUDA device name (cuDeviceGetName, the same string `nvidia-smi
#   --query-gpu=name` prints). Peaks are NVIDIA's data-sheet "BF16 Tensor Core" figures, which are
#   quoted with sparsity, halved: H100 SXM 1,979 -> 989.4, H100 PCIe 1,513 -> 756, H100/H200 NVL
#   1,671 -> 835, H200 SXM 1,979 -> 989.4, HGX B200 4.5 PFLOP/s -> 2,250, A100 (all four) 624 ->
#   312, L40S 733 -> 362, L40 362 -> 181, L4 242 -> 121 TFLOP/s. Some drivers name an H200 NVL
#   "NVIDIA H200"; set ``accelerator: NVIDIA H200 NVL`` in the config for the right peak.
# - TPU kinds are those of jax-ml/jax tests/pallas/tpu_info_test.py and openxla/xla
#   xla/python/ifrt/ir/utils.cc: v5e reports "TPU v5 lite", v5p "TPU v5" (newer runtimes may say
#   "TPU v5p"), v6e "TPU v6 lite". Peaks per chip from the Cloud TPU system-architecture pages:
#   v4 275, v5e 197, v5p 459, v6e 918 TFLOP/s.
PEAK_BF16_FLOPS: dict[str, float] = {
    "NVIDIA H100 80GB HBM3": 989.4e12,  # H100 SXM5
    "NVIDIA H100 PCIe": 756e12,
    "NVIDIA H100 NVL": 835e12,
    "NVIDIA H200": 989.4e12,  # H200 SXM
    "NVIDIA H200 NVL": 835e12,
    "NVIDIA GH200 480GB": 989.4e12,
    "NVIDIA B200": 2250e12,
    "NVIDIA A100-SXM4-40GB": 312e12,
    "NVIDIA A100-SXM4-80GB": 312e12,
    "NVIDIA A100-PCIE-40GB": 312e12,
    "NVIDIA A100 80GB PCIe": 312e12,
    "NVIDIA L40S": 362e12,
    "NVIDIA L40": 181e12,
    "NVIDIA L4": 121e12,
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,  # v5e
    "TPU v5": 459e12,  # v5p
    "TPU v5p": 459e12,
    "TPU v6 lite": 918e12,  # v6e (Trillium)
}
# Host CPU, per core: AVX-512 fp32, 2 FMA units x 16 lanes x 2 FLOP x ~2.5 GHz. A CPU device's peak
# is this times the cores it shares; MFU on a CPU is only a rough indication.
CPU_CORE_PEAK_FLOPS = 160e9

_warned_kinds: set[str] = set()


def matmul_params(cfg: ESM2Config) -> int:
    e, f, n, v = cfg.embed_dim, cfg.mlp_dim, cfg.num_layers, cfg.vocab_size
    return n * (4 * e * e + 2 * e * f) + e * e + e * v


def train_flops_per_token(cfg: ESM2Config, seq_len: int) -> float:
    return 6.0 * matmul_params(cfg) + 12.0 * cfg.num_layers * cfg.embed_dim * seq_len


def peak_flops_of_kind(kind: str) -> float | None:
    """Dense bf16 peak FLOP/s of a device kind, matched whole (case and outer spaces ignored)."""
    key = " ".join(kind.split()).casefold()
    for name, peak in PEAK_BF16_FLOPS.items():
        if name.casefold() == key:
            return peak
    return None


def device_peak_flops(accelerator: str = "", device: Any = None) -> float | None:
    """Peak FLOP/s of one device: of ``accelerator`` (a ``PEAK_BF16_FLOPS`` kind, the config's
    ``accelerator`` field) when given, else of ``device`` (default: the first local device).

    A CPU device gets the rough per-core estimate times the cores it shares. An accelerator kind not
    in the table gives None (``mfu: null`` in the metrics) and one warning per kind and process; an
    ``accelerator`` value not in the table is a config error.
    """
    if accelerator:
        peak = peak_flops_of_kind(accelerator)
        if peak is None:
            raise ConfigError(
                f"accelerator={accelerator!r} is not a device kind of the peak-FLOPs table; use "
                f"one of {', '.join(PEAK_BF16_FLOPS)} (or leave it empty to detect the device)"
            )
        return peak
    device = device if device is not None else jax.local_devices()[0]
    if device.platform == "cpu":
        return CPU_CORE_PEAK_FLOPS * (os.cpu_count() or 1) / jax.local_device_count()
    peak = peak_flops_of_kind(device.device_kind)
    if peak is None and device.device_kind not in _warned_kinds:
        _warned_kinds.add(device.device_kind)
        log.warning(
            "no peak FLOP/s known for device kind %r: mfu is logged as null (set the config's "
            "`accelerator` to a kind of esmjax.train.metrics.PEAK_BF16_FLOPS to choose one)",
            device.device_kind,
        )
    return peak


class ThroughputWindow:
    """Training throughput over one logging window: the steps since the last log line and the
    wall time they took, with evaluation (``with window.excluded(): ...``) left out.

    The caller marks every step with ``add_step(tokens, nonpad_fraction)`` and, at a log line,
    takes ``summary(...)``, which also starts the next window. Steps are dispatched asynchronously,
    so the caller must have waited for the window's last step (reading its metrics does) before
    ``summary`` and before entering ``excluded``. The window keeps checkpoint saves and data loading
    (costs of training); the first window of an invocation also holds the compilation.

    ``with window.timed(name): ...`` adds the time inside to ``name``, logged per step as
    ``<name>_seconds`` (the step-time breakdown: ``BREAKDOWN``).
    """

    def __init__(self, clock: Callable[[], float] = time.perf_counter):
        self._clock = clock
        self._start = clock()
        self._excluded = 0.0
        self.steps = 0
        self._tokens = 0
        self._nonpad_sum = 0.0
        self._parts = dict.fromkeys(BREAKDOWN, 0.0)

    @contextlib.contextmanager
    def timed(self, name: str) -> Iterator[None]:
        """Time spent inside counts towards ``name`` (one of ``BREAKDOWN``)."""
        t0 = self._clock()
        try:
            yield
        finally:
            self._parts[name] += self._clock() - t0

    def add_step(self, tokens: int, nonpad_fraction: float) -> None:
        """A step of ``tokens`` tokens (global, padding included)."""
        self.steps += 1
        self._tokens += tokens
        self._nonpad_sum += nonpad_fraction

    @contextlib.contextmanager
    def excluded(self) -> Iterator[None]:
        """Time spent inside does not count (evaluation)."""
        t0 = self._clock()
        try:
            yield
        finally:
            self._excluded += self._clock() - t0

    def summary(
        self, *, num_devices: int, flops_per_token: float | None, peak_flops: float | None
    ) -> dict[str, float | None]:
        """Throughput of the window; starts the next one. ``peak_flops`` per device (None:
        ``mfu`` is None); without ``flops_per_token`` neither FLOPs figure is known."""
        now = self._clock()
        seconds = max(now - self._start - self._excluded, 1e-9)
        steps = max(self.steps, 1)
        tps = self._tokens / seconds
        tflops = flops_per_token * tps / num_devices if flops_per_token else None
        out = {
            "tokens_per_second": tps,
            "tokens_per_second_per_device": tps / num_devices,
            "nonpad_fraction": self._nonpad_sum / steps,
            "tflops_per_device": None if tflops is None else tflops / 1e12,
            "mfu": tflops / peak_flops if tflops is not None and peak_flops else None,
            "step_seconds": seconds / steps,
            **{f"{k}_seconds": v / steps for k, v in self._parts.items()},
        }
        self._parts = dict.fromkeys(BREAKDOWN, 0.0)
        self._start, self._excluded, self.steps = now, 0.0, 0
        self._tokens, self._nonpad_sum = 0, 0.0
        return out


# Where a step's wall time goes, each logged per step as ``<name>_seconds``: getting the next batch,
# dispatching the step and waiting for its result, and inside checkpoint save calls.
BREAKDOWN = ("data_wait", "device_step", "checkpoint_wait")

# The fields of a log line that depend on the machine's speed, not on the run's numbers.
TIMING_FIELDS = (
    "tokens_per_second",
    "tokens_per_second_per_device",
    "tflops_per_device",
    "mfu",
    "step_seconds",
    *(f"{k}_seconds" for k in BREAKDOWN),
)


def _append(path: Path, data: bytes) -> None:
    """Appends ``data`` to ``path`` whole or not at all: a write the disk refuses (full, quota) is
    cut off again (truncating needs no space), so no torn line is left for a resumed run to trip
    over, and the run ends with one ``WriteFailed`` line naming the file. Unbuffered, so nothing
    is left in a buffer for a later flush to write after the cut."""
    with paths.write_errors(path), open(path, "ab", buffering=0) as f:
        size = f.seek(0, os.SEEK_END)
        try:
            view = memoryview(data)
            while view:
                view = view[f.write(view) :]
        except OSError:
            f.truncate(size)
            raise


def _record(data: bytes) -> bytes:
    """One TFRecord (the framing of TensorBoard event files): the length, its masked CRC-32C, the
    data, its masked CRC-32C, little-endian."""
    from tensorboardX.record_writer import masked_crc32c

    head = struct.pack("<Q", len(data))
    return (
        head
        + struct.pack("<I", masked_crc32c(head))
        + data
        + struct.pack("<I", masked_crc32c(data))
    )


class EventFile:
    """TensorBoard scalars in an event file of ``folder``, appended by the caller (``_append``).

    tensorboardX's ``SummaryWriter`` writes from a thread of its own and flushes again at exit: a
    full disk kills that thread with a traceback, its queue then fills and the next scalar blocks
    the run for good, and the exit prints another traceback. Written here, a refused write is one
    error line like ``metrics.jsonl``'s. The file is tensorboardX's: its name, a version record,
    and with ``purge_step`` a session start at that step, which makes TensorBoard hide the earlier
    files' points from that step on (those of a run that crashed past its last checkpoint)."""

    def __init__(self, folder: Path, purge_step: int | None = None):
        from tensorboardX.proto.event_pb2 import Event, SessionLog

        self._event = Event
        with paths.write_errors(folder):
            folder.mkdir(parents=True, exist_ok=True)
        now = time.time()
        self.path = folder / f"events.out.tfevents.{int(now)}.{socket.gethostname()}"
        first = [Event(wall_time=now, file_version="brain.Event:2")]
        if purge_step is not None:
            start = SessionLog(status=SessionLog.START)
            first.append(Event(wall_time=now, step=purge_step, session_log=start))
        self._write(first)

    def add(self, step: int, values: dict[str, float]) -> None:
        from tensorboardX.summary import scalar

        now = time.time()
        self._write(
            [self._event(wall_time=now, step=step, summary=scalar(k, v)) for k, v in values.items()]
        )

    def _write(self, events: list) -> None:
        _append(self.path, b"".join(_record(e.SerializeToString()) for e in events))


class WandbRun:
    """The log lines of a run in one Weights & Biases run, its id kept in
    ``<workdir>/wandb_run_id`` so that a resumed run (or a restart after a crash) goes on in it.

    W&B's own step must only grow, but a resumed run logs again the steps past its checkpoint: so
    every value is charted against the logged ``step`` field instead (``define_metric``), and
    nothing is dropped. W&B's files go to ``$WANDB_DIR`` when set, else to ``folder``."""

    ID_FILE = "wandb_run_id"

    def __init__(self, cfg: WandbConfig, workdir: Path, folder: Path, config: dict | None):
        import wandb

        id_path = workdir / self.ID_FILE
        with paths.remote_errors(workdir):
            run_id = id_path.read_text().strip() if id_path.exists() else ""
        if not run_id:
            run_id = secrets.token_hex(4)  # W&B's own ids are 8 characters of [0-9a-z]
            paths.write_text(id_path, run_id + "\n")  # before the run: a crash keeps the same id
        try:
            self.run = wandb.init(
                project=cfg.project,
                entity=cfg.entity or None,
                name=cfg.name or None,
                id=run_id,
                resume="allow",
                dir=os.environ.get("WANDB_DIR") or str(folder),
                config=config,
            )
        except wandb.errors.Error as e:  # no API key, an unknown entity, no network
            msg = " ".join(str(e).split())
            raise ConfigError(f"metrics.wandb: W&B refused run {run_id}: {msg}") from None
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")

    def log(self, step: int, numbers: dict[str, float]) -> None:
        self.run.log({"step": step, **numbers})

    def close(self) -> None:
        self.run.finish()


class MetricsWriter:
    """Appends JSON lines to ``W/metrics.jsonl`` and scalars to TensorBoard (process 0 only), and
    with ``wandb`` (a config's ``metrics.wandb`` with a project) logs them to W&B too.

    Both are written in the calling thread, each write whole or not at all (``_append``): a full
    disk ends the run with one line naming the file, leaves the files as they were before the
    write, and the resumed run goes on appending.

    With a bucket workdir (``gs://``, ``s3://``) both are written to a local folder and uploaded at
    every write (each log step and each evaluation): an object cannot be appended to, so the whole
    ``metrics.jsonl`` (a few hundred bytes per line) and the event files of this invocation are
    copied; the bucket is at most one log step behind a run that is killed.
    """

    def __init__(
        self,
        workdir: Path,
        resume_step: int,
        enabled: bool = True,
        wandb: WandbConfig | None = None,
        config: dict | None = None,
    ):
        self.enabled = enabled
        self.remote = workdir if enabled and paths.is_remote(workdir) else None
        self.tb = self.wandb = None
        wandb = wandb if wandb is not None and wandb.project else None
        if wandb is not None:  # on every process: a missing package stops them all, not one
            try:
                import wandb as _  # noqa: F401
            except ImportError:
                raise ConfigError(
                    "metrics.wandb.project: W&B needs the wandb package: pip install "
                    "'esmjax[wandb]'"
                ) from None
        if not enabled:
            return
        local = Path(tempfile.mkdtemp(prefix="esmjax-metrics-")) if self.remote else Path(workdir)
        self.local = local
        self.path = local / "metrics.jsonl"
        if self.remote is not None:
            with paths.remote_errors(self.remote):
                if (self.remote / "metrics.jsonl").exists():
                    self.path.write_text((self.remote / "metrics.jsonl").read_text())
        if self.path.exists():
            # drop lines past the restored step: the resumed run writes them again (the file is
            # replaced whole: a full disk keeps the old one)
            kept = [
                l
                for l in self.path.read_text().splitlines()
                if l.strip() and json.loads(l)["step"] <= resume_step
            ]
            paths.write_text(self.path, "".join(k + "\n" for k in kept))
        try:
            self.tb = EventFile(local / "tensorboard", resume_step + 1 if resume_step else None)
        except ImportError:
            self.tb = None
        self._sync()
        if wandb is not None:
            self.wandb = WandbRun(wandb, workdir, local, config)

    def _sync(self) -> None:
        if self.remote is None:
            return
        paths.upload(self.local, str(self.remote))

    def write(self, step: int, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        clean = {
            k: (None if isinstance(v, float) and not math.isfinite(v) else v)
            for k, v in values.items()
        }
        _append(self.path, (json.dumps({"step": step, **clean}) + "\n").encode())
        if self.tb is not None:
            numbers = {k: v for k, v in clean.items() if isinstance(v, (int, float))}
            self.tb.add(step, numbers)
        if self.wandb is not None:
            self.wandb.log(step, numbers)
        self._sync()

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.close()
            self.wandb = None
        if self.enabled and self.remote is not None:
            self._sync()
            shutil.rmtree(self.local, ignore_errors=True)
