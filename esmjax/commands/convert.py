"""``esmjax convert SRC OUT`` and ``esmjax export CKPT --to fair-esm|hf OUT``."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from esmjax.errors import InputError
from esmjax.io import checkpoint
from esmjax.io import convert_esm2 as convert

log = logging.getLogger("esmjax.io.convert_esm2")


def add_convert_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "src", help="fair-esm .pt (e.g. esm2_t33_650M_UR50D.pt) or a HuggingFace model folder"
    )
    p.add_argument("out", help="esmjax checkpoint folder to create")
    p.add_argument(
        "--esm",
        default=None,
        help="ESMFold .pt only: the ESM-2 it folds with (fair-esm .pt, HF folder or esmjax "
        "checkpoint), e.g. esm2_t36_3B_UR50D.pt for esmfold_3B_v1.pt",
    )


def convert_main(args: argparse.Namespace) -> int:
    src = Path(args.src)
    if not src.exists():
        raise InputError(f"{src}: no such file or folder")
    from esmjax.io import convert_esmfold

    if convert_esmfold.is_esmfold_source(src):
        return convert_esmfold.convert_main(args)
    if args.esm is not None:
        raise InputError("--esm applies to ESMFold checkpoints only")
    cfg, params, notes = convert.read_any(src)
    for n in notes:
        log.warning("%s", n)
    checkpoint.save_converted(args.out, cfg, params, extra={"source": str(src)})
    print(
        f"wrote {args.out}: ESM-2 with {cfg.num_layers} layers, width {cfg.embed_dim}, "
        f"{cfg.num_heads} heads ({cfg.num_params() / 1e6:.2f}M parameters)",
        file=sys.stderr,
    )
    return 0


def add_export_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="esmjax checkpoint folder or training workdir")
    p.add_argument("out", help="output: a .pt file (fair-esm) or a folder (hf)")
    p.add_argument(
        "--to", required=True, choices=["fair-esm", "hf", "esmfold"], help="target format"
    )
    p.add_argument(
        "--folding-head",
        default=None,
        help="--to esmfold: the ESMFold (esmjax folder, fair-esm .pt or HF folder) whose trunk "
        "and heads fold with this checkpoint's ESM-2",
    )
    p.add_argument(
        "--step", type=int, default=None, help="training step to export (default: latest)"
    )


def export_main(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if out.exists() and (out.is_file() or any(out.iterdir())):
        raise InputError(f"{out} exists; refusing to overwrite")
    if args.to == "esmfold":
        from esmjax.io import convert_esmfold

        return convert_esmfold.export_main(args)
    model, step = checkpoint.load_model(args.checkpoint, step=args.step)
    params = checkpoint.params_numpy(model)
    cfg = model.cfg
    if args.to == "fair-esm":
        if out.suffix != ".pt":
            raise InputError("a fair-esm export is a .pt file; name it e.g. esm2_t6_8M_mine.pt")
        if not out.name.startswith("esm2"):
            log.warning(
                "fair-esm loads a local file as ESM-2 only when its name starts with 'esm2'"
            )
        out.parent.mkdir(parents=True, exist_ok=True)
        convert.write_fairesm(params, cfg, out)
    else:
        convert.write_hf(params, cfg, out)
    print(f"wrote {out} from step {step}", file=sys.stderr)
    return 0
