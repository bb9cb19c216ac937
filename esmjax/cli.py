"""The ``esmjax`` console script: the command table only.

Each command is the module ``esmjax.commands.<name>``, which defines ``add_arguments(parser)`` and
``main(args) -> int`` (argv -> config -> one library call). A module is imported only when its
command runs, so ``esmjax --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import traceback

from esmjax.errors import InputError, StalledWrite

# name -> one-line help; the command lives in ``esmjax.commands.<name>`` (``-`` -> ``_``).
COMMANDS: dict[str, str] = {
    "train": "pretrain or resume ESM-2 (masked LM) on one or many hosts",
    "convert": "convert fair-esm .pt / HuggingFace weights into an esmjax checkpoint",
    "export": "export a checkpoint or fine-tuned model to fair-esm, HuggingFace, PEFT or ESMFold",
    "plan": "compile the train step ahead of time and report memory and FLOPs per device",
    "embed": "per-residue / mean embeddings, logits and contacts for a FASTA file",
    "fold": "ESMFold structures (PDB) and confidences (pLDDT, pTM, PAE) for a FASTA file",
    "data": "build a training dataset from FASTA (+ cluster TSV), inspect it",
    "evaluate": "perplexity, contacts, variants, ProteinGym and structure scores of a checkpoint",
    "finetune": "fine-tune ESM-2 on a sequence or residue task (full, LoRA or frozen backbone)",
    "inspect-outputs": "the units of an embed/fold/predict/evaluate job folder: done, missing, "
    "damaged",
    "predict": "predictions of a fine-tuned task model: one .csv/.jsonl, or shards as a job",
    "plot": "loss and perplexity curves of a training workdir (metrics.jsonl)",
}


def command_module(name: str):
    return importlib.import_module(f"esmjax.commands.{name.replace('-', '_')}")


LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"  # every log line of a command
LOG_DATEFMT = "%H:%M:%S"
# Libraries whose INFO lines (TFDS's "Downloading and preparing dataset", absl's, Orbax's) show only
# with --verbose; esmjax.data.builder also keeps TFDS's prints and progress bars off by their level.
NOISY = ("absl", "orbax", "jax._src", "tensorflow_datasets", "etils")


def _setup_logging(verbose: bool = False) -> None:
    for h in logging.root.handlers[:]:
        # Orbax's import logs through absl, whose first line installs the default
        # "WARNING:name:message" handler (a plain StreamHandler; pytest's are subclasses)
        if type(h) is logging.StreamHandler:
            logging.root.removeHandler(h)
    logging.basicConfig(
        level=os.environ.get("ESMJAX_LOG", "INFO"),
        format=LOG_FORMAT,
        datefmt=LOG_DATEFMT,
        stream=sys.stderr,
    )
    for noisy in NOISY:
        logging.getLogger(noisy).setLevel(logging.INFO if verbose else logging.ERROR)
    if os.environ.get("ESMJAX_LOG", "INFO").upper() != "DEBUG":
        # Orbax logs each failed background write with its traceback (several per failed save); the
        # failure reaches the user as one error line (esmjax.train.checkpoints)
        if not verbose:
            logging.getLogger("absl").setLevel(logging.CRITICAL)
        sys.unraisablehook = _without_closed_loops(sys.unraisablehook)
        logging.getLogger("asyncio").addFilter(_abandoned_reads)


_CLOSED_LOOP = "Event loop is closed"


def _without_closed_loops(hook):
    """``hook`` less the reports of Orbax's abandoned array reads and writes: after a failed save
    (a full disk) or restore (a damaged step), each one that completes after Orbax closed its event
    loop is an unraisable "Event loop is closed", and each unfinished read coroutine one with
    TensorStore's whole spec: hundreds of lines. The failure itself reaches the user as one line
    (esmjax.train.checkpoints, esmjax.io.checkpoint.restore_latest)."""

    def unraisable(u) -> None:
        closed = isinstance(u.exc_value, RuntimeError) and str(u.exc_value) == _CLOSED_LOOP
        if not closed and "_read_array_index" not in repr(u.object):
            hook(u)

    return unraisable


def _abandoned_reads(record: logging.LogRecord) -> bool:
    """False for asyncio's "Task/_GatheringFuture exception was never retrieved" of an abandoned
    Orbax array read: a read of a damaged or mismatched step whose task or gathering future is
    collected while Orbax's loop still runs reports there instead of through the unraisable hook,
    with its traceback and TensorStore spec; the restore's own error has already reached the user
    as one line. The message names Orbax only for a task; a gathering future shows it in its
    traceback, so both are searched."""
    text = record.getMessage()
    if "never retrieved" not in text:
        return True
    frames = traceback.extract_tb(record.exc_info[2]) if record.exc_info else []
    return not ("orbax" in text or any("orbax" in frame.filename for frame in frames))


def build_parser(command: str | None) -> argparse.ArgumentParser:
    """The parser; only the chosen subcommand's module is imported to add its options."""
    parser = argparse.ArgumentParser(prog="esmjax", description="ESM-2 / ESMFold in JAX")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, help_text in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == command:
            command_module(name).add_arguments(p)
    _add_verbose(parser, default=False)
    return parser


def _add_verbose(parser: argparse.ArgumentParser, default: object = argparse.SUPPRESS) -> None:
    """``-v/--verbose`` on ``parser`` and every subcommand under it, so that it may come anywhere
    (``esmjax -v data build`` and ``esmjax data build ... -v``). Below the top, its default is
    SUPPRESS: a subparser's default would overwrite a ``-v`` given before the command."""
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        default=default,
        help="also show the INFO lines of absl, Orbax, TFDS and etils",
    )
    for action in parser._actions:  # argparse has no public walk of its subparsers
        if isinstance(action, argparse._SubParsersAction):
            for child in dict.fromkeys(action.choices.values()):  # aliases map to one parser
                _add_verbose(child)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if a in COMMANDS), None)  # after global options
    parser = build_parser(command)
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    _setup_logging(args.verbose)
    try:
        return int(command_module(args.command).main(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except InputError as e:
        print(f"esmjax {args.command}: error: {e}", file=sys.stderr)
        if isinstance(e, StalledWrite):  # do not wait for the stuck writer threads
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(2)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
