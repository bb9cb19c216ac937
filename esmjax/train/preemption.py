"""Preemption: SIGTERM or SIGINT -> a checkpoint of the current step and an exit with
:data:`EXIT_PREEMPTED` (75), within one step, on every process, whatever ``log_every`` is.

The exit status is the contract with the launchers: 0 means the run is finished (or stopped where
``--stop-after`` asked), 75 means "stopped with a checkpoint, not finished: start me again", and
anything else is an error. A scheduler that sees 0 from every process considers the job done, so a
preempted run must not exit 0: ``launch/slurm.sbatch`` requeues the job on 75, the Kubernetes
JobSets restart on it (a pod failure policy), and ``launch/tpu_pod.sh`` starts the command again.
75 is ``EX_TEMPFAIL`` of sysexits.h: a temporary failure, the invitation to retry.

Schedulers give little notice: Slurm ``--signal=TERM@300`` 300 s, a Kubernetes grace period 600 s,
a Cloud TPU spot VM about 30 s; a large step can take several seconds, and ``log_every`` steps
several minutes. So the signal is looked at on every step, and the processes must agree on the
step to stop at (each one saves its shards of the same checkpoint) even when only some of them were
signalled, without a host round trip per step:

1. The signal handler only sets this process's flag (:class:`StopSignal`).
2. The flag goes into the jitted train step as one more input: a global int32 array with one
   element per device of the mesh, every device of a process holding that process's flag
   (:func:`flag_inputs`; the two possible arrays are built once, so a step costs nothing on the
   host). :func:`with_stop_flag` reduces it (max) inside the compiled step, an all-reduce of one
   word per device that XLA schedules with the step's own collectives, and returns the agreed flag
   as a replicated scalar next to the metrics.
3. The loop starts the copy of that scalar to the host as soon as the step is dispatched
   (``copy_to_host_async``), prepares the next batch while the step runs, then reads it; when set,
   it saves the step just finished (with the data-iterator position after that step's batch, so a
   resumed run continues exactly) and leaves. Every process reads the same value after the same
   step, so they all save the same step.

Both loops work this way: pretraining (``esmjax/train/loop.py``) and fine-tuning
(``esmjax/train/finetune.py``, whose batch order is a function of the step, so its checkpoint
needs no iterator position). Work that could outlast the grace period is left to the resumed run:
pretraining skips a due evaluation; fine-tuning marks a skipped validation as pending in the
checkpoint and runs it first when it resumes, since validation decides the best step and early
stopping.

A signal that arrives while step ``n`` is being dispatched or run is carried by step ``n`` or
``n + 1``, and the run saves and exits right after that step: within one step of where the signal
found it. The price is that the host waits for each step to finish before dispatching the next (it
no longer queues several steps ahead); the device idles only for the dispatch of the next step,
whose batch is already prepared (measured in BENCHMARKS.md, "Preemption check").

A second SIGINT (Ctrl-C twice) aborts at once with ``KeyboardInterrupt``, no checkpoint. The
handlers are installed just before the first step: a signal during start-up (restore, data) ends
the process as usual, with nothing new to save; one during the first step's compilation is honoured
after that step.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from esmjax.errors import NonFiniteLoss

log = logging.getLogger("esmjax.train")

SIGNALS = (signal.SIGTERM, signal.SIGINT)
EXIT_PREEMPTED = 75


class StopSignal:
    """Installs handlers for SIGTERM and SIGINT that set :attr:`flag`; :meth:`restore` puts the
    previous handlers back. ``step`` is kept up to date by the training loop (the step being
    dispatched or last dispatched) so the log line says where the signal found the run."""

    def __init__(self, signals: tuple[int, ...] = SIGNALS) -> None:
        self.flag = False
        self.step = 0
        self._old = {s: signal.signal(s, self._handle) for s in signals}

    def _handle(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if self.flag:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            log.warning("%s received again: already stopping", name)
            return
        self.flag = True
        log.warning(
            "%s received at step %d: saving a checkpoint within one step, then exiting",
            name,
            self.step,
        )

    def restore(self) -> None:
        for s, old in self._old.items():
            signal.signal(s, old)


def flag_sharding(mesh: Mesh) -> NamedSharding:
    """One element per device: the flag vector [D] split over every mesh axis."""
    return NamedSharding(mesh, P(tuple(mesh.axis_names)))


def flag_inputs(mesh: Mesh) -> tuple[jax.Array, jax.Array]:
    """The two global flag arrays [D] (this process's devices holding 0, resp. 1), built once.

    Each process builds them from its addressable devices only; the other processes' elements are
    theirs, so the step sees every process's own flag."""
    sharding = flag_sharding(mesh)
    n = mesh.devices.size

    def build(value: int) -> jax.Array:
        shards = [
            jax.device_put(np.full((1,), value, np.int32), d)
            for d in sharding.addressable_devices_indices_map((n,))
        ]
        return jax.make_array_from_single_device_arrays((n,), sharding, shards)

    return build(0), build(1)


def with_stop_flag(train_step: Callable) -> Callable:
    """``train_step(state, *inputs) -> (state, metrics)`` to
    ``step(state, *inputs, flags) -> (state, metrics, agreed)``: ``flags`` [D] int32 from
    :func:`flag_inputs` (always the last argument); ``agreed`` [2] int32, replicated: the stop
    flag's max over every device (so over every process), and whether the step's loss was not
    finite. Pretraining's step takes ``(state, batch)``, fine-tuning's ``(state, frozen, batch)``;
    both loops use this one wrapper, and read ``agreed`` after every step (:func:`read_agreed`),
    so a NaN is caught at the step it appears, before that step is saved."""

    def step(state, *args):
        *inputs, flags = args
        state, metrics = train_step(state, *inputs)
        bad = (~jnp.isfinite(metrics["loss"])).astype(jnp.int32)
        return state, metrics, jnp.stack([jnp.max(flags), bad])

    return step


def read_agreed(
    agreed: jax.Array, step: int, nonfinite: str, last_saved: Callable[[], int | None]
) -> bool:
    """Whether to stop after ``step`` (a signal); waits for the step. A non-finite loss raises
    ``NonFiniteLoss`` with ``nonfinite: stop`` (before the loop saves this step, so the last
    checkpoint stays the last good state), and is one warning line with ``skip`` (the step left
    the parameters and the optimizer state as they were). Every process reads the same values,
    so all of them stop, or go on, together."""
    stop, bad = (int(v) for v in np.asarray(agreed))
    if bad:
        if nonfinite != "skip":
            saved = last_saved()
            kept = "no checkpoint yet" if saved is None else f"step {saved}"
            raise NonFiniteLoss(
                f"step {step}: the loss is not finite; stopped before saving it (the last "
                f"checkpoint, {kept}, is untouched); lower optim.peak_lr, or set nonfinite: skip "
                "to skip such steps"
            )
        log.warning("step %d: the loss is not finite; its update was skipped", step)
    return bool(stop)
