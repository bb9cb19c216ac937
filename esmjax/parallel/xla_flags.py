"""The compiler flags a run sets per platform: one place that the launchers (``launch/``) and
``esmjax plan --target`` both read, so that a plan compiles the program the launcher runs.

TPU (``LIBTPU_INIT_ARGS``): async collective fusion, so that FSDP's per-layer all-gathers and
reduce-scatters run as ``-start``/``-done`` pairs the scheduler overlaps with the layer before (the
set MaxText's and Cloud TPU's reference recipes run with). Without them libtpu 0.0.42 schedules
every all-gather of the layer scan synchronously (``esmjax plan --target v5p-8`` prints the async
share of each collective).

GPU (``XLA_FLAGS``): the latency-hiding scheduler, and pipelined all-gather / reduce-scatter /
all-reduce with while-loop double buffering, so that the layer scan prefetches the next layer's
weights (NVIDIA JAX-Toolbox's recommendations for FSDP). Every flag is one jaxlib 0.10.2 accepts:
an unknown one aborts XLA at start-up, which ``tests/test_targets.py`` would catch.

    python -m esmjax.parallel.xla_flags tpu   # prints the flags, for a launcher's export
"""

from __future__ import annotations

import os
import sys
from collections.abc import MutableMapping

FLAGS: dict[str, tuple[str, tuple[str, ...]]] = {
    "tpu": (
        "LIBTPU_INIT_ARGS",
        (
            "--xla_tpu_enable_async_collective_fusion=true",
            "--xla_tpu_enable_async_collective_fusion_fuse_all_gather=true",
            "--xla_tpu_enable_async_collective_fusion_multiple_steps=true",
            "--xla_tpu_overlap_compute_collective_tc=true",
            "--xla_enable_async_all_gather=true",
            "--xla_tpu_enable_data_parallel_all_reduce_opt=true",
            "--xla_tpu_data_parallel_opt_different_sized_ops=true",
        ),
    ),
    "gpu": (
        "XLA_FLAGS",
        (
            "--xla_gpu_enable_latency_hiding_scheduler=true",
            "--xla_gpu_enable_pipelined_all_gather=true",
            "--xla_gpu_enable_pipelined_reduce_scatter=true",
            "--xla_gpu_enable_pipelined_all_reduce=true",
            "--xla_gpu_enable_while_loop_double_buffering=true",
        ),
    ),
}


def flags(platform: str) -> tuple[str, str]:
    """(environment variable, flags) for ``platform`` (``tpu`` or ``gpu``)."""
    var, values = FLAGS[platform]
    return var, " ".join(values)


def apply(platform: str, env: MutableMapping[str, str] | None = None) -> None:
    """Adds ``platform``'s flags to its variable in ``env`` (default ``os.environ``), keeping what
    the user set: a flag the user gave (by name) wins. Must run before the backend starts."""
    env = os.environ if env is None else env
    if platform not in FLAGS:
        return
    var, values = FLAGS[platform]
    given = env.get(var, "").split()
    names = {f.split("=", 1)[0] for f in given}
    extra = [f for f in values if f.split("=", 1)[0] not in names]
    env[var] = " ".join([*given, *extra])


if __name__ == "__main__":
    print(flags(sys.argv[1])[1] if len(sys.argv) == 2 and sys.argv[1] in FLAGS else "")
