"""``esmjax train --config C --workdir W [--set key=value ...]``: argv -> config -> ``loop.run``."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config", help="YAML config (configs/*.yaml); optional when resuming a workdir"
    )
    p.add_argument(
        "--workdir", required=True, help="run folder: checkpoints, metrics.jsonl, tensorboard/"
    )
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field"
    )
    p.add_argument(
        "--init-from",
        metavar="SRC",
        help="start a new run from these weights: fair-esm .pt, HF folder, esmjax checkpoint or "
        "workdir (the model config comes from SRC; optimizer and schedule start fresh)",
    )
    p.add_argument(
        "--init-step", type=int, metavar="N", help="the step of an esmjax SRC (default: latest)"
    )
    p.add_argument("--coordinator-address", help="host:port of process 0 (multi-process runs)")
    p.add_argument("--num-processes", type=int, help="number of processes (multi-process runs)")
    p.add_argument("--process-id", type=int, help="this process's index (multi-process runs)")
    p.add_argument(
        "--stop-after",
        type=int,
        metavar="N",
        help="stop (with a checkpoint) after N steps of this run",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def main(args: argparse.Namespace) -> int:
    from esmjax.parallel import distributed

    distributed.initialize(args.coordinator_address, args.num_processes, args.process_id)
    from esmjax.config import load_run_config
    from esmjax.io.convert import source_model_config
    from esmjax.train.loop import run

    workdir = args.workdir  # a local folder or a bucket URL: esmjax.io.paths reads both
    overrides = list(args.set)
    if args.init_from:
        overrides.append(f"init_from={args.init_from}")
    if args.init_step is not None:
        overrides.append(f"init_step={args.init_step}")
    cfg = load_run_config(args.config, overrides, workdir, source_model=source_model_config)
    run(cfg, workdir, progress=not args.no_progress, stop_after=args.stop_after)
    return 0
