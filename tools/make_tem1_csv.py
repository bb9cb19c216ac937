"""Writes ``data/tem1_dms.csv.gz``: the TEM-1 beta-lactamase DMS of fair-esm's examples
(``examples/variant-prediction/data``; Stiffler et al. 2015, MIT licence via fair-esm) as a
FLIP-style CSV, split by position: every mutation at a position divisible by 5 is ``test``, so
the test set holds positions never seen in training.

    python tools/make_tem1_csv.py ../shared/data/esm_examples/P62593.fasta data/tem1_dms.csv.gz
"""

import csv
import gzip
import io
import re
import sys

from esmjax.io.fasta import read_fasta


def main(src: str, out: str) -> None:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["sequence", "target", "set", "mutation"])
    for r in read_fasta(src):
        _, name, score = r.id.split("|")
        mutation = name.split("_")[-1]
        pos = int(re.sub(r"\D", "", mutation))
        w.writerow([r.sequence, score, "test" if pos % 5 == 0 else "train", mutation])
    with gzip.GzipFile(out, "wb", mtime=0, compresslevel=9) as f:
        f.write(buf.getvalue().encode())


if __name__ == "__main__":
    main(*sys.argv[1:3])
