"""Exports of a fine-tuning run (``esmjax export W --to ...``), and ``export_any``, the command's
entry point, which hands anything else to ``esmjax.io.convert``:

- ``hf``: an ``EsmForSequenceClassification`` (BOS head) or ``EsmForTokenClassification`` folder
  (``config.json`` with ``num_labels``, ``id2label``/``label2id``, ``problem_type``,
  ``model.safetensors`` and the ``EsmTokenizer`` files), LoRA merged into the kernels. Mean
  pooling has no HF counterpart and is refused.
- ``peft``: the LoRA adapters alone (and the head, as ``modules_to_save``) in HF PEFT's layout,
  for the HF model of the unchanged backbone, with the tokenizer files.
- ``fair-esm``: the (merged) backbone as a fair-esm ``.pt``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import numpy as np

from esmjax.config import FinetuneConfig
from esmjax.errors import InputError
from esmjax.inference import preflight
from esmjax.inference.task import Setup, Tree, finetune_run, load_finetuned
from esmjax.io import checkpoint, convert, convert_esm2, paths
from esmjax.models.heads import LORA_MODULES, merge_lora

RUN_FORMATS = ("hf", "peft", "fair-esm")  # what a fine-tuning run exports to


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
    folder = _save_tensors(sd, out, "model.safetensors")
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
    convert_esm2.write_hf_tokenizer(folder)
    (folder / "config.json").write_text(json.dumps(config, indent=2))


def _save_tensors(sd: dict[str, np.ndarray], out: str | Path, name: str) -> Path:
    """``sd`` as float32 safetensors ``out/name`` (PyTorch's metadata); returns the folder."""
    from safetensors.numpy import save_file

    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: np.ascontiguousarray(v, np.float32) for k, v in sd.items()},
        str(folder / name),
        metadata={"format": "pt"},
    )
    return folder


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
    folder = _save_tensors(sd, out, "adapter_model.safetensors")
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
    # HF recipes load the tokenizer from the adapter folder as from the model's
    convert_esm2.write_hf_tokenizer(folder)
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2))


def export(
    source: checkpoint.Checkpoint | str | Path, out: str | Path, to: str, step: int | None = None
) -> str:
    """A fine-tuning run (opened, or its path) -> an HF task folder, PEFT adapters or the (merged)
    backbone as fair-esm ``.pt``. ``out`` may be a bucket URL: the files are written to a
    temporary folder and uploaded (``paths.local_output``), one object each, ``config.json`` /
    ``adapter_config.json`` last."""
    if to not in RUN_FORMATS:
        raise InputError(f"--to {to}: a fine-tuning workdir exports to hf, peft or fair-esm")
    convert.check_export_target(out, to)
    setup, variables, got = load_finetuned(source, step)
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
    """``esmjax export``: a fine-tuning run here, anything else by ``esmjax.io.convert``; where
    the export goes is checked before the weights are read (a fair-esm .pt is a file, the rest
    folders)."""
    preflight.output(out, f"out {out}", folder=to != "fair-esm")
    run = finetune_run(src)
    if run is not None:
        return export(run, out, to, step)
    return convert.export(src, out, to, step=step, folding_head=folding_head)
