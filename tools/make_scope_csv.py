"""Writes a FLIP-style CSV of SCOPe class labels (a/b/c/d) from ``scope_astral40`` (astral.fa and
derived_astral40_labels.tsv), split by superfamily: a superfamily's hash puts all its domains in
test (10%), validation (10%) or train. SCOPe carries no licence text, so the CSV is written
locally for experiments and tests and never bundled.

    python tools/make_scope_csv.py ../shared/data/scope_astral40 runs/scope.csv
"""

import csv
import hashlib
import sys
from pathlib import Path

from esmjax.io.fasta import read_fasta


def main(folder: str, out: str) -> None:
    d = Path(folder)
    labels = {}
    for line in (d / "derived_astral40_labels.tsv").read_text().splitlines()[1:]:
        f = line.split("\t")
        labels[f[0]] = (f[2], f[4])
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["sequence", "target", "set", "validation"])
        for r in read_fasta(d / "astral.fa"):
            cls, superfamily = labels.get(r.id, (None, None))
            if cls not in ("a", "b", "c", "d"):
                continue
            h = int(hashlib.sha256(superfamily.encode()).hexdigest()[:8], 16) % 10
            w.writerow([r.sequence.upper(), cls, "test" if h == 0 else "train", h == 1])


if __name__ == "__main__":
    main(*sys.argv[1:3])
