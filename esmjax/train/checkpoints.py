"""Training checkpoints: asynchronous Orbax saves of parameters, optimizer state and run metadata.

Each step folder holds three items: ``params`` (the model's variables, readable by
``esmjax.io.checkpoint.load_model`` and every other command), ``opt_state`` and ``meta`` (JSON:
step, data-iterator state, the resolved config and its hash; the step itself consumes no random
numbers, since ESM-2 has no dropout, so the data iterator's state is the run's whole random state).
Orbax writes a step into a temporary folder and renames it when every process has finished, so a
step that was not completely written is never listed; a listed step whose files are damaged is
skipped with a warning on restore (``esmjax.io.checkpoint``). Retention: the last ``keep`` steps
plus every ``keep_every``-th.

An asynchronous save is waited for at the next save and at the end, at most
``ESMJAX_CHECKPOINT_TIMEOUT`` seconds (default 1800): a store that went away mid-run (TensorStore
retries for about a quarter of an hour) ends the run with one ``StalledWrite`` line instead of a
hang, and a save that failed ends it with its error in one line; the next run resumes from the
last complete step.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from esmjax.config import CheckpointConfig
from esmjax.errors import InputError, StalledWrite
from esmjax.io import checkpoint as ckpt
from esmjax.io import paths
from esmjax.train.state import TrainState

log = logging.getLogger(__name__)

ITEMS = ("params", "opt_state", "meta")


class TrainCheckpointer:
    def __init__(self, workdir: str | Path, cfg: CheckpointConfig):
        self.cfg = cfg
        self.workdir = workdir
        self.pending: int | None = None  # the step of the last save started
        self.timeout = float(os.environ.get("ESMJAX_CHECKPOINT_TIMEOUT", "1800"))
        self.mngr = ckpt.manager(
            workdir,
            item_names=ITEMS,
            read_only=False,
            max_to_keep=cfg.keep,
            keep_period=cfg.keep_every or None,
            enable_async_checkpointing=cfg.async_save,
        )

    def latest_step(self) -> int | None:
        return self.mngr.latest_step()

    def save(self, state: TrainState, meta: dict[str, Any]) -> None:
        """Starts saving ``state`` at its step (returns before the write finishes when
        asynchronous)."""
        step = int(state.step)
        self.wait()
        self.pending = step
        try:
            self.mngr.save(
                step,
                args=ocp.args.Composite(
                    params=ocp.args.StandardSave(state.variables),
                    opt_state=ocp.args.StandardSave(state.opt_state),
                    meta=ocp.args.JsonSave({"step": step, **meta}),
                ),
                force=True,
            )
        except Exception as e:  # a synchronous save, or its start, refused by the disk
            self._refused(e)
            raise

    def restore(self, target: TrainState) -> tuple[TrainState, dict[str, Any]] | None:
        """The latest readable step restored into ``target``'s shardings, or None when there is
        none."""
        if not self.mngr.all_steps():
            return None

        def args():
            return ocp.args.Composite(
                params=ocp.args.StandardRestore(target.variables),
                opt_state=ocp.args.StandardRestore(target.opt_state),
                meta=ocp.args.JsonRestore(),
            )

        step, restored = ckpt.restore_latest(self.mngr, None, args)
        # the newer steps restore_latest passed over: the resumed run writes them anew
        ckpt.set_aside(self.mngr, [s for s in self.mngr.all_steps() if s > step])
        state = TrainState(
            step=target.step, variables=restored["params"], opt_state=restored["opt_state"]
        )
        meta = dict(restored["meta"])
        state.step = jax.device_put(jnp.asarray(meta["step"], jnp.int32), target.step.sharding)
        return state, meta

    def wait(self) -> None:
        """Until the last save is complete; a save still running after ``timeout`` seconds, or
        one that failed to write to a bucket, is a ``StalledWrite`` (one line)."""
        deadline = time.monotonic() + self.timeout
        while self.mngr.is_saving_in_progress():
            if time.monotonic() > deadline:
                raise StalledWrite(
                    f"{self.workdir}: checkpoint step {self.pending} still not written after "
                    f"{self.timeout:.0f} s (is the store reachable? ESMJAX_CHECKPOINT_TIMEOUT sets "
                    "the wait); run again to resume from the last complete step"
                )
            time.sleep(0.1)
        try:
            with paths.remote_errors(self.workdir):
                self.mngr.wait_until_finished()
        except InputError as e:  # a bucket write failed; the save's other threads may linger
            raise StalledWrite(f"{e}; run again to resume from the last complete step") from None
        except Exception as e:
            self._refused(e)
            raise

    def _refused(self, e: Exception) -> None:
        """A save the disk refused (full, a quota, read-only: ``paths.write_failure``; TensorStore
        words it in a ValueError) as one line naming the workdir. Orbax left the step in its
        temporary folder, which is never listed (and is replaced when the step is saved again), so
        the last complete step is intact and the next run resumes from it. A ``StalledWrite``: the
        CLI does not wait for the failed save's writer threads, which linger."""
        found = paths.write_failure(e)
        if found is not None:
            what = f"checkpoint step {self.pending} not written:"
            kept = "the last complete checkpoint is intact"
            line = paths.write_failed(self.workdir, found[0], what, kept, " to resume from it")
            raise StalledWrite(line) from None

    def close(self) -> None:
        self.wait()
        self.mngr.close()
