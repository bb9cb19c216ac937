"""The fine-tuning configs (task, head, mode, LoRA, data) and the loader of
``esmjax finetune``."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from esmjax.config.base import ConfigError, check, check_finite
from esmjax.config.mesh import MeshConfig
from esmjax.config.serialize import (
    from_dict,
    read_yaml_mapping,
    saved_config,
    set_path,
    split_override,
)
from esmjax.config.train import CheckpointConfig, MetricsConfig, OptimConfig, ProfileConfig

TASKS = ("sequence_classification", "sequence_regression", "residue_classification")
FINETUNE_MODES = ("full", "lora", "frozen")
LORA_TARGETS = ("q", "k", "v", "out", "fc1", "fc2")


@dataclass(frozen=True, kw_only=True)
class LoraConfig:
    """LoRA (Hu et al. 2021, "LoRA: Low-rank adaptation of large language models"): each target
    linear map ``W x`` becomes ``W x + (alpha / rank) B A x`` with ``B`` starting at zero.
    ``targets``: any of q, k, v, out (attention projections), fc1, fc2 (feed-forward)."""

    rank: int = 8
    alpha: float = 16.0
    targets: tuple = ("q", "k", "v", "out")

    def __post_init__(self) -> None:
        bad = [t for t in self.targets if t not in LORA_TARGETS]
        if bad or not self.targets:
            raise ConfigError(f"lora.targets: {bad or '[]'}; each one of {LORA_TARGETS}")
        if self.rank < 1:
            raise ConfigError(f"lora.rank must be >= 1, got {self.rank}")


@dataclass(frozen=True, kw_only=True)
class FinetuneDataConfig:
    """Labelled data for ``esmjax finetune`` (formats in ``esmjax.io.labeled``).

    Attributes:
      csv: FLIP's sequence-task CSV: ``sequence,target[,set][,validation]`` (``set`` train/test,
        ``validation`` True/False marks train rows held out for validation).
      fasta / labels / mask: FLIP's residue-task layout: sequences, a label FASTA (one character
        per residue, ``SET=``/``VALIDATION=`` in the header) and an optional 0/1 mask FASTA.
      train / valid / test: explicit files instead (a CSV, or for residue tasks a label FASTA with
        the sequence FASTA in ``fasta``); they override the ``set``/``validation`` columns.
      valid_fraction: when nothing marks validation rows, this fraction of train (hash of the
        sequence) is held out.
      max_length: residues kept per sequence (longer ones are cropped, as ``esmjax embed``).
      batch_size: sequences per optimizer step (global); rows_per_device splits it into
        micro-batches (0: all at once), gradient accumulation covers the rest.
      skip_invalid: skip and count bad rows instead of stopping at the first.
    """

    csv: str = ""
    fasta: str = ""
    labels: str = ""
    mask: str = ""
    train: str = ""
    valid: str = ""
    test: str = ""
    valid_fraction: float = 0.1
    max_length: int = 1022
    batch_size: int = 16
    rows_per_device: int = 0
    skip_invalid: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        check_finite(self)
        check(self, "valid_fraction", 0 <= self.valid_fraction < 1, "in [0, 1)")
        check(self, "max_length", self.max_length >= 1, ">= 1")
        check(self, "batch_size", self.batch_size >= 1, ">= 1")
        check(self, "rows_per_device", self.rows_per_device >= 0, ">= 0 (0: the whole batch)")


@dataclass(frozen=True, kw_only=True)
class FinetuneConfig:
    """The root of ``esmjax finetune --config C``.

    Attributes:
      backbone: what ``esmjax train --init-from`` accepts (fair-esm .pt, HF folder, esmjax
        checkpoint or workdir, or a released model's name); backbone_step its step (-1: latest).
      task: sequence_classification | sequence_regression | residue_classification.
      multi_label: sequence classification with several labels per sequence (sigmoid, BCE).
      labels: class names in order (default: sorted classes of the training data).
      head: ``bos`` (HF ``EsmClassificationHead``: BOS token, dense, tanh, out_proj) or ``mean``
        (the same layers on the mean over residues); residue tasks use a linear layer per token.
      mode: full (every weight), lora (adapters + head) or frozen (head only).
      head_lr: peak learning rate of the head (0: ``optim.peak_lr``, the backbone's).
      best_metric: validation metric that picks the best checkpoint (default: mcc for single-label
        classification, macro_f1 for multi-label, spearman for regression, accuracy for residue
        tasks); patience: evaluations without improvement before stopping (0: never stop early).
    """

    backbone: str = ""
    backbone_step: int = -1
    task: str = "sequence_classification"
    multi_label: bool = False
    labels: tuple = ()
    head: str = "bos"
    mode: str = "full"
    lora: LoraConfig = field(default_factory=LoraConfig)
    dtype: str = "float32"
    remat: str = "none"
    mesh: MeshConfig = field(default_factory=MeshConfig)
    data: FinetuneDataConfig = field(default_factory=FinetuneDataConfig)
    optim: OptimConfig = field(
        default_factory=lambda: OptimConfig(peak_lr=1e-4, warmup_steps=50, weight_decay=0.01)
    )
    head_lr: float = 0.0
    checkpoint: CheckpointConfig = field(default_factory=lambda: CheckpointConfig(every=500))
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    profile: ProfileConfig = field(default_factory=ProfileConfig)
    num_steps: int = 1000
    log_every: int = 10
    eval_every: int = 100
    best_metric: str = ""
    patience: int = 0
    seed: int = 0
    # a step with a non-finite loss: "stop" before saving it, or "skip" its update (TrainConfig)
    nonfinite: str = "stop"

    def __post_init__(self) -> None:
        check_finite(self)
        check(self, "nonfinite", self.nonfinite in ("stop", "skip"), "stop or skip")
        check(self, "backbone_step", self.backbone_step >= -1, ">= -1 (-1: the latest)")
        check(self, "head_lr", self.head_lr >= 0, ">= 0 (0: the backbone's rate)")
        check(self, "num_steps", self.num_steps >= 1, ">= 1")
        check(self, "log_every", self.log_every >= 1, ">= 1")
        check(self, "eval_every", self.eval_every >= 0, ">= 0")
        check(self, "patience", self.patience >= 0, ">= 0 (0: no early stopping)")
        if self.task not in TASKS:
            raise ConfigError(f"task {self.task!r}: one of {', '.join(TASKS)}")
        if self.mode not in FINETUNE_MODES:
            raise ConfigError(f"mode {self.mode!r}: one of {', '.join(FINETUNE_MODES)}")
        if self.head not in ("bos", "mean"):
            raise ConfigError(f"head {self.head!r}: bos or mean")
        if self.multi_label and self.task != "sequence_classification":
            raise ConfigError("multi_label applies to sequence_classification only")

    @property
    def metric(self) -> str:
        if self.best_metric:
            return self.best_metric
        if self.task == "sequence_regression":
            return "spearman"
        if self.task == "residue_classification":
            return "accuracy"
        # MCC: a constant (majority-class) predictor scores 0 however skewed the classes are
        return "macro_f1" if self.multi_label else "mcc"


def load_finetune_config(path: str | Path | None, overrides: list[str] | tuple = ()) -> Any:
    """Reads a YAML fine-tuning config (``configs/finetune/*.yaml``) plus ``--set`` overrides."""
    tree: dict[str, Any] = {}
    if path is not None:
        tree = read_yaml_mapping(path)
    for item in overrides:
        set_path(tree, *split_override(item))
    try:
        cfg = from_dict(FinetuneConfig, tree)
    except ConfigError as e:  # as esmjax train's: the line starts with the file
        raise ConfigError(f"{path}: {e}" if path is not None else str(e)) from None
    if not cfg.backbone:
        raise ConfigError("backbone: the config names no backbone checkpoint")
    return cfg


def load_finetune_run_config(
    path: str | Path | None, overrides: list[str], workdir: str | Path
) -> Any:
    """The config for ``esmjax finetune``: the file plus overrides, or, resuming without
    ``--config``, the workdir's saved one."""
    if path is None:
        saved = saved_config(workdir)
        if overrides:
            raise ConfigError("--set needs --config")
        return from_dict(FinetuneConfig, json.loads(saved.read_text())["finetune"])
    return load_finetune_config(path, overrides)
