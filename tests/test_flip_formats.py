"""FLIP's ``splits/`` files read by ``esmjax finetune`` as they are (esmjax.io.labeled): the CSV,
the sequence-task FASTA (``>ID TARGET=.. SET=.. VALIDATION=..`` + sequence), the residue-task
three files (sequences, label FASTA, mask) and the one-file residue FASTA and CSV (bind's layout):
a few records of each give the same splits and targets as the equivalent CSV; bad headers are one
line naming file and line."""

from __future__ import annotations

import contextlib
import gzip
import io
import json

import pytest

from esmjax.cli import main as cli
from esmjax.config import FinetuneDataConfig
from esmjax.io import labeled

# (sequence, target, set, validation): train, validation, test rows, and a class per sequence
ROWS = [
    ("MKTAYIAKQR", "Nucleus", "train", "False"),
    ("GSHMLEDPVA", "Cytoplasm", "train", "False"),
    ("PEPTIDEKLV", "Nucleus", "train", "True"),
    ("WYFWYFAAAK", "Cytoplasm", "test", "False"),
    ("ACDEFGHIKL", "Nucleus;Cytoplasm", "test", "False"),
]
VALUES = ["1.0", "-0.5", "2.25", "0.0", "3.5"]


def _csv(path, rows):
    lines = ["sequence,target,set,validation", *(",".join(r) for r in rows)]
    path.write_text("\n".join(lines) + "\n")
    return path


def _fasta(rows, wrap: int = 0) -> str:
    """FLIP's FASTA of ``rows``; ``wrap`` splits each sequence over lines of that width."""
    out = []
    for i, (seq, target, s, v) in enumerate(rows):
        body = [seq[j : j + wrap] for j in range(0, len(seq), wrap)] if wrap else [seq]
        out += [f">Sequence{i} TARGET={target} SET={s} VALIDATION={v}", *body]
    return "\n".join(out) + "\n"


def _view(splits):
    return {s: [(ex.sequence, ex.target) for ex in splits[s]] for s in labeled.SPLITS}


def _load(task, **data):
    return labeled.load(FinetuneDataConfig(valid_fraction=0, **data), task)


@pytest.mark.parametrize(
    "task, name, values",
    [
        ("sequence_classification", "sampled.fasta", False),
        ("sequence_regression", "sampled.fasta", True),
        ("sequence_classification", "sampled.fasta.gz", False),
        ("sequence_classification", "sampled.txt", False),  # a FASTA told by its first line
    ],
)
def test_sequence_fasta_reads_as_the_csv(tmp_path, task, name, values):
    rows = [(q, v, s, f) for (q, _, s, f), v in zip(ROWS, VALUES)] if values else ROWS
    text = _fasta(rows, wrap=4)
    fa = tmp_path / name
    fa.write_bytes(gzip.compress(text.encode()) if name.endswith(".gz") else text.encode())
    from_csv, _ = _load(task, csv=str(_csv(tmp_path / "sampled.csv", rows)))
    from_fasta, skipped = _load(task, csv=str(fa))
    assert _view(from_fasta) == _view(from_csv) and not skipped
    assert [len(from_fasta[s]) for s in labeled.SPLITS] == [2, 1, 2]
    assert from_fasta["test"][1].target == ((3.5,) if values else ("Nucleus", "Cytoplasm"))
    assert from_fasta["train"][0].id == "Sequence0" and from_fasta["train"][0].where.endswith(":1")


def test_explicit_split_files_may_be_fastas(tmp_path):
    """``--train/--valid/--test`` FASTAs take their split from the file, as CSVs do."""
    tr, te = tmp_path / "tr.fasta", tmp_path / "te.fa"
    tr.write_text(_fasta(ROWS[:3]))
    te.write_text(">t TARGET=Nucleus\nWYFWYFAAAK\n")  # no SET=: the file gives the split
    splits, _ = _load("sequence_classification", train=str(tr), test=str(te))
    assert [len(splits[s]) for s in labeled.SPLITS] == [3, 0, 1]


def _residue_rows():
    labels = ["HHHHEEEECC", "CCCHHHHHCC", "EEEECCCCHH", "HHHCCCEEEC", "CCCCCHHHHH"]
    return [(q, lab, s, v) for (q, _, s, v), lab in zip(ROWS, labels)]


def test_residue_layouts_read_alike(tmp_path):
    """FLIP's secondary-structure/conservation layout (sequences.fasta + the label FASTA
    sampled.fasta), bind's CSV of label strings, and one FASTA with the labels as TARGET=."""
    rows = _residue_rows()
    seqs = "".join(f">Seq{i}\n{q}\n" for i, (q, *_) in enumerate(rows))
    (tmp_path / "sequences.fasta").write_text(seqs)
    lab = "".join(f">Seq{i} SET={s} VALIDATION={v}\n{t}\n" for i, (_, t, s, v) in enumerate(rows))
    (tmp_path / "sampled.fasta").write_text(lab)
    (tmp_path / "one.fasta").write_text(_fasta(rows, wrap=3))
    three, _ = _load(
        "residue_classification",
        fasta=str(tmp_path / "sequences.fasta"),
        labels=str(tmp_path / "sampled.fasta"),
    )
    from_csv, _ = _load("residue_classification", csv=str(_csv(tmp_path / "bind.csv", rows)))
    one, _ = _load("residue_classification", csv=str(tmp_path / "one.fasta"))
    assert _view(three) == _view(from_csv) == _view(one)
    assert [len(three[s]) for s in labeled.SPLITS] == [2, 1, 2]
    assert three["valid"][0].target == "EEEECCCCHH"


def test_residue_split_files_without_data_fasta_hold_their_sequences(tmp_path):
    """``--train/--test`` of a residue task without data.fasta: one-file CSV/FASTA (bind's
    layout); a mask without data.labels has nothing to pair with and is refused."""
    rows = _residue_rows()
    tr = _csv(tmp_path / "tr.csv", rows[:3])
    (tmp_path / "te.fasta").write_text(_fasta(rows[3:]))
    splits, _ = _load("residue_classification", train=str(tr), test=str(tmp_path / "te.fasta"))
    assert [len(splits[s]) for s in labeled.SPLITS] == [3, 0, 2]
    with pytest.raises(labeled.LabeledDataError, match="data.mask: a mask goes with data.fasta"):
        _load("residue_classification", train=str(tr), mask=str(tr))


@pytest.mark.parametrize(
    "records, fragment",
    [
        (">a SET=train VALIDATION=False\nMKTA\n", r"x\.fasta:1: no TARGET= in the header"),
        (">a TARGET=1 SET=valid VALIDATION=False\nMKTA\n", r"x\.fasta:1: unknown set: 'valid'"),
        (">a TARGET=1 SET=train VALIDATION=maybe\nMKTA\n", r"x\.fasta:1: unknown validation"),
        (
            ">a TARGET=1 SET=train\nMKTA\n>b TARGET=0\nMKTA\n",
            r"x\.fasta:3: unknown set: no SET= in the header \(1 of 2 records",
        ),
        (">a TARGET=HH SET=train\nMKTA\n", r"x\.fasta:1: length mismatch: 2 labels for 4"),
        ("MKTA\n>a TARGET=1\nMKTA\n", r"x\.fasta:1: text before the first '>' header"),
    ],
)
def test_bad_fasta_records_name_file_and_line(tmp_path, records, fragment):
    task = "residue_classification" if "TARGET=HH" in records else "sequence_regression"
    bad = tmp_path / "x.fasta"
    bad.write_text(records)
    with pytest.raises(labeled.LabeledDataError, match=fragment):
        _load(task, csv=str(bad))


def test_skip_invalid_skips_and_counts_bad_records(tmp_path):
    fa = tmp_path / "x.fasta"
    fa.write_text(_fasta(ROWS) + ">bad SET=train VALIDATION=False\nMKTA\n")
    splits, skipped = _load("sequence_classification", csv=str(fa), skip_invalid=True)
    assert sum(len(v) for v in splits.values()) == len(ROWS)
    assert skipped == {"no TARGET= in the header": 1}


def _run(args):
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        return cli(["finetune", "--no-progress", *args])


def test_finetune_runs_on_a_flip_sequence_fasta(tmp_path, ckpt, capsys):
    """End to end: ``--set data.csv=sampled.fasta`` (the issue's refused command) trains, validates
    on the VALIDATION=True records and tests on SET=test; a header without TARGET= is one line."""
    rows = [(q, "1" if i % 2 else "0", s, v) for i, (q, _, s, v) in enumerate(ROWS * 2)]
    fa = tmp_path / "sampled.fasta"
    fa.write_text(_fasta(rows))
    cfg = tmp_path / "c.yaml"
    # the frozen mode (head only) compiles in two thirds of the full mode's time
    cfg.write_text(json.dumps({"num_steps": 2, "log_every": 1, "eval_every": 2, "mode": "frozen"}))
    base = ["--config", str(cfg), "--backbone", str(ckpt), "--set", "data.batch_size=8"]
    assert _run([*base, "--set", f"data.csv={fa}", "--workdir", str(tmp_path / "w")]) == 0
    report = json.loads((tmp_path / "w" / "report.json").read_text())
    assert report["examples"] == {"train": 4, "valid": 2, "test": 4}
    assert report["labels"] == ["0", "1"]
    bad = tmp_path / "bad.fasta"
    bad.write_text(">Sequence0 SET=train VALIDATION=False\nMKTA\n")
    assert _run([*base, "--set", f"data.csv={bad}", "--workdir", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bad.fasta:1: no TARGET= in the header" in err[0], err
