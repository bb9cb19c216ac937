"""``esmjax evaluate masked-marginals``: the masked-marginal log-likelihood ratio of every single
substitution of every record of FASTA files (a proteome's variant-effect map, as Brandes et al.
2023 computed with ESM-1b), as an inference job (``esmjax.inference.units``: work units, any number
of processes, resumable).

For residue i of a record x, with i masked (Meier et al. 2021, the score of ``evaluate variants``)::

    llr[i, a] = log p(a | x with i masked) - log p(x_i | x with i masked)

for the 20 standard amino acids ``a`` in the order of ``AMINO_ACIDS``; the wild type's column is 0.
The passes are pseudo-perplexity's (``variants.masked_scan``: one forward pass per residue, batched
across the unit's records), read at every amino acid instead of the wild type alone. A residue
outside the 20 (``X``, ``B``, ``U``, ...) is scored against its own token's log-probability.

Each unit's shard (``units/<unit>.parquet``) holds per record ``id``, ``description``, ``index``,
``length`` (residues L), ``llr`` ([L, 20] float32, row i = residue i + 1), ``wt_logprob`` ([L]
float32: log p(x_i | x with i masked), whose sum is minus pseudo-perplexity's ``nll``) and
``windowed`` (whether the record was longer than the window). The schema's metadata holds the
column order (``amino_acids``) and the window.

Long records. ESM-2 was trained on crops of 1024 tokens (1022 residues). A record longer than
``--window`` residues (default 1022) is scored as ``evaluate proteingym`` scores long targets
(ProteinGym's and ESM-1v's ``get_optimal_window``, ``variants.optimal_window``): each position
masked in the ``window``-residue crop centred on it, shifted inside the record at its ends. So a
record costs L passes of at most ``window + 2`` tokens, and no record is refused for its length.
``--window 0`` scores every record whole, as ``evaluate variants`` scores its wild type (past the
training length the model extrapolates, and a pass costs L + 2 tokens).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from esmjax.errors import InputError
from esmjax.evaluate.proteingym import DEFAULT_WINDOW
from esmjax.evaluate.pseudo import PseudoOptions, StopCheck, run_units
from esmjax.evaluate.variants import masked_scan
from esmjax.inference import shards, units
from esmjax.inference.engine import Engine
from esmjax.io import checkpoint
from esmjax.models.alphabet import TOKEN_TO_ID, encode

log = logging.getLogger("esmjax.evaluate.marginals")

AMINO_ACIDS = "ACDEFGHIKLMNPQRSTVWY"  # the columns of ``llr``, in this order
_AA_IDS = np.array([TOKEN_TO_ID[a] for a in AMINO_ACIDS])
COMMAND = "masked-marginals"


@dataclass(frozen=True, kw_only=True)
class MarginalsOptions(PseudoOptions):
    """What ``esmjax evaluate masked-marginals`` scores and where it writes."""

    # a record of L residues is L passes and L x 20 floats: 100 records keep a unit (what a
    # preemption may cost) to minutes on an accelerator
    unit_size: int = 100
    window: int = DEFAULT_WINDOW  # residues per pass (longer records are cropped); 0 = whole

    def __post_init__(self):
        super().__post_init__()
        if self.window != 0 and self.window < 16:
            raise InputError(f"--window {self.window}: 0 (whole records) or at least 16 residues")


def llr_matrix(logp: np.ndarray, sequence: str) -> tuple[np.ndarray, np.ndarray]:
    """([L, 20] LLR of each substitution, [L] wild-type log-probability) from a record's [L, V]
    masked log-probabilities (``variants.masked_scan``), float32."""
    ids = encode(sequence)
    wt = logp[np.arange(len(ids)), ids]
    return (logp[:, _AA_IDS] - wt[:, None]).astype(np.float32), wt.astype(np.float32)


def marginals_unit(
    engine: Engine,
    unit: units.Unit,
    opts: MarginalsOptions,
    stopped: Callable[[], bool] = lambda: False,
) -> units.Result:
    """One unit's shard: every record's LLR map."""
    check = StopCheck(stopped)
    check.update(0)  # a signal before the unit starts
    seqs = [r.sequence for r in unit.records]
    window = opts.window or None
    scan = masked_scan(engine, seqs, window, opts.max_tokens_per_batch, check)
    rows = []
    for i, (rec, logp) in enumerate(zip(unit.records, scan.logprobs)):
        llr, wt = llr_matrix(logp, rec.sequence)
        rows.append(
            {
                "id": rec.id,
                "description": rec.description,
                "index": unit.first + i,
                "length": len(wt),
                "llr": llr,
                "wt_logprob": wt,
                "windowed": window is not None and len(wt) > window,
            }
        )
    meta = {"command": COMMAND, "unit": unit.index, "amino_acids": AMINO_ACIDS}
    files = {units.shard_name(unit.index): shards.shard_bytes(rows, {**meta, "window": window})}
    return units.Result(files, scan.tokens, scan.padded_tokens)


def score_fasta(source: checkpoint.Checkpoint | str, opts: MarginalsOptions) -> None:
    """The job: this process's units not yet done."""
    run_units(
        source,
        opts,
        COMMAND,
        lambda engine, unit, stopped: marginals_unit(engine, unit, opts, stopped),
        window=opts.window,
    )
