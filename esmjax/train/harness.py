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
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
from jax.sharding import Mesh
from tqdm import tqdm

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
    step, preempted, last = start, False, {}
    signals.step = step
    try:
        if step < n and not drive.stopped():
            batch, tokens, nonpad = drive.batch(step)
        while step < n and not drive.stopped():
            step += 1
            signals.step = step
            state, m, agreed = drive.step(state, batch, flags[signals.flag])
            agreed.copy_to_host_async()
            position = drive.position()
            window.add_step(tokens, nonpad)
            if step < n:  # prepared while the step runs
                batch, tokens, nonpad = drive.batch(step)
            bar.update(1)
            # waits for this step; the same values on every process
            preempted = read_agreed(agreed, step, schedule.nonfinite, ckptr.latest_step)
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
                ckptr.save(state, drive.meta(step, position, due and preempted))
            if stop and not drive.stopped():
                log.warning("stopping at step %d: checkpoint written; run again to resume", step)
                break
    finally:
        bar.close()
        signals.restore()
        ckptr.close()
    return Outcome(state, step, preempted, last)
