"""``esmjax plan --config C --mesh data=..,fsdp=..,tensor=..``: memory and FLOPs of a run, ahead
of time, on mock devices."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="training YAML config")
    p.add_argument("--mesh", required=True, help="mesh sizes, e.g. data=1,fsdp=16,tensor=4")
    p.add_argument(
        "--devices", type=int, help="host CPU devices to create (default: the mesh size)"
    )
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field"
    )
    p.add_argument("--device-memory-gb", type=float, default=80.0, help="memory of one accelerator")
    p.add_argument("--json", help="also write the plan as JSON here")


def main(args: argparse.Namespace) -> int:
    from esmjax.train.plan import plan_run

    result = plan_run(
        args.config, args.set, args.mesh, args.devices, args.device_memory_gb, args.json
    )
    return 0 if result["fits"] else 1
