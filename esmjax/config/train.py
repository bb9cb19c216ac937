"""The training configs (data, optimizer, checkpoints, the run; the mesh is ``mesh``) and the YAML
loader of ``esmjax train``."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from esmjax.config.base import ConfigError, check, check_finite
from esmjax.config.mesh import MeshConfig
from esmjax.config.model import ESM2Config, check_same_architecture
from esmjax.config.serialize import (
    from_dict,
    read_yaml_mapping,
    saved_config,
    set_path,
    split_override,
    to_dict,
)


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """Input pipeline (see ``esmjax.data``).

    Attributes:
      train: a dataset folder built by ``esmjax data build`` or a FASTA file.
      eval: held-out data; empty means the dataset folder's validation split.
      seq_len: tokens per packed row, BOS and EOS included (ESM-2 crops at 1,024): a longer
        protein is cut to a window of ``seq_len`` tokens of ``BOS seq EOS``, keeping BOS/EOS only
        where the window reaches its real start/end.
      tokens_per_step: global tokens per optimizer step (ESM-2: about 2M = 2,048 x 1,024).
      rows_per_device: packed rows each device processes per micro-step; accumulation covers the
        rest.
      mask_prob / mask_token_prob / random_token_prob: BERT masking (15%, of which 80% <mask>, 10%
      random).
      cluster_exponent: 0 draws clusters uniformly (ESM-2), 1 draws sequences uniformly.
      max_segments: at most this many sequences packed into one row.
      seed: sampling seed (the masking seed derives from it and each row's place in the packed
        stream).
      num_workers: background worker processes (0 = in-process threads only).
      prefetch: batches prefetched ahead of the step.
      eval_tokens: held-out tokens evaluated at each evaluation (0 or less: the whole held-out
        split).
      val_fraction: for a FASTA ``train``, the fraction of records held out for evaluation (each
        record is its own cluster; the same hash rule as ``esmjax data build --val-fraction``).
    """

    train: str = ""
    eval: str = ""
    seq_len: int = 1024
    tokens_per_step: int = 2_097_152
    rows_per_device: int = 0
    mask_prob: float = 0.15
    mask_token_prob: float = 0.8
    random_token_prob: float = 0.1
    cluster_exponent: float = 0.0
    max_segments: int = 64
    seed: int = 0
    num_workers: int = 0
    prefetch: int = 2
    eval_tokens: int = 65_536
    val_fraction: float = 0.005

    def __post_init__(self) -> None:
        check_finite(self)
        check(self, "seq_len", self.seq_len >= 3, ">= 3 (BOS, a residue, EOS)")
        check(self, "tokens_per_step", self.tokens_per_step >= 1, "positive")
        check(self, "rows_per_device", self.rows_per_device >= 0, ">= 0 (0: the rows per step)")
        check(self, "mask_prob", 0 < self.mask_prob <= 1, "in (0, 1]")
        check(self, "mask_token_prob", 0 <= self.mask_token_prob <= 1, "in [0, 1]")
        check(self, "random_token_prob", 0 <= self.random_token_prob <= 1, "in [0, 1]")
        check(
            self,
            "random_token_prob",
            self.mask_token_prob + self.random_token_prob <= 1,
            f"at most 1 - data.mask_token_prob={self.mask_token_prob}",
        )
        check(self, "cluster_exponent", self.cluster_exponent >= 0, ">= 0")
        check(self, "max_segments", self.max_segments >= 1, ">= 1")
        check(self, "num_workers", self.num_workers >= 0, ">= 0")
        check(self, "prefetch", self.prefetch >= 1, ">= 1")
        check(self, "val_fraction", 0 <= self.val_fraction < 1, "in [0, 1)")


@dataclass(frozen=True, kw_only=True)
class OptimConfig:
    """AdamW with linear warm-up and linear decay to ``final_lr_ratio`` of peak (ESM-2 recipe, Lin
    et al. 2023).

    The decay runs over ``decay_fraction`` of ``TrainConfig.num_steps`` and then holds.
    """

    peak_lr: float = 4e-4
    warmup_steps: int = 2000
    decay_fraction: float = 0.9
    final_lr_ratio: float = 0.1
    b1: float = 0.9
    b2: float = 0.98
    eps: float = 1e-8
    weight_decay: float = 0.01
    grad_clip: float = 1.0

    def __post_init__(self) -> None:
        check_finite(self)
        check(self, "peak_lr", self.peak_lr > 0, "positive")
        check(self, "warmup_steps", self.warmup_steps >= 0, ">= 0")
        check(self, "decay_fraction", 0 < self.decay_fraction <= 1, "in (0, 1]")
        check(self, "final_lr_ratio", 0 <= self.final_lr_ratio <= 1, "in [0, 1]")
        check(self, "b1", 0 <= self.b1 < 1, "in [0, 1)")
        check(self, "b2", 0 <= self.b2 < 1, "in [0, 1)")
        check(self, "eps", self.eps > 0, "positive")
        check(self, "weight_decay", self.weight_decay >= 0, ">= 0")
        check(self, "grad_clip", self.grad_clip >= 0, ">= 0 (0: no clipping)")


@dataclass(frozen=True, kw_only=True)
class CheckpointConfig:
    """Orbax checkpointing: save every ``every`` steps, keep the last ``keep`` and every
    ``keep_every``-th."""

    every: int = 1000
    keep: int = 3
    keep_every: int = 0
    async_save: bool = True

    def __post_init__(self) -> None:
        check(self, "every", self.every >= 1, ">= 1 (steps between checkpoints)")
        check(self, "keep", self.keep >= 1, ">= 1 (a run must keep its latest checkpoint)")
        check(self, "keep_every", self.keep_every >= 0, ">= 0 (0: none kept beyond keep)")


@dataclass(frozen=True, kw_only=True)
class WandbConfig:
    """A Weights & Biases run beside ``metrics.jsonl`` and TensorBoard (process 0 only; needs the
    ``wandb`` extra). An empty ``project`` logs nothing to W&B; ``entity`` empty is the account's
    default, ``name`` empty lets W&B pick one. A resumed run goes on in the same W&B run (its id is
    kept in ``<workdir>/wandb_run_id``)."""

    project: str = ""
    entity: str = ""
    name: str = ""

    def __post_init__(self) -> None:
        for name in ("entity", "name"):
            check(
                self,
                name,
                not getattr(self, name) or bool(self.project),
                "empty without metrics.wandb.project (which turns W&B on)",
            )


@dataclass(frozen=True, kw_only=True)
class MetricsConfig:
    """Where log lines go besides ``metrics.jsonl`` and TensorBoard."""

    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass(frozen=True, kw_only=True)
class ProfileConfig:
    """A ``jax.profiler`` trace of steps ``start_step .. start_step + num_steps - 1`` (1-based)
    into ``<workdir>/profile/`` (TensorBoard's profile plugin or Perfetto read it); ``num_steps``
    0 traces nothing. ``processes``: "0" traces process 0 only, "all" every process."""

    start_step: int = 1
    num_steps: int = 0
    processes: str = "0"

    def __post_init__(self) -> None:
        check(self, "start_step", self.start_step >= 1, ">= 1 (steps count from 1)")
        check(self, "num_steps", self.num_steps >= 0, ">= 0 (0: no trace)")
        check(self, "processes", self.processes in ("0", "all"), "0 or all")


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """The root of a training run (``esmjax train --config C``)."""

    model: ESM2Config
    mesh: MeshConfig = field(default_factory=MeshConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    profile: ProfileConfig = field(default_factory=ProfileConfig)
    num_steps: int = 500_000
    log_every: int = 10
    eval_every: int = 1000
    seed: int = 0
    # a device kind of esmjax.train.metrics.PEAK_BF16_FLOPS (the MFU peak); empty = the local device
    accelerator: str = ""
    # continued pretraining: the weights a new run starts from (a fair-esm .pt, an HF folder, an
    # esmjax checkpoint or training workdir) and its step (-1: the latest). The optimizer and the
    # schedule start fresh; a run that has its own checkpoints resumes them and ignores this.
    init_from: str = ""
    init_step: int = -1
    # JAX's persistent compilation cache, so that a restart or a preempted run coming back loads
    # the compiled step instead of compiling it again (minutes for 15B): "auto" is
    # $JAX_COMPILATION_CACHE_DIR when set, else <workdir>/compile_cache (local or a bucket,
    # shared by the run's hosts); "off", or a folder or bucket URL of its own.
    compile_cache: str = "auto"
    # a step whose loss is NaN or infinite: "stop" ends the run before that step is saved (one
    # line; the last checkpoint is the last good state); "skip" leaves the parameters and the
    # optimizer state as they were and goes on (one warning line per skipped step)
    nonfinite: str = "stop"

    def __post_init__(self) -> None:
        check(self, "nonfinite", self.nonfinite in ("stop", "skip"), "stop or skip")
        check(self, "num_steps", self.num_steps >= 0, ">= 0 (0: evaluate the starting weights)")
        check(self, "log_every", self.log_every >= 1, ">= 1")
        check(self, "eval_every", self.eval_every >= 0, ">= 0 (0: at the end only)")
        check(self, "init_step", self.init_step >= -1, ">= -1 (-1: the latest)")
        d = self.data
        if d.tokens_per_step % d.seq_len:  # training packs whole rows
            raise ConfigError(
                f"data.tokens_per_step: must be a multiple of data.seq_len={d.seq_len}, got "
                f"{d.tokens_per_step}"
            )


def load_config(
    path: str | Path | None,
    overrides: list[str] | tuple[str, ...] = (),
    source_model: Any = None,
) -> TrainConfig:
    """Reads a YAML training config and applies ``key.path=value`` overrides.

    Every problem is a one-line ``ConfigError`` that starts with the file and names the key, e.g.
    ``configs/x.yaml: model.num_heads: 7 does not divide model.embed_dim 320``.

    With ``init_from`` set, the model comes from that source (``source_model(src) -> ESM2Config``,
    supplied by the caller since reading checkpoints is a layer above): a config without a model
    section takes the source's, and one that names a different network is an error. Compute
    fields (``dtype``, ``remat``) may still be set.
    """
    tree: dict[str, Any] = {}
    if path is not None:
        tree = read_yaml_mapping(path)
    if isinstance(tree.get("model"), str):
        tree["model"] = {"preset": tree["model"]}
    model_overrides = []
    for item in overrides:
        key, raw = split_override(item)
        if key.startswith("model."):
            model_overrides.append((key, raw))
            continue
        set_path(tree, key, raw)
    src = tree.get("init_from") or ""
    source_cfg = source_model(str(src)) if src and source_model is not None else None
    named = "model" in tree
    if not named and source_cfg is not None:
        tree["model"] = to_dict(source_cfg)
    for key, raw in model_overrides:
        if "model" not in tree:
            raise ConfigError("--set model.*: the config names no model")
        set_path(tree, key, raw)
    if "model" not in tree:
        raise ConfigError("the config must name a model (a preset name or a mapping)")
    try:
        cfg = from_dict(TrainConfig, tree)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}" if path is not None else str(e)) from None
    if named and source_cfg is not None:
        check_same_architecture(cfg.model, source_cfg, str(src))
    return cfg


def load_run_config(
    path: str | Path | None, overrides: list[str], workdir: str | Path, source_model: Any = None
) -> TrainConfig:
    """The config for ``esmjax train``: the file plus overrides, or the workdir's saved config
    when resuming."""
    if path is None:
        saved = saved_config(workdir)
        tree = json.loads(saved.read_text())
        try:
            cfg = from_dict(TrainConfig, tree)
        except ConfigError as e:
            raise ConfigError(f"{saved}: {e}") from None
        if overrides:
            raise ConfigError("--set needs --config")
        return cfg
    return load_config(path, overrides, source_model)
