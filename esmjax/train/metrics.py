"""Throughput accounting (FLOPs, MFU) and the metrics sinks: ``metrics.jsonl`` and TensorBoard event
files.

Training FLOPs per token follow the PaLM/Megatron accounting without causal halving, since ESM-2
attention is
bidirectional: ``6 * (matmul weights) + 12 * N * E * S`` (forward + backward of the weight matmuls,
  and of the
S x S attention scores and values), counting full padded rows as BioNeMo does.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import jax

from esmjax.config import ESM2Config

# Dense bf16 peak FLOP/s per device (vendor data sheets, dense not sparse).
PEAK_FLOPS = {
    "h100": 989e12,
    "h200": 989e12,
    "b200": 2250e12,
    "a100": 312e12,
    "l4": 121e12,
    "v100": 125e12,
    "tpu v4": 275e12,
    "tpu v5 lite": 197e12,
    "tpu v5e": 197e12,
    "tpu v5p": 459e12,
    "tpu v6 lite": 918e12,
    "tpu v6e": 918e12,
}
# Host CPU, per core: AVX-512 fp32, 2 FMA units x 16 lanes x 2 FLOP x ~2.5 GHz. A CPU device's peak
# is this times
# the cores it shares; MFU on a CPU is only a rough indication.
CPU_CORE_PEAK_FLOPS = 160e9


def matmul_params(cfg: ESM2Config) -> int:
    e, f, n, v = cfg.embed_dim, cfg.mlp_dim, cfg.num_layers, cfg.vocab_size
    return n * (4 * e * e + 2 * e * f) + e * e + e * v


def train_flops_per_token(cfg: ESM2Config, seq_len: int) -> float:
    return 6.0 * matmul_params(cfg) + 12.0 * cfg.num_layers * cfg.embed_dim * seq_len


def device_peak_flops(accelerator: str = "") -> float | None:
    """Peak FLOP/s of one device, from ``accelerator`` or the local device kind; None when
    unknown."""
    if not accelerator and jax.local_devices()[0].platform == "cpu":
        return CPU_CORE_PEAK_FLOPS * (os.cpu_count() or 1) / jax.local_device_count()
    kind = (accelerator or jax.local_devices()[0].device_kind).lower()
    for key in sorted(PEAK_FLOPS, key=len, reverse=True):
        if key in kind:
            return PEAK_FLOPS[key]
    return None


class MetricsWriter:
    """Appends JSON lines to ``W/metrics.jsonl`` and scalars to TensorBoard (process 0 only)."""

    def __init__(self, workdir: Path, resume_step: int, enabled: bool = True):
        self.enabled = enabled
        self.path = workdir / "metrics.jsonl"
        self.tb = None
        if not enabled:
            return
        if (
            self.path.exists()
        ):  # drop lines past the restored step: the resumed run writes them again
            kept = [
                l
                for l in self.path.read_text().splitlines()
                if l.strip() and json.loads(l)["step"] <= resume_step
            ]
            self.path.write_text("".join(k + "\n" for k in kept))
        try:
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(
                str(workdir / "tensorboard"), purge_step=resume_step + 1 if resume_step else None
            )
        except ImportError:
            self.tb = None

    def write(self, step: int, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        clean = {
            k: (None if isinstance(v, float) and not math.isfinite(v) else v)
            for k, v in values.items()
        }
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **clean}) + "\n")
        if self.tb is not None:
            for k, v in clean.items():
                if isinstance(v, (int, float)) and v is not None:
                    self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
