"""The ``esmjax`` console script.

Each subcommand lives in the module that implements it; that module defines
``add_arguments(parser)`` and ``main(args) -> int``. Modules are imported only when their subcommand
runs, so ``esmjax --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from esmjax.errors import InputError

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("esmjax.commands.train", "pretrain or resume ESM-2 (masked LM) on one or many hosts"),
    "convert": (
        "esmjax.commands.convert",
        "convert fair-esm .pt / HuggingFace weights into an esmjax checkpoint",
    ),
    "export": (
        "esmjax.commands.convert",
        "export an esmjax checkpoint to fair-esm .pt or a HuggingFace folder",
    ),
    "plan": (
        "esmjax.train.plan",
        "compile the train step ahead of time and report memory and FLOPs per device",
    ),
    "embed": (
        "esmjax.inference.embed",
        "per-residue / mean embeddings, logits and contacts for a FASTA file",
    ),
    "fold": (
        "esmjax.inference.fold",
        "ESMFold structures (PDB) and confidences (pLDDT, pTM, PAE) for a FASTA file",
    ),
    "data": (
        "esmjax.commands.data",
        "build a training dataset from FASTA (+ cluster TSV), inspect it",
    ),
    "evaluate": (
        "esmjax.commands.evaluate",
        "perplexity, contacts, variants, ProteinGym, structure scores, report cards",
    ),
    "plot": (
        "esmjax.evaluate.plot",
        "loss and perplexity curves of a training workdir (metrics.jsonl)",
    ),
}


def _setup_logging() -> None:
    logging.basicConfig(
        level=os.environ.get("ESMJAX_LOG", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    for noisy in ("absl", "orbax", "jax._src", "tensorflow_datasets", "etils"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


def build_parser(command: str | None) -> argparse.ArgumentParser:
    """The parser; only the chosen subcommand's module is imported to add its options."""
    parser = argparse.ArgumentParser(prog="esmjax", description="ESM-2 / ESMFold in JAX")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == command:
            mod = importlib.import_module(module)
            getattr(mod, f"add_{name}_arguments", getattr(mod, "add_arguments", None))(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = argv[0] if argv and argv[0] in COMMANDS else None
    parser = build_parser(command)
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    _setup_logging()
    mod = importlib.import_module(COMMANDS[args.command][0])
    entry = getattr(mod, f"{args.command}_main", None) or mod.main
    try:
        return int(entry(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except InputError as e:
        print(f"esmjax {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
