"""The training harness that pretraining (``esmjax.train.loop``) and fine-tuning
(``esmjax.train.finetune``) both drive: the workdir's config, and the loop of steps with its
logging, throughput, evaluation, checkpoints and stops. A run passes in what differs (a
:class:`Drive`: its step, its batches, its evaluation, what its checkpoints hold).

Each iteration dispatches step n, notes the data position after its batch, prepares the batch of
step n + 1 while step n runs, then reads step n's agreed stop flag (a scalar already on its way to
the host): the host waits for each step, and the device idles only while the next, already
prepared, step is dispatched. Metrics are fetched only every ``log_every`` steps. SIGTERM or SIGINT
(preemption) saves the current step and stops within one step, on every process
(``esmjax.train.preemption``); an evaluation due at that step is left to the resumed run.

Log lines carry the step-time breakdown (``esmjax.train.metrics.BREAKDOWN``: getting batches,
dispatching and waiting for steps, checkpoint saves); a config's ``profile`` section traces a
window of steps with ``jax.profiler`` (:class:`Tracer`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
from jax.sharding import Mesh
from tqdm import tqdm

from esmjax.config.train import ProfileConfig
from esmjax.io import paths
from esmjax.train import metrics as tm
from esmjax.train.checkpoints import TrainCheckpointer
from esmjax.train.preemption import StopSignal, flag_inputs, read_agreed

log = logging.getLogger("esmjax.train")


def saved_config(workdir: Path) -> dict | None:
    """The config a run in ``workdir`` started with, or None for a new workdir."""
    path = workdir / "config.json"
    with paths.remote_errors(workdir):
        found = path.exists()
    return json.loads(path.read_text()) if found else None


def write_config(workdir: Path, config: dict) -> None:
    """Written once the run has started (data opened, state created or restored), so bad input
    leaves nothing; replaced whole (a renamed temporary sibling), so a full disk keeps the old one
    readable."""
    if jax.process_index() == 0:
        with paths.remote_errors(workdir):
            workdir.mkdir(parents=True, exist_ok=True)
        paths.write_text(workdir / "config.json", json.dumps(config, indent=2))


@dataclasses.dataclass(frozen=True)
class Schedule:
    """When the harness logs, saves and stops."""

    num_steps: int
    log_every: int
    save_every: int
    nonfinite: str  # "stop" | "skip": esmjax.train.preemption.read_agreed
    stop_after: int | None = None  # leave (with a checkpoint) after this many steps of this call
    desc: str = "train"  # the progress bar's name; progress=False: no bar
    progress: bool = True
    profile: ProfileConfig | None = None  # the steps traced into profile_dir
    profile_dir: Path | None = None


class Tracer:
    """A ``jax.profiler`` trace of the steps of ``cfg`` (those of this invocation: a run resumed
    inside the window traces the rest of it) into ``folder``, on process 0 or on all (each in
    ``folder/process<i>``: the trace files are named by host, which processes may share). The
    trace (an XSpace for TensorBoard's profile plugin, and a Perfetto trace) is written at its
    last step or when the loop ends; a bucket folder gets it uploaded from a local one."""

    def __init__(self, cfg: ProfileConfig | None, folder: Path | None):
        mine = cfg is not None and (cfg.processes == "all" or jax.process_index() == 0)
        self.on = mine and cfg.num_steps > 0 and folder is not None
        if self.on:
            self.first, self.last = cfg.start_step, cfg.start_step + cfg.num_steps - 1
            if cfg.processes == "all":
                folder = folder / f"process{jax.process_index()}"
        self.folder, self.local, self.tracing = folder, None, False

    def before(self, step: int) -> None:
        """Called before step ``step`` is dispatched."""
        if self.on and not self.tracing and self.first <= step <= self.last:
            remote = paths.is_remote(self.folder)
            self.local = Path(tempfile.mkdtemp(prefix="esmjax-profile-")) if remote else None
            target = self.local or Path(self.folder)
            with paths.write_errors(target):
                target.mkdir(parents=True, exist_ok=True)
            jax.profiler.start_trace(str(target), create_perfetto_trace=True)
            self.tracing = True
            log.info("profiling steps %d to %d into %s", step, self.last, self.folder)

    def after(self, step: int) -> None:
        """Called once step ``step``'s result is on the host."""
        if self.tracing and step >= self.last:
            self.stop()

    def stop(self) -> None:
        if not self.tracing:
            return
        self.tracing = False
        jax.profiler.stop_trace()
        if self.local is not None:
            paths.upload(self.local, str(self.folder))
            shutil.rmtree(self.local, ignore_errors=True)


@dataclasses.dataclass
class Drive:
    """What a run gives the harness.

    ``step(state, batch, flags) -> (state, metrics, agreed)``: jitted, wrapped by
    ``preemption.with_stop_flag``. ``batch(i) -> (batch, tokens, nonpad)``: the batch of 0-based
    step ``i`` on the mesh, its token count (padding included) and non-padding fraction.
    ``position()``: the data position after the last batch taken (stored with a checkpoint).
    ``evaluate(state, step)``: the evaluation of a step where ``eval_due(step)``; it writes its
    own metrics. ``meta(step, position, pending) -> dict``: a checkpoint's metadata, ``pending``
    when the step's evaluation was skipped to save in time. ``stopped()``: an early stop.
    ``postfix(metrics)``: the progress bar's fields of a log line. ``flops_per_token`` and
    ``peak_flops`` (per device) give the log lines' FLOPs and MFU where known.
    """

    step: Callable
    batch: Callable[[int], tuple[dict, int, float]]
    evaluate: Callable[[Any, int], None]
    eval_due: Callable[[int], bool]
    meta: Callable[[int, Any, bool], dict]
    postfix: Callable[[dict], dict]
    position: Callable[[], Any] = lambda: None
    stopped: Callable[[], bool] = lambda: False
    flops_per_token: float | None = None
    peak_flops: float | None = None


@dataclasses.dataclass(frozen=True)
class Outcome:
    state: Any
    step: int
    preempted: bool
    last: dict  # the metrics of the last log line


def run_steps(
    drive: Drive,
    state: Any,
    start: int,
    schedule: Schedule,
    mesh: Mesh,
    ckptr: TrainCheckpointer,
    writer: tm.MetricsWriter,
) -> Outcome:
    """Steps ``start + 1 ..`` to ``schedule.num_steps``, an early stop, a signal or
    ``stop_after``; every step that ends the loop is saved. Closes ``ckptr``."""
    n = schedule.num_steps
    bar = tqdm(
        total=n,
        initial=start,
        desc=schedule.desc,
        unit="step",
        file=sys.stderr,
        disable=not schedule.progress or jax.process_index() != 0,
        dynamic_ncols=True,
    )
    flags = flag_inputs(mesh)
    window = tm.ThroughputWindow()  # steps and time since the last log line, evaluation excluded
    signals = StopSignal()
    tracer = Tracer(schedule.profile, schedule.profile_dir)
    step, preempted, last = start, False, {}
    signals.step = step
    try:
        if step < n and not drive.stopped():
            with window.timed("data_wait"):
                batch, tokens, nonpad = drive.batch(step)
        while step < n and not drive.stopped():
            step += 1
            signals.step = step
            with window.excluded():  # starting and writing a trace is no cost of training
                tracer.before(step)
            with window.timed("device_step"):
                state, m, agreed = drive.step(state, batch, flags[signals.flag])
                agreed.copy_to_host_async()
            position = drive.position()
            window.add_step(tokens, nonpad)
            if step < n:  # prepared while the step runs
                with window.timed("data_wait"):
                    batch, tokens, nonpad = drive.batch(step)
            bar.update(1)
            # waits for this step; the same values on every process
            with window.timed("device_step"):
                preempted = read_agreed(agreed, step, schedule.nonfinite, ckptr.latest_step)
            with window.excluded():
                tracer.after(step)
            if step % schedule.log_every == 0 or step == n:
                m = {k: float(v) for k, v in jax.device_get(m).items()}
                m.update(
                    window.summary(
                        num_devices=mesh.size,
                        flops_per_token=drive.flops_per_token,
                        peak_flops=drive.peak_flops,
                    )
                )
                writer.write(step, m)
                bar.set_postfix(drive.postfix(m))
                last = m
            due = drive.eval_due(step)
            # On preemption the checkpoint comes first: the evaluation could outlast the grace
            # period.
            if due and not preempted:
                with window.excluded():
                    drive.evaluate(state, step)
            stop = preempted or drive.stopped()
            if schedule.stop_after is not None and step - start >= schedule.stop_after:
                stop = True
            if step % schedule.save_every == 0 or step == n or stop:
                with window.timed("checkpoint_wait"):
                    ckptr.save(state, drive.meta(step, position, due and preempted))
            if stop and not drive.stopped():
                log.warning("stopping at step %d: checkpoint written; run again to resume", step)
                break
    finally:
        tracer.stop()
        bar.close()
        signals.restore()
        ckptr.close()
    return Outcome(state, step, preempted, last)
