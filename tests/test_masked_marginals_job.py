"""``esmjax evaluate masked-marginals`` (issue 29: the per-sequence scoring of evaluate as jobs of
units): every substitution's LLR of short CATH domains equals fair-esm's ``ESM2`` on the same random
weights, each position masked in turn (in its ``optimal_window`` crop past ``--window``); two
processes run one after the other, then a rerun that does nothing, give a 1-process run's records,
each once."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from support.data_fixtures import cath_head
from support.reference import fair_esm_model, to_esmjax

from esmjax.cli import main as cli
from esmjax.config import esm2_from_shape
from esmjax.evaluate.marginals import AMINO_ACIDS
from esmjax.evaluate.variants import optimal_window
from esmjax.inference import shards, units
from esmjax.io import checkpoint
from esmjax.io.fasta import read_fasta

SHAPE = (2, 32, 4)  # layers, width, heads
WINDOW = 40  # residues: the 41- to 48-residue records below are scored in crops
RECORDS = 10


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """(fair-esm model, its converted checkpoint, the FASTA, a 1-process run's --out)."""
    d = tmp_path_factory.mktemp("marginals")
    ref = fair_esm_model(*SHAPE, seed=29)
    model = to_esmjax(ref.state_dict(), esm2_from_shape(*SHAPE), "fair-esm")
    ckpt = d / "ck"
    checkpoint.save_converted(ckpt, model.cfg, checkpoint.params_numpy(model))
    short = [r for r in read_fasta(cath_head(d / "c.fa", 400)) if len(r.sequence) <= 48]
    fasta = d / "short.fa"
    fasta.write_text("".join(f">{r.id} CATH\n{r.sequence}\n" for r in short[:RECORDS]))
    out = d / "one"
    assert cli(args(ckpt, fasta, out)) == 0
    return ref, ckpt, fasta, out


def args(ckpt, fasta, out, *extra: str) -> list[str]:
    return [
        *("evaluate", "masked-marginals", "--checkpoint", str(ckpt), "--fasta", str(fasta)),
        *("--out", str(out), "--unit-size", "3", "--window", str(WINDOW)),
        *("--max-tokens-per-batch", "2048", "--no-progress", *extra),
    ]


def records(out) -> list[dict]:
    """Every record of every unit marked done, in unit order."""
    rows = []
    for _, m in sorted(units.read_markers(out, units.done_units(out)).items()):
        for name in m["files"]:
            rows += shards.read_records(out / name)
    return rows


def fair_esm_llr(ref, seq: str) -> tuple[np.ndarray, np.ndarray]:
    """([L, 20] LLR, [L] wild-type log-probability) by fair-esm: one row per masked position, each
    in the ``WINDOW``-residue crop around it."""
    import esm

    alphabet = esm.data.Alphabet.from_architecture("ESM-1b")
    rows, at = [], []
    for i in range(len(seq)):
        start, end = optimal_window(i, len(seq), WINDOW)
        toks = [alphabet.cls_idx, *map(alphabet.get_idx, seq[start:end]), alphabet.eos_idx]
        toks[i - start + 1] = alphabet.mask_idx
        rows.append(toks + [alphabet.padding_idx] * (WINDOW + 2 - len(toks)))
        at.append(i - start + 1)
    with torch.no_grad():
        logits = ref(torch.tensor(rows))["logits"]
    logp = torch.log_softmax(logits[torch.arange(len(seq)), torch.tensor(at)], -1).numpy()
    wt = logp[np.arange(len(seq)), [alphabet.get_idx(a) for a in seq]]
    cols = [alphabet.get_idx(a) for a in AMINO_ACIDS]
    return logp[:, cols] - wt[:, None], wt


def test_llr_matches_fair_esm(job):
    ref, _, fasta, out = job
    got = records(out)
    want = list(read_fasta(fasta))
    assert [r["id"] for r in got] == [r.id for r in want]
    assert [r["index"] for r in got] == list(range(RECORDS))
    assert {r["description"] for r in got} == {f"{r.id} CATH" for r in want}
    assert {bool(r["windowed"]) for r in got} == {True, False}  # both paths are compared
    worst = 0.0
    for g, w in zip(got, want):
        llr, wt = fair_esm_llr(ref, w.sequence)
        assert g["llr"].shape == (len(w.sequence), 20) and g["length"] == len(w.sequence)
        assert g["llr"].dtype == np.float32
        worst = max(worst, np.abs(g["llr"] - llr).max(), np.abs(g["wt_logprob"] - wt).max())
        wild = [(i, AMINO_ACIDS.index(a)) for i, a in enumerate(w.sequence) if a in AMINO_ACIDS]
        assert all(g["llr"][i, a] == 0 for i, a in wild)  # the wild type's column
    assert worst < 1e-5, worst


def test_two_processes_then_rerun_equal_one(job, tmp_path):
    _, ckpt, fasta, one = job
    out = tmp_path / "two"
    for i in (0, 1):
        assert cli(args(ckpt, fasta, out, "--process-id", str(i), "--num-processes", "2")) == 0
        done = units.read_markers(out, units.done_units(out))
        assert {m["process"][0] for m in done.values()} == set(range(i + 1))
    # total.json is the one file every run writes again (the stream was read to its end)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.name != units.TOTAL_FILE}
    assert cli(args(ckpt, fasta, out)) == 0  # every unit is done: nothing is redone
    after = {p: p.stat().st_mtime_ns for p in before}
    assert after == before
    got, want = records(out), records(one)
    assert [r["index"] for r in got] == list(range(RECORDS))  # each record once
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.keys() == w.keys()
        for k in g:
            np.testing.assert_array_equal(g[k], w[k], err_msg=k)
    assert cli(["inspect-outputs", str(out)]) == 0
