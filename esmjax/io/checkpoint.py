"""Checkpoint folders: Orbax ``CheckpointManager`` steps plus the resolved config as JSON.

One layout serves converted ESM-2 and ESMFold weights and training runs::

    DIR/config.json              {"model": {...}, ...}  (a training run: its whole TrainConfig;
                                 ESMFold: "model" is the ESM-2 stem, plus an "esmfold" section)
    DIR/checkpoints/<step>/params            model variables (Orbax, sharded, restorable
                                             onto any mesh)
    DIR/checkpoints/<step>/opt_state, meta   (training runs only)

``open`` reads a folder's ``config.json`` once into a ``Checkpoint`` (its kind, its model configs,
the step to restore, the abstract model), which every reader takes instead of the path.

A converted checkpoint is step 0 with only ``params``. Restoring takes abstract targets with
shardings, so a checkpoint saved on one mesh or process count restores onto another (Orbax
reshards). A step that was never committed is invisible to Orbax; a committed step whose files are
damaged is skipped with a warning and the previous step is used.

``DIR`` may be a bucket URL (``gs://``; see ``esmjax.io.paths``): Orbax writes the arrays through
TensorStore's own GCS driver from every process, and its commit (a step is listed only once its
``commit_success.txt`` is written, after every process has finished) replaces the rename of a
local folder. A converted checkpoint written to a bucket gets its ``config.json`` last, so a
folder whose upload was cut short is not a checkpoint. ``ESMJAX_CHECKPOINT_OCDBT=0`` writes each
array as its own zarr folder instead of Orbax's default OCDBT database (whose manifest is updated
with conditional writes that gcp-storage-emulator cannot serve; README "Object storage").
"""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from jax.experimental import multihost_utils

from esmjax.config import ConfigError, ESM2Config, from_dict, to_dict
from esmjax.errors import InputError
from esmjax.io import paths
from esmjax.models.esm2 import ESM2
from esmjax.models.esm2 import abstract_model as esm2_abstract
from esmjax.models.esmfold.config import ESMFoldConfig, from_json, to_json
from esmjax.models.esmfold.model import ESMFold
from esmjax.models.esmfold.model import abstract_model as esmfold_abstract
from esmjax.parallel import sharding as shd

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
STEPS_DIR = "checkpoints"
ESMFOLD_SECTION = "esmfold"  # config.json section that makes a folder an ESMFold checkpoint


class CheckpointError(InputError):
    """No usable checkpoint at the given place or step."""


# What a folder holds, by the sections each writer puts in its config.json: a fine-tuning run has
# "finetune" (esmjax.inference.task.Setup), an ESMFold checkpoint "esmfold", a pretraining run its
# whole TrainConfig ("data", "optim", ...), a converted ESM-2 checkpoint only "model".
CONVERTED, ESMFOLD, TRAIN, FINETUNE = "converted", "esmfold", "train", "finetune"
_PRETRAINING_KEYS = ("data", "optim", "num_steps", "checkpoint")
HOLDS = {
    CONVERTED: "a converted checkpoint",
    ESMFOLD: "an ESMFold checkpoint",
    TRAIN: "a pretraining run",
    FINETUNE: "a fine-tuning run",
}


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint folder or run opened once (``open``): its ``config.json`` read a single time,
    the configs parsed from it, the step and the abstract models built on first use. Every reader
    of a checkpoint (evaluations and their reports, embed, fold, predict, export) takes one. Two
    are equal when they name the same folder and step."""

    path: str
    config: dict[str, Any] = field(compare=False, repr=False)
    requested_step: int | None = None
    _abstract: dict[tuple, tuple[nnx.GraphDef, nnx.State]] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    @property
    def kind(self) -> str:
        """``CONVERTED`` (ESM-2 weights), ``ESMFOLD``, ``TRAIN`` or ``FINETUNE``."""
        if FINETUNE in self.config:
            return FINETUNE
        if ESMFOLD_SECTION in self.config:
            return ESMFOLD
        return TRAIN if any(k in self.config for k in _PRETRAINING_KEYS) else CONVERTED

    @property
    def holds(self) -> str:
        """What the folder holds, in words."""
        return HOLDS[self.kind]

    @functools.cached_property
    def model_config(self) -> ESM2Config:
        """The ESM-2 config (for an ESMFold folder: its language-model stem)."""
        where = Path(self.path) / CONFIG_FILE
        if not isinstance(self.config.get("model"), dict):
            raise CheckpointError(f"{where}: no 'model' section")
        try:
            return from_dict(ESM2Config, self.config["model"], "model")
        except ConfigError as e:
            raise CheckpointError(f"{where}: {e}") from None

    @functools.cached_property
    def esmfold_config(self) -> ESMFoldConfig:
        if ESMFOLD_SECTION not in self.config:
            raise CheckpointError(
                f"{self.path}: an ESM-2 checkpoint, not ESMFold (config.json has no "
                f"'{ESMFOLD_SECTION}')"
            )
        return from_json(self.config["model"], self.config[ESMFOLD_SECTION])

    @functools.cached_property
    def step(self) -> int:
        """``requested_step``, or else the newest complete step. Orbax lists steps with JAX: read
        it after the distributed start-up."""
        if self.requested_step is not None:
            return self.requested_step
        mngr = manager(self.path)
        try:
            with paths.remote_errors(self.path):
                steps = list(mngr.all_steps())
        finally:
            mngr.close()
        if not steps:
            raise CheckpointError(f"{self.path}: no complete checkpoint")
        return max(steps)

    def checked(self, *, esmfold: bool = False) -> Checkpoint:
        """This checkpoint, once its ESM-2 config (``esmfold``: its ESMFold config) is read
        without error: a broken or other folder is one line before any work."""
        _ = self.esmfold_config if esmfold else self.model_config
        return self

    def pinned(self) -> Checkpoint:
        """This checkpoint with ``requested_step`` set to ``step``: restores made one after
        another (``evaluate all``, a contact-head fit) then read the same step."""
        if self.requested_step is not None:
            return self
        out = Checkpoint(self.path, self.config, self.step)
        out._abstract.update(self._abstract)
        return out

    def abstract(
        self, dtype: str | None = None, *, esmfold: bool = False
    ) -> tuple[nnx.GraphDef, nnx.State]:
        """The abstract ESM-2 (``esmfold``: the ESMFold) with compute ``dtype`` (default: the
        config's), built once each. Restores fill a copy of the state (``restore_params``)."""
        key = (esmfold, dtype)
        if key not in self._abstract:
            if esmfold:
                cfg = self.esmfold_config
                model = esmfold_abstract(cfg if dtype is None else cfg.with_esm_dtype(dtype))
            else:
                cfg = self.model_config
                if dtype is not None:
                    cfg = from_dict(ESM2Config, {**to_dict(cfg), "dtype": dtype})
                model = esm2_abstract(cfg)
            self._abstract[key] = model
        return self._abstract[key]


def peek(path: str | Path, step: int | None = None) -> Checkpoint | None:
    """The checkpoint at ``path``, or None where there is no ``config.json`` (a fair-esm file, an
    HF folder, nothing)."""
    p = paths.path(path) / CONFIG_FILE
    with paths.remote_errors(path):
        if not p.exists():
            return None
        return Checkpoint(str(path), json.loads(p.read_text()), step)


def open(path: str | Path, step: int | None = None) -> Checkpoint:
    """The checkpoint folder or run at ``path`` (``step``: the one to restore, default the latest);
    refused in one line where it has no ``config.json``."""
    found = peek(path, step)
    if found is None:
        raise CheckpointError(f"{path}: not an esmjax checkpoint folder (no {CONFIG_FILE})")
    return found


def opened(source: Checkpoint | str | Path) -> Checkpoint:
    """``source`` itself, or the checkpoint at that path."""
    return source if isinstance(source, Checkpoint) else open(source)


def is_esmfold(path: str | Path) -> bool:
    found = peek(path)
    return found is not None and found.kind == ESMFOLD


def _remove_unfinished_steps(steps_dir: Any) -> None:
    """Deletes step folders of a bucket that have no ``commit_success.txt`` (a run killed while
    saving), before a writer starts, so that no step is ever written into a half-written folder.
    (Orbax's own ``cleanup_tmp_directories`` does it in a background thread that races the first
    save.) Process 0 deletes; every process waits for it."""
    if jax.process_index() == 0 and steps_dir.exists():
        for step in steps_dir.iterdir():
            if step.name.isdigit() and not (step / "commit_success.txt").exists():
                log.warning(
                    "removing unfinished checkpoint step %s (the run stopped while saving)", step
                )
                step.rmtree()
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("esmjax: unfinished checkpoint steps removed")


def manager(
    path: str | Path, *, item_names=("params",), read_only: bool = True, **options: Any
) -> ocp.CheckpointManager:
    if paths.scheme(path) == "s3":
        raise CheckpointError(
            f"{path}: Orbax {ocp.__version__} cannot store checkpoints in s3:// (its TensorStore "
            "spec builder knows gs:// and local paths only); use a gs:// bucket or a mounted path"
        )
    with paths.remote_errors(path):
        if not read_only and paths.is_remote(path):
            _remove_unfinished_steps(paths.path(path) / STEPS_DIR)
        handlers = None
        if os.environ.get("ESMJAX_CHECKPOINT_OCDBT", "1") == "0":
            handlers = {
                n: ocp.StandardCheckpointHandler(use_ocdbt=False) for n in item_names if n != "meta"
            }
        return ocp.CheckpointManager(
            paths.path(path) / STEPS_DIR,
            item_names=None if handlers else item_names,
            item_handlers=(
                {
                    **handlers,
                    **({"meta": ocp.JsonCheckpointHandler()} if "meta" in item_names else {}),
                }
                if handlers
                else None
            ),
            options=ocp.CheckpointManagerOptions(
                read_only=read_only,
                create=not read_only,
                multiprocessing_options=ocp.options.MultiprocessingOptions(
                    barrier_sync_key_prefix=BARRIER_PREFIX
                ),
                **options,
            ),
        )


def restore_target(
    state: nnx.State, mesh: jax.sharding.Mesh, rules: shd.Rules, *, allow_replicated: bool = False
) -> dict[str, Any]:
    """Pure-dict restore target: ShapeDtypeStructs carrying the shardings the rules give on
    ``mesh`` (refused when they leave too much replicated, unless ``allow_replicated``)."""
    shardings = shd.tree_shardings(state, mesh, rules, allow_replicated=allow_replicated)
    target = jax.tree.map(
        lambda v, s: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s),
        state,
        shardings,
        is_leaf=lambda x: isinstance(x, nnx.Variable),
    )
    return nnx.State(target).to_pure_dict() if not isinstance(target, dict) else target


def pure_dict_shardings(state: nnx.State, mesh: jax.sharding.Mesh, rules: shd.Rules) -> Any:
    """The NamedShardings of ``state``'s variables as a pure dict (the layout of ``params``)."""
    return jax.tree.map(lambda t: t.sharding, restore_target(state, mesh, rules))


def nnx_pure_dict(model: nnx.Module) -> dict[str, Any]:
    """A model's variables as a pure dict of (device) arrays."""
    return nnx.state(model).to_pure_dict()


# Orbax's barriers carry this prefix (every manager of ours sets it), and the barrier that ends
# ``Checkpointer.restore`` this name: a process whose restore failed joins it (_restore_agreed).
BARRIER_PREFIX = "esmjax"
_ORBAX_RESTORE_BARRIER = "Checkpointer:restore"


def _agreed(value: int, op: str) -> int:
    """``min``/``max`` of ``value`` over every process (itself on one process)."""
    if jax.process_count() == 1:
        return value
    values = multihost_utils.process_allgather(np.asarray(value, np.int64))
    return int(values.min() if op == "min" else values.max())


def _restore_agreed(mngr: ocp.CheckpointManager, step: int, make_args) -> tuple[Any | None, str]:
    """``(step restored, "")`` on every process, or ``(None, why)`` on every process when any one
    of them could not read its part (a damaged shard, a bucket error on one host)."""
    why = ""
    try:
        restored, failed = mngr.restore(step, args=make_args()), 0
    except Exception as e:  # a damaged step on this process
        # the first line only: TensorStore's errors go on with a spec of 60 lines
        why = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:300]}"
        log.warning("checkpoint step %d is unreadable here (%s)", step, why)
        restored, failed = None, 1
        if jax.process_count() > 1:
            # The processes that read their part wait in the barrier that ends Orbax's restore;
            # meet them there, so that the vote below pairs with every other process's vote.
            ocp.multihost.sync_global_processes(
                ocp.multihost.unique_barrier_key(_ORBAX_RESTORE_BARRIER, prefix=BARRIER_PREFIX)
            )
    if _agreed(failed, "max"):
        if not failed:
            why = "unreadable on another process"
            log.warning("checkpoint step %d is %s", step, why)
        return None, why
    return restored, why


def restore_latest(mngr: ocp.CheckpointManager, step: int | None, make_args) -> tuple[int, Any]:
    """``step`` (default: the newest readable one) restored from ``mngr``.

    Every process restores the same step: the newest that every process lists and could read.
    A step unreadable on any process sends all of them to the one before (one collective per
    step tried), so no process resumes from another step than the others.
    """
    steps = sorted(mngr.all_steps())
    if step is not None:
        if step not in steps:
            raise CheckpointError(f"{mngr.directory}: no step {step}; available: {steps}")
        restored, why = _restore_agreed(mngr, step, make_args)
        if restored is None:
            raise CheckpointError(f"{mngr.directory}: step {step} is unreadable ({why})")
        return step, restored
    if not steps:
        raise CheckpointError(f"{mngr.directory}: no complete checkpoint")
    below = None
    while True:
        mine = max((s for s in steps if below is None or s < below), default=-1)
        s = _agreed(mine, "min")  # the newest step every process lists
        if s < 0:
            raise CheckpointError(f"{mngr.directory}: every checkpoint step is unreadable")
        restored, _ = _restore_agreed(mngr, s, make_args)
        if restored is not None:
            return s, restored
        log.warning("trying the checkpoint step before %d", s)
        below = s


def set_aside(mngr: ocp.CheckpointManager, steps: list[int]) -> None:
    """Renames the unreadable ``steps`` to ``<step>.unreadable`` (Orbax lists integer names only),
    on every process together: a resumed run can then write those steps again (Orbax cannot save
    over an existing step: the save never finished), and nothing is deleted, since a step a user
    copied in from another run is theirs."""
    if not steps:
        return
    root = paths.path(str(mngr.directory))
    if jax.process_index() == 0:
        with paths.remote_errors(root):
            for s in steps:
                dst, n = root / f"{s}.unreadable", 1
                while dst.exists():
                    n += 1
                    dst = root / f"{s}.unreadable{n}"
                (root / str(s)).rename(dst)
                log.warning("checkpoint step %d could not be read; moved it aside to %s", s, dst)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("esmjax:set_aside")
    mngr.reload()


def restore_params(
    path: str | Path,
    graphdef: nnx.GraphDef,
    state: nnx.State,
    step: int | None,
    mesh: jax.sharding.Mesh,
    rules: shd.Rules,
    *,
    allow_replicated: bool = False,
) -> tuple[Any, int]:
    """Restores the ``params`` item of ``path``'s latest readable (or given) step into ``state``'s
    structure, sharded onto ``mesh`` by ``rules``; returns the merged module and the step."""
    target = restore_target(state, mesh, rules, allow_replicated=allow_replicated)
    mngr = manager(path)
    try:
        with paths.remote_errors(path):
            step, restored = restore_latest(
                mngr, step, lambda: ocp.args.Composite(params=ocp.args.StandardRestore(target))
            )
    finally:
        mngr.close()
    state = jax.tree.map(lambda v: v, state)  # a copy: ``state`` may be a checkpoint's cached one
    nnx.replace_by_pure_dict(state, restored["params"])
    return nnx.merge(graphdef, state), step


def load_model(
    source: Checkpoint | str | Path,
    step: int | None = None,
    mesh: jax.sharding.Mesh | None = None,
    rules: shd.Rules | str = "fsdp",
    dtype: str | None = None,
    allow_replicated: bool = False,
) -> tuple[ESM2, int]:
    """Restores the ESM2 of ``source`` (converted weights or a training workdir, opened or a path)
    onto ``mesh``.

    Returns the model and the step restored (the latest complete one unless ``step`` is given).
    ``allow_replicated``: accept a mesh the rules cannot shard the model on
    (``mesh.allow_replicated``).
    """
    ckpt = opened(source)
    graphdef, state = ckpt.abstract(dtype)
    mesh = mesh if mesh is not None else shd.single_device_mesh()
    return restore_params(
        ckpt.path,
        graphdef,
        state,
        step,
        mesh,
        shd.resolve_rules(rules),
        allow_replicated=allow_replicated,
    )


def inference_mesh(
    source: Checkpoint | str | Path,
    rules: shd.Rules | str = "fsdp",
    dtype: str | None = None,
    local: bool = False,
) -> jax.sharding.Mesh:
    """All devices for ``evaluate`` (``local``: this process's, for the jobs of work units, whose
    processes run independently): the parameters of the model of ``source`` on ``fsdp`` as far as
    the rules divide them, the rest on ``data`` (``sharding.fit_mesh``)."""
    devices = jax.local_devices() if local else None
    return shd.fit_mesh(opened(source).abstract(dtype)[1], shd.resolve_rules(rules), devices)


def load_esmfold(
    source: Checkpoint | str | Path,
    *,
    dtype: str | None = None,
    step: int | None = None,
    mesh: jax.sharding.Mesh | None = None,
    rules: shd.Rules | str = "dp",
) -> tuple[ESMFold, int]:
    """Restores the ESMFold of ``source`` onto ``mesh`` (default: one device) by ``rules``;
    ``dtype`` sets the language model's compute dtype.

    Only the ESM-2 stem's parameters carry the logical axes the preset rules shard (``embed``,
    ``mlp``, ``heads``; the trunk's and heads' carry none, or ``norm``), so the presets split the
    stem alone and replicate the rest on every device of ``mesh``."""
    ckpt = opened(source)
    graphdef, state = ckpt.abstract(dtype, esmfold=True)
    mesh = mesh if mesh is not None else shd.single_device_mesh()
    return restore_params(ckpt.path, graphdef, state, step, mesh, shd.resolve_rules(rules))


def write_params(
    path: str | Path, config: dict[str, Any], params: dict[str, Any], expected: nnx.State
) -> None:
    """Writes ``params`` as step 0 with ``config`` as config.json, atomically: a failure leaves no
    partial folder.

    ``expected`` is the abstract state of the model the params belong to; shapes are checked and
    dtypes cast to it.
    """
    if paths.is_remote(path):
        out_url = paths.path(path)
        with paths.remote_errors(path):
            if out_url.exists() and any(out_url.iterdir()):
                raise CheckpointError(f"{path} exists and is not empty; refusing to overwrite")
    else:
        out = Path(path)
        if out.exists() and (out.is_file() or any(out.iterdir())):
            raise CheckpointError(f"{out} exists and is not empty; refusing to overwrite")
    reference = expected.to_pure_dict()
    mismatch: list[str] = []

    def check(kp, a, b):
        if tuple(a.shape) != tuple(np.shape(b)):
            mismatch.append(f"{jax.tree_util.keystr(kp)}: {np.shape(b)} vs {a.shape}")

    jax.tree_util.tree_map_with_path(check, reference, params)
    if mismatch:
        raise CheckpointError("parameter shapes do not fit the config: " + "; ".join(mismatch[:5]))
    params = jax.tree.map(lambda a, ref: np.asarray(a, dtype=ref.dtype), params, reference)
    if paths.is_remote(path):  # Orbax commits the step; config.json last marks the folder done
        with paths.remote_errors(path):
            mngr = manager(path, read_only=False, enable_async_checkpointing=False)
            mngr.save(0, args=ocp.args.Composite(params=ocp.args.StandardSave(params)))
            mngr.wait_until_finished()
            mngr.close()
            (paths.path(path) / CONFIG_FILE).write_text(json.dumps(config, indent=2))
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2))
        mngr = manager(tmp, read_only=False, enable_async_checkpointing=False)
        mngr.save(0, args=ocp.args.Composite(params=ocp.args.StandardSave(params)))
        mngr.wait_until_finished()
        mngr.close()
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_converted(
    path: str | Path,
    cfg: ESM2Config | ESMFoldConfig,
    params: dict[str, Any],
    extra: dict[str, Any] | None = None,
) -> None:
    """Writes converted ESM-2 or ESMFold weights as a checkpoint folder (step 0)."""
    if isinstance(cfg, ESMFoldConfig):
        config = {"model": to_dict(cfg.esm), ESMFOLD_SECTION: to_json(cfg)}
        expected = esmfold_abstract(cfg)[1]
    else:
        config, expected = {"model": to_dict(cfg)}, esm2_abstract(cfg)[1]
    write_params(path, {**config, **(extra or {})}, params, expected)


def params_numpy(model: ESM2 | ESMFold) -> dict[str, Any]:
    """The model's variables as a nested dict of host NumPy arrays (gathered from every device)."""
    state = nnx.state(model).to_pure_dict()
    return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), state)
