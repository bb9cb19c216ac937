"""``esmjax finetune --config C --workdir W [--set k=v ...]``: argv -> config ->
``esmjax.train.finetune.run``."""

from __future__ import annotations

import argparse
import contextlib


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config (configs/finetune/*.yaml); optional when resuming")
    p.add_argument(
        "--workdir", required=True, help="run folder: checkpoints, best/, metrics.jsonl, report"
    )
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field"
    )
    p.add_argument(
        "--backbone",
        help="backbone checkpoint, or a released model by name (esm2_t12_35M_UR50D, "
        "facebook/esm2_t12_35M_UR50D; downloaded first) (sets backbone=)",
    )
    p.add_argument("--train", help="training file (sets data.train=)")
    p.add_argument("--valid", help="validation file (sets data.valid=)")
    p.add_argument("--test", help="test file (sets data.test=)")
    p.add_argument(
        "--skip-invalid", action="store_true", help="skip and count bad rows instead of stopping"
    )
    p.add_argument("--coordinator-address", help="host:port of process 0 (multi-process runs)")
    p.add_argument("--num-processes", type=int, help="number of processes (multi-process runs)")
    p.add_argument("--process-id", type=int, help="this process's index (multi-process runs)")
    p.add_argument(
        "--stop-after", type=int, metavar="N", help="stop (with a checkpoint) after N steps"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def main(args: argparse.Namespace) -> int:
    from esmjax.config import load_finetune_run_config
    from esmjax.inference import preflight
    from esmjax.io import labeled, paths

    flags = {
        "backbone": args.backbone,
        "data.train": args.train,
        "data.valid": args.valid,
        "data.test": args.test,
        "data.skip_invalid": "true" if args.skip_invalid else None,
    }
    overrides = list(args.set) + [f"{k}={v}" for k, v in flags.items() if v is not None]
    workdir = args.workdir  # a local folder or a bucket URL: esmjax.io.paths reads both
    # Before the start-up, so that a bad config or a missing local file is the only line printed.
    # Resuming without --config reads the workdir's config.json: a store failure is one line.
    preflight.output(workdir, f"--workdir {workdir}")
    preflight.workdir_kind(workdir, "finetune")
    reading = paths.remote_errors(workdir) if args.config is None else contextlib.nullcontext()
    with reading:
        cfg = load_finetune_run_config(args.config, overrides, workdir)
    preflight.local_source(cfg.backbone)
    labeled.check(cfg.data, cfg.task)
    cfg = _stored_paths(cfg, workdir)
    preflight.start(args.coordinator_address, args.num_processes, args.process_id)
    from esmjax.train.finetune import run
    from esmjax.train.preemption import EXIT_PREEMPTED

    result = run(cfg, workdir, progress=not args.no_progress, stop_after=args.stop_after)
    # 75: stopped by a signal with a checkpoint, not finished; the launchers start it again
    return EXIT_PREEMPTED if result.get("preempted") else 0


def _stored_paths(cfg, workdir: str):
    """The backbone and data files as the run's config.json keeps them (``preflight.stored_path``);
    a local workdir's saved backbone is kept when it names the same folder (the resumed run
    compares them)."""
    import dataclasses
    import json
    from pathlib import Path

    from esmjax.inference.preflight import stored_path
    from esmjax.io import paths

    saved = None
    if not paths.is_remote(workdir) and (Path(workdir) / "config.json").is_file():
        saved = json.loads((Path(workdir) / "config.json").read_text()).get("finetune", {})
    keys = ("csv", "fasta", "labels", "mask", "train", "valid", "test")
    data = dataclasses.replace(cfg.data, **{k: stored_path(getattr(cfg.data, k)) for k in keys})
    backbone = stored_path(cfg.backbone, (saved or {}).get("backbone"), weights=True)
    return dataclasses.replace(cfg, backbone=backbone, data=data)
