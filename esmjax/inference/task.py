"""A fine-tuned ESM-2 task model: how a fine-tuning run's variables split into trainable and
frozen parts, how the model is rebuilt from a workdir (``config.json`` + the trainable part of the
best or a given step + the frozen backbone), and predictions in length buckets (``esmjax
predict``). Its exports are ``esmjax.inference.export``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from esmjax.config import ESM2Config, FinetuneConfig, MeshConfig, from_dict, to_dict
from esmjax.errors import InputError
from esmjax.inference import preflight
from esmjax.inference.engine import Engine, bucketed
from esmjax.inference.inputs import InputStream
from esmjax.io import checkpoint as ckpt
from esmjax.io import paths
from esmjax.io.checkpoint import pure_dict_shardings
from esmjax.io.convert import load_source_params, source_model_config
from esmjax.io.fasta import Record
from esmjax.models.alphabet import PAD, encode_with_specials
from esmjax.models.heads import TaskModel, abstract_task_model
from esmjax.parallel import sharding as shd

log = logging.getLogger("esmjax.finetune")

Tree = dict[str, Any]


# --------------------------------------------------------------------------------------------------
# Trainable / frozen split of a pure dict
# --------------------------------------------------------------------------------------------------
def is_trainable(mode: str, names: tuple[str, ...]) -> bool:
    if names[0] == "classifier" or mode == "full":
        return True
    return mode == "lora" and "lora" in names


def split_tree(tree: Tree, pred: Callable[[tuple[str, ...]], bool], at: tuple = ()) -> tuple:
    """(the leaves where ``pred(path)``, the rest), as nested dicts without empty branches."""
    yes: Tree = {}
    no: Tree = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            a, b = split_tree(v, pred, (*at, k))
            if a:
                yes[k] = a
            if b:
                no[k] = b
        else:
            (yes if pred((*at, k)) else no)[k] = v
    return yes, no


def merge_trees(a: Tree, b: Tree) -> Tree:
    out = dict(a)
    for k, v in b.items():
        out[k] = merge_trees(out[k], v) if k in out and isinstance(v, dict) else v
    return out


def count(tree: Tree) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


class Setup:
    """Everything a fine-tuning run, ``predict`` and ``export`` rebuild from the config."""

    def __init__(self, cfg: FinetuneConfig, targets_labels: tuple, num_outputs: int):
        self.cfg = cfg
        src = source_model_config(cfg.backbone)
        self.esm_cfg: ESM2Config = from_dict(
            ESM2Config, {**to_dict(src), "dtype": cfg.dtype, "remat": cfg.remat}
        )
        self.labels = targets_labels
        self.num_outputs = num_outputs
        lora = (cfg.lora.rank, cfg.lora.alpha, tuple(cfg.lora.targets))
        self.model_kw = dict(
            cfg=self.esm_cfg,
            per_residue=cfg.task == "residue_classification",
            num_outputs=num_outputs,
            pooling=cfg.head,
            lora=lora if cfg.mode == "lora" else None,
        )
        self.graphdef, self.abstract = abstract_task_model(**self.model_kw)

    def trainable(self, names: tuple[str, ...]) -> bool:
        return is_trainable(self.cfg.mode, names)

    def initial(self, mesh, rules, seed: int) -> Tree:
        """Head and adapters fresh (seed), the backbone from ``cfg.backbone``, on ``mesh``."""
        shardings = pure_dict_shardings(self.abstract, mesh, rules)
        kw = self.model_kw
        fresh = jax.jit(
            lambda: nnx.state(TaskModel(**kw, rngs=nnx.Rngs(seed))).to_pure_dict(),
            out_shardings=shardings,
        )()
        step = None if self.cfg.backbone_step < 0 else self.cfg.backbone_step
        esm, what = load_source_params(self.cfg.backbone, self.esm_cfg, mesh, rules, step)
        log.info("backbone %s", what)
        return merge_trees(fresh, {"esm": esm})

    def config_json(self) -> dict:
        return {
            "model": to_dict(self.esm_cfg),
            "finetune": to_dict(self.cfg),
            "labels": list(self.labels),
            "num_outputs": self.num_outputs,
        }


def _logits(model: TaskModel, tokens: jax.Array) -> jax.Array:
    return model(tokens)


def predict(engine: Engine, tokens: list[np.ndarray], max_tokens: int = 8192) -> list[np.ndarray]:
    """Outputs per sequence (``[C]``, or ``[L, C]`` per residue without BOS/EOS), computed in
    length buckets with one compilation per bucket."""
    out: list[np.ndarray | None] = [None] * len(tokens)
    if not tokens:
        return []
    lengths = [len(t) for t in tokens]
    fwd = engine.cached_forward("task", _logits)
    for width, rows, idx in bucketed(lengths, max_tokens, engine.row_multiple):
        batch = np.full((rows, width), PAD, np.int32)
        for r, i in enumerate(idx):
            batch[r, : lengths[i]] = tokens[i]
        res = np.asarray(fwd(batch), np.float32)
        for r, i in enumerate(idx):
            out[i] = res[r, 1 : lengths[i] - 1] if res.ndim == 3 else res[r]
    return out  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------------
# A fine-tuning workdir restored
# --------------------------------------------------------------------------------------------------
def finetune_run(source: ckpt.Checkpoint | str | Path) -> ckpt.Checkpoint | None:
    """The fine-tuning run ``source`` (opened, or its path); None for anything else."""
    found = source if isinstance(source, ckpt.Checkpoint) else ckpt.peek(source)
    return found if found is not None and found.kind == ckpt.FINETUNE else None


def load_finetuned(
    source: ckpt.Checkpoint | str | Path, step: int | None = None, mesh=None, rules: Any = "fsdp"
) -> tuple[Setup, Tree, int]:
    """(setup, the full variables on ``mesh``, the step) of the fine-tuning run ``source``
    (opened, or its path): the best validation step when the run kept one (else the latest), or
    the run's step ``step``."""
    run = finetune_run(source)
    if run is None:
        where = paths.path(source.path if isinstance(source, ckpt.Checkpoint) else source)
        raise InputError(f"{where}: not an esmjax finetune workdir (config.json has no 'finetune')")
    w = paths.path(run.path)
    raw = run.config
    setup = Setup(
        from_dict(FinetuneConfig, raw["finetune"], "finetune"),
        tuple(raw["labels"]),
        int(raw["num_outputs"]),
    )
    mesh = mesh if mesh is not None else shd.single_device_mesh()
    rules = shd.resolve_rules(rules)
    shardings = pure_dict_shardings(setup.abstract, mesh, rules)
    abstract = setup.abstract.to_pure_dict()
    target_vars, _ = split_tree(abstract, setup.trainable)
    target_sh, _ = split_tree(shardings, setup.trainable)
    target = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), target_vars, target_sh
    )
    mngr = _run_manager(w, step)
    try:
        got, restored = ckpt.restore_latest(
            mngr,
            step,  # None with W/best: its only step
            lambda: ocp.args.Composite(params=ocp.args.StandardRestore(target)),
        )
    finally:
        mngr.close()
    if setup.cfg.mode == "full":
        return setup, restored["params"], got
    _, frozen = split_tree(setup.initial(mesh, rules, 0), setup.trainable)
    return setup, merge_trees(restored["params"], frozen), got


def _run_manager(w: Any, step: int | None) -> Any:
    """The checkpoint manager of the steps to restore from: ``W/best`` when ``step`` is None and
    it holds a complete step, else ``W``. A run whose validation metric was never finite (e.g.
    constant predictions of cropped sequences) leaves ``W/best`` empty; its report then scores the
    last step, so predict must too, not fail on the empty folder."""
    items = ("params", "opt_state", "meta")
    if step is None:
        with paths.remote_errors(w):
            found = (w / "best" / ckpt.STEPS_DIR).is_dir()
        if found:
            best = ckpt.manager(w / "best", item_names=items)
            with paths.remote_errors(w):
                kept = bool(best.all_steps())
            if kept:
                return best
            best.close()
    return ckpt.manager(w, item_names=items)


def finetune_task(source: ckpt.Checkpoint | str | Path) -> tuple[ckpt.Checkpoint, bool]:
    """(the fine-tuning run ``source``, opened; whether its task is per residue): anything but an
    ``esmjax finetune`` workdir is one line, before any model loads."""
    run = ckpt.opened(source)
    if run.kind != ckpt.FINETUNE:
        raise InputError(
            f"--checkpoint {run.path} holds {run.holds}, not a fine-tuning run "
            "(esmjax predict reads `esmjax finetune` workdirs)"
        )
    task = run.config["finetune"].get("task") if isinstance(run.config["finetune"], dict) else None
    return run, task == "residue_classification"


def task_engine(run: ckpt.Checkpoint, step: int | None) -> tuple[Setup, Engine, int]:
    """(setup, engine, the step restored): the run's model on this process's devices, over
    ``fsdp`` as far as it divides. Local devices, so that each process of a job of work units
    (``esmjax.inference.predictions``) holds a whole model; one process sees no other."""
    mesh = shd.make_mesh(MeshConfig(ici_fsdp=-1), jax.local_devices())
    setup, variables, got = load_finetuned(run, step, mesh, "fsdp")
    return setup, Engine(nnx.merge(setup.graphdef, nnx.State(variables)), mesh, "fsdp"), got


# The run cropped every train, validation and test sequence to its first data.max_length residues
# (esmjax.io.labeled.Rows.add) and its report scores those crops, so predict crops the same way: its
# outputs on the test rows are then the report's, bit for bit. Sliding windows over the rest would
# give residue labels from contexts the run never trained or evaluated on, with an accuracy no
# report describes; the cut is marked instead (``truncated_at`` in residue rows, and one warning).
def cropped_tokens(setup: Setup, records: Sequence[Record]) -> tuple[list[np.ndarray], int]:
    """(the tokens of each record's first ``data.max_length`` residues, how many were longer)."""
    limit = setup.cfg.data.max_length
    tokens = [encode_with_specials(r.sequence, limit) for r in records]
    return tokens, sum(len(r.sequence) > limit for r in records)


def warn_cropped(setup: Setup, cropped: int, records: int) -> None:
    """The one warning line that counts the sequences cropped to the run's ``data.max_length``."""
    if not cropped:
        return
    limit = setup.cfg.data.max_length
    marked = "; their rows carry truncated_at" if setup.cfg.task == "residue_classification" else ""
    log.warning(
        "%d of %d sequences are longer than the run's data.max_length=%d: predicted from "
        "their first %d residues, as the run was trained and evaluated%s",
        cropped,
        records,
        limit,
        limit,
        marked,
    )


def predict_fasta(
    source: ckpt.Checkpoint | str | Path,
    fasta: str | Path | Sequence[str | Path],
    out: str | Path,
    step: int | None = None,
    max_tokens: int = 8192,
    unknown_as_x: bool = False,
    skip_invalid: bool = False,
) -> str:
    """``esmjax predict``: one row per record of ``fasta`` (one FASTA or several, read in order) in
    ``out`` (``.csv``: id, prediction and per-class probabilities or per-target values; ``.jsonl``
    for residue tasks: id, sequence, one predicted label per residue and ``truncated_at``). The
    whole input is validated before the model runs (``skip_invalid``: invalid records are counted
    and left out instead). Sequences are cropped to the run's ``data.max_length``, as the run's
    training and report cropped them, so predict on the run's test rows gives the report's test
    figures. A folder ``out`` is a job of work units instead (``esmjax.inference.predictions``).

    ``source`` (the run, opened or its path), ``fasta`` and ``out`` may be bucket URLs. The run's
    task and the output are checked first. The predictions are formatted in memory and written
    whole (``paths.write_text``: a local file through a renamed temporary sibling, a bucket object
    in one upload), the same bytes either way; a missing output bucket is refused before the
    model loads."""
    run, residue = finetune_task(source)
    shown = paths.given(out)
    if residue != (shown.suffix == ".jsonl"):
        raise InputError(f"--out {out}: residue tasks write .jsonl, sequence tasks .csv")
    preflight.output(out, f"--out {out}", folder=False)
    inputs = [fasta] if isinstance(fasta, (str, Path)) else list(fasta)
    stream = InputStream([str(f) for f in inputs], unknown_as_x, skip_invalid)
    records = list(stream.records())
    if not records:
        raise InputError(f"{', '.join(map(str, inputs))}: no records")
    if paths.is_remote(out):
        paths.nonempty(out)  # the bucket must exist (an existing object is replaced, as on disk)
    setup, engine, got = task_engine(run, step)
    tokens, cropped = cropped_tokens(setup, records)
    warn_cropped(setup, cropped, len(records))
    outputs = predict(engine, tokens, max_tokens)
    paths.write_text(out, prediction_text(setup, records, outputs))
    skipped = f", {stream.stats.skipped} invalid skipped" if stream.stats.skipped else ""
    return f"wrote {shown}: {len(records)} records{skipped} (step {got})"


def prediction_columns(setup: Setup) -> list[str]:
    """The columns of ``esmjax predict``'s rows (``prediction_rows``), in order."""
    if setup.cfg.task == "residue_classification":
        return ["id", "sequence", "prediction", "truncated_at"]
    if setup.cfg.task == "sequence_regression":
        return ["id", *[f"prediction_{i}" for i in range(setup.num_outputs)]]
    return ["id", "prediction", *[f"prob_{n}" for n in setup.labels]]


def prediction_rows(
    setup: Setup, records: Sequence[Record], outputs: list[np.ndarray]
) -> list[dict[str, Any]]:
    """One dict per record, keys ``prediction_columns``: the predictions as ``esmjax predict``
    writes them, whatever the output (a ``.csv``/``.jsonl`` file, or a job's shards).

    Residue rows hold one label per residue of the crop the model saw (the first
    ``data.max_length``) and ``truncated_at``: that length where the sequence is longer, else
    None. Sequence rows hold the float32 outputs as Python floats: every value is kept in full
    (a float32 widens exactly), so that metrics recomputed from the output are the run's."""
    cfg, names, columns = setup.cfg, list(setup.labels), prediction_columns(setup)
    rows = []
    for r, o in zip(records, outputs):
        o = np.asarray(o, np.float32)
        if cfg.task == "residue_classification":
            pred = "".join(names[i] for i in o.argmax(-1))
            cut = cfg.data.max_length if len(r.sequence) > cfg.data.max_length else None
            values = [r.sequence, pred, cut]
        elif cfg.task == "sequence_regression":
            values = [float(v) for v in o]
        else:
            p = probabilities(o, cfg.multi_label)
            if cfg.multi_label:  # logit > 0, as the run's metrics decide (a sigmoid rounds)
                label = ";".join(n for n, x in zip(names, o) if x > 0)
            else:
                label = names[int(p.argmax())]
            values = [label, *[float(v) for v in p]]
        rows.append(dict(zip(columns, [r.id, *values])))
    return rows


def prediction_text(setup: Setup, records: Sequence[Record], outputs: list[np.ndarray]) -> str:
    """The contents of ``esmjax predict``'s output file: ``prediction_rows`` as JSON lines
    (residue tasks) or a CSV (the ``csv`` module's dialect, ``\\r\\n`` line ends). Numbers are
    written in full (``_number``): 6 significant digits tie and reorder close scores, which moves
    a Spearman recomputed from the file."""
    import csv
    import io

    rows = prediction_rows(setup, records, outputs)
    if setup.cfg.task == "residue_classification":
        return "".join(json.dumps(row) + "\n" for row in rows)
    f = io.StringIO()
    w = csv.writer(f)
    w.writerow(prediction_columns(setup))
    for row in rows:
        w.writerow([_number(v) if isinstance(v, float) else v for v in row.values()])
    return f.getvalue()


def probabilities(logits: np.ndarray, multi_label: bool) -> np.ndarray:
    """Per-class probabilities of float32 logits (``[C]``, or ``[L, C]`` per residue; over the
    last axis): sigmoids, or the softmax in the float32 expression of
    ``finetune_metrics.classification`` (whose two-class AUROC ranks these values), so that a
    metric recomputed from the output ranks them as the run did."""
    if multi_label:
        return 1 / (1 + np.exp(-logits.astype(np.float64)))
    z = logits - logits.max(-1, keepdims=True)
    return np.exp(z) / np.exp(z).sum(-1, keepdims=True)


def _number(v: Any) -> str:
    """``v`` as the shortest text that reads back as the same float64 (``repr``); a float32 is
    widened exactly first, so the text holds the model's output itself."""
    return repr(float(v))
