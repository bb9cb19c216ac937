"""A fine-tuned ESM-2 task model: how a fine-tuning run's variables split into trainable and
frozen parts, how the model is rebuilt from a workdir (``config.json`` + the trainable part of the
best or a given step + the frozen backbone), predictions in length buckets, and exports.

Exports (``esmjax export W --to ...``):

- ``hf``: an ``EsmForSequenceClassification`` (BOS head) or ``EsmForTokenClassification`` folder
  (``config.json`` with ``num_labels``, ``id2label``/``label2id``, ``problem_type``, and
  ``model.safetensors``), LoRA merged into the kernels. Mean pooling has no HF counterpart and is
  refused.
- ``peft``: the LoRA adapters alone (and the head, as ``modules_to_save``) in HF PEFT's layout,
  for the HF model of the unchanged backbone.
- ``fair-esm``: the (merged) backbone as a fair-esm ``.pt``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from esmjax.config import ESM2Config, FinetuneConfig, MeshConfig, from_dict, to_dict
from esmjax.errors import InputError
from esmjax.inference.engine import Engine, bucketed
from esmjax.io import checkpoint as ckpt
from esmjax.io import convert_esm2, paths
from esmjax.io.checkpoint import pure_dict_shardings
from esmjax.io.convert import export as convert_export
from esmjax.io.convert import load_source_params, source_model_config
from esmjax.io.fasta import read_fasta
from esmjax.models.alphabet import PAD, encode_with_specials
from esmjax.models.heads import LORA_MODULES, TaskModel, merge_lora
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
        self.graphdef, self.abstract = nnx.split(
            nnx.eval_shape(lambda: TaskModel(**self.model_kw, rngs=nnx.Rngs(0)))
        )

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
def is_finetune_dir(path: str | Path) -> bool:
    p = paths.path(path) / "config.json"
    with paths.remote_errors(path):
        return p.exists() and "finetune" in json.loads(p.read_text())


def load_setup(workdir: str | Path) -> Setup:
    with paths.remote_errors(workdir):
        raw = json.loads((paths.path(workdir) / "config.json").read_text())
    cfg = from_dict(FinetuneConfig, raw["finetune"], "finetune")
    return Setup(cfg, tuple(raw["labels"]), int(raw["num_outputs"]))


def load_finetuned(
    workdir: str | Path, step: int | None = None, mesh=None, rules: Any = "fsdp"
) -> tuple[Setup, Tree, int]:
    """(setup, the full variables on ``mesh``, the step): the best validation step when the run
    kept one (else the latest), or the run's step ``step``."""
    w = paths.path(workdir)
    if not is_finetune_dir(w):
        raise InputError(f"{w}: not an esmjax finetune workdir (config.json has no 'finetune')")
    setup = load_setup(w)
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


def plain_variables(setup: Setup, variables: Tree) -> Tree:
    """Host NumPy variables with LoRA merged (the model without adapters computes the same)."""
    host = jax.tree.map(lambda x: np.asarray(jax.device_get(x), np.float32), variables)
    if setup.cfg.mode == "lora":
        host = merge_lora(host, setup.cfg.lora.alpha / setup.cfg.lora.rank)
    return jax.tree.map(np.asarray, host)


def problem_type(cfg: FinetuneConfig) -> str:
    if cfg.task == "sequence_regression":
        return "regression"
    return "multi_label_classification" if cfg.multi_label else "single_label_classification"


def write_hf_task(setup: Setup, variables: Tree, out: str | Path) -> None:
    """An ``EsmForSequenceClassification`` / ``EsmForTokenClassification`` folder."""
    from safetensors.numpy import save_file

    cfg = setup.cfg
    if cfg.task != "residue_classification" and cfg.head != "bos":
        raise InputError("head: mean has no HF counterpart; only the bos head exports to HF")
    plain = plain_variables(setup, variables)
    sd = convert_esm2.params_to_state_dict(plain["esm"], setup.esm_cfg, "hf")
    sd = {k: v for k, v in sd.items() if k.startswith("esm.") and "contact_head" not in k}
    head = plain["classifier"]
    sd.update(_hf_head(cfg, head, "classifier"))
    arch = (
        "EsmForTokenClassification"
        if cfg.task == "residue_classification"
        else "EsmForSequenceClassification"
    )
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: np.ascontiguousarray(v, np.float32) for k, v in sd.items()},
        str(folder / "model.safetensors"),
        metadata={"format": "pt"},
    )
    names = list(setup.labels) or [f"target_{i}" for i in range(setup.num_outputs)]
    config = {
        **convert_esm2.hf_config(setup.esm_cfg),
        "architectures": [arch],
        "num_labels": setup.num_outputs,
        "id2label": {str(i): n for i, n in enumerate(names)},
        "label2id": {n: i for i, n in enumerate(names)},
    }
    if cfg.task != "residue_classification":
        config["problem_type"] = problem_type(cfg)
    (folder / "config.json").write_text(json.dumps(config, indent=2))


def _hf_head(cfg: Any, head: Tree, prefix: str) -> dict[str, np.ndarray]:
    """The head's weights under HF's names: ``EsmForTokenClassification``'s linear ``classifier``,
    or ``EsmClassificationHead``'s ``classifier.dense`` and ``classifier.out_proj`` ([out, in])."""
    if cfg.task == "residue_classification":
        return {f"{prefix}.weight": head["kernel"].T, f"{prefix}.bias": head["bias"]}
    sd = {}
    for name in ("dense", "out_proj"):
        sd[f"{prefix}.{name}.weight"] = head[name]["kernel"].T
        sd[f"{prefix}.{name}.bias"] = head[name]["bias"]
    return sd


# LoRA target -> (HF module path inside ``esm.encoder.layer.{i}``)
PEFT_MODULES = {
    "q": "attention.self.query",
    "k": "attention.self.key",
    "v": "attention.self.value",
    "out": "attention.output.dense",
    "fc1": "intermediate.dense",
    "fc2": "output.dense",
}


def write_peft(setup: Setup, variables: Tree, out: str | Path) -> None:
    """The adapters alone in HF PEFT's layout: ``adapter_config.json`` and
    ``adapter_model.safetensors`` with ``base_model.model.<module>.lora_A.weight`` [R, in] and
    ``lora_B.weight`` [out, R] per layer, the head as ``modules_to_save`` (``classifier``). PEFT
    applies them to the HF model of the backbone (``esmjax export BACKBONE --to hf``)."""
    from safetensors.numpy import save_file

    cfg = setup.cfg
    if cfg.mode != "lora":
        raise InputError(f"--to peft needs a lora run; this one is mode {cfg.mode}")
    if cfg.task != "residue_classification" and cfg.head != "bos":
        raise InputError("head: mean has no HF counterpart; only the bos head exports to PEFT")
    host = jax.tree.map(lambda x: np.asarray(jax.device_get(x), np.float32), variables)
    layers = host["esm"]["layers"]
    sd: dict[str, np.ndarray] = {}
    for target in cfg.lora.targets:
        node = layers
        for name in LORA_MODULES[target]:
            node = node[name]
        a, b = node["lora"]["lora_a"], node["lora"]["lora_b"]  # [N, in, R], [N, R, out]
        for i in range(setup.esm_cfg.num_layers):
            key = f"base_model.model.esm.encoder.layer.{i}.{PEFT_MODULES[target]}"
            sd[f"{key}.lora_A.weight"] = a[i].T
            sd[f"{key}.lora_B.weight"] = b[i].T
    sd.update(_hf_head(cfg, host["classifier"], "base_model.model.classifier"))
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: np.ascontiguousarray(v, np.float32) for k, v in sd.items()},
        str(folder / "adapter_model.safetensors"),
        metadata={"format": "pt"},
    )
    modules = "|".join(PEFT_MODULES[t].replace(".", r"\.") for t in cfg.lora.targets)
    config = {
        "peft_type": "LORA",
        "task_type": "TOKEN_CLS" if cfg.task == "residue_classification" else "SEQ_CLS",
        "r": cfg.lora.rank,
        "lora_alpha": cfg.lora.alpha,
        "lora_dropout": 0.0,
        "bias": "none",
        # a regex: "dense" alone would also match the classifier's dense layer
        "target_modules": rf".*\.layer\.\d+\.({modules})",
        "modules_to_save": ["classifier"],
        "base_model_name_or_path": cfg.backbone,
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "use_rslora": False,
        "use_dora": False,
    }
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2))


def export(workdir: str | Path, out: str | Path, to: str, step: int | None = None) -> str:
    """A fine-tuning workdir -> an HF task folder, PEFT adapters or the (merged) backbone as
    fair-esm ``.pt``. ``out`` may be a bucket URL: the files are written to a temporary folder and
    uploaded (``paths.local_output``), one object each, ``config.json`` / ``adapter_config.json``
    last."""
    if to not in ("hf", "peft", "fair-esm"):
        raise InputError(f"--to {to}: a fine-tuning workdir exports to hf, peft or fair-esm")
    if paths.nonempty(out):
        raise InputError(f"{out} exists; refusing to overwrite")
    if to == "fair-esm" and not paths.path(out).name.endswith(".pt"):
        raise InputError("a fair-esm export is a .pt file; name it e.g. esm2_t6_8M_mine.pt")
    setup, variables, got = load_finetuned(workdir, step)
    last = {"hf": "config.json", "peft": "adapter_config.json"}.get(to)
    with paths.local_output(out, last=last) as local:
        if to == "hf":
            write_hf_task(setup, variables, local)
        elif to == "peft":
            write_peft(setup, variables, local)
        else:
            local.parent.mkdir(parents=True, exist_ok=True)
            esm = plain_variables(setup, variables)["esm"]
            convert_esm2.write_fairesm(esm, setup.esm_cfg, local)
    return f"wrote {out} ({to}, {setup.cfg.task}, {setup.cfg.mode}) from step {got}"


def export_any(
    src: str | Path,
    out: str | Path,
    to: str,
    step: int | None = None,
    folding_head: str | Path | None = None,
) -> str:
    """``esmjax export``: a fine-tuning workdir here, anything else by ``esmjax.io.convert``."""
    if is_finetune_dir(src):
        return export(src, out, to, step)
    return convert_export(src, out, to, step=step, folding_head=folding_head)


def predict_fasta(
    workdir: str | Path,
    fasta: str | Path,
    out: str | Path,
    step: int | None = None,
    max_tokens: int = 8192,
) -> str:
    """``esmjax predict``: one row per record of ``fasta`` in ``out`` (``.csv``: id, prediction and
    per-class probabilities or per-target values; ``.jsonl`` for residue tasks: id, sequence, one
    predicted label per residue and ``truncated_at``). The whole FASTA is validated before the
    model runs. Sequences are cropped to the run's ``data.max_length``, as the run's training and
    report cropped them, so predict on the run's test rows gives the report's test figures.

    ``workdir``, ``fasta`` and ``out`` may be bucket URLs. The predictions are formatted in memory
    and written whole (``paths.write_text``: a local file through a renamed temporary sibling, a
    bucket object in one upload), the same bytes either way; a missing output bucket is refused
    before the model loads."""
    shown = paths.given(out)
    records = list(read_fasta(fasta))
    if not records:
        raise InputError(f"{fasta}: no records")
    if paths.is_remote(out):
        paths.nonempty(out)  # the bucket must exist (an existing object is replaced, as on disk)
    mesh = shd.make_mesh(MeshConfig(ici_fsdp=-1))
    setup, variables, got = load_finetuned(workdir, step, mesh, "fsdp")
    cfg = setup.cfg
    residue = cfg.task == "residue_classification"
    if residue != (shown.suffix == ".jsonl"):
        raise InputError(f"--out {shown}: residue tasks write .jsonl, sequence tasks .csv")
    engine = Engine(nnx.merge(setup.graphdef, nnx.State(variables)), mesh, "fsdp")
    # The run cropped every train, validation and test sequence to its first data.max_length
    # residues (esmjax.io.labeled.Rows.add) and its report scores those crops, so predict crops
    # the same way: its outputs on the test rows are then the report's, bit for bit. Sliding
    # windows over the rest would give residue labels from contexts the run never trained or
    # evaluated on, with an accuracy no report describes; the cut is marked instead
    # (``truncated_at`` in residue rows, and one warning line).
    limit = cfg.data.max_length
    tokens = [encode_with_specials(r.sequence, limit) for r in records]
    cropped = sum(len(r.sequence) > limit for r in records)
    if cropped:
        marked = "; their rows carry truncated_at" if residue else ""
        log.warning(
            "%d of %d sequences are longer than the run's data.max_length=%d: predicted from "
            "their first %d residues, as the run was trained and evaluated%s",
            cropped,
            len(records),
            limit,
            limit,
            marked,
        )
    outputs = predict(engine, tokens, max_tokens)
    paths.write_text(out, prediction_text(setup, records, outputs))
    return f"wrote {shown}: {len(records)} records (step {got})"


def prediction_text(setup: Setup, records: list, outputs: list[np.ndarray]) -> str:
    """The contents of ``esmjax predict``'s output: JSON lines (residue tasks) or a CSV (the
    ``csv`` module's dialect, ``\\r\\n`` line ends).

    Residue rows hold one label per residue of the crop the model saw (the first
    ``data.max_length``) and ``truncated_at``: that length where the sequence is longer, else
    null. Numbers are written in full (``_number``), so that metrics recomputed from the file are
    the run's: 6 significant digits tie and reorder close scores, which moves a Spearman."""
    import csv
    import io

    cfg = setup.cfg
    names = list(setup.labels)
    if cfg.task == "residue_classification":
        limit = cfg.data.max_length
        lines = []
        for r, o in zip(records, outputs):
            pred = "".join(names[i] for i in np.asarray(o).argmax(-1))
            cut = limit if len(r.sequence) > limit else None
            row = {"id": r.id, "sequence": r.sequence, "prediction": pred, "truncated_at": cut}
            lines.append(json.dumps(row))
        return "".join(line + "\n" for line in lines)
    f = io.StringIO()
    w = csv.writer(f)
    if cfg.task == "sequence_regression":
        w.writerow(["id", *[f"prediction_{i}" for i in range(setup.num_outputs)]])
        for r, o in zip(records, outputs):
            w.writerow([r.id, *[_number(v) for v in o]])
    else:
        w.writerow(["id", "prediction", *[f"prob_{n}" for n in names]])
        for r, o in zip(records, outputs):
            p = _probabilities(np.asarray(o, np.float32), cfg.multi_label)
            if cfg.multi_label:  # logit > 0, as the run's metrics decide (a sigmoid rounds)
                pred = ";".join(n for n, x in zip(names, o) if x > 0)
            else:
                pred = names[int(p.argmax())]
            w.writerow([r.id, pred, *[_number(v) for v in p]])
    return f.getvalue()


def _probabilities(logits: np.ndarray, multi_label: bool) -> np.ndarray:
    """Per-class probabilities of one row's float32 logits: sigmoids, or the softmax in the
    float32 expression of ``finetune_metrics.classification`` (whose two-class AUROC ranks these
    values), so that a metric recomputed from the file ranks them as the run did."""
    if multi_label:
        return 1 / (1 + np.exp(-logits.astype(np.float64)))
    z = logits - logits.max()
    return np.exp(z) / np.exp(z).sum()


def _number(v: Any) -> str:
    """``v`` as the shortest text that reads back as the same float64 (``repr``); a float32 is
    widened exactly first, so the text holds the model's output itself."""
    return repr(float(v))
