"""How a step's rows split into devices, loaders and accumulation steps, and how a loader's rows
become the step's global batch on the mesh: the one split and the one placement of pretraining
and fine-tuning."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from esmjax.config import ConfigError, TrainConfig
from esmjax.parallel import sharding as shd
from esmjax.parallel.rows import RowShare, assemble, row_share

if TYPE_CHECKING:
    from esmjax.config.mesh import Rules


class Batching:
    """A step of ``rows`` rows: micro-batches of ``rows_per_device`` rows on each of ``devices``
    devices (0: as many as one micro-batch takes), accumulated over ``accum`` scan steps; each of
    the ``loaders`` groups of processes that load distinct rows (``RowShare.count``) loads
    ``process_rows`` of them."""

    def __init__(
        self, rows: int, rows_per_device: int, devices: int, loaders: int, what: str, seq_len=0
    ):
        self.global_rows = rows
        per_device = rows_per_device or max(1, rows // devices)
        self.micro_rows = per_device * devices  # rows of one accumulation step, over all devices
        if rows % self.micro_rows:
            raise ConfigError(
                f"{rows} rows per step ({what}) do not split into micro-batches of {per_device} "
                f"rows x {devices} devices; change data.rows_per_device or {what}"
            )
        self.accum = rows // self.micro_rows
        if self.micro_rows % loaders:
            raise ConfigError(
                f"{self.micro_rows} rows per micro-batch do not split over the {loaders} "
                "groups of processes that load distinct rows"
            )
        self.process_rows = rows // loaders
        self.seq_len = seq_len

    @classmethod
    def pretraining(cls, cfg: TrainConfig, num_devices: int, loaders: int) -> Batching:
        """Pretraining's step: ``data.tokens_per_step`` in rows of ``data.seq_len`` tokens."""
        rows = cfg.data.tokens_per_step // cfg.data.seq_len
        what = "data.tokens_per_step"
        return cls(rows, cfg.data.rows_per_device, num_devices, loaders, what, cfg.data.seq_len)

    def __str__(self) -> str:
        tokens = f" x {self.seq_len} tokens" if self.seq_len else ""
        return (
            f"{self.global_rows} rows{tokens} per step = {self.accum} accumulation step(s) of "
            f"{self.micro_rows} rows"
        )


class Placement:
    """The global batch of a step on ``mesh``: arrays [A, R, ...] with the rows R split over the
    ``act_batch`` rule's axes; processes holding the same rows form one loader and load the same
    rows (``esmjax.parallel.rows``)."""

    def __init__(self, mesh: Mesh, rules: Rules):
        rows = shd.batch_sharding(mesh, rules, 1).spec[0]
        self.sharding = NamedSharding(mesh, P(None, rows))
        self.share: RowShare = row_share(self.sharding, dim=1)
        names = () if rows is None else (rows,) if isinstance(rows, str) else rows
        self.devices = math.prod(shd.mesh_sizes(mesh)[a] for a in names)  # devices a row splits

    def put(self, local: dict[str, np.ndarray], accum: int) -> dict[str, jax.Array]:
        """This loader's rows [r, ...] -> the global arrays [A, R, ...]."""
        return {
            k: assemble(v.reshape(accum, -1, *v.shape[1:]), self.sharding, self.share, dim=1)
            for k, v in local.items()
        }

    def put_whole(self, batch: dict[str, np.ndarray], accum: int) -> dict[str, jax.Array]:
        """The same from the whole batch [R, ...], which every process holds: this loader's rows
        of each accumulation step are taken from it."""
        n = self.share.count
        i = self.share.index
        local = {}
        for k, v in batch.items():
            v = v.reshape(accum, n, -1, *v.shape[1:])[:, i]
            local[k] = v.reshape(-1, *v.shape[2:])
        return self.put(local, accum)
