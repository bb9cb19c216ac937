"""How a step's global token budget splits into devices, processes and accumulation steps."""

from __future__ import annotations

from esmjax.config import ConfigError, TrainConfig


class Batching:
    """How the global token budget of a step splits into devices, processes and accumulation
    steps."""

    def __init__(self, cfg: TrainConfig, num_devices: int, loaders: int):
        """``loaders``: the groups of processes that load distinct rows
        (``esmjax.parallel.rows.row_share``; the process count when no tensor group spans
        processes)."""
        s = cfg.data.seq_len
        self.global_rows = cfg.data.tokens_per_step // s
        per_device = cfg.data.rows_per_device or max(1, self.global_rows // num_devices)
        self.micro_rows = (
            per_device * num_devices
        )  # rows of one accumulation step, over all devices
        if self.global_rows % self.micro_rows:
            raise ConfigError(
                f"{self.global_rows} rows per step do not split into micro-batches of "
                f"{per_device} rows x {num_devices} devices; change data.rows_per_device or "
                "data.tokens_per_step"
            )
        self.accum = self.global_rows // self.micro_rows
        if self.micro_rows % loaders:
            raise ConfigError(
                f"{self.micro_rows} rows per micro-batch do not split over the {loaders} "
                "groups of processes that load distinct rows"
            )
        self.process_rows = self.global_rows // loaders
        self.seq_len = s

    def __str__(self) -> str:
        return (
            f"{self.global_rows} rows x {self.seq_len} tokens per step = {self.accum} "
            f"accumulation step(s) of {self.micro_rows} rows"
        )
