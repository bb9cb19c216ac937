"""``esmjax plan``: compile a run's program for an accelerator (``--target``) or on host CPU
devices, and report the compiler's memory, kernels and collectives."""

from __future__ import annotations

import argparse

JOBS = ("train", "embed", "fold")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="training YAML config (job train; the model of embed/fold)")
    p.add_argument(
        "--target",
        help="compile for this accelerator with its own compiler, no device needed: a Cloud TPU "
        "name (v5p-128, v6e-64), a TPU topology (v5p:4x4x4), or NVIDIA GPUs (h100 = one host of "
        "8, h100-64, h200:16x8 = 16 hosts of 8)",
    )
    p.add_argument("--slices", type=int, default=1, help="TPU slices (multi-slice over DCN)")
    p.add_argument(
        "--mesh",
        help="mesh sizes, e.g. data=1,fsdp=16,tensor=4 (default with --target: the config's mesh "
        "over the target's devices; needed without)",
    )
    p.add_argument("--job", choices=JOBS, default="train", help="which program (default train)")
    p.add_argument("--model", help="embed/fold: an ESM-2 preset, or esmfold_v1 (fold's default)")
    p.add_argument("--rows", type=int, default=1, help="embed/fold: sequences per batch")
    p.add_argument(
        "--length", type=int, help="embed/fold: residues per sequence (1022 / 384 by default)"
    )
    p.add_argument(
        "--devices", type=int, help="host CPU devices to create without --target (default: mesh)"
    )
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field"
    )
    p.add_argument(
        "--device-memory-gb",
        type=float,
        default=80.0,
        help="without --target: memory of one accelerator in GiB (a target knows its own)",
    )
    p.add_argument("--json", help="also write the plan as JSON here")


def main(args: argparse.Namespace) -> int:
    from esmjax.train.plan import plan_run

    result = plan_run(
        args.config,
        args.set,
        args.mesh,
        args.devices,
        args.device_memory_gb,
        args.json,
        target=args.target,
        slices=args.slices,
        job=args.job,
        model=args.model,
        rows=args.rows,
        length=args.length,
    )
    return 0 if result["fits"] else 1
