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
        "workdir, or a released model by name (esm2_t12_35M_UR50D, facebook/esm2_t12_35M_UR50D; "
        "downloaded first) (the model config comes from SRC; optimizer and schedule start fresh)",
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
    from esmjax.inference import preflight

    # before the start-up: a bad workdir or config is the only line printed
    preflight.output(args.workdir, f"--workdir {args.workdir}")
    preflight.workdir_kind(args.workdir, "train")
    cfg = _checked_config(args)
    preflight.start(args.coordinator_address, args.num_processes, args.process_id)
    from esmjax.io.convert import source_model_config
    from esmjax.train.loop import run
    from esmjax.train.preemption import EXIT_PREEMPTED

    if cfg is None:
        cfg = _config(args, source_model_config)
    cfg = _stored_paths(cfg)

    from esmjax.io import paths

    # a write the disk refuses outside the checkpoints and metrics.jsonl, which name their own
    # (config.json, the compilation cache): one line naming the workdir
    with paths.write_errors(args.workdir):
        result = run(cfg, args.workdir, progress=not args.no_progress, stop_after=args.stop_after)
    # 75: stopped by a signal with a checkpoint, not finished; the launchers start it again
    return EXIT_PREEMPTED if result.get("preempted") else 0


def _stored_paths(cfg):
    """The run's data and init_from as its config.json keeps them (``preflight.stored_path``)."""
    import dataclasses

    from esmjax.inference.preflight import stored_path

    data = dataclasses.replace(
        cfg.data, train=stored_path(cfg.data.train), eval=stored_path(cfg.data.eval)
    )
    return dataclasses.replace(cfg, data=data, init_from=stored_path(cfg.init_from, weights=True))


class _BucketSource(Exception):
    """``init_from`` is a bucket URL: its model is read after the start-up (``_checked_config``)."""


def _local_source_model(src: str):
    from esmjax.io import paths
    from esmjax.io.convert import source_model_config

    if paths.is_remote(src):
        raise _BucketSource(src)
    return source_model_config(src)


def _config(args: argparse.Namespace, source_model):
    from esmjax.config import load_run_config

    workdir = args.workdir  # a local folder or a bucket URL: esmjax.io.paths reads both
    overrides = list(args.set)
    if args.init_from:
        overrides.append(f"init_from={args.init_from}")
    if args.init_step is not None:
        overrides.append(f"init_step={args.init_step}")
    return load_run_config(args.config, overrides, workdir, source_model=source_model)


def _checked_config(args: argparse.Namespace):
    """The run's config, parsed and validated, and its local data checked to exist; None when
    ``init_from`` is a bucket URL: a model in a fair-esm .pt or HF folder there is downloaded to be
    read, which waits until after the start-up as before (a pod's processes start together)."""
    from esmjax.data import source

    try:
        cfg = _config(args, _local_source_model)  # a local init_from is read (and checked) here
    except _BucketSource:
        return None
    source.check_path(cfg.data.train)
    if cfg.data.eval:
        source.check_path(cfg.data.eval)
    return cfg
