"""Test data made from the real data in ../shared/data: datasets built once per test session
(shared by tests/test_data_*.py), the first records of CATH S20, and the fine-tuning tests'
labelled files."""

from __future__ import annotations

import csv
import hashlib
from pathlib import Path

import numpy as np

from esmjax.data.build import build_dataset
from esmjax.io.fasta import read_fasta
from support.shared_paths import SHARED

ROOT = Path(__file__).resolve().parents[2]
CATH_FASTA = SHARED / "cath_s20" / "cath-dataset-nonredundant-S20-v4_3_0.fa"
SCOPE_FASTA = SHARED / "scope_astral40" / "astral.fa"
SCOPE_LABELS = SHARED / "scope_astral40" / "derived_astral40_labels.tsv"
TEM1_SCAN = SHARED / "esm_examples" / "P62593.fasta"

_BUILT: dict[str, Path] = {}


def cath_head(out: Path, n: int) -> Path:
    """The first ``n`` records of the shared CATH S20 FASTA, written to ``out``."""
    with open(out, "w") as f:
        for i, r in enumerate(read_fasta(CATH_FASTA)):
            if i == n:
                break
            f.write(f">{r.id}\n{r.sequence}\n")
    return out


def scope_family_tsv(out: Path) -> Path:
    """SCOPe family -> domain membership (4,583 families, 1 to 156 members): very skewed
    clusters."""
    rows = []
    for line in SCOPE_LABELS.read_text().splitlines()[1:]:
        sid, _, _, _, _, family = line.split("\t")[:6]
        rows.append(f"{family}\t{sid}\n")
    out.write_text("".join(rows))
    return out


def built(tmp_path_factory, name: str) -> Path:
    """``cath``: CATH S20, 2% held out, each record its own cluster. ``scope``: SCOPe ASTRAL 40
    clustered by family, 5% of families held out."""
    if name not in _BUILT:
        base = tmp_path_factory.mktemp(f"data_{name}")
        if name == "cath":
            build_dataset([CATH_FASTA], base / "ds", val_fraction=0.02)
        else:
            tsv = scope_family_tsv(base / "families.tsv")
            build_dataset([SCOPE_FASTA], base / "ds", clusters=tsv, val_fraction=0.05)
        _BUILT[name] = base / "ds"
    return _BUILT[name]


def finetune_inputs(d: Path) -> Path:
    """The fine-tuning tests' labelled data, written to ``d``: a SCOPe-class CSV split by
    superfamily (``scope.csv``), a TEM-1 DMS CSV split by position (``tem1.csv``) and a
    FLIP-layout residue task, hydrophobic or not (``res.fa``, ``res_labels.fa``,
    ``res_mask.fa``)."""
    lab = {}
    for line in SCOPE_LABELS.read_text().splitlines()[1:]:
        f = line.split("\t")
        lab[f[0]] = (f[2], f[4])
    rows, seqs = [], []
    records = list(read_fasta(SCOPE_FASTA))
    np.random.default_rng(0).shuffle(records)
    for r in records:
        c, sf = lab.get(r.id, (None, None))
        if c not in ("a", "b", "c", "d"):
            continue
        h = int(hashlib.sha256(sf.encode()).hexdigest()[:8], 16) % 10
        rows.append((r.sequence.upper(), c, "test" if h == 0 else "train", str(h == 1)))
        seqs.append((r.id, r.sequence.upper()[:60]))
        if len(rows) == 160:
            break
    with open(d / "scope.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["sequence", "target", "set", "validation"])
        w.writerows(rows)
    # TEM-1: held-out positions (every 5th) are the test set
    dms = []
    for r in read_fasta(TEM1_SCAN):
        pos = int("".join(ch for ch in r.id.split("_")[1] if ch.isdigit()))
        dms.append((r.sequence, r.id.split("|")[-1], "test" if pos % 5 == 0 else "train"))
        if len(dms) == 120:
            break
    with open(d / "tem1.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["sequence", "target", "set"])
        w.writerows(dms)
    with (
        open(d / "res.fa", "w") as fs,
        open(d / "res_labels.fa", "w") as fl,
        open(d / "res_mask.fa", "w") as fm,
    ):
        for i, (sid, s) in enumerate(seqs):
            split = "test" if i % 8 == 0 else "train"
            fs.write(f">{sid}\n{s}\n")
            fl.write(f">{sid} SET={split} VALIDATION={i % 8 == 1}\n")
            fl.write("".join("H" if c in "AILMFVWC" else "C" for c in s) + "\n")
            fm.write(f">{sid}\n" + "".join("0" if j < 2 else "1" for j in range(len(s))) + "\n")
    return d
